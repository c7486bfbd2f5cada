"""Scoring benchmark, all in one run: HF pipeline per item vs `imr score` (torch, onnx), attribution cost.

    python bench/score.py [--letters DIR] [--model URI] [--attr-items 24] [--out bench/results/score.json]

Phases run one after another, each in its own subprocess so its peak RSS is its own:

* ``hf``: what a user would write: ``pipeline("text-classification")`` on the same backbone, called
  once per item on the model-input texts (letters parsed beforehand, parsing not timed).
* ``torch`` / ``onnx``: `imr score` end to end (PDF parsing included) on the letters, model loaded and
  ONNX exported beforehand (not timed). Output rows go to a temporary JSONL file.
* ``attr``: ms per item with and without attributions (`n_steps`=32, torch) on the first items.
* ``agree``: max |Δp| and ΔAUROC of the ONNX path against PyTorch (int8, or fp32 where the int8
  check of `onnx_backend.onnx_forward` rejected int8; the report names the file). "Held-out" means the test
  split of the model's training data when `dataset_digest` proves the split could be rebuilt from
  these letters; otherwise all letters are used and the report says so.

Nothing from the letters is printed or saved: only counts, timings and metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_LETTERS = Path(__file__).resolve().parents[2] / "shared" / "data" / "raw" / "ca-dwc-imr-letters" / "pdfs"
PHASES = ("hf", "torch", "onnx", "attr", "agree")
_INTERNAL = ("export",)  # ONNX export + quantization, once, before any timed phase


def cpu_seconds() -> float:
    """User + system CPU of this process: far less sensitive than wall time to other jobs on the machine."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def parsed_items(letters: Path) -> list[dict]:
    from imr_model.letters import iter_letter_files, parse_many

    return [r for res in parse_many(iter_letter_files([letters])) if not isinstance(res, Exception) for r in res.item_records()]


def phase_hf(args) -> dict:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline
    from transformers.utils import logging

    from imr_model.config import resolve_backbone
    from imr_model.inference import load_model

    logging.set_verbosity_error()
    predictor = load_model(args.model)
    texts = predictor.item_texts(parsed_items(args.letters))
    source = resolve_backbone(predictor.classifier.config.backbone)
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=2, local_files_only=True)
    pipe = pipeline("text-classification", model=model, tokenizer=AutoTokenizer.from_pretrained(source), device=-1)
    pipe(texts[0], truncation=True)  # warm-up
    start, cpu = time.perf_counter(), cpu_seconds()
    for text in texts:
        pipe(text, truncation=True)
    seconds = time.perf_counter() - start
    return {"items": len(texts), "seconds": seconds, "items_per_s": len(texts) / seconds,
            "cpu_ms_per_item": (cpu_seconds() - cpu) / len(texts) * 1000}  # fmt: skip


def phase_score(args, backend: str) -> dict:
    from imr_model.inference import load_model
    from imr_model.scoring import score

    load_model(args.model, backend=backend)  # load outside the timed part (ONNX was exported by phase "export")
    cpu = cpu_seconds()
    with tempfile.TemporaryDirectory() as tmp:
        summary = score([args.letters], Path(tmp) / "out.jsonl", model=args.model, backend=backend,
                        batch_size=args.batch_size, progress=False)  # fmt: skip
    return {"items": summary.items, "letters": summary.letters, "errors": summary.errors,
            "seconds": summary.seconds, "items_per_s": summary.items_per_second,
            "cpu_ms_per_item": (cpu_seconds() - cpu) / summary.items * 1000}  # fmt: skip


def phase_attr(args) -> dict:
    from imr_model.inference import load_model

    predictor = load_model(args.model)
    records = parsed_items(args.letters)[: args.attr_items]
    predictor.predict_records(records[:2], attributions=True, n_steps=4)  # warm-up
    timings = {}
    for flag in (False, True):
        start = time.perf_counter()
        preds = predictor.predict_records(records, attributions=flag, n_steps=32, batch_size=args.batch_size)
        timings[flag] = (time.perf_counter() - start) / len(records) * 1000
    deltas = [abs(p.attributions.delta) for p in preds]
    return {"items": len(records), "ms_per_item_plain": timings[False], "ms_per_item_attributions": timings[True],
            "ratio": timings[True] / timings[False], "max_abs_delta": max(deltas), "median_abs_delta": sorted(deltas)[len(deltas) // 2]}  # fmt: skip


def heldout(records: list[dict], classifier, args) -> tuple[list[dict], str]:
    """The test split of the model's training data if it can be rebuilt exactly, else all records."""
    digest = classifier.config.data_digest
    if digest:
        from imr_model.dataset import build_dataset, dataset_digest

        dd = build_dataset(records, seed=args.split_seed, val_size=args.val_size, test_size=args.test_size)
        if dataset_digest(dd) == digest:
            test_ids = set(dd["test"]["letter_id"])
            return [r for r in records if r["letter_id"] in test_ids], f"test split ({len(test_ids)} letters)"
    return records, "all letters (the training split could not be rebuilt: these may include training letters)"


def phase_agree(args) -> dict:
    from imr_model.inference import load_model
    from imr_model.onnx_backend import compare

    torch_model, onnx_model = load_model(args.model), load_model(args.model, backend="onnx")
    records, which = heldout(parsed_items(args.letters), torch_model.classifier, args)
    texts = torch_model.item_texts(records)
    y = [int(r["decision"] == "Overturned") for r in records]
    return {"on": which, "onnx_file": onnx_model.forward.path.name,
            **compare(torch_model.classifier, onnx_model.forward, texts, y, batch_size=args.batch_size)}  # fmt: skip


def phase_export(args) -> dict:
    from imr_model.inference import load_model

    start = time.perf_counter()
    load_model(args.model, backend="onnx")
    return {"seconds": time.perf_counter() - start}


def run_phase(args) -> None:
    fn = {"export": phase_export, "hf": phase_hf, "torch": lambda a: phase_score(a, "torch"), "onnx": lambda a: phase_score(a, "onnx"),
          "attr": phase_attr, "agree": phase_agree}[args.phase]  # fmt: skip
    result = fn(args)
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


def ensure_model(args, workdir: Path) -> tuple[str, bool]:
    """The model to benchmark; without a trained one, MiniLM with untrained heads (timings only)."""
    from imr_model.inference import ModelNotFoundError, resolve_model_uri

    try:
        return resolve_model_uri(args.model), True
    except ModelNotFoundError:
        from imr_model.config import ModelConfig
        from imr_model.modeling import IMRClassifier
        from imr_model.taxonomy import LABELS

        path = workdir / "untrained-minilm"
        IMRClassifier.build(ModelConfig(guideline_tfidf=False), list(LABELS)).save_pretrained(path)
        return str(path), False


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--letters", type=Path, default=DEFAULT_LETTERS)
    parser.add_argument("--model", default=None, help="model dir or MLflow URI (default: imr's resolution order)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--attr-items", type=int, default=24)
    parser.add_argument("--split-seed", type=int, default=13)
    parser.add_argument("--val-size", type=float, default=0.15)
    parser.add_argument("--test-size", type=float, default=0.15)
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--repeat", type=int, default=3, help="runs of each timed phase (fastest kept, median shown)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/score.json"))
    parser.add_argument("--phase", choices=PHASES + _INTERNAL, help=argparse.SUPPRESS)  # internal: run one phase
    args = parser.parse_args(argv)
    if not args.letters.is_dir():
        parser.error(f"--letters {args.letters} is not a folder of letters")
    if args.phase:
        run_phase(args)
        return {}
    with tempfile.TemporaryDirectory(prefix="imr-bench-") as tmp:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "IMR_CACHE_DIR": os.environ.get("IMR_CACHE_DIR", str(Path(tmp) / "cache"))}
        model, trained = ensure_model(args, Path(tmp))
        results: dict = {"model": model, "trained_model": trained, "letters": str(args.letters)}
        phases = args.phases.split(",")
        timed = [ph for ph in phases if ph in ("hf", "torch", "onnx")]
        # Other processes share these CPUs: timed phases are interleaved `--repeat` times, fastest kept.
        order = ["export"] + timed * args.repeat + [ph for ph in phases if ph not in timed]
        for phase in order:
            cmd = [sys.executable, __file__, "--phase", phase, "--letters", str(args.letters), "--model", model,
                   "--batch-size", str(args.batch_size), "--attr-items", str(args.attr_items),
                   "--split-seed", str(args.split_seed), "--val-size", str(args.val_size), "--test-size", str(args.test_size)]  # fmt: skip
            print(f"[{phase}] running ...", file=sys.stderr, flush=True)
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"phase {phase} failed:\n{proc.stderr[-3000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            best = results.get(phase)
            if best is None or result.get("items_per_s", 0) > best.get("items_per_s", 0):
                results[phase] = result
            results.setdefault("runs", []).append({"phase": phase, **result})
    report(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"results → {args.out}", file=sys.stderr)
    return results


def report(r: dict) -> None:
    print(f"model: {r['model']}{'' if r['trained_model'] else '  (UNTRAINED heads: timings only, ΔAUROC meaningless)'}")
    print(f"{'path':<30}{'items':>6}{'best items/s':>14}{'median':>8}{'best ms/item':>14}{'CPU ms/item':>13}{'peak RSS MB':>13}")
    median = {}
    for key, label in (("hf", "HF pipeline, per item"), ("torch", "imr score --backend torch"), ("onnx", "imr score --backend onnx")):
        if key in r:
            x = r[key]
            rates = sorted(run["items_per_s"] for run in r.get("runs", []) if run["phase"] == key)
            median[key] = rates[len(rates) // 2]
            print(f"{label:<30}{x['items']:>6}{x['items_per_s']:>14.1f}{median[key]:>8.1f}{1000 / x['items_per_s']:>14.1f}"
                  f"{x['cpu_ms_per_item']:>13.0f}{x['peak_rss_mb']:>13.0f}")  # fmt: skip
    if "hf" in r:
        for key in ("torch", "onnx"):
            if key in r:
                print(f"speed-up {key} vs HF pipeline: {r[key]['items_per_s'] / r['hf']['items_per_s']:.2f}x best-vs-best, "
                      f"{median[key] / median['hf']:.2f}x median-vs-median")  # fmt: skip
    if "attr" in r:
        a = r["attr"]
        print(f"attributions (n_steps=32, {a['items']} items): {a['ms_per_item_plain']:.1f} ms/item plain, "
              f"{a['ms_per_item_attributions']:.1f} ms/item with attributions -> {a['ratio']:.1f}x; "
              f"|delta| median {a['median_abs_delta']:.3g}, max {a['max_abs_delta']:.3g}")  # fmt: skip
    if "agree" in r:
        g = r["agree"]
        auc = f", AUROC torch {g['auroc_torch']:.4f} onnx {g['auroc_onnx']:.4f} (Δ {g['delta_auroc']:+.4f})" if "delta_auroc" in g else ""
        print(f"onnx ({g.get('onnx_file', '?')}) vs torch on {g['on']}: n={g['n']}, max|Δp| {g['max_abs_dp_outcome']:.4f}, "
              f"outcome agreement {g['outcome_agreement']:.3f}{auc}")  # fmt: skip


if __name__ == "__main__":
    main()
