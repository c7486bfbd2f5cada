"""`python train/train.py --config C --data PATH ... [--set key=value ...] [--cv K] [--json F]`: one training run.

A thin script over the library: `imr_model.experiment.train_from_config`, exactly what `imr train` runs.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from imr_model.experiment import TrainResult, result_lines, train_from_config
from imr_model.logs import log_to_stderr


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="train/train.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="default", help="YAML path or a name in configs/ (default: default)")
    parser.add_argument("--data", nargs="+", action="extend", required=True,
                        help="letters (PDF/TXT files, folders, globs) or tables (.csv/.jsonl/.parquet)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.epochs=3 (repeatable)")
    parser.add_argument("--cv", type=int, default=0, help="also run grouped K-fold cross-validation (K >= 2)")
    parser.add_argument("--json", dest="json_out", default=None, help="write all metrics to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> TrainResult:
    args = parse_args(argv)
    log_to_stderr()
    result = train_from_config(args.config, args.data, args.overrides, cv=args.cv, json_out=args.json_out,
                               quiet=args.quiet)  # fmt: skip
    print("\n".join(result_lines(result)))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
