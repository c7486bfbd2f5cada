"""Acceptance run for messy input: the shared letters mixed with every hostile file, parsed and scored.

    python bench/hostile.py [--model MODEL_DIR_OR_URI] [--letters PDF_DIR] [--as-limit-gb 4]

Builds a folder in a temporary directory: the shared PDF letters plus the hostile files of
`tests/hostile_files.py` (empty, random bytes, truncated and bit-flipped PDFs, an AES-encrypted PDF,
an image-only PDF, a 1 GB flate bomb, a deeply nested object, a 2,000-page PDF, symlink loops,
dangling links, FIFOs, a socket, a UTF-16 file, once-quadratic texts, a 500-item letter). Then runs
`imr parse` and (with `--model`) `imr score` on it with their default settings, each in a child
process under an address-space limit (RLIMIT_AS, default 4 GB), and reports wall time, the peak RSS
of the child and its workers (wait4), and whether every entry of the folder got exactly one result.
Results go to bench/results/hostile.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from imr_model.types import clean_text  # noqa: E402
from tests.hostile_files import hostile_files  # noqa: E402

DEFAULT_LETTERS = REPO.parent / "shared" / "data" / "raw" / "ca-dwc-imr-letters" / "pdfs"
RESULTS = REPO / "bench" / "results" / "hostile.json"


def build_folder(root: Path, letters: Path | None) -> list[str]:
    """The mixed folder; returns the names of its entries that must each get one result."""
    folder = root / "mixed"
    hostile_files(folder)
    if letters is not None and letters.is_dir():
        for pdf in sorted(letters.glob("*.pdf")):
            shutil.copy(pdf, folder / pdf.name)
    skip_kinds = {"empty-subfolder"}  # an empty folder inside a walk is nothing to report
    # Output rows carry names as clean text: an undecodable byte in a file name reads as U+FFFD there.
    return sorted(clean_text(os.fsdecode(n)) for n in os.listdir(folder) if n not in skip_kinds)


def run_limited(argv: list[str], as_limit: int) -> dict:
    """Run `argv` under RLIMIT_AS; wall time, exit code and the peak RSS of it and its descendants."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (as_limit, as_limit))

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(argv, preexec_fn=limit, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = proc.stderr.read().decode("utf-8", "replace")
    _, status, usage = os.wait4(proc.pid, 0)
    return {
        "seconds": round(time.perf_counter() - start, 2),
        "exit_code": os.waitstatus_to_exitcode(status),
        "peak_rss_mb": round(usage.ru_maxrss / 1024),  # KiB on Linux; the largest of the child and its workers
        "stderr_tail": stderr.strip().splitlines()[-3:],
    }


def results_per_entry(output: Path, folder: Path) -> Counter:
    counts: Counter = Counter()
    if output.suffix == ".jsonl":
        for line in output.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            counts[(row["source"], row.get("letter_id"))] += 0  # keep one key per letter
    keys = Counter()
    for source, _ in counts:
        rel = Path(source).relative_to(folder) if Path(source).is_relative_to(folder) else Path(source)
        keys[str(rel)] += 1
    return keys


def check(name: str, run: dict, output: Path, folder: Path, entries: list[str]) -> dict:
    if not output.is_file():
        print(f"{name}: no output (exit {run['exit_code']}): {' / '.join(run['stderr_tail'])}")
        return {**run, "one_result_each": False}
    got = results_per_entry(output, folder)
    missing = [e for e in entries if got.get(e, 0) == 0]
    twice = [e for e, n in got.items() if n > 1]
    extra = [e for e in got if e not in entries]
    rows = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    run.update(entries=len(entries), results=len(got), error_rows=sum(1 for r in rows if r.get("error")),
               missing=missing, twice=twice, extra=extra, one_result_each=not (missing or twice or extra))  # fmt: skip
    print(f"{name}: {run['seconds']} s, peak RSS {run['peak_rss_mb']} MB, exit {run['exit_code']}, "
          f"{run['results']} results for {run['entries']} entries ({run['error_rows']} error rows); "
          f"one result each: {run['one_result_each']}")  # fmt: skip
    if not run["one_result_each"]:
        print(f"  missing {missing[:5]} twice {twice[:5]} extra {extra[:5]}")
    return run


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model directory or MLflow URI for the `imr score` run (skipped without it)")
    ap.add_argument("--letters", type=Path, default=DEFAULT_LETTERS, help="folder of real PDF letters to mix in")
    ap.add_argument("--as-limit-gb", type=float, default=4.0, help="address-space limit of each run")
    args = ap.parse_args(argv)
    as_limit = int(args.as_limit_gb * 2**30)
    imr = [sys.executable, "-c", "from imr_model.cli import main; main()"]
    report: dict = {"as_limit_gb": args.as_limit_gb, "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        entries = build_folder(root, args.letters)
        folder = root / "mixed"
        print(f"{len(entries)} entries in {folder} ({sum(e.endswith('.pdf') for e in entries)} named *.pdf)")
        out = root / "parse.jsonl"
        run = run_limited(imr + ["parse", str(folder), "-o", str(out)], as_limit)
        report["parse"] = check("imr parse", run, out, folder, entries)
        if args.model:
            out = root / "score.jsonl"
            run = run_limited(imr + ["score", str(folder), "-o", str(out), "--model", args.model], as_limit)
            report["score"] = check("imr score", run, out, folder, entries)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(f"→ {RESULTS}")
    return report


if __name__ == "__main__":
    main()
