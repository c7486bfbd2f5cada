"""Read a letter file (PDF or plain text) into normalised text with paragraph and page breaks.

PDF text comes from pypdfium2 (the fastest extractor measured here). PDFium returns lines but no
blank lines, so paragraph breaks are recovered from geometry: a vertical gap between consecutive
lines larger than `PARAGRAPH_GAP` times the page's typical line pitch becomes an empty line — the
same signal `pdftotext -layout` turns into blank lines. Pages are joined with a form feed line,
which `normalize_text` turns into a `PAGE_BREAK` marker line.

Every failure raises `LetterError` naming the file and what was wrong, never quoting its content.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import os
import re
import stat
import threading
from pathlib import Path

from imr_model.types import LetterError

FORM_FEED = "\f"  # between pages of extracted PDF text
PAGE_BREAK = "<<PAGE>>"  # the line that marks a page boundary in normalised text
PARAGRAPH_GAP = 1.6  # × median line pitch; a blank line in these letters is ~2× the pitch
MAX_TEXT_BYTES = 5 * 1024 * 1024  # a real letter is 5-50 KB of text; anything this big is not a letter
MAX_PDF_BYTES = 50 * 1024 * 1024
LETTER_SUFFIXES = (".pdf", ".txt")  # what a folder walk reads
MAX_PDF_PAGES = 1000  # the real letters have 1-6 pages

_PAGE_NUMBER = re.compile(r"^\s*(?:-\s*)?(?:page\s+)?\d{1,3}(?:\s+of\s+\d{1,3})?(?:\s*-)?\s*$", re.I)


def read_letter_text(path: str | Path) -> str:
    """Return the text of a letter file; PDF detected by magic bytes, anything else must be UTF-8 text.

    Only regular files are opened (symlinks are followed): a FIFO, socket, device, folder, dangling
    or looping symlink is reported without opening it, since opening a FIFO blocks forever.
    """
    path = Path(path)
    src = str(path)
    data, is_pdf = read_letter_bytes(path)
    return pdf_bytes_text(data, src, has_header=is_pdf) if is_pdf is not None else decode_text(data, src)


def read_letter_bytes(path: str | Path) -> tuple[bytes, bool | None]:
    """(bytes, kind) of a letter file: kind is True for a PDF with a %PDF- header, False for a .pdf
    without one, None for text. Raises `LetterError` for anything that is not a readable regular
    file of a plausible size."""
    path = Path(path)
    src = str(path)
    _check_file_type(path, src)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise LetterError(src, f"cannot read file ({(exc.strerror or str(exc)).lower()})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # replaced between the check and the open
            raise LetterError(src, f"{_kind(st.st_mode)}, not a letter file")
        if st.st_size == 0:
            raise LetterError(src, "empty file (0 bytes)")
        head = os.read(fd, 1024)
        is_pdf = head.lstrip(b"\x00\t\r\n\x0c ").startswith(b"%PDF-")
        if is_pdf or path.suffix.lower() == ".pdf":
            limit, what = MAX_PDF_BYTES, "PDF too large"
        else:
            limit, what = MAX_TEXT_BYTES, "text file too large for a letter"
        if st.st_size > limit:
            raise LetterError(src, f"{what} ({st.st_size / 1e6:.1f} MB > {limit / 1e6:.0f} MB limit)")
        chunks = [head]
        size = len(head)
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:  # the file grew while being read
            raise LetterError(src, f"{what} (> {limit / 1e6:.0f} MB limit)")
    except OSError as exc:
        raise LetterError(src, f"cannot read file ({(exc.strerror or str(exc)).lower()})") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if not data:
        raise LetterError(src, "empty file (0 bytes)")
    return data, (is_pdf if is_pdf or path.suffix.lower() == ".pdf" else None)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "is a folder"
    if stat.S_ISFIFO(mode):
        return "is a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "is a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device file"
    return "is not a regular file"


def _check_file_type(path: Path, src: str) -> None:
    """Raise `LetterError` unless `path` is (a symlink to) a regular file; never opens it."""
    try:
        lst = os.lstat(path)
    except FileNotFoundError:
        if glob.has_magic(src):
            raise LetterError(src, "pattern matched no files") from None
        raise LetterError(src, "file not found") from None
    except OSError as exc:
        raise LetterError(src, f"cannot read file ({(exc.strerror or str(exc)).lower()})") from None
    st = lst
    if stat.S_ISLNK(lst.st_mode):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise LetterError(src, "dangling symlink (its target does not exist)") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise LetterError(src, "symlink loop (the link resolves back to itself)") from None
            raise LetterError(src, f"cannot read file ({(exc.strerror or str(exc)).lower()})") from None
    if stat.S_ISDIR(st.st_mode):
        if stat.S_ISLNK(lst.st_mode):
            raise LetterError(src, "is a symlink to a folder (a folder walk does not follow these; name the folder to read it)")
        raise LetterError(src, _folder_reason(path))
    if not stat.S_ISREG(st.st_mode):
        raise LetterError(src, f"{_kind(st.st_mode)}, not a letter file")


def _folder_reason(path: Path) -> str:
    try:
        for _, _, files in os.walk(path, onerror=_raise):
            if any(f.lower().endswith(LETTER_SUFFIXES) for f in files):
                return "is a folder, not a letter file (read folders with `imr parse FOLDER` or iter_letter_files)"
    except OSError as exc:
        return f"folder cannot be read ({(exc.strerror or str(exc)).lower()})"
    except RecursionError:  # os.walk recurses: a tree ~1,000 folders deep
        return "is a folder nested too deeply to search for letters"
    return "folder holds no .pdf or .txt letter files"


def _raise(exc: OSError) -> None:
    raise exc


def decode_text(data: bytes, source: str) -> str:
    """Decode letter bytes as UTF-8 (BOM allowed); binary data and other encodings are errors."""
    if not data:
        raise LetterError(source, "empty file (0 bytes)")
    utf16 = _utf16_guess(data[:4096])
    if utf16:
        raise LetterError(source, f"not UTF-8 text (looks like {utf16}); re-save the file as UTF-8")
    if b"\x00" in data[:4096] or _binary_ratio(data[:4096]) > 0.1:
        raise LetterError(source, "binary data: not a PDF and not a text letter")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LetterError(
            source,
            f"not valid UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); re-save the file as UTF-8",
        ) from None


def _utf16_guess(chunk: bytes) -> str | None:
    """'UTF-16'/'UTF-32' when the bytes look like that encoding (a BOM, or NULs in every other byte)."""
    if chunk[:4] in (b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff"):
        return "UTF-32"
    if chunk[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return "UTF-16"
    if len(chunk) >= 16:
        even, odd = chunk[0::2], chunk[1::2]
        # ASCII text in UTF-16: one of the two byte lanes is almost all NULs, the other almost none.
        for a, b in ((even, odd), (odd, even)):
            if a.count(0) > 0.9 * len(a) and b.count(0) < 0.1 * len(b):
                return "UTF-16"
    return None


def _binary_ratio(chunk: bytes) -> float:
    if not chunk:
        return 0.0
    control = sum(1 for b in chunk if b < 32 and b not in (9, 10, 12, 13))
    return control / len(chunk)


# FPDF_GetLastError codes → what to tell the user (fpdfview.h). The code is only meaningful when a
# load failed: PDFium does not reset it on success.
_PDF_ERRORS = {
    2: "file not found or could not be opened",
    3: "not a readable PDF (corrupt or truncated)",
    4: "PDF is encrypted (password required); decrypt it first",
    5: "PDF uses an unsupported security handler",
    6: "PDF page not found or content error",
}
_FPDF_ERR_FORMAT = 3
_EOF_MARK = b"%%EOF"
_EOF_RETRIES = 4  # how many %%EOF markers (from the end) a PDF with trailing junk is cut back to
# PDFium is not thread-safe: calls from several threads (a server's worker pool) must not overlap.
_PDFIUM_LOCK = threading.Lock()


def pdf_text(path: Path) -> str:
    """Extract the text of a PDF file (see `pdf_bytes_text`)."""
    data, is_pdf = read_letter_bytes(path)
    return pdf_bytes_text(data, str(path), has_header=bool(is_pdf))


def pdf_bytes_text(data: bytes, src: str, *, has_header: bool = True) -> str:
    """Extract text from every page of a PDF, with blank lines at paragraph gaps and \\f between pages.

    Uses PDFium's C API (`pypdfium2.raw`) directly: the object wrappers of `pypdfium2`'s helpers
    (finalizers, range checks) cost ~0.6 ms per letter, a tenth of the whole parse. A PDF that PDFium
    refuses but that ends in junk after a %%EOF marker (mail gateways append footers) is loaded again
    cut back to that marker, as poppler would read it.
    """
    # deferred: importing pypdfium2 takes ~60 ms here and initialises PDFium; text-only callers (and the serving
    # fork server, which imports the parser before forking workers) never need it
    import pypdfium2.raw as pdfium_c

    with _PDFIUM_LOCK:
        doc, buf, code = _load_pdf(pdfium_c, data)
        if not doc:
            if code == _FPDF_ERR_FORMAT and not has_header:
                raise LetterError(src, "not a PDF (no %PDF- header) and not a text letter")
            if code == _FPDF_ERR_FORMAT and _EOF_MARK not in data:
                raise LetterError(src, "not a readable PDF (truncated: no %%EOF end marker)")
            raise LetterError(src, _PDF_ERRORS.get(code, f"not a readable PDF (PDFium error {code})"))
        try:
            n_pages = pdfium_c.FPDF_GetPageCount(doc)
            if n_pages > MAX_PDF_PAGES:
                raise LetterError(src, f"PDF has {n_pages} pages (> {MAX_PDF_PAGES}); not a single IMR letter")
            pages, n_chars = [], 0
            for index in range(n_pages):
                pages.append(_page_text(pdfium_c, doc, index, src))
                n_chars += len(pages[-1])
                if n_chars > MAX_TEXT_BYTES:
                    raise LetterError(src, f"PDF text too large for a letter (> {MAX_TEXT_BYTES / 1e6:.0f} M characters)")
        finally:
            pdfium_c.FPDF_CloseDocument(doc)
            del buf  # PDFium reads the buffer until the document is closed
    if not any(p.strip() for p in pages):
        raise LetterError(
            src, f"PDF has no text layer ({len(pages)} page(s) of images, or damaged page content?); a scan needs OCR first"
        )
    return f"\n{FORM_FEED}\n".join(pages)


def _load_pdf(pdfium_c, data: bytes):
    """(document or None, the buffer it reads, PDFium error code on failure)."""
    doc, buf, code = _load_pdf_bytes(pdfium_c, data)
    if doc or code != _FPDF_ERR_FORMAT:
        return doc, buf, code
    end = len(data)
    for _ in range(_EOF_RETRIES):
        mark = data.rfind(_EOF_MARK, 0, end)
        if mark < 0:
            break
        cut = mark + len(_EOF_MARK)
        if cut < len(data):
            retry, rbuf, _ = _load_pdf_bytes(pdfium_c, data[:cut] + b"\n")
            if retry:
                return retry, rbuf, 0
        end = mark
    return None, None, code


def _load_pdf_bytes(pdfium_c, data: bytes):
    buf = (ctypes.c_char * len(data)).from_buffer_copy(data)
    doc = pdfium_c.FPDF_LoadMemDocument64(buf, len(data), None)
    return (doc, buf, 0) if doc else (None, None, pdfium_c.FPDF_GetLastError())


def _page_text(pdfium_c, doc, index: int, src: str) -> str:
    page = pdfium_c.FPDF_LoadPage(doc, index)
    if not page:
        raise LetterError(src, f"PDF page {index + 1} could not be read (corrupt or truncated)")
    textpage = pdfium_c.FPDFText_LoadPage(page)
    try:
        if not textpage:
            raise LetterError(src, f"PDF page {index + 1} has an unreadable text layer")
        count = pdfium_c.FPDFText_CountChars(textpage)
        if count <= 0:
            return ""
        # Room for generated characters PDFium may add beyond the char count, plus the NUL.
        buffer = (ctypes.c_ushort * (2 * count + 2))()
        written = pdfium_c.FPDFText_GetText(textpage, 0, count, buffer)
        raw = ctypes.string_at(buffer, max(written - 1, 0) * 2).decode("utf-16-le", errors="ignore")
        if not raw.strip():
            return ""
        lines = raw.replace("\r\n", "\n").split("\n")
        if written - 1 != count:
            return "\n".join(lines)  # char/text index mapping unreliable; fall back to plain lines
        rect = pdfium_c.FS_RECTF()
        tops: list[float | None] = []
        pos = 0
        for line in lines:
            stripped = line.lstrip()
            if stripped and pdfium_c.FPDFText_GetLooseCharBox(textpage, pos + len(line) - len(stripped), rect):
                tops.append(rect.top)
            else:
                tops.append(None)
            pos += len(line) + 2  # PDFium emits \r\n between lines
    finally:
        if textpage:
            pdfium_c.FPDFText_ClosePage(textpage)
        pdfium_c.FPDF_ClosePage(page)
    return _insert_paragraph_breaks(lines, tops)


def _insert_paragraph_breaks(lines: list[str], tops: list[float | None]) -> str:
    ys = [(i, y) for i, y in enumerate(tops) if y is not None]
    pitches = [a[1] - b[1] for a, b in zip(ys, ys[1:]) if a[1] - b[1] > 0]
    if not pitches:
        return "\n".join(lines)
    # The single-spaced pitch: a low percentile, since pages with many short paragraphs have a
    # median gap that is already a paragraph break.
    pitches.sort()
    pitch = pitches[len(pitches) // 10]
    out: list[str] = []
    prev_y = None
    for line, y in zip(lines, tops):
        if y is not None:
            if prev_y is not None and prev_y - y > PARAGRAPH_GAP * pitch:
                out.append("")
            prev_y = y
        out.append(line)
    return "\n".join(out)


def normalize_text(text: str) -> str:
    """Normalise line endings, undo double spacing, and drop page-number lines and repeated page headers."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u00a0", " ")
    # PDFium marks a hyphen that ends a layout line as U+FFFE (sometimes U+0002) and drops the break.
    text = text.replace("\ufffe", "- ").replace("\x02", "- ")
    text = text.replace("\x0c", f"\n{PAGE_BREAK}\n")
    lines = [ln.rstrip() for ln in text.split("\n")]
    lines = _undo_double_spacing(lines)
    lines = _drop_page_furniture(lines)
    return "\n".join(lines)


def _undo_double_spacing(lines: list[str]) -> list[str]:
    """Text exported with an empty line after every line: keep only runs of 2+ empties as paragraph breaks."""
    nonempty = [i for i, ln in enumerate(lines) if ln.strip()]
    if len(nonempty) < 10:
        return lines
    singles = sum(1 for a, b in zip(nonempty, nonempty[1:]) if b - a == 2 and not lines[a + 1])
    if singles < 0.6 * (len(nonempty) - 1):
        return lines
    out: list[str] = []
    i = 0
    while i < len(lines):
        if lines[i] == "" and i + 1 < len(lines) and lines[i + 1].strip():
            i += 1  # the filler empty line between two text lines
            continue
        out.append(lines[i])
        i += 1
    return out


def _drop_page_furniture(lines: list[str]) -> list[str]:
    """Remove page numbers and header/footer lines that repeat on most pages."""
    pages: list[list[str]] = [[]]
    for ln in lines:
        if ln.strip() == PAGE_BREAK:
            pages.append([])
        else:
            pages[-1].append(ln)
    repeated: set[str] = set()
    if len(pages) >= 3:
        counts: dict[str, int] = {}
        for page in pages:
            edge = [ln.strip() for ln in page if ln.strip()]
            for ln in set(edge[:2] + edge[-2:]):
                counts[ln] = counts.get(ln, 0) + 1
        repeated = {ln for ln, c in counts.items() if c >= max(3, 0.6 * len(pages)) and len(ln) < 120}
    out: list[str] = []
    for n, page in enumerate(pages):
        if n:
            while out and not out[-1].strip():
                out.pop()  # blank lines at a page edge say nothing about paragraphs
            out.append(PAGE_BREAK)
        for ln in page:
            if out and out[-1] == PAGE_BREAK and not ln.strip():
                continue
            s = ln.strip()
            if s in repeated or (s and len(s) <= 40 and _PAGE_NUMBER.match(s)):  # page numbers are short
                continue
            out.append(ln)
    return out
