"""Does batch drift (imr_model.drift) stay quiet on real held-out letters and speak up on other populations?

    python experiments/drift_check.py --letters ../shared/data/raw/ca-dwc-imr-letters/pdfs \
        --dmhc ../shared/data/raw/ca-dmhc-imr-eval-sample/eval_set_imr_preview.csv --seeds 0 1 2 [--json out.json]

Per seed: the letters are split in half by letter (seeded); a model is trained on one half with the `masked`
config (recipe probe; `--set` overrides, domain adaptation off unless `--set train.domain_adaptation=true`) in a
temporary directory, and `scoring.drift_report` is run on the other half (a folder of symlinks to its PDFs),
on `--demo` synthetic demo letters and on the DMHC table (its Findings as the item texts). Prints, per batch,
the verdict and each feature's p-value and effect, and the margins of the held-out half: the smallest p-value
over the per-feature alpha and the largest effect over its minimum (a verdict of drift needs both beyond 1 on
one feature). Writes numbers only, never letter text. Research tooling: not part of the package.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def split_letters(letters: Path, seed: int) -> tuple[list[Path], list[Path]]:
    files = sorted(p for p in letters.iterdir() if p.suffix.lower() in (".pdf", ".txt"))
    order = np.random.default_rng(seed).permutation(len(files))
    half = len(files) // 2
    return [files[i] for i in sorted(order[:half])], [files[i] for i in sorted(order[half:])]


def link_folder(files: list[Path], folder: Path) -> Path:
    folder.mkdir(parents=True)
    for f in files:
        (folder / f.name).symlink_to(f.resolve())
    return folder


def margins(report: dict) -> dict:
    tested = {f: r for f, r in report["features"].items() if r["p_value"] is not None}
    p_f, p_r = min(tested.items(), key=lambda fr: fr[1]["p_value"])
    e_f, e_r = max(tested.items(), key=lambda fr: fr[1]["effect"] / fr[1]["min_effect"])
    return {"smallest_p": {"feature": p_f, "p": p_r["p_value"], "times_alpha": p_r["p_value"] / p_r["alpha"]},
            "largest_effect": {"feature": e_f, "effect": e_r["effect"], "of_minimum": e_r["effect"] / e_r["min_effect"]}}


def run(args: argparse.Namespace) -> dict:
    from imr_model.config import load_config
    from imr_model.dataset import load_records
    from imr_model.demo import write_demo_letters
    from imr_model.experiment import run_training
    from imr_model.inference import clear_cache
    from imr_model.scoring import drift_report

    out = {"config": args.config, "overrides": args.overrides, "seeds": {}}
    with tempfile.TemporaryDirectory(prefix="imr-drift-") as tmp:
        tmp = Path(tmp)
        demo = tmp / "demo"
        write_demo_letters(demo, args.demo, seed=0)
        for seed in args.seeds:
            start = time.time()
            train_files, held_files = split_letters(Path(args.letters), seed)
            train_dir = link_folder(train_files, tmp / f"train-{seed}")
            held_dir = link_folder(held_files, tmp / f"held-{seed}")
            cfg = load_config(args.config, ["train.domain_adaptation=false", "mlflow.enabled=false",
                                            f"output_dir={tmp / 'models'}", *args.overrides])  # fmt: skip
            records, _ = load_records([train_dir])
            result = run_training(cfg, records=records, quiet=True)
            trained = time.time() - start
            batches = {"held-out half": [str(held_dir)], f"{args.demo} demo letters": [str(demo)]}
            if args.dmhc:
                batches["DMHC Findings"] = [args.dmhc]
            row = {"train_letters": len(train_files), "train_items": len(records), "train_seconds": round(trained, 1),
                   "batches": {}}  # fmt: skip
            for name, inputs in batches.items():
                report = drift_report(inputs, model=str(result.model_dir), progress=False)
                row["batches"][name] = {"verdict": report["verdict"], "n_items": report["n_items"],
                                        "features": {f: {k: r[k] for k in ("p_value", "effect", "alpha", "min_effect",
                                                                        "drifted", "n_batch", "n_reference")}
                                                     for f, r in report["features"].items()},
                                        "margins": margins(report)}  # fmt: skip
            clear_cache()
            out["seeds"][str(seed)] = row
            print_seed(seed, row)
    return out


def print_seed(seed: int, row: dict) -> None:
    print(f"\nseed {seed}: trained on {row['train_letters']} letters / {row['train_items']} items "
          f"({row['train_seconds']} s)")  # fmt: skip
    for name, b in row["batches"].items():
        m = b["margins"]
        print(f"  {name}: {b['verdict']} ({b['n_items']} items); smallest p {m['smallest_p']['p']:.2g} on "
              f"{m['smallest_p']['feature']} ({m['smallest_p']['times_alpha']:.3g} x alpha); largest effect "
              f"{m['largest_effect']['effect']:.3f} on {m['largest_effect']['feature']} "
              f"({m['largest_effect']['of_minimum']:.2f} x minimum)")  # fmt: skip
        for f, r in b["features"].items():
            if r["p_value"] is not None:
                print(f"      {f:<15} p {r['p_value']:<10.3g} effect {r['effect']:.3f} "
                      f"{'DRIFT' if r['drifted'] else 'ok'}  (n {r['n_batch']} vs {r['n_reference']})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--letters", required=True, help="folder of letters (PDF/TXT)")
    parser.add_argument("--dmhc", help="the DMHC table (CSV)")
    parser.add_argument("--demo", type=int, default=60, help="synthetic demo letters to score")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--config", default="masked")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args()
    out = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
