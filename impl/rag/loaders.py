"""Uploaded bytes to plain text: PDF (pypdf), Word .docx (python-docx), HTML (BeautifulSoup on
lxml), Markdown and plain text.

The type is decided by the content, never by the file name or the client's claim, and every
parse is bounded (pages, unpacked size, characters, seconds), because uploads are untrusted.
Error details are shown to the API's users: they say what is wrong with the file in plain words
and never carry paths, stack traces or library internals.
"""

from __future__ import annotations

import bisect
import io
import logging
import re
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from impl.errors import DocumentTooLarge, UnreadableDocument, UnsupportedMediaType
from impl.settings import Settings

if TYPE_CHECKING:
    import pypdf
    from bs4 import BeautifulSoup
    from bs4.element import NavigableString, Tag
    from docx.table import Table

# pypdf, python-docx and BeautifulSoup are imported by the functions that read each format:
# documents are read only in the parsing processes (parsing.py preloads these modules into
# their forkserver), and the server process would otherwise hold about 25 MB of them unused.
PARSER_MODULES = ("pypdf", "docx", "docx.table", "bs4", "bs4.element")

logger = logging.getLogger(__name__)

PDF = "application/pdf"
DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
HTML = "text/html"
MARKDOWN = "text/markdown"
TEXT = "text/plain"
SUPPORTED_MEDIA_TYPES: tuple[str, ...] = (PDF, DOCX, HTML, MARKDOWN, TEXT)

_SUPPORTED_IN_WORDS = "PDF, Word (.docx), HTML, Markdown and plain text (UTF-8)"

# Deflate tops out near 1:1000; real .docx parts compress about 1:10. A part that unpacks this
# much better than that is padding built to exhaust memory, whatever the total says.
_MAX_COMPRESSION_RATIO = 100
_RATIO_CHECK_MIN_BYTES = 1024 * 1024
_UNZIP_PIECE_BYTES = 64 * 1024


@dataclass(frozen=True)
class ParseLimits:
    max_pdf_pages: int
    max_unzipped_bytes: int
    max_extracted_chars: int
    max_parse_seconds: float

    @classmethod
    def from_settings(cls, settings: Settings) -> ParseLimits:
        return cls(
            max_pdf_pages=settings.max_pdf_pages,
            max_unzipped_bytes=settings.max_unzipped_bytes,
            max_extracted_chars=settings.max_extracted_chars,
            max_parse_seconds=settings.max_parse_seconds,
        )


@dataclass(frozen=True)
class ExtractedText:
    text: str
    # For PDF: the offset in ``text`` where page i+1 begins (so page_starts[0] == 0); None for
    # formats without pages.
    page_starts: list[int] | None
    # The title the document gives itself: HTML's <title>, a PDF's or a Word document's
    # metadata, Markdown's first level-1 heading; None when it gives none.
    title: str | None = None

    def page_at(self, offset: int) -> int | None:
        """The 1-based page holding the character at ``offset``; None for unpaged formats."""
        if self.page_starts is None:
            return None
        return max(1, bisect.bisect_right(self.page_starts, offset))


# --------------------------------------------------------------------------- detection

# (magic bytes at offset 0, what the file is, in words for the user)
_BINARY_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"\x00\x00\x01\x00", "an icon image"),
    (b"\x7fELF", "an executable program"),
    (b"MZ", "a Windows program"),
    (b"\xcf\xfa\xed\xfe", "an executable program"),
    (b"\xfe\xed\xfa\xcf", "an executable program"),
    (b"\xca\xfe\xba\xbe", "a compiled program"),
    (b"\x00asm", "a WebAssembly program"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "a legacy Microsoft Office file (.doc, .xls or .ppt)"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"BZh", "a bzip2 archive"),
    (b"\xfd7zXZ\x00", "an xz archive"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
    (b"Rar!\x1a\x07", "a RAR archive"),
    (b"\x28\xb5\x2f\xfd", "a zstd archive"),
    (b"SQLite format 3\x00", "an SQLite database"),
    (b"OggS", "an audio or video file"),
    (b"fLaC", "an audio file"),
    (b"ID3", "an MP3 audio file"),
    (b"\x1aE\xdf\xa3", "a video file"),
)

# Inside a zip: the part that marks each Office Open XML / OpenDocument flavour.
_ZIP_KINDS: tuple[tuple[str, str], ...] = (
    ("xl/workbook.xml", "an Excel workbook (.xlsx)"),
    ("ppt/presentation.xml", "a PowerPoint presentation (.pptx)"),
    ("META-INF/container.xml", "an EPUB book"),
)

_MARKDOWN_SUFFIXES = (".md", ".markdown", ".mdown", ".mkd")
_MARKDOWN_TYPES = ("text/markdown", "text/x-markdown")

# A page opens with its skeleton, after at most an XML declaration and comments; text that only
# mentions <body> somewhere (a Markdown tutorial) is not a page.
_HTML_PAGE = re.compile(
    r"(?:<\?xml[^>]*>\s*)?(?:<!--.*?-->\s*)*(?:<!doctype\s+html|<html[\s>]|<head[\s>]|<body[\s>])",
    re.IGNORECASE | re.DOTALL,
)
_HTML_ELEMENT = re.compile(
    r"<(p|div|span|a|h[1-6]|ul|ol|li|table|tr|td|th|br|em|strong|b|i|section|article|main|"
    r"header|footer|nav|title|meta|link|script|style|img|form|blockquote|pre|code)(\s[^<>]*)?/?>",
    re.IGNORECASE,
)
_HTML_CLOSE = re.compile(r"</[a-z][a-z0-9]*\s*>", re.IGNORECASE)
_MD_HEADING = re.compile(r"^#{1,6}[ \t]+\S", re.MULTILINE)
_MD_LIST = re.compile(r"^[ \t]*(?:[-*+]|\d{1,3}[.)])[ \t]+\S", re.MULTILINE)
_MD_LINK = re.compile(r"!?\[[^\]\n]+\]\([^)\s]+[^)]*\)")
_MD_FENCE = re.compile(r"^[ \t]*(?:```|~~~)", re.MULTILINE)
# C0 controls other than tab, newline, form feed and carriage return, and DEL.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")
_SNIFF_CHARS = 64 * 1024
_LETTER_OR_DIGIT = re.compile(r"[^\W_]")
_PAGE_SEPARATOR = "\n\n"
_MARKDOWN_H1 = re.compile(r"^ {0,3}#[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*$")


def detect_media_type(content: bytes, filename: str | None, declared: str | None = None) -> str:
    """One of SUPPORTED_MEDIA_TYPES, decided by the bytes. The file name and the declared type
    only choose Markdown for text that could be Markdown, plain text or an HTML fragment (a
    README.md may open with a few HTML tags)."""
    if content[:1024].lstrip(b" \t\r\n\f").startswith(b"%PDF-"):
        return PDF
    if content.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return _detect_zip(content)
    text = _decode(content)
    if text is None or _mostly_controls(text[:_SNIFF_CHARS]):
        raise _unsupported(_binary_kind(content))
    if not text.strip():
        raise UnreadableDocument("the file is empty")
    sample = text[:_SNIFF_CHARS]
    stripped = sample.lstrip()
    if stripped.startswith("{\\rtf"):
        raise _unsupported("an RTF document")
    if stripped[:5].lower() == "<svg " or (stripped.startswith("<?xml") and "<svg" in sample):
        raise _unsupported("an SVG image")
    if _HTML_PAGE.match(stripped):
        return HTML
    if _says_markdown(filename, declared):
        return MARKDOWN
    if _is_html_fragment(stripped):
        return HTML
    if _looks_like_markdown(sample):
        return MARKDOWN
    return TEXT


def _mostly_controls(sample: str) -> bool:
    # A stray escape code is tolerable in a text file; text made of them is not text.
    return len(_CONTROL.findall(sample)) > len(sample) // 100 + 2


def _binary_kind(content: bytes) -> str:
    for magic, kind in _BINARY_SIGNATURES:
        if content.startswith(magic):
            return kind
    if content.startswith(b"RIFF") or content[4:8] == b"ftyp":
        return "an image, audio or video file"
    return "binary data, or text in an encoding other than UTF-8"


def _detect_zip(content: bytes) -> str:
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as archive:
            names = set(archive.namelist())
            mimetype = _read_start(archive, "mimetype", 100) if "mimetype" in names else b""
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as exc:
        raise UnreadableDocument(
            "the file looks like a ZIP archive (a .docx is one) but it is damaged"
        ) from exc
    if "word/document.xml" in names:
        return DOCX
    for part, kind in _ZIP_KINDS:
        if part in names:
            raise _unsupported(kind)
    if mimetype.startswith(b"application/vnd.oasis.opendocument"):
        raise _unsupported("an OpenDocument file (save it as .docx or PDF)")
    raise _unsupported("a ZIP archive")


def _read_start(archive: zipfile.ZipFile, name: str, size: int) -> bytes:
    # Not archive.read(): it inflates the whole part before anything is cut off.
    with archive.open(name) as part:
        return part.read(size)


def _unsupported(kind: str) -> UnsupportedMediaType:
    return UnsupportedMediaType(f"the file looks like {kind}; ragapi reads {_SUPPORTED_IN_WORDS}")


def _decode(content: bytes) -> str | None:
    """The text of UTF-8 bytes (with or without a BOM) or of UTF-16/32 with a BOM; None when the
    bytes are not text in those encodings."""
    if content.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):
        encoding = "utf-32"
    elif content.startswith((b"\xff\xfe", b"\xfe\xff")):
        encoding = "utf-16"
    elif content.startswith(b"\xef\xbb\xbf"):
        encoding = "utf-8-sig"
    elif b"\x00" in content:
        # UTF-8 text never holds NUL; UTF-16 without a BOM is too rare to guess at.
        return None
    else:
        encoding = "utf-8"
    try:
        return content.decode(encoding)
    except UnicodeDecodeError:
        return None


def _is_html_fragment(stripped: str) -> bool:
    # Markup without the page skeleton: text that opens with a tag and carries a real structure
    # of known elements, closing tags included.
    return (
        stripped.startswith("<")
        and len(_HTML_ELEMENT.findall(stripped)) >= 3
        and len(_HTML_CLOSE.findall(stripped)) >= 2
    )


def _says_markdown(filename: str | None, declared: str | None) -> bool:
    if filename and filename.lower().endswith(_MARKDOWN_SUFFIXES):
        return True
    return declared is not None and declared.split(";")[0].strip().lower() in _MARKDOWN_TYPES


def _looks_like_markdown(sample: str) -> bool:
    # A dash list alone is common in plain notes; two kinds of Markdown syntax are not.
    kinds = sum(bool(p.search(sample)) for p in (_MD_HEADING, _MD_LIST, _MD_LINK, _MD_FENCE))
    return kinds >= 2


# --------------------------------------------------------------------------- extraction


class _Budget:
    """The bounds of one extraction: the deadline and the character allowance."""

    def __init__(self, limits: ParseLimits) -> None:
        self.limits = limits
        self.deadline = time.monotonic() + limits.max_parse_seconds
        self.chars = 0

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise DocumentTooLarge(
                f"reading the document took longer than {self.limits.max_parse_seconds:g} seconds"
            )

    def add(self, text: str) -> None:
        self.chars += len(text)
        self.check_chars(self.chars)

    def check_chars(self, count: int) -> None:
        if count > self.limits.max_extracted_chars:
            raise DocumentTooLarge(
                f"the document holds more than {self.limits.max_extracted_chars:,} characters "
                "of text"
            )


def extract_text(content: bytes, media_type: str, limits: ParseLimits) -> ExtractedText:
    """The document's text, within ``limits``. Raises UnreadableDocument for damaged, locked or
    text-less files and DocumentTooLarge when a bound is passed."""
    extractors: dict[str, Callable[[bytes, _Budget], ExtractedText]] = {
        PDF: _extract_pdf,
        DOCX: _extract_docx,
        HTML: _extract_html,
        MARKDOWN: _extract_markdown,
        TEXT: _extract_plain,
    }
    extractor = extractors.get(media_type)
    if extractor is None:
        raise UnsupportedMediaType(f"ragapi reads {_SUPPORTED_IN_WORDS}, not {media_type}")
    budget = _Budget(limits)
    extracted = extractor(content, budget)
    budget.check_chars(len(extracted.text))
    if not _LETTER_OR_DIGIT.search(extracted.text):
        if media_type == PDF:
            raise UnreadableDocument("the PDF has no extractable text (scanned images?)")
        raise UnreadableDocument("the document holds no text (no letters or digits)")
    return extracted


def _normalise_newlines(text: str) -> str:
    # NUL is dropped because no text store downstream keeps it intact.
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")


def _extract_plain(content: bytes, budget: _Budget) -> ExtractedText:
    text = _decode(content)
    if text is None:
        raise UnreadableDocument("the file is not UTF-8 text")
    budget.check_chars(len(text))
    return ExtractedText(_normalise_newlines(text), None)


def _extract_markdown(content: bytes, budget: _Budget) -> ExtractedText:
    extracted = _extract_plain(content, budget)
    fenced = False
    for line in extracted.text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced  # a "# " line in a code block is a comment, not a heading
        elif not fenced and (heading := _MARKDOWN_H1.match(line)):
            return replace(extracted, title=heading.group(1))
    return extracted


def _extract_pdf(content: bytes, budget: _Budget) -> ExtractedText:
    import pypdf

    try:
        reader = pypdf.PdfReader(io.BytesIO(content))
        if reader.is_encrypted:
            _unlock(reader)
        page_count = len(reader.pages)
        title = (reader.metadata.title or None) if reader.metadata else None
    except (UnreadableDocument, DocumentTooLarge, MemoryError):
        raise
    except Exception as exc:
        # Damaged PDFs make pypdf raise far more than its own error classes.
        logger.info("unreadable PDF: %r", exc)
        raise UnreadableDocument("the PDF is damaged and cannot be read") from exc
    if page_count > budget.limits.max_pdf_pages:
        raise DocumentTooLarge(
            f"the PDF has {page_count:,} pages; at most {budget.limits.max_pdf_pages:,} are read"
        )
    pages: list[str] = []
    for number, page in enumerate(reader.pages, start=1):
        budget.tick()
        try:
            page_text = page.extract_text()
        except MemoryError:
            raise
        except Exception as exc:
            logger.info("unreadable PDF page %d: %r", number, exc)
            raise UnreadableDocument(f"page {number} of the PDF is damaged") from exc
        # Broken font maps can yield lone surrogates, which no UTF-8 store accepts.
        page_text = page_text.encode("utf-8", "replace").decode("utf-8")
        page_text = _normalise_newlines(page_text).strip()
        budget.add(page_text)
        pages.append(page_text)
    starts: list[int] = []
    offset = 0
    for page_text in pages:
        starts.append(offset)
        offset += len(page_text) + len(_PAGE_SEPARATOR)
    if title:
        title = title.encode("utf-8", "replace").decode("utf-8")  # as for the pages' text
    return ExtractedText(_PAGE_SEPARATOR.join(pages), starts, title)


def _unlock(reader: pypdf.PdfReader) -> None:
    """Open a PDF that is encrypted with an empty user password (only printing or copying is
    restricted), which every PDF viewer opens without asking."""
    import pypdf

    try:
        unlocked = reader.decrypt("")
    except pypdf.errors.DependencyError as exc:
        raise UnreadableDocument("the PDF uses an encryption ragapi cannot open") from exc
    if unlocked == pypdf.PasswordType.NOT_DECRYPTED:
        raise UnreadableDocument("the PDF is password-protected")


def _extract_docx(content: bytes, budget: _Budget) -> ExtractedText:
    import docx
    from docx.table import Table

    _check_zip_size(content, budget.limits.max_unzipped_bytes)
    unpacked = _unpack_bounded(content)
    try:
        document = docx.Document(io.BytesIO(unpacked))
        blocks: list[str] = []
        for block in document.iter_inner_content():
            budget.tick()
            text = _table_text(block) if isinstance(block, Table) else block.text
            if text.strip():
                budget.add(text)
                blocks.append(text)
        title = document.core_properties.title or None
    except (UnreadableDocument, DocumentTooLarge, MemoryError):
        raise
    except Exception as exc:
        logger.info("unreadable DOCX: %r", exc)
        raise UnreadableDocument("the Word document is damaged and cannot be read") from exc
    return ExtractedText(_normalise_newlines("\n\n".join(blocks)), None, title)


def _unpack_bounded(content: bytes) -> bytes:
    """The .docx again with every part stored uncompressed, each part read from the upload in
    bounded pieces. python-docx reads a part with ZipFile.read(), which inflates all of the
    compressed data in one call before it cuts the result to the declared size, so a part that
    declares 5,000 bytes and inflates to a gigabyte costs a gigabyte; read in pieces, zipfile
    stops at the declared size (_check_zip_size has bounded their sum) after inflating at most
    one piece more. Given this copy, python-docx only copies bytes already read."""
    copy = io.BytesIO()
    try:
        with (
            zipfile.ZipFile(io.BytesIO(content)) as archive,
            zipfile.ZipFile(copy, "w", zipfile.ZIP_STORED) as stored,
        ):
            for entry in archive.infolist():
                if entry.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                    # Word writes deflate only; zipfile inflates the others without a bound.
                    raise UnreadableDocument(
                        "the Word document is packed with a compression Word does not use"
                    )
                pieces: list[bytes] = []
                with archive.open(entry) as part:
                    while piece := part.read(_UNZIP_PIECE_BYTES):
                        pieces.append(piece)
                stored.writestr(entry.filename, b"".join(pieces))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as exc:
        # A part whose bytes are not what its directory entry says fails its CRC here.
        raise UnreadableDocument("the Word document is damaged and cannot be read") from exc
    return copy.getvalue()


def _check_zip_size(content: bytes, max_unzipped_bytes: int) -> None:
    """Refuse a zip bomb from the sizes its directory declares, before anything is unpacked.
    Python's zipfile never unpacks past a declared size (it fails the CRC instead), so the
    declared sizes bound the real work."""
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as exc:
        raise UnreadableDocument("the Word document is damaged and cannot be read") from exc
    total = sum(entry.file_size for entry in entries)
    if total > max_unzipped_bytes:
        raise DocumentTooLarge(
            f"the Word document unpacks to {total:,} bytes; the limit is {max_unzipped_bytes:,}"
        )
    for entry in entries:
        if (
            entry.file_size > _RATIO_CHECK_MIN_BYTES
            and entry.file_size > _MAX_COMPRESSION_RATIO * max(entry.compress_size, 1)
        ):
            raise DocumentTooLarge(
                "the Word document holds a part that unpacks over "
                f"{_MAX_COMPRESSION_RATIO} times its packed size (a zip bomb?)"
            )


def _table_text(table: Table) -> str:
    rows: list[str] = []
    for row in table.rows:
        cells: list[str] = []
        previous = None
        for cell in row.cells:
            # A merged cell is listed once per grid column it spans.
            if previous is not None and cell._tc is previous:
                continue
            previous = cell._tc
            cells.append(" ".join(cell.text.split()))
        rows.append(" | ".join(cells))
    return "\n".join(rows)


# Elements whose text is never the document's: code, styling, hidden templates, page chrome.
_HTML_DROP = (
    "script",
    "style",
    "noscript",
    "template",
    "head",
    "nav",
    "footer",
    "svg",
    "canvas",
    "iframe",
    "object",
    "embed",
    "button",
    "select",
    "input",
    "textarea",
)
# Site chrome that pages mark by role or class rather than by tag: dropped when most of its
# text is link text, as menus are (a "menu" of content, say a restaurant's, is not links).
_CHROME_ROLES = frozenset(("navigation", "banner", "search", "menubar", "menu"))
_CHROME_CLASSES = frozenset(
    (
        "menu",
        "mainmenu",
        "submenu",
        "searchmenu",
        "navbar",
        "nav",
        "navigation",
        "sidebar",
        "breadcrumb",
        "breadcrumbs",
        "topbar",
    )
)
_CHROME_LINK_SHARE = 0.5
_HTML_PARAGRAPHS = frozenset(
    [
        "p",
        "div",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "section",
        "article",
        "main",
        "header",
        "aside",
        "blockquote",
        "pre",
        "ul",
        "ol",
        "dl",
        "table",
        "figure",
        "figcaption",
        "address",
        "hr",
        "form",
        "fieldset",
        "details",
        "summary",
        "caption",
    ]
)
_HTML_LINES = frozenset(["li", "dt", "dd", "tr", "br"])
_HTML_CELLS = frozenset(("td", "th"))
# Private-use characters mark block breaks while whitespace from the source is collapsed.
_PARAGRAPH_MARK = "\ue000"
_LINE_MARK = "\ue001"
_CELL_MARK = "\ue002"


def _extract_html(content: bytes, budget: _Budget) -> ExtractedText:
    from bs4 import BeautifulSoup

    markup = _decode(content)
    if markup is None:
        raise UnreadableDocument("the HTML file is not UTF-8 text")
    for mark in (_PARAGRAPH_MARK, _LINE_MARK, _CELL_MARK):
        markup = markup.replace(mark, "")
    soup = BeautifulSoup(markup, "lxml")
    title = (soup.title.get_text() or None) if soup.title else None  # before <head> goes
    budget.tick()
    for element in soup.find_all(list(_HTML_DROP)):
        element.decompose()
    for element in soup.find_all(_is_chrome):
        element.decompose()
    root = _main_content(soup)
    for node in list(_strings(root)):
        if node.find_parent("pre") is None:
            node.replace_with(re.sub(r"\s+", " ", str(node)))
    budget.tick()
    for tag in root.find_all(True):
        if tag.name in _HTML_PARAGRAPHS:
            tag.insert_before(_PARAGRAPH_MARK)
            tag.insert_after(_PARAGRAPH_MARK)
        elif tag.name in _HTML_LINES:
            tag.insert_after(_LINE_MARK)
        elif tag.name in _HTML_CELLS:
            tag.insert_after(_CELL_MARK)
    budget.tick()
    text = root.get_text()
    text = re.sub(rf"[ \t]*{_LINE_MARK}[ \t]*", "\n", text)
    text = re.sub(rf"\s*{_PARAGRAPH_MARK}[\s{_PARAGRAPH_MARK}]*", "\n\n", text)
    text = re.sub(rf"[ \t]*{_CELL_MARK}[ \t]*(?=[^\s{_CELL_MARK}])", " | ", text)
    text = text.replace(_CELL_MARK, "")
    text = re.sub(r"[ \t]*\n[ \t]*", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return ExtractedText(_normalise_newlines(text.strip()), None, title)


def _is_chrome(tag: Tag) -> bool:
    marks = {str(tag.get("role", "")).lower()}
    marks.update(str(c).lower() for c in tag.get_attribute_list("class") if c)
    marks.add(str(tag.get("id", "")).lower())
    if not (marks & _CHROME_ROLES or marks & _CHROME_CLASSES):
        return False
    text = len(tag.get_text(strip=True))
    links = sum(len(a.get_text(strip=True)) for a in tag.find_all("a"))
    return text == 0 or links >= _CHROME_LINK_SHARE * text


def _main_content(soup: BeautifulSoup) -> Tag:
    """The page's <main> (or its only <article>) when it holds text, else the whole body, so
    that site menus and sidebars do not crowd out the content."""
    from bs4.element import Tag

    for candidate in (soup.find("main"), _only(soup.find_all("article"))):
        if isinstance(candidate, Tag) and candidate.get_text(strip=True):
            return candidate
    body = soup.find("body")
    return body if isinstance(body, Tag) else soup


def _only(tags: list[Tag]) -> Tag | None:
    return tags[0] if len(tags) == 1 else None


def _strings(root: Tag) -> Iterator[NavigableString]:
    from bs4.element import NavigableString

    for node in root.descendants:
        # Comments, doctypes and CDATA are NavigableString subclasses that get_text() skips.
        if type(node) is NavigableString:
            yield node
