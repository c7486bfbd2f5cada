"""Letter-level (cluster) bootstrap intervals for the outcome and guideline metrics of `imr_model.metrics`.

Items of one letter share a reviewer, a patient and a writing style, so they are not independent:
the bootstrap resamples LETTERS with replacement and keeps each drawn letter's items together. A
resample is a vector of item weights (how often the item's letter was drawn), so every metric is
computed for all resamples at once from weighted counts; `tests/test_intervals.py` checks each one
against `metrics.outcome_metrics` / `metrics.guideline_metrics` on the expanded resample.

Resamples holding a single outcome class are dropped (and counted in `n_dropped`) for the metrics
that need both classes (AUROC, AUPRC, balanced accuracy); the other metrics use every resample.
Intervals are percentile intervals (`level`, 95% by default), reported as `<metric>_ci95: [low, high]`.
"""

from __future__ import annotations

import numpy as np

from imr_model.metrics import ECE_BINS, _as_binary, outcome_metrics

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
OUTCOME_INTERVALS = (
    "accuracy", "balanced_accuracy", "precision", "recall", "f1", "mcc", "auroc", "auprc", "brier", "ece",
    "ece_overturned",
)  # fmt: skip
GUIDELINE_INTERVALS = ("micro_f1", "micro_precision", "micro_recall", "macro_f1", "macro_f1_all_labels")
NEED_BOTH_CLASSES = ("balanced_accuracy", "auroc", "auprc")
THRESHOLD_FREE = ("auroc", "auprc", "brier", "ece", "ece_overturned")
_CHUNK_CELLS = 4_000_000  # resamples x items per chunk (memory bound for large evaluations)


def _codes(groups, n_items: int) -> tuple[np.ndarray, int]:
    g = np.arange(n_items) if groups is None else np.asarray(groups)
    if g.shape[0] != n_items:
        raise ValueError(f"{n_items} items but {g.shape[0]} groups")
    _, codes = np.unique(g.astype(str), return_inverse=True)
    return codes.ravel(), int(codes.max()) + 1 if n_items else 0


def resample_weights(groups, n_items: int, n: int, seed: int) -> np.ndarray:
    """(n, n_items) item weights: how many times each item's letter was drawn in each resample.

    Resample b draws as many letters as there are, with replacement, from the sorted letter ids: row b of
    `np.random.default_rng(seed).integers(0, n_letters, size=(n, n_letters))`.
    """
    codes, n_groups = _codes(groups, n_items)
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, n_groups, size=(n, n_groups)) if n_groups else np.zeros((n, 0), dtype=int)
    flat = (np.arange(n)[:, None] * n_groups + drawn).ravel()
    counts = np.bincount(flat, minlength=n * n_groups).reshape(n, n_groups).astype(float)
    return counts[:, codes]


def _safe_div(num: np.ndarray, den: np.ndarray, empty: float = 0.0) -> np.ndarray:
    out = np.full(np.broadcast(num, den).shape, empty, dtype=float)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _ece(W: np.ndarray, conf: np.ndarray, hit: np.ndarray, total: np.ndarray) -> np.ndarray:
    bins = np.clip(np.ceil(conf * ECE_BINS).astype(int) - 1, 0, ECE_BINS - 1)
    onehot = np.zeros((conf.size, ECE_BINS))
    onehot[np.arange(conf.size), bins] = 1.0
    gap = np.abs(W @ (onehot * hit[:, None]) - W @ (onehot * conf[:, None])).sum(axis=1)
    return _safe_div(gap, total, np.nan)


def _ranking(W: np.ndarray, y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted AUROC (ties count half) and average precision (sklearn's step definition) per resample."""
    order = np.argsort(p, kind="stable")
    ps = p[order]
    starts = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])  # one level per distinct score, ascending
    Ws = W[:, order]
    pos = np.add.reduceat(Ws * y[order], starts, axis=1)
    neg = np.add.reduceat(Ws * (1 - y[order]), starts, axis=1)
    P, N = pos.sum(axis=1), neg.sum(axis=1)
    below = np.cumsum(neg, axis=1) - neg
    auroc = _safe_div((pos * (below + 0.5 * neg)).sum(axis=1), P * N, np.nan)
    # descending thresholds: items at or above level k are predicted positive
    tp = np.cumsum(pos[:, ::-1], axis=1)[:, ::-1]
    fp = np.cumsum(neg[:, ::-1], axis=1)[:, ::-1]
    auprc = _safe_div((pos * _safe_div(tp, tp + fp)).sum(axis=1), P, np.nan)
    return auroc, auprc


def _outcome_draws(W: np.ndarray, y: np.ndarray, p: np.ndarray, threshold) -> dict[str, np.ndarray]:
    thr = np.asarray(threshold, dtype=float)
    if thr.ndim == 0:
        pred = (p >= float(thr)).astype(float)
    else:  # per-item fold thresholds, decided as `evaluation.outcome_metrics_per_item` does
        pred = (np.clip(p - thr + 0.5, 0, 1) >= 0.5).astype(float)
    yf = y.astype(float)
    tp, fp = W @ (yf * pred), W @ ((1 - yf) * pred)
    fn, tn = W @ (yf * (1 - pred)), W @ ((1 - yf) * (1 - pred))
    total = tp + fp + fn + tn
    recall, specificity = _safe_div(tp, tp + fn), _safe_div(tn, tn + fp)
    mcc_den = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    auroc, auprc = _ranking(W, y, p)
    pc = np.clip(p, 0.0, 1.0)
    out = {
        "accuracy": _safe_div(tp + tn, total, np.nan),
        "balanced_accuracy": (recall + specificity) / 2,
        "precision": _safe_div(tp, tp + fp),
        "recall": recall,
        "f1": _safe_div(2 * tp, 2 * tp + fp + fn),
        "mcc": _safe_div(tp * tn - fp * fn, mcc_den),
        "auroc": auroc,
        "auprc": auprc,
        "brier": _safe_div(W @ (p - yf) ** 2, total, np.nan),
        "ece": _ece(W, np.maximum(pc, 1 - pc), ((pc >= 0.5).astype(int) == y).astype(float), total),
        "ece_overturned": _ece(W, pc, yf, total),
    }
    both = (tp + fn > 0) & (tn + fp > 0)
    for key in NEED_BOTH_CLASSES:
        out[key] = np.where(both, out[key], np.nan)
    return out


def _guideline_draws(W: np.ndarray, Y: np.ndarray, D: np.ndarray) -> dict[str, np.ndarray]:
    Yf, Df = Y.astype(float), D.astype(float)
    tp, fp, fn = W @ (Yf * Df), W @ ((1 - Yf) * Df), W @ (Yf * (1 - Df))
    f_label = _safe_div(2 * tp, 2 * tp + fp + fn)
    present = (tp + fn) > 0
    n_present = present.sum(axis=1)
    TP, FP, FN = tp.sum(axis=1), fp.sum(axis=1), fn.sum(axis=1)
    return {
        "micro_f1": _safe_div(2 * TP, 2 * TP + FP + FN),
        "micro_precision": _safe_div(TP, TP + FP),
        "micro_recall": _safe_div(TP, TP + FN),
        "macro_f1": _safe_div((f_label * present).sum(axis=1), n_present, np.nan),
        "macro_f1_all_labels": f_label.mean(axis=1) if Y.shape[1] else np.full(W.shape[0], np.nan),
    }


class Resampler:
    """One set of letter resamples, shared by every model scored on the same items (paired comparisons)."""

    def __init__(self, y, groups=None, *, n: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                 level: float = 0.95):  # fmt: skip
        self.y = _as_binary(y, "y_true")
        if n < 1:
            raise ValueError(f"the bootstrap needs at least 1 resample, got n={n}")
        if not 0 < level < 1:
            raise ValueError(f"level must be in (0, 1), got {level}")
        self.n, self.seed, self.level = int(n), int(seed), float(level)
        self.unit = "letter" if groups is not None else "item"
        self.weights = resample_weights(groups, self.y.size, self.n, self.seed)
        pos = self.weights @ self.y.astype(float)
        self.single_class = (pos == 0) | (pos == self.weights.sum(axis=1))

    def info(self) -> dict:
        return {"n_resamples": self.n, "n_dropped": int(self.single_class.sum()), "seed": self.seed,
                "level": self.level, "unit": self.unit}  # fmt: skip

    def _chunks(self):
        step = max(1, _CHUNK_CELLS // max(1, self.y.size))
        for start in range(0, self.n, step):
            yield self.weights[start:start + step]

    def outcome_draws(self, p, threshold=0.5) -> dict[str, np.ndarray]:
        """{metric: (n,) values per resample}; NaN where a metric is undefined (single-class resamples)."""
        p = np.asarray(p, dtype=float)
        if p.shape != self.y.shape:
            raise ValueError(f"{self.y.size} outcome labels but {p.shape} probabilities")
        parts = [_outcome_draws(W, self.y, p, threshold) for W in self._chunks()]
        return {k: np.concatenate([d[k] for d in parts]) for k in parts[0]}

    def guideline_draws(self, Y, decided) -> dict[str, np.ndarray]:
        Y, D = np.asarray(Y).astype(int), np.asarray(decided).astype(int)
        if Y.shape != D.shape or Y.ndim != 2 or Y.shape[0] != self.y.size:
            raise ValueError(f"guideline labels {Y.shape} and decisions {D.shape} must both be ({self.y.size}, L)")
        parts = [_guideline_draws(W, Y, D) for W in self._chunks()]
        return {k: np.concatenate([d[k] for d in parts]) for k in parts[0]}

    def interval(self, draws: np.ndarray) -> list[float]:
        """Percentile interval of the finite draws; [nan, nan] when none is finite."""
        d = np.asarray(draws, dtype=float)
        d = d[np.isfinite(d)]
        if not d.size:
            return [float("nan"), float("nan")]
        tail = (1 - self.level) / 2 * 100
        lo, hi = np.percentile(d, [tail, 100 - tail])
        return [float(lo), float(hi)]


def bootstrap_metrics(y, p, threshold=0.5, *, groups=None, Y=None, decided=None, n: int = BOOTSTRAP_RESAMPLES,
                      seed: int = BOOTSTRAP_SEED, level: float = 0.95, resampler: Resampler | None = None) -> dict:  # fmt: skip
    """Letter-level bootstrap intervals for the outcome metrics (and guideline metrics when Y and decided are given).

    `threshold` is the decision threshold, or one threshold per item (pooled cross-validation).
    `groups` holds the letter of each item (None: each item is its own letter). Returns
    {"outcome": {metric: [low, high]}, "guidelines": {...} or None, "n_resamples", "n_dropped",
    "seed", "level", "unit"}. Pass a `resampler` to reuse the same resamples for several models.
    """
    rs = resampler or Resampler(y, groups, n=n, seed=seed, level=level)
    outcome = {k: rs.interval(v) for k, v in rs.outcome_draws(p, threshold).items()}
    guidelines = None
    if Y is not None and decided is not None:
        guidelines = {k: rs.interval(v) for k, v in rs.guideline_draws(Y, decided).items()}
    return {"outcome": outcome, "guidelines": guidelines, **rs.info()}


def paired_difference(y, p_a, p_b, groups=None, metric: str = "auroc", *, threshold_a=0.5, threshold_b=0.5,
                      n: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED, level: float = 0.95,
                      resampler: Resampler | None = None) -> dict:  # fmt: skip
    """Outcome metric of B minus A on the same items, with its interval over the same letter resamples.

    Returns {"metric", "a", "b", "difference", "difference_ci95": [low, high], "n_resamples", "n_dropped", ...}.
    """
    if metric not in OUTCOME_INTERVALS:
        raise ValueError(f"unknown metric {metric!r}; valid: {list(OUTCOME_INTERVALS)}")
    rs = resampler or Resampler(y, groups, n=n, seed=seed, level=level)
    a, b = _point(rs.y, p_a, threshold_a, metric), _point(rs.y, p_b, threshold_b, metric)
    diff = rs.outcome_draws(p_b, threshold_b)[metric] - rs.outcome_draws(p_a, threshold_a)[metric]
    return {"metric": metric, "a": a, "b": b, "difference": b - a, "difference_ci95": rs.interval(diff), **rs.info()}


def _point(y, p, threshold, metric: str) -> float:
    thr = np.asarray(threshold, dtype=float)
    if thr.ndim == 0:
        return float(outcome_metrics(y, p, float(thr))[metric])
    if metric in THRESHOLD_FREE:
        return float(outcome_metrics(y, p, 0.5)[metric])
    return float(outcome_metrics(y, np.clip(np.asarray(p, dtype=float) - thr + 0.5, 0, 1), 0.5)[metric])


def add_intervals(row: dict, resampler: Resampler, p, threshold=0.5, Y=None, decided=None) -> None:
    """Put `<metric>_ci95: [low, high]` beside each metric of a row's "outcome" (and "guidelines") object."""
    for key, draws in resampler.outcome_draws(p, threshold).items():
        if key in row["outcome"]:
            row["outcome"][f"{key}_ci95"] = resampler.interval(draws)
    if Y is not None and decided is not None and row.get("guidelines") is not None:
        for key, draws in resampler.guideline_draws(Y, decided).items():
            if key in row["guidelines"]:
                row["guidelines"][f"{key}_ci95"] = resampler.interval(draws)

