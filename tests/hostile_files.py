"""Hostile letter files for the tests and `bench/hostile.py`, generated (never committed): see `hostile_files`."""

from __future__ import annotations

import os
import random
import socket
import struct
import zlib
from pathlib import Path

from imr_model.demo import generate_letters
from imr_model.letters import MAX_ITEMS

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def demo_letter_text(seed: int = 0) -> str:
    return next(iter(generate_letters(1, seed=seed))).text


def fpdf_bytes(text: str, **encryption) -> bytes:
    from fpdf import FPDF

    from imr_model.demo import to_latin1

    pdf = FPDF()
    if encryption:
        pdf.set_encryption(**encryption)
    pdf.add_page()
    pdf.set_font("Helvetica", size=10)
    for line in to_latin1(text).split("\n"):
        if line.strip():
            pdf.multi_cell(0, 5, line, new_x="LMARGIN", new_y="NEXT")
        else:
            pdf.ln(5)
    return bytes(pdf.output())


def raw_pdf(stream: bytes, *, filters: str = "/Filter /FlateDecode", pages: int = 1) -> bytes:
    """A hand-built PDF whose `pages` pages all draw the same content stream."""
    font = 3 + 2 * pages
    objs = [b"<< /Type /Catalog /Pages 2 0 R >>"]
    kids = " ".join(f"{3 + 2 * i} 0 R" for i in range(pages))
    objs.append(f"<< /Type /Pages /Kids [{kids}] /Count {pages} >>".encode())
    for i in range(pages):
        objs.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {4 + 2 * i} 0 R "
            f"/Resources << /Font << /F1 {font} 0 R >> >> >>".encode()
        )
        objs.append(f"<< /Length {len(stream)} {filters} >>\nstream\n".encode() + stream + b"\nendstream")
    objs.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for n, obj in enumerate(objs, 1):
        offsets.append(len(out))
        out += f"{n} 0 obj\n".encode() + obj + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def flate_bomb(inflated_mb: int) -> bytes:
    """A zlib stream of `inflated_mb` MB of spaces, ~1000:1: one flushed deflate segment repeated."""
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    segment = co.compress(b" " * (1 << 20)) + co.flush(zlib.Z_FULL_FLUSH)
    tail = co.flush()
    adler, mb = 1, b" " * (1 << 20)
    for _ in range(inflated_mb):
        adler = zlib.adler32(mb, adler)
    return b"\x78\xda" + segment * inflated_mb + tail + struct.pack(">I", adler)


def letter_with_items(n: int) -> str:
    blocks = "".join(
        f"\nItem number {k}: {'Overturned' if k % 5 == 0 else 'Upheld'}\n\nMAXIMUS guideline: MTUS.\n\n"
        f"Decision rationale: Reviewed.\n"
        for k in range(1, n + 1)
    )
    return "IMR ISSUES, DECISIONS AND RATIONALES\n" + blocks


def hostile_files(folder: Path) -> dict[str, str]:
    """Write every hostile file into `folder`; name → a substring its error must contain."""
    folder.mkdir(parents=True, exist_ok=True)
    good = fpdf_bytes(demo_letter_text(1))
    rng = random.Random(7)
    flipped = bytearray(good)
    for _ in range(40):
        i = rng.randrange(len(flipped))
        flipped[i] ^= 1 << rng.randrange(8)
    image_only = _image_only_pdf()
    from fpdf.enums import EncryptionMethod

    files: dict[str, tuple[bytes, str]] = {
        "empty.txt": (b"", "empty file"),
        "random.txt": (rng.randbytes(20_000), "binary data"),
        "random.pdf": (rng.randbytes(20_000), "not a PDF (no %PDF- header)"),
        "truncated.pdf": (good[: len(good) // 2], "not a readable PDF"),
        "bitflipped.pdf": (bytes(flipped), "PDF"),
        "aes.pdf": (
            fpdf_bytes("secret", owner_password="o", user_password="u", encryption_method=EncryptionMethod.AES_128),
            "encrypted",
        ),
        "image-only.pdf": (image_only, "needs OCR"),
        "bomb.pdf": (raw_pdf(flate_bomb(1024)), "memory limit"),
        "nested.pdf": (raw_pdf(b"BT /F1 12 Tf 72 720 Td (x) Tj ET", filters="/Foo " + "[" * 100_000 + "]" * 100_000), "not an IMR"),
        "pages-2000.pdf": (raw_pdf(b"BT /F1 12 Tf 72 720 Td (page) Tj ET", filters="", pages=2000), "2000 pages"),
        "nested.txt": (("[" * 100_000 + "]" * 100_000).encode(), "not an IMR"),
        "utf16.txt": (demo_letter_text(2).encode("utf-16"), "looks like UTF-16"),
        "surrogate-bytes.txt": (b"Decision rationale: \xed\xa0\x80", "not valid UTF-8"),
        "quadratic-determined.txt": (("has determined the request for x is " * 3000).encode(), "not an IMR"),
        "quadratic-spaces.txt": (("Knee MRI: Upheld" + " " * 20_000 + "x").encode(), "not an IMR"),
        "items-500.txt": (letter_with_items(500).encode(), f"500 decisions found (> {MAX_ITEMS})"),
    }
    expected = {}
    for name, (data, reason) in files.items():
        (folder / name).write_bytes(data)
        expected[name] = reason
    os.symlink("no-such-target.pdf", folder / "dangling.pdf")
    os.symlink("loop-b.pdf", folder / "loop-a.pdf")
    os.symlink("loop-a.pdf", folder / "loop-b.pdf")
    os.symlink(".", folder / "self-link")  # a symlink to a folder (a loop if followed)
    os.mkfifo(folder / "fifo.pdf")
    os.mkfifo(folder / "pipe")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(folder / "sock"))
    sock.close()
    (folder / "empty-subfolder").mkdir()  # nothing to report: a walk lists no entry for it
    # A file name that is not UTF-8: its str holds a surrogate, which item records must not carry.
    fd = os.open(os.fsencode(folder) + b"/undecodable-\xff.txt", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, demo_letter_text(4).encode())
    os.close(fd)
    expected["undecodable-\\xff.txt"] = None  # a letter; output rows spell the undecodable byte as \xff
    expected.update({
        "dangling.pdf": "dangling symlink", "loop-a.pdf": "symlink loop", "loop-b.pdf": "symlink loop",
        "self-link": "symlink to a folder", "fifo.pdf": "FIFO", "pipe": "FIFO", "sock": "socket",
    })  # fmt: skip
    if not IS_ROOT:  # root reads a chmod 000 file anyway
        (folder / "unreadable.txt").write_text(demo_letter_text(3))
        os.chmod(folder / "unreadable.txt", 0)
        expected["unreadable.txt"] = "permission denied"
    return expected


def _image_only_pdf() -> bytes:
    from fpdf import FPDF

    pdf = FPDF()
    pdf.add_page()
    pdf.rect(20, 20, 100, 60, style="F")
    return bytes(pdf.output())
