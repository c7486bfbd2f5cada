"""`python -m train.train --config C [--data PATH ...] [--set key=value ...] [--cv K]`: one training run.

Arguments → config → `imr_model.experiment.run_training` → printed table. `imr train` is the same.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="train.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="default", help="YAML path or a name in configs/ (default: default)")
    parser.add_argument("--data", nargs="*", default=None,
                        help="letters (PDF/TXT files, folders, globs) or tables (.csv/.jsonl/.parquet); default: demo letters")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.epochs=3 (repeatable)")
    parser.add_argument("--cv", type=int, default=0, help="also run grouped K-fold cross-validation (K >= 2)")
    parser.add_argument("--json", dest="json_out", default=None, help="write all metrics to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.cv == 1 or args.cv < 0:
        parser.error(f"--cv must be 0 (off) or >= 2, got {args.cv}")
    return args


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record is emitted, not the stream it was when the handler was made
    (as `logging.lastResort` does): a redirected or closed earlier stderr (pytest's capture) is never written to."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def log_to_stderr() -> None:
    """Show imr_model's progress messages (counts and metrics only, never letter text) on stderr."""
    log = logging.getLogger("imr_model")
    if not log.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None):
    """Run training; returns the `TrainResult`."""
    from imr_model.config import load_config, resolve_config_path
    from imr_model.experiment import run_training

    args = parse_args(argv)
    log_to_stderr()
    cfg = load_config(args.config, args.overrides)
    result = run_training(cfg, args.data, cv=args.cv, config_path=resolve_config_path(args.config),
                          quiet=args.quiet)  # fmt: skip
    print(result.table)
    print(f"model directory: {result.model_dir}")
    if result.run_id:
        print(f"MLflow run: {result.run_id}" + (f"  registered: {result.model_uri} (alias candidate)" if result.version else ""))
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as fh:
            json.dump({"model_dir": str(result.model_dir), "run_id": result.run_id, "model_uri": result.model_uri,
                       "metrics": result.metrics}, fh, indent=2, default=float)  # fmt: skip
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
