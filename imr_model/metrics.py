"""Outcome and guideline metrics and the comparison table (fitting thresholds and temperature: calibration.py).

Outcome metrics treat Overturned (label 1) as the positive class: with ~89% Upheld, accuracy alone
hides a model that never predicts an overturn, so every table carries balanced accuracy, F1 and
MCC for Overturned, AUROC/AUPRC (threshold-free), and Brier/ECE (calibration), beside a majority
row. ECE follows Guo et al. (2017): 15 equal-width bins of the top-label confidence
max(p, 1 - p); `ece_overturned` bins P(Overturned) itself (what the reliability diagram shows).
Guideline macro-F1 averages over labels that occur in the evaluated items (`macro_f1`); the
scikit-learn average over every taxonomy label, absent ones scoring 0, is `macro_f1_all_labels`.
"""

from __future__ import annotations

import math
import warnings
from typing import Mapping, Sequence

import numpy as np
from sklearn import metrics as skm

ECE_BINS = 15
OUTCOME_COLUMNS = (
    "accuracy", "balanced_accuracy", "precision", "recall", "f1", "mcc", "auroc", "auprc", "brier", "ece",
)  # fmt: skip
GUIDELINE_COLUMNS = ("micro_f1", "macro_f1", "micro_precision", "micro_recall")
TABLE_INTERVALS = ("auroc", "auprc")  # columns the table prints with their `_ci95` interval when a row has one


def _as_binary(y: Sequence[int] | np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size and not np.isin(arr, (0, 1)).all():
        raise ValueError(f"{name} must hold 0/1 labels (1 = Overturned), got values {sorted(set(arr.tolist()))[:5]}")
    return arr.astype(int)


def _check_same_length(y: np.ndarray, p: np.ndarray) -> None:
    if y.shape[0] != p.shape[0]:
        raise ValueError(f"y_true has {y.shape[0]} items but the predictions have {p.shape[0]}")


def expected_calibration_error(y_true, p_positive, n_bins: int = ECE_BINS, top_label: bool = True) -> float:
    """ECE with equal-width bins; top_label=True bins max(p, 1-p) against accuracy (Guo et al.)."""
    y = _as_binary(y_true, "y_true")
    p = np.clip(np.asarray(p_positive, dtype=float), 0.0, 1.0)
    _check_same_length(y, p)
    if y.size == 0:
        return float("nan")
    if top_label:
        conf = np.maximum(p, 1.0 - p)
        hit = ((p >= 0.5).astype(int) == y).astype(float)
    else:
        conf, hit = p, y.astype(float)
    # bin b holds (b/n, (b+1)/n]; 0 goes to the first bin
    bins = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            total += sel.mean() * abs(hit[sel].mean() - conf[sel].mean())
    return float(total)


def outcome_metrics(y_true, p_overturned, threshold: float = 0.5) -> dict:
    """All outcome metrics for P(Overturned) at a decision threshold; undefined values are NaN."""
    y = _as_binary(y_true, "y_true")
    p = np.asarray(p_overturned, dtype=float)
    _check_same_length(y, p)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    pred = (p >= threshold).astype(int)
    both = len(np.unique(y)) == 2
    tn, fp, fn, tp = skm.confusion_matrix(y, pred, labels=[0, 1]).ravel()
    return {
        "n": int(y.size),
        "n_overturned": int(y.sum()),
        "threshold": float(threshold),
        "accuracy": float(skm.accuracy_score(y, pred)) if y.size else float("nan"),
        "balanced_accuracy": float(skm.balanced_accuracy_score(y, pred)) if both else float("nan"),
        "precision": float(skm.precision_score(y, pred, zero_division=0)),
        "recall": float(skm.recall_score(y, pred, zero_division=0)),
        "f1": float(skm.f1_score(y, pred, zero_division=0)),
        "mcc": _mcc(y, pred),
        "auroc": float(skm.roc_auc_score(y, p)) if both else float("nan"),
        "auprc": float(skm.average_precision_score(y, p)) if both else float("nan"),
        "brier": float(skm.brier_score_loss(y, p, pos_label=1)) if y.size else float("nan"),
        "ece": expected_calibration_error(y, p),
        "ece_overturned": expected_calibration_error(y, p, top_label=False),
        "confusion": {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)},
    }


def _mcc(y: np.ndarray, pred: np.ndarray) -> float:
    if y.size == 0:
        return float("nan")
    with warnings.catch_warnings():  # one class only: sklearn warns, then correctly returns 0
        warnings.simplefilter("ignore", UserWarning)
        return float(skm.matthews_corrcoef(y, pred))


def majority_probabilities(y_train, n: int) -> np.ndarray:
    """The majority baseline: every item gets the training rate of Overturned (predicts the majority)."""
    y = _as_binary(y_train, "y_train")
    rate = float(y.mean()) if y.size else 0.0
    return np.full(n, rate)


def guideline_metrics(Y_true, Y_pred, label_names: Sequence[str]) -> dict:
    """Multi-label metrics for 0/1 matrices (N, L): micro/macro F1 and per-label P/R/F1/support."""
    yt, yp = np.asarray(Y_true).astype(int), np.asarray(Y_pred).astype(int)
    if yt.shape != yp.shape or yt.ndim != 2:
        raise ValueError(f"Y_true has shape {yt.shape} but Y_pred has {yp.shape}; both must be (N, L)")
    if yt.shape[1] != len(label_names):
        raise ValueError(f"{yt.shape[1]} label columns but {len(label_names)} label names")
    p, r, f, s = skm.precision_recall_fscore_support(yt, yp, average=None, zero_division=0, labels=range(yt.shape[1]))
    present = s > 0
    micro = skm.precision_recall_fscore_support(yt, yp, average="micro", zero_division=0)
    return {
        "n": int(yt.shape[0]),
        "micro_f1": float(micro[2]),
        "micro_precision": float(micro[0]),
        "micro_recall": float(micro[1]),
        "macro_f1": float(f[present].mean()) if present.any() else float("nan"),
        "macro_f1_all_labels": float(f.mean()),
        "per_label": {
            name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, name in enumerate(label_names)
        },
    }


# ------------------------------------------------------------------------------------ reporting
def summary_row(outcome: Mapping | None, guidelines: Mapping | None) -> dict:
    """One flat row: outcome columns then guideline micro/macro F1, each followed by its `_ci95` interval when present."""
    row = {}
    for key, src, name in ([(k, outcome, k) for k in OUTCOME_COLUMNS]
                           + [("micro_f1", guidelines, "guideline_micro_f1"), ("macro_f1", guidelines, "guideline_macro_f1")]):  # fmt: skip
        row[name] = (src or {}).get(key, float("nan"))
        if (ci := (src or {}).get(f"{key}_ci95")) is not None:
            row[f"{name}_ci95"] = ci
    return row


def _cell(value, ci=None) -> str:
    def num(v) -> str:
        return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"

    text = num(value)
    if ci is not None and text != "—" and not any(v is None or math.isnan(v) for v in ci):
        text += f" [{num(ci[0])}, {num(ci[1])}]"
    return text


def format_table(rows: Mapping[str, Mapping], title: str = "") -> str:
    """A fixed-width text table of summary rows (what the CLI prints and the README quotes)."""
    cols = list(OUTCOME_COLUMNS) + ["guideline_micro_f1", "guideline_macro_f1"]
    short = {"balanced_accuracy": "bal_acc", "guideline_micro_f1": "gl_microF1", "guideline_macro_f1": "gl_macroF1"}
    names = [short.get(c, c) for c in cols]
    width = max([len(n) for n in rows] + [8])
    cells = {name: [_cell(row.get(c, float("nan")), row.get(f"{c}_ci95") if c in TABLE_INTERVALS else None)
                    for c in cols] for name, row in rows.items()}  # fmt: skip
    widths = [max([10] + [len(r[i]) for r in cells.values()]) for i in range(len(cols))]
    lines = [title] if title else []
    lines.append(" " * width + "  " + "  ".join(f"{n:>{w}}" for n, w in zip(names, widths)))
    for name, row in cells.items():
        lines.append(f"{name:<{width}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(row, widths)))
    if any(f"{c}_ci95" in row for row in rows.values() for c in TABLE_INTERVALS):
        lines.append("[low, high]: 95% letter-level bootstrap interval")
    return "\n".join(lines)


def flat_metrics(prefix: str, row: Mapping) -> dict[str, float]:
    """{prefix_key: value} for the finite numeric entries of a row (MLflow rejects NaN in some stores)."""
    out = {}
    for key, value in row.items():
        if isinstance(value, (int, float, np.floating)) and not isinstance(value, bool) and math.isfinite(value):
            out[f"{prefix}_{key}"] = float(value)
    return out
