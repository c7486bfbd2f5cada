"""Training budget benchmark: wall time and peak RSS of one `imr train` run (train + evaluate + MLflow).

    python bench/train.py                      # configs/default.yaml on ../shared letters
    python bench/train.py --config forecast --data path/to/letters

The budget (issue 3): default.yaml on the 124 shared letters in <= 10 minutes with peak RSS <= 4 GB
on a 2-core machine. MLflow logs into a temporary store unless --tracking-uri is given, so the
benchmark does not add versions to your registry. Results go to bench/results/train-<config>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "raw" / "ca-dwc-imr-letters" / "pdfs"
BUDGET_SECONDS = 600
BUDGET_RSS_MB = 4096


def peak_rss_mb() -> float:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="default")
    parser.add_argument("--data", nargs="*", default=[str(DEFAULT_DATA)])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--tracking-uri", default=None, help="MLflow store (default: a temporary sqlite file)")
    args = parser.parse_args(argv)
    missing = [d for d in args.data if not Path(d).exists()]
    if missing:
        parser.error(f"data not found: {missing} (the shared letters live in {DEFAULT_DATA})")

    sys.path.insert(0, str(REPO))
    from imr_model.config import load_config, resolve_config_path
    from imr_model.experiment import run_training

    with tempfile.TemporaryDirectory(prefix="imr-bench-") as tmp:
        uri = args.tracking_uri or f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        overrides = [f"mlflow.tracking_uri={uri}", f"output_dir={Path(tmp) / 'models'}", *args.overrides]
        cfg = load_config(args.config, overrides)
        cwd = os.getcwd()
        os.chdir(tmp)  # MLflow's ./mlruns artifacts land in the temporary directory
        start = time.perf_counter()
        try:
            result = run_training(cfg, args.data, config_path=resolve_config_path(args.config), quiet=True)
        finally:
            os.chdir(cwd)
        seconds = time.perf_counter() - start
    test = result.metrics.get("test", {}).get("model", {})
    report = {
        "config": args.config, "items": sum(result.metrics.get(s, {}).get("model", {}).get("outcome", {}).get("n", 0)
                                           for s in ("validation", "test")),
        "seconds": round(seconds, 1), "peak_rss_mb": round(peak_rss_mb(), 1),
        "epochs_run": len(result.history), "best_epoch": result.metrics.get("best_epoch"),
        "threads": cfg.train.threads, "cpus": os.cpu_count(), "device": result.metrics.get("device"),
        "test_auroc": test.get("outcome", {}).get("auroc"), "test_f1": test.get("outcome", {}).get("f1"),
        "within_budget": seconds <= BUDGET_SECONDS and peak_rss_mb() <= BUDGET_RSS_MB,
    }  # fmt: skip
    print(result.table)
    device = result.metrics.get("device") or {}
    print(f"device: {device.get('device', '?')} ({device.get('precision', '?')}; train.device={cfg.train.device})")
    print(f"train + evaluate + log: {seconds:.1f} s (budget {BUDGET_SECONDS} s); peak RSS {peak_rss_mb():.0f} MB "
          f"(budget {BUDGET_RSS_MB} MB); {len(result.history)} epochs on {os.cpu_count()} CPUs")  # fmt: skip
    out = REPO / "bench" / "results" / f"train-{args.config}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report


if __name__ == "__main__":
    main()
