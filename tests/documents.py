"""Real documents for tests, made with the libraries that make them in the wild (fpdf2,
python-docx, zipfile), plus the hostile ones an upload endpoint must survive, and a small corpus
of documents on unrelated topics with one question each."""

from __future__ import annotations

import html
import io
import struct
import zipfile
import zlib
from dataclasses import dataclass

import docx
from fpdf import FPDF
from fpdf.enums import EncryptionMethod

# Text inside <script> and <style> of make_html(): it must never show up in extracted text.
HTML_SCRIPT_TEXT = "scriptMarkerXyzzy"
HTML_STYLE_TEXT = "styleMarkerPlugh"
# Text of make_html()'s navigation menu and footer, which extraction drops as page chrome.
HTML_CHROME_TEXT = ("navMarkerFrobozz", "footerMarkerGrue")


def make_pdf(pages: list[str], title: str | None = None) -> bytes:
    """A PDF with one page per string (ASCII: fpdf2's core fonts are Latin-1 only). An empty
    string makes a blank page. `title` goes into its metadata."""
    pdf = _new_pdf()
    if title is not None:
        pdf.set_title(title)
    for text in pages:
        pdf.add_page()
        if text:
            pdf.multi_cell(0, 6, text)
    return bytes(pdf.output())


def make_encrypted_pdf(
    text: str = "Quarterly results.",
    user_password: str = "secret",  # noqa: S107 - a test file's password
    method: EncryptionMethod = EncryptionMethod.RC4,
) -> bytes:
    """An encrypted PDF. With an empty user password it opens without asking, like a PDF that
    only forbids printing."""
    pdf = _new_pdf()
    pdf.set_encryption(
        owner_password="owner-secret",
        user_password=user_password,
        encryption_method=method,
    )
    pdf.add_page()
    pdf.multi_cell(0, 6, text)
    return bytes(pdf.output())


def make_image_pdf() -> bytes:
    """A PDF whose only page is a picture, like a scan: no text to extract."""
    pdf = _new_pdf()
    pdf.add_page()
    pdf.image(io.BytesIO(make_png()), x=10, y=10, w=50)
    return bytes(pdf.output())


def make_corrupt_pdf() -> bytes:
    """Starts like a PDF, but its body is damaged beyond any repair."""
    damaged = bytearray(make_pdf(["This text will never be read."]))
    # Keep the header, wipe everything after it: objects, cross-reference table, trailer.
    damaged[16:] = bytes(b ^ 0x5A for b in damaged[16:])
    return bytes(damaged)


def _new_pdf() -> FPDF:
    pdf = FPDF()
    pdf.set_font("Helvetica", size=12)
    return pdf


def make_docx(
    paragraphs: list[str], table: list[list[str]] | None = None, title: str | None = None
) -> bytes:
    """A Word document with these paragraphs, then the table (rows of cells) when given;
    `title` goes into its core properties."""
    document = docx.Document()
    if title is not None:
        document.core_properties.title = title
    for text in paragraphs:
        document.add_paragraph(text)
    if table:
        grid = document.add_table(rows=len(table), cols=max(len(row) for row in table))
        for r, row in enumerate(table):
            for c, value in enumerate(row):
                grid.cell(r, c).text = value
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()


def make_docx_bomb(uncompressed_bytes: int) -> bytes:
    """A valid Word document plus a part of ``uncompressed_bytes`` zeros, which deflate packs
    about a thousand to one: a zip bomb in a .docx."""
    source = zipfile.ZipFile(io.BytesIO(make_docx(["An innocent looking memo."])))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as bomb:
        for item in source.infolist():
            bomb.writestr(item, source.read(item.filename))
        block = bytes(1024 * 1024)
        with bomb.open("word/media/padding.bin", "w", force_zip64=True) as part:
            for offset in range(0, uncompressed_bytes, len(block)):
                part.write(block[: uncompressed_bytes - offset])
    return buffer.getvalue()


def make_lying_docx(
    real_bytes: int, declared_bytes: int = 5000, matching_crc: bool = True
) -> bytes:
    """A Word document whose word/document.xml is ``real_bytes`` of "A" (deflate packs it about
    a thousand to one) while the zip's directory and local header declare ``declared_bytes``:
    the uncompressed-size fields (local header offset 22, central directory offset 24) are
    patched. With ``matching_crc`` the CRC fields are patched to the CRC of the declared prefix
    too, so reading exactly the declared bytes succeeds and only a reader that inflates the
    whole part (ZipFile.read) meets the rest."""
    source = zipfile.ZipFile(io.BytesIO(make_docx(["An innocent looking memo."])))
    buffer = io.BytesIO()
    piece = b"A" * (8 * 1024 * 1024)
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("word/document.xml", "w") as part:  # first: its header is at 0
            for offset in range(0, real_bytes, len(piece)):
                part.write(piece[: real_bytes - offset])
        for item in source.infolist():
            if item.filename != "word/document.xml":
                archive.writestr(item, source.read(item.filename))
    data = bytearray(buffer.getvalue())
    central = data.find(b"PK\x01\x02")
    while data[central + 46 : central + 46 + 17] != b"word/document.xml":
        central = data.find(b"PK\x01\x02", central + 4)
    struct.pack_into("<I", data, 22, declared_bytes)
    struct.pack_into("<I", data, central + 24, declared_bytes)
    if matching_crc:
        crc = zlib.crc32(b"A" * declared_bytes)
        struct.pack_into("<I", data, 14, crc)
        struct.pack_into("<I", data, central + 16, crc)
    return bytes(data)


def make_zip_not_docx() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("notes.txt", "Shopping list: eggs, flour, butter.")
        archive.writestr("data/table.csv", "a,b\n1,2\n")
    return buffer.getvalue()


def make_png(width: int = 2, height: int = 2) -> bytes:
    """A real PNG (8-bit grey), written by hand so no imaging library is involved."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    rows = b"".join(b"\x00" + bytes([0x80] * width) for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def make_html(title: str, paragraphs: list[str]) -> bytes:
    """A full page: the paragraphs in <main>, wrapped in a <script>, a <style>, a navigation
    menu and a footer whose text (the HTML_* markers above) is not the page's content."""
    body = "\n".join(f"    <p>{html.escape(text)}</p>" for text in paragraphs)
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>{html.escape(title)}</title>
  <style>.{HTML_STYLE_TEXT} {{ color: #333; }}</style>
  <script>window.{HTML_SCRIPT_TEXT} = "tracking";</script>
</head>
<body>
  <nav><a href="/">Home</a> <a href="/about">{HTML_CHROME_TEXT[0]}</a></nav>
  <main>
    <h1>{html.escape(title)}</h1>
{body}
  </main>
  <footer>&copy; 2024 {HTML_CHROME_TEXT[1]}</footer>
  <script>console.log("{HTML_SCRIPT_TEXT}");</script>
</body>
</html>
"""
    return page.encode("utf-8")


def make_markdown(title: str, paragraphs: list[str]) -> bytes:
    return (f"# {title}\n\n" + "\n\n".join(paragraphs) + "\n").encode("utf-8")


def make_text(paragraphs: list[str]) -> bytes:
    return ("\n\n".join(paragraphs) + "\n").encode("utf-8")


@dataclass(frozen=True)
class CorpusDocument:
    title: str
    paragraphs: list[str]
    question: str  # answered by this document and by no other in CORPUS
    answer: str  # a phrase of the paragraphs that answers the question


CORPUS: dict[str, CorpusDocument] = {
    "rust": CorpusDocument(
        title="Ownership in Rust",
        paragraphs=[
            "Rust manages memory through ownership. Every value has exactly one owner, a "
            "variable, and when the owner goes out of scope the value is dropped and its memory "
            "is freed, without a garbage collector.",
            "Assigning a heap value such as a String to another variable moves it: the first "
            "variable can no longer be used. Types that implement the Copy trait, like integers, "
            "are copied instead.",
            "References borrow a value without taking ownership. The borrow checker allows "
            "either any number of shared references or exactly one mutable reference at a time, "
            "which rules out data races at compile time.",
        ],
        question="What happens to a value in Rust when its owner goes out of scope?",
        answer="the value is dropped and its memory is freed",
    ),
    "sourdough": CorpusDocument(
        title="Baking sourdough bread",
        paragraphs=[
            "Sourdough bread is leavened by a starter, a culture of wild yeast and lactic acid "
            "bacteria kept alive by regular feedings of flour and water.",
            "A starter is ready to bake with when it doubles in size within four to eight hours "
            "after a feeding and smells pleasantly sour.",
            "The dough is mixed, left to rest for the autolyse, stretched and folded during bulk "
            "fermentation, shaped, proofed overnight in the fridge and baked in a preheated "
            "Dutch oven at about 250 degrees Celsius.",
        ],
        question="How can I tell that my sourdough starter is ready to bake with?",
        answer="it doubles in size within four to eight hours after a feeding",
    ),
    "saturn": CorpusDocument(
        title="The moons of Saturn",
        paragraphs=[
            "Saturn has more than one hundred known moons. Titan, the largest, is bigger than "
            "the planet Mercury and is the only moon in the solar system with a thick "
            "atmosphere, made mostly of nitrogen.",
            "Titan's surface holds lakes and seas of liquid methane and ethane, which the "
            "Cassini spacecraft mapped with radar.",
            "Enceladus, a small icy moon, sprays plumes of water vapour from cracks near its "
            "south pole, evidence of a salty ocean beneath its crust.",
        ],
        question="Which moon of Saturn has a thick nitrogen atmosphere?",
        answer="Titan",
    ),
    "french_revolution": CorpusDocument(
        title="The French Revolution",
        paragraphs=[
            "The French Revolution began in 1789, when a financial crisis forced King Louis XVI "
            "to summon the Estates-General for the first time since 1614.",
            "On 14 July 1789 a crowd in Paris stormed the Bastille, a royal fortress and "
            "prison, an event that became the symbol of the revolution.",
            "The National Assembly abolished feudal privileges and adopted the Declaration of "
            "the Rights of Man and of the Citizen. The monarchy fell in 1792.",
        ],
        question="When was the Bastille stormed?",
        answer="On 14 July 1789",
    ),
    "photosynthesis": CorpusDocument(
        title="Photosynthesis",
        paragraphs=[
            "Photosynthesis is the process by which plants, algae and some bacteria turn light "
            "energy into chemical energy.",
            "In the chloroplasts, the pigment chlorophyll absorbs mostly red and blue light. "
            "Water is split, releasing oxygen as a by-product, and carbon dioxide is fixed into "
            "glucose in the Calvin cycle.",
            "Leaves look green because chlorophyll reflects green light rather than absorbing it.",
        ],
        question="Why do plant leaves look green?",
        answer="chlorophyll reflects green light",
    ),
}
