"""Flip-recovery check of `imr review` (#21 item 4): flip N outcome labels at random, see how many the review finds.

    python experiments/review_flip.py --data ../shared/data/raw/ca-dwc-imr-letters/pdfs --view rationale
    python experiments/review_flip.py --data ../shared/data/raw/ca-dwc-imr-letters/pdfs --view rationale_masked

The letters are parsed to a temporary item table (JSONL, deleted afterwards); `--flips` outcome labels (seeded by
`--flip-seed`) are flipped in that copy; `imr_model.review.review` runs grouped `--folds`-fold CV on it and ranks
every item. Prints how many flipped items are among the first `--top` rows, and their ranks: numbers and ids only,
never letter text. The view picks a probe-recipe config: rationale → configs/review.yaml, rationale_masked →
configs/masked.yaml without domain adaptation (its own view and pooling). Research tooling: not part of the package.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

VIEW_CONFIGS = {
    "rationale": ("review", []),
    "rationale_masked": ("masked", ["train.domain_adaptation=false"]),
    "forecast": ("forecast", ["train.domain_adaptation=false"]),
}


def flip_outcomes(records: list[dict], n: int, seed: int) -> list[int]:
    """Flip `n` items' decision in place (seeded); returns their indices."""
    idx = np.random.default_rng(seed).choice(len(records), size=n, replace=False)
    for i in idx:
        records[i]["decision"] = "Upheld" if records[i]["decision"] == "Overturned" else "Overturned"
    return sorted(int(i) for i in idx)


def run(data: list[str], view: str, *, flips: int = 10, flip_seed: int = 0, folds: int = 5, top: int = 30,
        seed: int | None = None, overrides: list[str] | None = None, quiet: bool = True) -> dict:  # fmt: skip
    """Parse → table copy → flip → review; the result as numbers (no text)."""
    from imr_model.config import load_config
    from imr_model.dataset import load_records
    from imr_model.review import review

    config, view_overrides = VIEW_CONFIGS[view]
    cfg = load_config(config, ["mlflow.enabled=false", f"model.text_view={view}", *view_overrides, *(overrides or [])])
    records, errors = load_records(data)
    flipped = flip_outcomes(records, flips, flip_seed)
    with tempfile.TemporaryDirectory(prefix="imr-flip-") as tmp:  # the noisy copy is an item table, as a user's
        table = Path(tmp) / "items.jsonl"
        with table.open("w", encoding="utf-8") as fh:
            for rec in records:
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        noisy, _ = load_records([str(table)])
        start = time.perf_counter()
        result = review(cfg, noisy, k=folds, seed=seed, quiet=quiet)
        seconds = time.perf_counter() - start
    keys = {(str(noisy[i]["letter_id"]), int(noisy[i]["item_index"])) for i in flipped}
    rows = result.rows
    is_flip = np.array([(a, int(b)) in keys for a, b in zip(rows["letter_id"], rows["item_index"])])
    ranks = rows["rank"][is_flip].tolist()
    by_direction = {f"flipped_to_{g.lower()}_ranks": sorted(rows["rank"][is_flip & (rows["given_outcome"] == g)].tolist())
                    for g in ("Overturned", "Upheld")}  # fmt: skip
    return {"view": view, "config": config, "items": len(noisy), "parse_errors": len(errors),
            "overturned_after_flips": int(sum(r["decision"] == "Overturned" for r in noisy)),
            "flips": flips, "flip_seed": flip_seed, "folds": folds, "cv_seed": result.seed,
            f"in_top_{top}": int(sum(r <= top for r in ranks)), "flipped_ranks": sorted(ranks), **by_direction,
            "flagged": result.n_flagged, "flagged_outcome": int(rows["flagged_outcome"].sum()),
            "flipped_flagged_outcome": int(rows["flagged_outcome"][is_flip].sum()),
            "oof": {k: round(float(v), 3) for k, v in result.metrics.items()}, "seconds": round(seconds)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", action="append", required=True)
    ap.add_argument("--view", choices=sorted(VIEW_CONFIGS), default="rationale")
    ap.add_argument("--flips", type=int, default=10)
    ap.add_argument("--flip-seed", type=int, default=0)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--seed", type=int, default=None, help="CV seed (default: the config's)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    out = run(args.data, args.view, flips=args.flips, flip_seed=args.flip_seed, folds=args.folds, top=args.top,
              seed=args.seed, overrides=args.overrides)  # fmt: skip
    print(json.dumps(out))


if __name__ == "__main__":
    main()
