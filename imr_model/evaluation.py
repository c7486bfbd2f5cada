"""Scoring fitted models side by side: majority / TF-IDF / model rows on a split, tables, `imr evaluate`.

Every comparison shows the majority rule (the training Overturned rate) and the TF-IDF baseline
beside the model, on the same items; rationales usually state the verdict, so a model row alone
says little.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from imr_model import overlap
from imr_model.baseline import BaselineModel
from imr_model.dataset import dataset_digest, load_records
from imr_model.intervals import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, Resampler, add_intervals, paired_difference
from imr_model.metrics import format_table, outcome_metrics, summary_row
from imr_model.modeling import IMRClassifier
from imr_model.slices import format_slices, slice_info, slice_metrics  # noqa: F401 (format_slices: `imr evaluate --slices`)
from imr_model.splits import Split, records_to_split
from imr_model.tracking import resolve_model_dir
from imr_model.training import score_predictions

logger = logging.getLogger(__name__)

BASELINE_DIR = "baseline"  # the TF-IDF baseline's folder inside a model directory


def compare_rows(split: Split, label_names: Sequence[str], train_rate: float, models: dict, *,
                 bootstrap: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict:  # fmt: skip
    """{"majority"|name: {"outcome", "guidelines", "_probabilities", ...}} on one split; majority predicts the training rate.

    With `bootstrap` > 0 every metric gets a letter-level `<metric>_ci95` sibling (`imr_model.intervals`)
    and each row a private "_bootstrap" summary (resamples drawn and dropped).
    """
    rows = {}
    p_major = np.full(len(split), float(train_rate))
    rows["majority"] = score_predictions(split, p_major, np.zeros_like(split.Y), 0.5, label_names)
    rows["majority"].update({"_probabilities": p_major, "_threshold": 0.5, "_decided": np.zeros_like(split.Y)})
    for name, model in models.items():
        p, P = model.predict_proba(split.texts)
        decided = model.decide_guidelines(P)
        rows[name] = score_predictions(split, p, decided, model.outcome_threshold, label_names)
        rows[name].update({"_probabilities": p, "_threshold": model.outcome_threshold, "_decided": decided})
    if bootstrap and len(split):
        add_row_intervals(rows, split.y, split.Y, split.groups, n=bootstrap, seed=seed)
    return rows


def add_row_intervals(rows: dict, y, Y, groups, *, n: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict:
    """`<metric>_ci95` beside every metric of each row (rows hold "_probabilities", "_threshold", "_decided"),
    all rows on the same letter resamples; returns the bootstrap summary, also kept as each row's "_bootstrap"."""
    rs = Resampler(y, groups, n=n, seed=seed)
    for name, row in rows.items():
        if name.startswith("_") or "_probabilities" not in row:
            continue
        add_intervals(row, rs, row["_probabilities"], row.get("_threshold", 0.5), Y, row.get("_decided"))
        row["_bootstrap"] = rs.info()
    return rs.info()


def paired_rows(rows: dict, y, groups, a: str = "tfidf", b: str = "model", metrics: Sequence[str] = ("auroc", "auprc"), *,
                n: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict:  # fmt: skip
    """{"<b>_minus_<a>": {metric: paired difference with "difference_ci95"}} on the same letter resamples; {} without both rows."""
    if a not in rows or b not in rows or not len(y):
        return {}
    rs = Resampler(y, groups, n=n, seed=seed)
    pa, pb = rows[a]["_probabilities"], rows[b]["_probabilities"]
    ta, tb = rows[a].get("_threshold", 0.5), rows[b].get("_threshold", 0.5)
    return {f"{b}_minus_{a}": {m: paired_difference(y, pa, pb, metric=m, threshold_a=ta, threshold_b=tb, resampler=rs)
                               for m in metrics}}  # fmt: skip


def outcome_metrics_per_item(y: np.ndarray, p: np.ndarray, thresholds: np.ndarray) -> dict:
    """Pooled out-of-fold outcome metrics when each fold chose its own threshold.

    Threshold-free metrics use the pooled probabilities; decision metrics use each item's own fold
    threshold (shifting p by the threshold difference leaves every decision unchanged).
    """
    decisions = outcome_metrics(y, np.clip(p - thresholds + 0.5, 0, 1), 0.5)
    pooled = outcome_metrics(y, p, float(np.median(thresholds)))
    for key in ("accuracy", "balanced_accuracy", "precision", "recall", "f1", "mcc", "confusion"):
        pooled[key] = decisions[key]
    pooled["threshold"] = float(np.median(thresholds))
    return pooled


def table_rows(by_split: dict) -> dict:
    """{"split/row": summary row} for `metrics.format_table`."""
    return {f"{split}/{name}": summary_row(r["outcome"], r["guidelines"])
            for split, rows in by_split.items() for name, r in rows.items()
            if not str(name).startswith("_") and isinstance(r, dict) and "outcome" in r}  # fmt: skip


def strip_private(obj):
    """The JSON-ready part of a result: keys starting with "_" (probability arrays) removed, recursively."""
    if isinstance(obj, dict):
        return {k: strip_private(v) for k, v in obj.items() if not str(k).startswith("_")}
    return obj


def format_metrics(metrics: dict) -> str:
    """Text table: CV rows first (when present), then validation and test."""
    by_split = {k: metrics[k] for k in ("cv", "validation", "test") if k in metrics}
    by_split = {k: {n: r for n, r in v.items() if isinstance(r, dict) and "outcome" in r} for k, v in by_split.items()}
    return format_table(table_rows(by_split), "Outcome = Overturned vs Upheld; guideline F1 at fitted thresholds")


class _BatchedScorer:
    """An IMRClassifier with a fixed batch size, shaped like the other scorers."""

    def __init__(self, clf: IMRClassifier, batch_size: int):
        self.clf, self.batch_size = clf, batch_size
        self.outcome_threshold = clf.outcome_threshold

    def predict_proba(self, texts):
        return self.clf.predict_proba(texts, batch_size=self.batch_size)

    def decide_guidelines(self, guideline_probs):
        return self.clf.decide_guidelines(guideline_probs)


def load_labelled(data: Sequence[str]) -> tuple[list[dict], list]:
    """Labelled item records of `data` (letters, folders, globs, tables) and the files that failed to parse."""
    records, errors = load_records(list(data))
    if not records:
        raise ValueError(f"no labelled items found in {list(data)} ({len(errors)} files failed to parse)")
    return records, errors


def evaluate_model(model: str | Path, data: Sequence[str], *, batch_size: int = 32) -> tuple[dict, str]:
    """Score a saved or registered model (and its TF-IDF baseline, and the majority rule) on labelled letters."""
    records, errors = load_labelled(data)
    result, table, _ = evaluate_records(model, records, errors, batch_size=batch_size)
    return result, table


def evaluate_records(model: str | Path, records: Sequence[dict], errors: Sequence = (), *,
                     batch_size: int = 32) -> tuple[dict, str, dict]:  # fmt: skip
    """`evaluate_model` on item records already loaded; also returns the model's predictions {"y", "p",
    "threshold", "groups"} (numbers and letter ids only), for paired comparisons on the same items."""
    model_dir = resolve_model_dir(model)
    clf = IMRClassifier.from_pretrained(model_dir)
    split = records_to_split(records, clf.config.text_view, clf.label_names)
    models: dict = {}
    if (model_dir / BASELINE_DIR).is_dir():
        models["tfidf"] = BaselineModel.load(model_dir / BASELINE_DIR)
    models["model"] = _BatchedScorer(clf, batch_size)
    train_rate = float(clf.metrics.get("train_overturn_rate", 0.0))
    rows = compare_rows(split, clf.label_names, train_rate, models)
    result = {
        "model": str(model), "model_dir": str(model_dir), "model_version": clf.config.version,
        "text_view": clf.config.text_view, "data_digest": dataset_digest(records), "n_items": len(records),
        "n_overturned": int(split.y.sum()), "parse_errors": [e.source for e in errors],
        "bootstrap": rows["model"].get("_bootstrap"),
        "evaluation": strip_private(rows),
        "paired": paired_rows(rows, split.y, split.groups),
        "slices": slice_metrics(records, split.y, rows["model"]["_probabilities"], clf.outcome_threshold, split.Y,
                                rows["model"]["_decided"], split.groups),
        "slices_info": slice_info(),
        "overlap": overlap.check(records, model_dir),
    }  # fmt: skip
    table = format_table(table_rows({"eval": rows}), f"{len(records)} items, {int(split.y.sum())} Overturned")
    if (warning := result["overlap"]["warning"]) is not None:
        logger.warning("%s: %s", model, warning)
        table = f"WARNING: {warning}\n{table}"
    predictions = {"y": split.y, "p": rows["model"]["_probabilities"], "threshold": clf.outcome_threshold,
                   "groups": split.groups}  # fmt: skip
    return result, table, predictions
