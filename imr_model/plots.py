"""Evaluation figures (matplotlib, headless): reliability diagram, precision-recall curve, confusion matrix."""

from __future__ import annotations

from typing import Mapping

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve

from imr_model.metrics import ECE_BINS


def _pyplot():
    # deferred: importing pyplot costs ~0.5 s and selecting the Agg backend is global state, so both wait
    # for the first figure instead of happening whenever the experiment module is imported
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def reliability_diagram(y_true, curves: Mapping[str, np.ndarray], n_bins: int = ECE_BINS, title: str = ""):
    """Observed Overturned rate against mean predicted P(Overturned) per bin, one line per model."""
    plt = _pyplot()
    y = np.asarray(y_true, dtype=float)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    edges = np.linspace(0, 1, n_bins + 1)
    for name, p in curves.items():
        p = np.asarray(p, dtype=float)
        idx = np.clip(np.digitize(p, edges[1:-1], right=True), 0, n_bins - 1)
        xs, ys, ns = [], [], []
        for b in range(n_bins):
            sel = idx == b
            if sel.any():
                xs.append(p[sel].mean())
                ys.append(y[sel].mean())
                ns.append(sel.sum())
        ax.plot(xs, ys, marker="o", label=name)
        for x, v, n in zip(xs, ys, ns):
            ax.annotate(str(n), (x, v), textcoords="offset points", xytext=(3, 3), fontsize=6)
    ax.set(xlabel="predicted P(Overturned)", ylabel="observed Overturned rate", xlim=(0, 1), ylim=(0, 1),
           title=title or "Reliability diagram (points: items per bin)")  # fmt: skip
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def pr_curve(y_true, curves: Mapping[str, np.ndarray], title: str = ""):
    """Precision-recall curves for Overturned with average precision in the legend."""
    plt = _pyplot()
    y = np.asarray(y_true).astype(int)
    fig, ax = plt.subplots(figsize=(5, 5))
    if y.sum() > 0:
        for name, p in curves.items():
            precision, recall, _ = precision_recall_curve(y, p)
            ax.step(recall, precision, where="post", label=f"{name} (AP {average_precision_score(y, p):.3f})")
        ax.axhline(y.mean(), ls="--", color="grey", lw=1, label=f"base rate {y.mean():.3f}")
    ax.set(xlabel="recall (Overturned)", ylabel="precision (Overturned)", xlim=(0, 1), ylim=(0, 1.02),
           title=title or "Precision-recall, Overturned")  # fmt: skip
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    return fig


def confusion_matrix_figure(confusion: Mapping[str, int], title: str = ""):
    """2×2 confusion matrix (rows: true, columns: predicted) from outcome_metrics()['confusion']."""
    plt = _pyplot()
    m = np.array([[confusion["tn"], confusion["fp"]], [confusion["fn"], confusion["tp"]]])
    fig, ax = plt.subplots(figsize=(4, 3.6))
    ax.imshow(m, cmap="Blues")
    names = ["Upheld", "Overturned"]
    ax.set_xticks([0, 1], names)
    ax.set_yticks([0, 1], names)
    ax.set(xlabel="predicted", ylabel="true", title=title or "Confusion matrix")
    for i in range(2):
        for j in range(2):
            ax.text(j, i, str(m[i, j]), ha="center", va="center", color="white" if m[i, j] > m.max() / 2 else "black")
    fig.tight_layout()
    return fig
