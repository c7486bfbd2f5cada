"""Paired comparison of two grouped-CV runs on the same items, with letter-level bootstrap intervals.

    python experiments/paired_cv.py dump CONFIG SEED OUT.json --data LETTERS [--set key=value ...]
    python experiments/paired_cv.py compare A.json B.json [--model model] [--model-b model]

`dump` runs `imr_model.experiment.cross_validate` (grouped 5-fold, domain adaptation off unless
`--set train.domain_adaptation=true`) and writes every item's out-of-fold P(Overturned) per row
(majority, tfidf, model) with the outcome and letter of each item: numbers, never letter text.
`compare` resamples letters (2,000 draws, seed 0) and reports each run's AUROC / AUPRC with a 95%
interval and the paired difference B - A with its interval. Research tooling: not part of the package.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score


def dump(args: argparse.Namespace) -> None:
    from imr_model.config import load_config
    from imr_model.experiment import cross_validate, load_training_records
    from imr_model.taxonomy import LABELS

    overrides = [f"seed={args.seed}", "train.domain_adaptation=false", "mlflow.enabled=false", *args.overrides]
    cfg = load_config(args.config, overrides)
    try:
        records, _ = load_training_records(args.data)
    except TypeError:  # code before #20 took the config too
        records, _ = load_training_records(args.data, cfg)
    start = time.time()
    oof = cross_validate(cfg, records, args.k, list(LABELS), quiet=True)
    y = oof.pop("_y")
    out = {"config": args.config, "seed": args.seed, "overrides": overrides, "y": np.asarray(y).tolist(),
           "letters": [str(r.get("letter_id")) for r in records], "seconds": time.time() - start, "models": {}}
    for name, row in oof.items():
        out["models"][name] = {"p": np.asarray(row["_probabilities"]).tolist(), "auroc": row["outcome"]["auroc"],
                               "auprc": row["outcome"]["auprc"], "f1": row["outcome"]["f1"],
                               "micro_f1": row["guidelines"]["micro_f1"], "macro_f1": row["guidelines"]["macro_f1"]}
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(out, fh)
    print(json.dumps({m: {k: round(v, 3) for k, v in r.items() if k != "p"} for m, r in out["models"].items()}))


def _metrics(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    return float(roc_auc_score(y, p)), float(average_precision_score(y, p))


def compare(args: argparse.Namespace) -> None:
    a, b = (json.load(open(f, encoding="utf-8")) for f in (args.a, args.b))
    if a["y"] != b["y"] or a["letters"] != b["letters"]:
        raise SystemExit("the two runs did not score the same items in the same order")
    y, letters = np.asarray(a["y"]), np.asarray(a["letters"])
    pa, pb = np.asarray(a["models"][args.model]["p"]), np.asarray(b["models"][args.model_b or args.model]["p"])
    ids = np.unique(letters)
    rows = {letter: np.flatnonzero(letters == letter) for letter in ids}
    rng = np.random.default_rng(0)
    draws = []
    for _ in range(args.n):
        idx = np.concatenate([rows[letter] for letter in rng.choice(ids, size=len(ids), replace=True)])
        if len(set(y[idx].tolist())) < 2:
            continue
        ma, mb = _metrics(y[idx], pa[idx]), _metrics(y[idx], pb[idx])
        draws.append(ma + mb + (mb[0] - ma[0], mb[1] - ma[1]))
    d = np.asarray(draws)
    lo, hi = np.percentile(d, [2.5, 97.5], axis=0)
    point = _metrics(y, pa) + _metrics(y, pb)
    point = point + (point[2] - point[0], point[3] - point[1])
    names = ["A AUROC", "A AUPRC", "B AUROC", "B AUPRC", "B-A AUROC", "B-A AUPRC"]
    print(f"{len(y)} items, {int(y.sum())} Overturned, {len(ids)} letters, {len(d)} bootstrap draws over letters")
    for name, v, l, h in zip(names, point, lo, hi):
        print(f"  {name:10s} {v:+.3f}  [{l:+.3f}, {h:+.3f}]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("dump")
    d.add_argument("config"), d.add_argument("seed", type=int), d.add_argument("out")
    d.add_argument("--data", nargs="+", required=True)
    d.add_argument("--set", dest="overrides", action="append", default=[])
    d.add_argument("--k", type=int, default=5)
    c = sub.add_parser("compare")
    c.add_argument("a"), c.add_argument("b")
    c.add_argument("--model", default="model"), c.add_argument("--model-b", default=None)
    c.add_argument("--n", type=int, default=2000)
    args = parser.parse_args()
    dump(args) if args.command == "dump" else compare(args)


if __name__ == "__main__":
    main()
