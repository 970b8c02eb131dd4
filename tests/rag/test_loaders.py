"""Loaders on real files: detection by content, extraction of each format, the hostile files an
upload endpoint meets, and every parse bound."""

from __future__ import annotations

import gzip
import io
import os
import tracemalloc
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from fpdf.enums import EncryptionMethod

from impl.errors import (
    DocumentTooLarge,
    RagapiError,
    UnreadableDocument,
    UnsupportedMediaType,
)
from impl.rag.loaders import (
    DOCX,
    HTML,
    MARKDOWN,
    PDF,
    SUPPORTED_MEDIA_TYPES,
    TEXT,
    ExtractedText,
    ParseLimits,
    detect_media_type,
    extract_text,
)
from impl.settings import Settings
from tests.documents import (
    CORPUS,
    HTML_CHROME_TEXT,
    HTML_SCRIPT_TEXT,
    HTML_STYLE_TEXT,
    make_corrupt_pdf,
    make_docx,
    make_docx_bomb,
    make_encrypted_pdf,
    make_html,
    make_image_pdf,
    make_lying_docx,
    make_markdown,
    make_pdf,
    make_png,
    make_text,
    make_zip_not_docx,
)

LIMITS = ParseLimits(
    max_pdf_pages=2000,
    max_unzipped_bytes=100 * 1024 * 1024,
    max_extracted_chars=5_000_000,
    max_parse_seconds=60.0,
)
PARAGRAPHS = CORPUS["saturn"].paragraphs
MARKDOWN_WITHOUT_NAME = (
    b"# Release notes\n\n- faster start\n- fewer bugs\n\nSee [the docs](https://example.org).\n"
)


def load(content: bytes, filename: str | None = None, limits: ParseLimits = LIMITS) -> str:
    return extract_text(content, detect_media_type(content, filename), limits).text


def assert_user_facing(error: RagapiError) -> None:
    """A detail a user can read: a sentence about the file, nothing about our insides."""
    detail = error.detail
    assert detail and detail[0].islower()
    for leak in ("Traceback", "Error", "pypdf", "zipfile", "lxml", "docx.", "/tmp", "\\", "0x"):
        assert leak not in detail, detail


# ------------------------------------------------------------------------------ detection


def test_supported_media_types_are_the_five_formats() -> None:
    assert set(SUPPORTED_MEDIA_TYPES) == {PDF, DOCX, HTML, MARKDOWN, TEXT}


@pytest.mark.parametrize(
    ("content", "filename", "declared", "expected"),
    [
        (make_pdf(PARAGRAPHS), "report.pdf", PDF, PDF),
        (make_docx(PARAGRAPHS), "report.docx", DOCX, DOCX),
        (make_html("Saturn", PARAGRAPHS), "saturn.html", HTML, HTML),
        (make_markdown("Saturn", PARAGRAPHS), "saturn.md", None, MARKDOWN),
        (make_markdown("Saturn", PARAGRAPHS), "notes", "text/markdown", MARKDOWN),
        (make_text(PARAGRAPHS), "saturn.txt", TEXT, TEXT),
        (MARKDOWN_WITHOUT_NAME, None, None, MARKDOWN),
        (b"<p>A fragment with <b>bold</b> and <a href='#'>a link</a>.</p>", None, None, HTML),
        (b'<?xml version="1.0"?>\n<html><body><p>XHTML</p></body></html>', None, None, HTML),
    ],
    ids=["pdf", "docx", "html", "md-name", "md-declared", "text", "md-shape", "fragment", "xhtml"],
)
def test_each_type_is_detected(
    content: bytes, filename: str | None, declared: str | None, expected: str
) -> None:
    assert detect_media_type(content, filename, declared) == expected


@pytest.mark.parametrize(
    ("content", "filename", "declared", "expected"),
    [
        (make_pdf(PARAGRAPHS), "notes.txt", TEXT, PDF),
        (make_docx(PARAGRAPHS), "scan.pdf", PDF, DOCX),
        (make_html("Saturn", PARAGRAPHS), "page.txt", TEXT, HTML),
        (make_html("Saturn", PARAGRAPHS), "page.md", MARKDOWN, HTML),
        (make_text(PARAGRAPHS), "evil.pdf", PDF, TEXT),
        (make_text(PARAGRAPHS), "page.html", HTML, TEXT),
        (make_text(PARAGRAPHS), "letter.docx", DOCX, TEXT),
    ],
    ids=["pdf-as-txt", "docx-as-pdf", "html-as-txt", "html-as-md", "txt-as-pdf", "txt-as-html",
         "txt-as-docx"],
)  # fmt: skip
def test_content_decides_over_a_misleading_name_or_type(
    content: bytes, filename: str, declared: str, expected: str
) -> None:
    assert detect_media_type(content, filename, declared) == expected


def test_a_readme_opening_with_html_tags_stays_markdown() -> None:
    readme = (
        b'<p align="center"><img src="logo.png" alt="logo"></p>\n'
        b'<h1 align="center">ragapi</h1>\n<p align="center"><b>Ask your documents.</b></p>\n\n'
        b"## Install\n\n- `pip install ragapi`\n"
    )
    assert detect_media_type(readme, "README.md") == MARKDOWN
    assert detect_media_type(readme, None) == HTML


def test_text_that_talks_about_html_tags_is_not_html() -> None:
    tutorial = b"Writing pages\n\nEvery page has a <head> and a <body>; the <body> holds text.\n"
    assert detect_media_type(tutorial, "notes.txt") == TEXT


def test_a_page_opening_with_a_comment_is_html() -> None:
    page = b"<!-- generated -->\n<!DOCTYPE html><html><body><p>Hello</p></body></html>"
    assert detect_media_type(page, "page.md", MARKDOWN) == HTML


def test_plain_notes_with_a_dash_list_stay_plain_text() -> None:
    notes = b"Shopping\n\n- eggs\n- flour\n\nCall the baker before noon.\n"
    assert detect_media_type(notes, "notes.txt") == TEXT


@pytest.mark.parametrize(
    ("content", "looks_like"),
    [
        (make_png(), "PNG image"),
        (make_zip_not_docx(), "ZIP archive"),
        (b"\x7fELF\x02\x01\x01\x00" + bytes(64), "executable"),
        (gzip.compress(b"hello " * 100), "gzip archive"),
        (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(512), "legacy Microsoft Office"),
        (os.urandom(4096) + b"\x00", "binary data"),
        ("Grüße aus Köln, schöne Straße".encode("latin-1"), "encoding other than UTF-8"),
        (b"{\\rtf1\\ansi Hello}", "RTF document"),
        (b'<svg xmlns="http://www.w3.org/2000/svg"><circle r="4"/></svg>', "SVG image"),
    ],
    ids=["png", "zip", "elf", "gzip", "ole", "random", "latin1", "rtf", "svg"],
)
def test_unsupported_files_are_refused_saying_what_they_look_like(
    content: bytes, looks_like: str
) -> None:
    with pytest.raises(UnsupportedMediaType) as caught:
        detect_media_type(content, "upload.pdf", PDF)
    assert looks_like in caught.value.detail
    assert "PDF, Word (.docx), HTML, Markdown and plain text" in caught.value.detail
    assert_user_facing(caught.value)


def test_other_office_zips_are_named() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("[Content_Types].xml", "<Types/>")
        archive.writestr("xl/workbook.xml", "<workbook/>")
    with pytest.raises(UnsupportedMediaType, match=r"an Excel workbook \(\.xlsx\)"):
        detect_media_type(buffer.getvalue(), "budget.docx")


@pytest.mark.parametrize("content", [b"", b"   \n\t\r\n  ", "  \n".encode("utf-16")])
def test_empty_files_are_unreadable(content: bytes) -> None:
    with pytest.raises(UnreadableDocument) as caught:
        detect_media_type(content, "empty.txt")
    assert caught.value.detail == "the file is empty"


def test_text_in_utf8_with_bom_and_utf16_is_read() -> None:
    text = "Café au lait, naïve façade."
    for content in (b"\xef\xbb\xbf" + text.encode(), text.encode("utf-16"), text.encode()):
        assert detect_media_type(content, None) == TEXT
        assert extract_text(content, TEXT, LIMITS).text == text


# ------------------------------------------------------------------------------ PDF


def test_pdf_pages_are_joined_and_numbered() -> None:
    pages = ["Alpha is on the first page.", "Bravo is on the second page.", "Charlie third."]
    extracted = extract_text(make_pdf(pages), PDF, LIMITS)
    assert extracted.text == "\n\n".join(pages)
    assert extracted.page_starts == [0, 29, 59]
    for number, marker in enumerate(("Alpha", "Bravo", "Charlie"), start=1):
        offset = extracted.text.index(marker)
        assert extracted.page_at(offset) == number
        assert extracted.page_at(offset + len(marker) - 1) == number


def test_pdf_page_numbers_count_blank_pages() -> None:
    extracted = extract_text(make_pdf(["First words.", "", "Third page words."]), PDF, LIMITS)
    assert extracted.page_at(extracted.text.index("Third")) == 3
    assert extracted.page_at(0) == 1


def test_pdf_with_a_user_password_is_refused() -> None:
    content = make_encrypted_pdf(user_password="secret")
    assert detect_media_type(content, "locked.pdf") == PDF
    with pytest.raises(UnreadableDocument) as caught:
        extract_text(content, PDF, LIMITS)
    assert caught.value.detail == "the PDF is password-protected"


@pytest.mark.parametrize("method", [EncryptionMethod.RC4, EncryptionMethod.AES_256])
def test_pdf_encrypted_without_a_user_password_is_read(method: EncryptionMethod) -> None:
    # Such a PDF only restricts printing or copying; every viewer opens it without asking.
    # AES, the usual method today, needs the cryptography package.
    content = make_encrypted_pdf("Quarterly results are up.", user_password="", method=method)
    assert extract_text(content, PDF, LIMITS).text == "Quarterly results are up."


def test_pdf_of_scanned_images_has_no_extractable_text() -> None:
    with pytest.raises(UnreadableDocument) as caught:
        extract_text(make_image_pdf(), PDF, LIMITS)
    assert caught.value.detail == "the PDF has no extractable text (scanned images?)"


def test_pdf_of_blank_pages_has_no_extractable_text() -> None:
    with pytest.raises(UnreadableDocument, match="no extractable text"):
        extract_text(make_pdf(["", ""]), PDF, LIMITS)


def test_corrupt_pdf_is_unreadable() -> None:
    content = make_corrupt_pdf()
    assert detect_media_type(content, "broken.pdf") == PDF
    with pytest.raises(UnreadableDocument) as caught:
        extract_text(content, PDF, LIMITS)
    assert caught.value.detail == "the PDF is damaged and cannot be read"
    assert_user_facing(caught.value)


def test_truncated_pdf_is_unreadable() -> None:
    content = make_pdf(PARAGRAPHS)
    with pytest.raises(UnreadableDocument, match="damaged"):
        extract_text(content[: len(content) // 3], PDF, LIMITS)


# ------------------------------------------------------------------------------ DOCX


def test_docx_paragraphs_and_table_cells_are_extracted_in_order() -> None:
    table = [["Moon", "Diameter"], ["Titan", "5150 km"], ["Enceladus", "504 km"]]
    text = extract_text(make_docx(PARAGRAPHS, table), DOCX, LIMITS).text
    assert text.split("\n\n")[:3] == PARAGRAPHS
    assert text.endswith("Moon | Diameter\nTitan | 5150 km\nEnceladus | 504 km")


def test_docx_truncated_is_unreadable() -> None:
    content = make_docx(PARAGRAPHS)
    truncated = content[: len(content) // 2]
    with pytest.raises(UnreadableDocument) as caught:
        detect_media_type(truncated, "memo.docx")
    assert_user_facing(caught.value)
    with pytest.raises(UnreadableDocument, match="the Word document is damaged"):
        extract_text(truncated, DOCX, LIMITS)


def test_docx_with_broken_xml_is_unreadable() -> None:
    original = zipfile.ZipFile(io.BytesIO(make_docx(PARAGRAPHS)))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as damaged:
        for item in original.infolist():
            data = original.read(item.filename)
            if item.filename == "word/document.xml":
                data = data[: len(data) // 2]
            damaged.writestr(item, data)
    content = buffer.getvalue()
    assert detect_media_type(content, "memo.docx") == DOCX
    with pytest.raises(UnreadableDocument) as caught:
        extract_text(content, DOCX, LIMITS)
    assert caught.value.detail == "the Word document is damaged and cannot be read"


def test_docx_bomb_past_the_unzipped_limit_is_too_large() -> None:
    limits = ParseLimits(2000, 8 * 1024 * 1024, 5_000_000, 60.0)
    with pytest.raises(DocumentTooLarge) as caught:
        extract_text(make_docx_bomb(16 * 1024 * 1024), DOCX, limits)
    assert "unpacks to" in caught.value.detail
    assert "8,388,608" in caught.value.detail
    assert_user_facing(caught.value)


def test_docx_bomb_under_the_limit_is_caught_by_its_compression_ratio() -> None:
    with pytest.raises(DocumentTooLarge, match="zip bomb"):
        extract_text(make_docx_bomb(4 * 1024 * 1024), DOCX, LIMITS)


@pytest.mark.parametrize("matching_crc", [False, True], ids=["crc-of-all", "crc-of-declared"])
def test_a_docx_that_lies_about_its_size_is_never_inflated(matching_crc: bool) -> None:
    # 256 MiB of "A" declared as 5,000 bytes. With the CRC of the declared prefix, reading the
    # declared bytes succeeds: only a reader that inflates the whole part meets the rest.
    content = make_lying_docx(256 * 1024 * 1024, matching_crc=matching_crc)
    tracemalloc.start()
    try:
        assert detect_media_type(content, "memo.docx") == DOCX
        with pytest.raises(UnreadableDocument, match="damaged"):
            extract_text(content, DOCX, LIMITS)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024


def test_a_docx_packed_with_another_compression_is_refused() -> None:
    # bzip2 and lzma parts inflate without a bound per read; Word never writes them.
    source = zipfile.ZipFile(io.BytesIO(make_docx(PARAGRAPHS)))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_BZIP2) as repacked:
        for item in source.infolist():
            repacked.writestr(item.filename, source.read(item.filename))
    with pytest.raises(UnreadableDocument, match="compression Word does not use"):
        extract_text(buffer.getvalue(), DOCX, LIMITS)


def test_ordinary_docx_passes_the_zip_checks() -> None:
    paragraphs = [f"Paragraph {i}: " + " ".join(PARAGRAPHS) for i in range(300)]
    text = extract_text(make_docx(paragraphs), DOCX, LIMITS).text
    assert text.count("Paragraph ") == 300


# ------------------------------------------------------------------------------ HTML


def test_html_keeps_the_content_and_drops_code_styles_and_chrome() -> None:
    text = load(make_html("Moons & rings", PARAGRAPHS), "saturn.html")
    assert text == "\n\n".join(["Moons & rings", *PARAGRAPHS])
    for hidden in (HTML_SCRIPT_TEXT, HTML_STYLE_TEXT, *HTML_CHROME_TEXT):
        assert hidden not in text


def test_html_drops_menus_marked_by_class_or_role_but_keeps_a_menu_of_content() -> None:
    page = b"""<html><body>
      <div class="menu mainmenu"><ul><li><a href="/">Home</a><li><a href="/docs">Docs</a>
        <li><a href="/buy">Purchase</a></ul></div>
      <div role="navigation"><a href="/a">Previous page</a> | <a href="/b">Next page</a></div>
      <form action="search"><select name="s"><option>Search Documentation</option></select>
        <input type="text" name="q" value="query text"></form>
      <h1>Write-Ahead Logging</h1>
      <p>Readers do not block writers and a writer does not block readers.</p>
      <div class="menu"><h2>Lunch menu</h2><p>Soup of the day, bread and butter.</p></div>
    </body></html>"""
    text = load(page, "wal.html")
    assert text.splitlines()[0] == "Write-Ahead Logging"
    for chrome in ("Home", "Purchase", "Next page", "Search Documentation", "query text"):
        assert chrome not in text
    assert "Readers do not block writers" in text
    assert "Lunch menu" in text and "Soup of the day" in text


def test_html_blocks_lines_cells_and_entities() -> None:
    page = b"""<html><body>
      <h2>Fruit&nbsp;prices</h2>
      <p>Apples   and
         pears are &lt;cheap&gt; &amp; fresh.<br>Order today.</p>
      <ul><li>one</li><li>two</li></ul>
      <table><tr><th>Fruit</th><th>Price</th></tr><tr><td>Apple</td><td>1.20</td></tr></table>
      <!-- a comment nobody should see -->
      <template><p>never rendered</p></template>
      <noscript>Enable JavaScript</noscript>
    </body></html>"""
    text = load(page)
    assert text == (
        "Fruit prices\n\nApples and pears are <cheap> & fresh.\nOrder today.\n\n"
        "one\ntwo\n\nFruit | Price\nApple | 1.20"
    )


def test_html_prefers_the_main_element() -> None:
    page = (
        b"<html><body><div class='sidebar'>Sidebar links</div>"
        b"<main><p>The real article.</p></main></body></html>"
    )
    assert load(page) == "The real article."


def test_html_of_only_scripts_holds_no_text() -> None:
    page = b"<html><head><script>var x = 1;</script></head><body><script>run()</script></body>"
    with pytest.raises(UnreadableDocument, match="no text"):
        load(page)


# ------------------------------------------------------------------------------ text


def test_markdown_and_text_are_decoded_with_newlines_normalised() -> None:
    content = b"# Title\r\n\r\nFirst line\rsecond line\r\n"
    assert extract_text(content, MARKDOWN, LIMITS).text == "# Title\n\nFirst line\nsecond line\n"
    assert extract_text(content, TEXT, LIMITS).text == "# Title\n\nFirst line\nsecond line\n"


def test_markdown_text_is_kept_as_written() -> None:
    assert load(make_markdown("Saturn", PARAGRAPHS), "saturn.md") == (
        "# Saturn\n\n" + "\n\n".join(PARAGRAPHS) + "\n"
    )


def test_text_without_letters_or_digits_is_unreadable() -> None:
    with pytest.raises(UnreadableDocument) as caught:
        load(b"... --- !!! ???\n\n***")
    assert caught.value.detail == "the document holds no text (no letters or digits)"


def test_unsupported_media_type_is_refused_by_extract() -> None:
    with pytest.raises(UnsupportedMediaType, match="image/png"):
        extract_text(make_png(), "image/png", LIMITS)


# ------------------------------------------------------------------------------ bounds


def test_pdf_with_more_pages_than_allowed_is_too_large() -> None:
    limits = ParseLimits(2, LIMITS.max_unzipped_bytes, 5_000_000, 60.0)
    with pytest.raises(DocumentTooLarge) as caught:
        extract_text(make_pdf(["one", "two", "three"]), PDF, limits)
    assert caught.value.detail == "the PDF has 3 pages; at most 2 are read"
    assert extract_text(make_pdf(["one", "two"]), PDF, limits).text == "one\n\ntwo"


BUILDERS: dict[str, Callable[[list[str]], bytes]] = {
    PDF: make_pdf,
    DOCX: make_docx,
    HTML: lambda paragraphs: make_html("Title", paragraphs),
    MARKDOWN: lambda paragraphs: make_markdown("Title", paragraphs),
    TEXT: make_text,
}


@pytest.mark.parametrize("media_type", list(BUILDERS))
def test_text_longer_than_allowed_is_too_large(media_type: str) -> None:
    content = BUILDERS[media_type](PARAGRAPHS * 4)
    full = extract_text(content, media_type, LIMITS).text
    limits = ParseLimits(2000, LIMITS.max_unzipped_bytes, len(full) - 1, 60.0)
    with pytest.raises(DocumentTooLarge) as caught:
        extract_text(content, media_type, limits)
    assert (
        caught.value.detail == f"the document holds more than {len(full) - 1:,} characters of text"
    )
    exact = ParseLimits(2000, LIMITS.max_unzipped_bytes, len(full), 60.0)
    assert extract_text(content, media_type, exact).text == full


@pytest.mark.parametrize("media_type", [PDF, DOCX, HTML])
def test_parsing_past_the_deadline_is_too_large(media_type: str) -> None:
    content = BUILDERS[media_type]([f"Page {i}. " + PARAGRAPHS[i % 3] for i in range(40)])
    limits = ParseLimits(2000, LIMITS.max_unzipped_bytes, 5_000_000, 1e-6)
    with pytest.raises(DocumentTooLarge) as caught:
        extract_text(content, media_type, limits)
    assert caught.value.detail == "reading the document took longer than 1e-06 seconds"


def test_limits_come_from_settings() -> None:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        max_pdf_pages=7,
        max_unzipped_bytes=1234,
        max_extracted_chars=99,
        max_parse_seconds=2.5,
        data_dir=Path("unused"),
    )
    assert ParseLimits.from_settings(settings) == ParseLimits(7, 1234, 99, 2.5)


# ------------------------------------------------------------------------------ titles


def title_of(content: bytes, filename: str) -> str | None:
    return extract_text(content, detect_media_type(content, filename), LIMITS).title


def test_each_format_gives_the_title_it_holds() -> None:
    assert title_of(make_html("The moons of Saturn", PARAGRAPHS), "x.html") == (
        "The moons of Saturn"
    )
    assert title_of(make_pdf(PARAGRAPHS, title="Saturn, a survey"), "x.pdf") == ("Saturn, a survey")
    assert title_of(make_docx(PARAGRAPHS, title="Notes on Saturn"), "x.docx") == ("Notes on Saturn")
    assert title_of(make_markdown("Saturn's rings", PARAGRAPHS), "x.md") == "Saturn's rings"


def test_documents_without_a_title_give_none() -> None:
    assert title_of(make_pdf(PARAGRAPHS), "x.pdf") is None
    assert title_of(make_docx(PARAGRAPHS), "x.docx") is None
    assert title_of(make_text(PARAGRAPHS), "x.txt") is None
    page = b"<!DOCTYPE html><html><body><p>" + PARAGRAPHS[0].encode() + b"</p></body></html>"
    assert title_of(page, "x.html") is None


def test_markdown_title_is_the_first_level_one_heading_outside_code() -> None:
    notes = (
        "Intro line.\n\n## Setup\n\n```sh\n# install it first\npip install x\n```\n\n"
        "# Release notes #\n\n# Later heading\n"
    )
    assert title_of(notes.encode(), "notes.md") == "Release notes"
    assert title_of(b"## Only a section\n\nText here.\n", "notes.md") is None


def test_unpaged_text_has_no_page_numbers() -> None:
    assert ExtractedText("some text", None).page_at(3) is None
