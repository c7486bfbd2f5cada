"""Input-warning rates of a model: real letters should get none, text that is not an IMR item should get one.

    python bench/warnings.py --model MODEL_DIR_OR_URI [--letters DIR] [--dmhc CSV]

Sets (each reported as warned / n, with which checks fired):
- the real letters (PDF and TXT under `--letters`, default ../shared/data/raw/ca-dwc-imr-letters) through
  `predict_batch(paths)`, and their rationales sent as bare item texts;
- the DMHC health-plan sample's Findings as bare item texts (`--dmhc`, default the shared 20-row sample);
- synthetic demo letters (`imr_model.demo`, 60 letters, seed 99);
- junk texts that are not IMR items (weather, groceries, code, lorem ipsum, ...), written here.
Also the range of every p_overturned seen. Results go to bench/results/warnings.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "raw"

JUNK = [
    "The weather is nice today.",
    "Milk, eggs, two loaves of bread, bananas, coffee filters, dish soap and a bag of rice.",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "The city council voted on Tuesday to extend the downtown bike lane network by four miles next spring.",
    "Please remember to submit your timesheets by Friday so payroll can process them before the holiday.",
    "Our community guidelines ask members to be respectful and to stay on topic in every discussion thread.",
    "Preheat the oven to 350 degrees, whisk the butter and sugar, fold in the flour and bake for 25 minutes.",
    "The quarterly earnings call is scheduled for 9 am Pacific; analysts expect revenue growth of 4 percent.",
    "Dear team, the parking garage will be closed for maintenance this weekend; please use the north lot.",
    "asdf qwer zxcv uiop hjkl",
    "1234567890 0987654321 1122334455",
]


def rates(preds_per_input: list[list]) -> dict:
    items = [p for group in preds_per_input for p in group]
    fired = Counter(w.split(":", 1)[0] for p in items for w in p.warnings)
    return {"n": len(items), "warned": sum(1 for p in items if p.warnings), "checks": dict(fired)}


def main(argv: list[str] | None = None) -> dict:
    from imr_model.demo import generate_letters
    from imr_model.inference import load_model, predict_batch
    from imr_model.letters import iter_letter_files

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--letters", type=Path, default=SHARED / "ca-dwc-imr-letters")
    ap.add_argument("--dmhc", type=Path, default=SHARED / "ca-dmhc-imr-eval-sample" / "eval_set_imr_preview.csv")
    args = ap.parse_args(argv)
    predictor = load_model(args.model)
    report: dict = {"model": args.model}
    sets: dict[str, list] = {}
    if args.letters.is_dir():
        paths = iter_letter_files([args.letters])
        sets["real letters (predict(path))"] = predict_batch(paths, model=predictor)
        rationales = [r["rationale"] for p in paths for r in _records(p)]
        sets["real rationales as bare texts"] = predict_batch(rationales, model=predictor)
    if args.dmhc.is_file():
        import pandas as pd

        findings = [str(f) for f in pd.read_csv(args.dmhc)["Findings"].dropna()]
        sets["DMHC Findings as bare texts"] = predict_batch(findings, model=predictor)
    demo = [letter.text for letter in generate_letters(60, seed=99)]  # parsed from their text, like a user's letters
    sets["synthetic demo letters"] = predict_batch(demo, model=predictor)
    sets["junk texts"] = predict_batch(JUNK, model=predictor)
    probs = [p.p_overturned for group in sets.values() for g in group for p in g]
    for name, preds in sets.items():
        report[name] = rates(preds)
        r = report[name]
        print(f"{name:34s} {r['warned']:4d} / {r['n']:4d} warned  {r['checks']}")
    report["p_overturned_range"] = [min(probs), max(probs)]
    print(f"p_overturned range over all {len(probs)} items: [{min(probs):.4f}, {max(probs):.4f}]")
    out = REPO / "bench" / "results" / "warnings.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(f"→ {out}")
    return report


def _records(path: Path) -> list[dict]:
    from imr_model.letters import parse_file
    from imr_model.types import LetterError

    try:
        return parse_file(path).item_records()
    except LetterError:
        return []


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
