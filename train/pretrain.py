"""`python -m train.pretrain --config C --data PATH... -o DIR`: continued MLM pretraining of the backbone.

Arguments → config → `imr_model.pretrain.run_pretrain` → printed perplexities. `imr pretrain` is the same.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="train.pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="default", help="YAML path or a name in configs/")
    parser.add_argument("--data", nargs="*", default=None, help="letters or item tables; default: demo letters")
    parser.add_argument("--output", "-o", default="models/backbone-mlm", help="backbone directory to write")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run pretraining; returns the report (perplexities, sizes, seconds)."""
    from imr_model.config import load_config
    from imr_model.experiment import load_training_records
    from imr_model.pretrain import run_pretrain

    from train.train import log_to_stderr

    args = parse_args(argv)
    log_to_stderr()
    cfg = load_config(args.config, args.overrides)
    records, source = load_training_records(args.data, cfg)
    report = run_pretrain(cfg, records, args.output, quiet=args.quiet)
    print(f"held-out MLM perplexity: {report['perplexity_before']:.2f} before → {report['perplexity_after']:.2f} after "
          f"({report['steps']} steps, {report['seconds']:.0f}s; random-head start {report['perplexity_initial_head']:.0f})")
    print(f"backbone written to {args.output} (use --set model.backbone={args.output})")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
