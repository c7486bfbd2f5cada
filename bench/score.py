"""Scoring benchmark, all in one run: HF pipeline per item vs `imr score` (torch, onnx), attribution cost.

    python bench/score.py [--letters DIR] [--model URI] [--repeat 3] [--attr-items 24] [--out bench/results/score.json]

* ``hf``: what a user would write: ``pipeline("text-classification")`` on the same backbone, called
  once per item on the model-input texts (letters parsed beforehand, parsing not timed).
* ``torch`` / ``onnx``: `imr score` end to end (PDF parsing included) on the letters, model loaded and
  ONNX exported beforehand (not timed). Output rows go to a temporary JSONL file. The process-wide
  window cache (`imr_model.window_cache`) is emptied before every run, so each run starts cold like a
  new `imr score` process; its hit rate within the run is reported.
* The three are timed in one process (phase ``timed``), interleaved `--repeat` times in a rotating
  order, so the ratios compare runs made under the same load (other jobs share these CPUs). Best and
  median over the repeats are reported for wall time, and CPU time per item (this process plus its
  parse workers: user + system) beside it; CPU time varies far less than wall time on a shared machine.
  `--isolate` instead runs every timed run in its own process (peak RSS per path; the old layout).
* ``attr``: ms per item with and without attributions (`n_steps`=32, torch) on the first items, window
  cache emptied before each timing (what a new letter costs).
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
TIMED = ("hf", "torch", "onnx")
_INTERNAL = ("export", "timed")  # ONNX export + quantization, once, before any timed phase; the timed runs


def cpu_seconds() -> float:
    """User + system CPU of this process and its waited-for children (the parse workers): far less sensitive
    than wall time to other jobs on the machine."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def parsed_items(letters: Path) -> list[dict]:
    from imr_model.letters import iter_letter_files, parse_many

    return [r for res in parse_many(iter_letter_files([letters])) if not isinstance(res, Exception) for r in res.item_records()]


def hf_runner(args):
    """A function that runs the HF pipeline once over every item (the setup is not timed)."""
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

    def run() -> dict:
        start, cpu = time.perf_counter(), cpu_seconds()
        for text in texts:
            pipe(text, truncation=True)
        seconds = time.perf_counter() - start
        return {"items": len(texts), "seconds": seconds, "items_per_s": len(texts) / seconds,
                "cpu_ms_per_item": (cpu_seconds() - cpu) / len(texts) * 1000}  # fmt: skip

    return run


def score_runner(args, backend: str):
    """A function that runs `imr score` once over the letters, window cache emptied first (setup not timed)."""
    from imr_model.inference import load_model
    from imr_model.scoring import score
    from imr_model.window_cache import shared_cache

    predictor = load_model(args.model, backend=backend)  # load outside the timed part (ONNX exported by "export")
    cache = predictor.window_cache or shared_cache()
    with tempfile.TemporaryDirectory() as tmp:  # warm-up on a few letters: first-call set-up is not timed
        few = Path(tmp) / "few"
        few.mkdir()
        for letter in sorted(args.letters.glob("*.pdf"))[:3]:
            (few / letter.name).symlink_to(letter.resolve())
        score([few], Path(tmp) / "warm.jsonl", model=args.model, backend=backend, batch_size=args.batch_size,
              progress=False)  # fmt: skip

    def run() -> dict:
        cache.clear()
        with tempfile.TemporaryDirectory() as tmp:
            cpu = cpu_seconds()
            summary = score([args.letters], Path(tmp) / "out.jsonl", model=args.model, backend=backend,
                            batch_size=args.batch_size, progress=False)  # fmt: skip
            cpu = cpu_seconds() - cpu
        return {"items": summary.items, "letters": summary.letters, "errors": summary.errors,
                "seconds": summary.seconds, "items_per_s": summary.items_per_second,
                "cpu_ms_per_item": cpu / summary.items * 1000, "window_cache": cache.stats()}  # fmt: skip

    return run


def phase_hf(args) -> dict:
    return hf_runner(args)()


def phase_score(args, backend: str) -> dict:
    return score_runner(args, backend)()


def phase_timed(args) -> dict:
    """Every timed path in this one process, interleaved `--repeat` times in a rotating order."""
    paths = [p for p in args.phases.split(",") if p in TIMED]
    runners = {p: hf_runner(args) if p == "hf" else score_runner(args, p) for p in paths}
    runs = []
    for rep in range(args.repeat):
        for p in paths[rep % len(paths):] + paths[: rep % len(paths)]:
            print(f"[timed] repeat {rep + 1}/{args.repeat}: {p}", file=sys.stderr, flush=True)
            runs.append({"phase": p, "repeat": rep, **runners[p]()})
    return {"runs": runs}


def phase_attr(args) -> dict:
    from imr_model.inference import load_model

    predictor = load_model(args.model)
    records = parsed_items(args.letters)[: args.attr_items]
    predictor.predict_records(records[:2], attributions=True, n_steps=4)  # warm-up
    timings: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.repeat):  # interleaved; the window cache emptied before each timing: new letters
        for flag in (False, True):
            if predictor.window_cache is not None:
                predictor.window_cache.clear()
            start = time.perf_counter()
            preds = predictor.predict_records(records, attributions=flag, n_steps=32, batch_size=args.batch_size)
            timings[flag].append((time.perf_counter() - start) / len(records) * 1000)
    ratios = sorted(a / b for a, b in zip(timings[True], timings[False]))
    windows = [w for p in preds for w in p.attributions.windows]
    deltas = [abs(p.attributions.delta) for p in preds]
    return {"items": len(records), "ms_per_item_plain": min(timings[False]), "ms_per_item_attributions": min(timings[True]),
            "ratio": min(timings[True]) / min(timings[False]), "ratio_median": ratios[len(ratios) // 2],
            "runs_plain": timings[False], "runs_attributions": timings[True],
            "windows": len(windows), "windows_attributed": sum(w.attributed for w in windows),
            "max_abs_delta": max(deltas), "median_abs_delta": sorted(deltas)[len(deltas) // 2]}  # fmt: skip


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
    from imr_model.devices import resolve_device

    fn = {"export": phase_export, "hf": phase_hf, "torch": lambda a: phase_score(a, "torch"), "onnx": lambda a: phase_score(a, "onnx"),
          "attr": phase_attr, "agree": phase_agree, "timed": phase_timed}[args.phase]  # fmt: skip
    result = fn(args)
    result["peak_rss_mb"] = peak_rss_mb()
    # what load_model's default (auto) ran the torch phases on; the ONNX session and the HF pipeline run on the CPU
    result["device"] = "cpu" if args.phase in ("onnx", "export", "hf") else str(resolve_device("auto"))
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
    parser.add_argument("--repeat", type=int, default=3, help="runs of each timed path (best and median reported)")
    parser.add_argument("--isolate", action="store_true", help="each timed run in its own process (peak RSS per path)")
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
        timed = [ph for ph in phases if ph in TIMED]
        if args.isolate:  # interleaved `--repeat` times, each run in its own process
            order = ["export"] + timed * args.repeat + [ph for ph in phases if ph not in timed]
        else:
            order = ["export"] + (["timed"] if timed else []) + [ph for ph in phases if ph not in timed]
        for phase in order:
            cmd = [sys.executable, __file__, "--phase", phase, "--letters", str(args.letters), "--model", model,
                   "--batch-size", str(args.batch_size), "--attr-items", str(args.attr_items), "--repeat", str(args.repeat),
                   "--phases", args.phases, "--split-seed", str(args.split_seed), "--val-size", str(args.val_size),
                   "--test-size", str(args.test_size)]  # fmt: skip
            print(f"[{phase}] running ...", file=sys.stderr, flush=True)
            proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=None if phase == "timed" else subprocess.PIPE,
                                  text=True)  # fmt: skip
            if proc.returncode != 0:
                raise SystemExit(f"phase {phase} failed:\n{(proc.stderr or '')[-3000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            for run in result.pop("runs", None) or [{"phase": phase, **result}]:
                run.setdefault("peak_rss_mb", result.get("peak_rss_mb"))
                run.setdefault("device", result.get("device"))
                results.setdefault("runs", []).append(run)
                if run["phase"] in TIMED:
                    continue
                results[run["phase"]] = run
        summarise(results)
    report(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"results → {args.out}", file=sys.stderr)
    return results


def _median(values: list[float]) -> float:
    v = sorted(values)
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


def summarise(r: dict) -> None:
    """Per timed path: best and median items/s and CPU ms/item over its runs; ratios against the HF pipeline."""
    for key in TIMED:
        runs = [run for run in r.get("runs", []) if run["phase"] == key]
        if not runs:
            continue
        rates, cpus = [run["items_per_s"] for run in runs], [run["cpu_ms_per_item"] for run in runs]
        best = max(runs, key=lambda run: run["items_per_s"])
        r[key] = {**best, "runs": len(runs), "best_items_per_s": max(rates), "median_items_per_s": _median(rates),
                  "best_cpu_ms_per_item": min(cpus), "median_cpu_ms_per_item": _median(cpus)}  # fmt: skip
    if "hf" in r:
        h = r["hf"]
        r["speedup"] = {key: {"best_vs_best": r[key]["best_items_per_s"] / h["best_items_per_s"],
                              "median_vs_median": r[key]["median_items_per_s"] / h["median_items_per_s"],
                              "cpu_best_vs_best": h["best_cpu_ms_per_item"] / r[key]["best_cpu_ms_per_item"],
                              "cpu_median_vs_median": h["median_cpu_ms_per_item"] / r[key]["median_cpu_ms_per_item"]}
                        for key in ("torch", "onnx") if key in r}  # fmt: skip


def report(r: dict) -> None:
    print(f"model: {r['model']}{'' if r['trained_model'] else '  (UNTRAINED heads: timings only, ΔAUROC meaningless)'}")
    ran_on = sorted({str(run.get("device", "?")) for run in r.get("runs", [])})
    print(f"device: {', '.join(ran_on)} (imr_model.devices; the HF pipeline and ONNX rows run on the CPU)")
    print(f"{'path':<28}{'items':>6}{'items/s best':>13}{'median':>8}{'ms/item':>9}{'CPU ms/item best':>17}{'median':>8}"
          f"{'cache hits':>11}{'peak RSS MB':>12}")  # fmt: skip
    for key, label in (("hf", "HF pipeline, per item"), ("torch", "imr score --backend torch"), ("onnx", "imr score --backend onnx")):
        if key in r:
            x = r[key]
            hits = f"{x['window_cache']['hit_rate']:.0%}" if x.get("window_cache") else "-"
            print(f"{label:<28}{x['items']:>6}{x['best_items_per_s']:>13.1f}{x['median_items_per_s']:>8.1f}"
                  f"{1000 / x['best_items_per_s']:>9.1f}{x['best_cpu_ms_per_item']:>17.1f}{x['median_cpu_ms_per_item']:>8.1f}"
                  f"{hits:>11}{x.get('peak_rss_mb') or 0:>12.0f}")  # fmt: skip
    for key, s in r.get("speedup", {}).items():
        print(f"speed-up {key} vs HF pipeline: {s['best_vs_best']:.2f}x best-vs-best, {s['median_vs_median']:.2f}x "
              f"median-vs-median; CPU time per item {s['cpu_best_vs_best']:.2f}x best, {s['cpu_median_vs_median']:.2f}x median")  # fmt: skip
    if "attr" in r:
        a = r["attr"]
        print(f"attributions (n_steps=32, {a['items']} items, cold window cache): {a['ms_per_item_plain']:.1f} ms/item plain, "
              f"{a['ms_per_item_attributions']:.1f} ms/item with attributions -> {a['ratio']:.1f}x best, "
              f"{a.get('ratio_median', a['ratio']):.1f}x median; {a.get('windows_attributed', '?')} of {a.get('windows', '?')} "
              f"windows attributed; |delta| median {a['median_abs_delta']:.3g}, max {a['max_abs_delta']:.3g}")  # fmt: skip
    if "agree" in r:
        g = r["agree"]
        auc = f", AUROC torch {g['auroc_torch']:.4f} onnx {g['auroc_onnx']:.4f} (Δ {g['delta_auroc']:+.4f})" if "delta_auroc" in g else ""
        print(f"onnx ({g.get('onnx_file', '?')}) vs torch on {g['on']}: n={g['n']}, max|Δp| {g['max_abs_dp_outcome']:.4f}, "
              f"outcome agreement {g['outcome_agreement']:.3f}{auc}")  # fmt: skip


if __name__ == "__main__":
    main()
