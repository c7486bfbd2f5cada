"""Benchmark: PDF letters → items per second, against `pdftotext -layout` on the same files in the same run.

    python bench/parse.py [PDF_DIR] [--repeat 3] [--workers 2]

Both sides use the same number of processes (`--workers`), so the ratio compares extractors, not
parallelism. pdftotext (poppler-utils) only extracts text; imr-model extracts *and* parses items, so
the ratio is conservative. A third row, pypdfium2's own text extraction with nothing else, is the
ceiling any PDFium-based parser can reach. Prints letters/s for each and the ratios.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from imr_model.letters import parse_many
from imr_model.types import Letter

DEFAULT_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "raw" / "ca-dwc-imr-letters" / "pdfs"


def _pdftotext(path: Path) -> int:
    out = subprocess.run(["pdftotext", "-layout", str(path), "-"], capture_output=True, check=True)
    return len(out.stdout)


def bench_imr(paths: list[Path], workers: int) -> tuple[float, int, int]:
    start = time.perf_counter()
    results = list(parse_many(paths, workers=workers))
    elapsed = time.perf_counter() - start
    items = sum(len(r.items) for r in results if isinstance(r, Letter))
    errors = sum(not isinstance(r, Letter) for r in results)
    return elapsed, items, errors


def _bare_pypdfium2(path: Path) -> int:
    """The floor: pypdfium2's own page-by-page text extraction, no layout, no parsing."""
    import pypdfium2 as pdfium

    doc = pdfium.PdfDocument(str(path))
    n = 0
    for page in doc:
        textpage = page.get_textpage()
        n += len(textpage.get_text_range())
        textpage.close()
        page.close()
    doc.close()
    return n


def bench_each(fn, paths: list[Path], workers: int) -> float:
    """Seconds to run `fn` on every path, in this process or a pool of `workers`."""
    start = time.perf_counter()
    if workers <= 1:
        for p in paths:
            fn(p)
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            list(pool.map(fn, paths, chunksize=8))
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pdf_dir", nargs="?", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--repeat", type=int, default=3, help="best of N runs for each side")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    paths = sorted(args.pdf_dir.glob("*.pdf"))
    if not paths:
        print(f"no PDFs in {args.pdf_dir}", file=sys.stderr)
        return 2
    if shutil.which("pdftotext") is None:
        print("pdftotext not found: install poppler-utils (apt-get install poppler-utils)", file=sys.stderr)
        return 2
    n = len(paths)
    for label, workers in (("1 process", 1), (f"{args.workers} processes", args.workers)):
        imr, ref, bare = [], [], []
        for _ in range(args.repeat):  # interleaved, so a slow spell of the machine hits all three
            imr.append(bench_imr(paths, workers))
            ref.append(bench_each(_pdftotext, paths, workers))
            bare.append(bench_each(_bare_pypdfium2, paths, workers))
        t_imr, items, errors = min(imr, key=lambda r: r[0])
        t_ref, t_bare = min(ref), min(bare)
        print(f"[{label}] {n} letters, {items} items, {errors} errors")
        print(f"  imr-model PDF→items   : {n / t_imr:8.1f} letters/s")
        print(f"  pdftotext -layout     : {n / t_ref:8.1f} letters/s (text only)")
        print(f"  bare pypdfium2 text   : {n / t_bare:8.1f} letters/s (text only, no layout, no parsing)")
        print(f"  ratio imr / pdftotext : {t_ref / t_imr:8.2f}x  (bare pypdfium2 / pdftotext: {t_ref / t_bare:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
