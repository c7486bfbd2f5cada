"""`python train/pretrain.py --config C --data PATH ... -o DIR`: continued MLM pretraining of the backbone.

A thin script over the library: `imr_model.experiment.pretrain_from_config`, exactly what `imr pretrain` runs.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from imr_model.experiment import pretrain_from_config, pretrain_report_lines
from imr_model.logs import log_to_stderr


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="train/pretrain.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="default", help="YAML path or a name in configs/")
    parser.add_argument("--data", nargs="+", action="extend", required=True, help="letters or item tables (labels are not used)")
    parser.add_argument("--output", "-o", default="models/backbone-mlm", help="backbone directory to write")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    log_to_stderr()
    report = pretrain_from_config(args.config, args.data, args.output, args.overrides, quiet=args.quiet)
    print("\n".join(pretrain_report_lines(report, args.output)))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
