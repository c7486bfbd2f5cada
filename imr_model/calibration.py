"""Calibration: temperature scaling, decision thresholds and guideline decoding (numpy functions).

`IMRClassifier.fit_calibration` and `BaselineModel.calibrate` call these on held-out items.

The outcome logit is divided by a temperature T that minimises the validation NLL (Guo et al.,
2017) against Platt's smoothed targets ((N₊+1)/(N₊+2) for positives, 1/(N₋+2) for negatives): on
separable validation items (a handful of Overturned, all ranked above every Upheld) the hard-target
NLL falls without bound as T → 0, and the fit ran to its lower bound 0.05, which turned logits into
probabilities of exactly 0 and 1. The outcome threshold is half the best held-out F1
(`half_max_f1_threshold`, the F1-optimal threshold for calibrated probabilities); the class-balanced
guideline regressions and the TF-IDF baseline keep scikit-learn's 0.5.

Output scale: the classifier's probabilities leave the package within [PROB_MIN, PROB_MAX] =
[0.001, 0.999] through `bound_probability` (p' = 0.001 + 0.998 p, strictly increasing: no ties, so
AUROC/AUPRC are those of the unbounded probabilities). Rules are fitted on the calibrated (unbounded)
probabilities and their thresholds mapped the same way, so every decision is the one the unbounded
probability would have given, and a user who compares a reported probability with its reported
threshold sees the decision that was made. The one-basis `basis_extra` stays on the calibrated scale
(it is a rule parameter from `BASIS_EXTRA_GRID`); `IMRClassifier.decide_guidelines` maps it.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit
from sklearn import metrics as skm

from imr_model.metrics import _as_binary, _check_same_length

#: Bounds of every probability the classifier outputs: no letter is decided with certainty by a model
#: calibrated on ~40 validation items (5 Overturned), and 0.0/1.0/8.8e-27 read as certainty.
PROB_MIN, PROB_MAX = 0.001, 0.999


def bound_probability(p):
    """[0, 1] → [PROB_MIN, PROB_MAX], affine and strictly increasing (float64): p' = 0.001 + 0.998 p.

    Used for probabilities and for the thresholds they are compared with; affine, so the midpoint
    between two probabilities maps to the midpoint of their images. Raises on NaN
    or values outside [0, 1].
    """
    arr = np.asarray(p, dtype=np.float64)
    if not ((arr >= 0.0) & (arr <= 1.0)).all():  # NaN fails both
        raise ValueError(f"{int((~((arr >= 0.0) & (arr <= 1.0))).sum())} values are not probabilities in [0, 1] (or NaN)")
    out = PROB_MIN + (PROB_MAX - PROB_MIN) * arr
    return float(out) if out.ndim == 0 else out


def bounded_sigmoid(logits):
    """Logits → probabilities within [PROB_MIN, PROB_MAX]: `bound_probability(σ(z))`, in float64.

    No clipping: strictly increasing wherever float64 can tell the images apart (float spacing is 2e-19 at
    0.001 and 1.1e-16 at 0.999), e.g. logits 0.01 apart keep distinct probabilities for z in [-35, 25],
    logits 1e-6 apart for |z| ≤ 15; beyond about z < -43 or z > 36 every logit gives the bound itself (so
    does float64 σ above 36). ±inf give the bounds; NaN raises ValueError.
    """
    z = np.asarray(logits, dtype=np.float64)
    if np.isnan(z).any():
        raise ValueError(f"{int(np.isnan(z).sum())} of {z.size} logits are NaN; no probability can be given for them")
    return bound_probability(expit(z))


def platt_targets(y_true) -> np.ndarray:
    """Platt's (1999) smoothed targets: (N₊+1)/(N₊+2) for positives, 1/(N₋+2) for negatives (float64)."""
    y = np.asarray(y_true).astype(int)
    n_pos, n_neg = int(y.sum()), int(y.size - y.sum())
    return np.where(y == 1, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))


def fit_temperature(logits, y_true, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """Temperature T minimising the NLL of sigmoid(logit / T) on held-out items (1.0 if undefined).

    The NLL is taken against Platt's smoothed targets (`platt_targets`), which keeps T finite when the
    items are separable (the hard-target NLL then decreases without bound as T → 0). On non-separable
    items of realistic size it moves T little (the targets differ from 0/1 by 1/(N+2)).
    """
    z = np.asarray(logits, dtype=float)
    y = _as_binary(y_true, "y_true")
    _check_same_length(y, z)
    if y.size == 0 or len(np.unique(y)) < 2:
        return 1.0
    if not np.isfinite(z).all():
        raise ValueError(f"{int((~np.isfinite(z)).sum())} of {z.size} logits are not finite; cannot fit a temperature")
    targets = platt_targets(y)

    def nll(log_t: float) -> float:
        return binary_nll(z / math.exp(log_t), targets)

    res = minimize_scalar(nll, bounds=(math.log(bounds[0]), math.log(bounds[1])), method="bounded")
    best = float(math.exp(res.x))
    return best if nll(math.log(best)) <= nll(0.0) else 1.0


def binary_nll(logits, y_true) -> float:
    """Mean negative log-likelihood of (possibly soft) labels under sigmoid(logits), computed stably."""
    z = np.asarray(logits, dtype=float)
    y = np.asarray(y_true, dtype=float)
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def half_max_f1_threshold(y_true, p, default: float = 0.5) -> float:
    """Half the best F1 reachable on held-out items: the F1-optimal threshold for calibrated probabilities.

    Lipton, Elkan & Narayanaswamy (2014) show that for calibrated P(positive) the threshold that
    maximises expected F1 is F1*/2. Unlike the empirical argmax, it does not jump to wherever the
    few validation positives happen to fall (a small validation split holds ~5 Overturned).
    """
    y = _as_binary(y_true, "y_true")
    s = np.asarray(p, dtype=float)
    _check_same_length(y, s)
    if y.sum() == 0 or y.sum() == y.size:
        return float(default)
    best = max(skm.f1_score(y, (s >= c).astype(int), zero_division=0) for c in np.unique(s))
    return float(best / 2.0)


# Candidates for the extra-basis threshold (`fit_basis_extra`): 0.5 is independent decisions with at least
# one basis label; 1.0 allows exactly one basis label (the probe behind the grid: docs/experiments.md).
BASIS_EXTRA_GRID = (0.5, 0.9, 0.97, 1.0)


def decide_labels(P, thresholds, basis: Sequence[int] = (), basis_extra: float = 1.0) -> np.ndarray:
    """Guideline probabilities (N, L) → 0/1 decisions (N, L).

    Each label is on when its probability reaches its threshold. With `basis` (column indices of the
    taxonomy's `decision_basis` labels: what a decision was based on, an MTUS chapter, outside the MTUS
    or no citation) every item gets exactly its most probable basis label, plus any other basis label
    whose probability exceeds `basis_extra` (and its threshold): a citation always names one basis,
    rarely several chapters, while independent per-label decisions gave items none or two.
    """
    pr = np.asarray(P, dtype=float)
    thr = np.asarray(thresholds, dtype=float)
    if pr.ndim != 2 or thr.shape != (pr.shape[1],):
        raise ValueError(f"P has shape {pr.shape} but thresholds {thr.shape}; expected (N, L) and (L,)")
    decided = (pr >= thr[None, :]).astype(int)
    cols = np.asarray(list(basis), dtype=int)
    if cols.size == 0 or pr.shape[0] == 0:
        return decided
    sub = pr[:, cols]
    decided[:, cols] = ((sub > basis_extra) & (sub >= thr[cols][None, :])).astype(int)
    decided[np.arange(len(pr)), cols[np.argmax(sub, axis=1)]] = 1
    return decided


def fit_basis_extra(Y_true, P, thresholds, basis: Sequence[int],
                    grid: Sequence[float] = BASIS_EXTRA_GRID) -> tuple[float | None, dict]:  # fmt: skip
    """The `basis_extra` of `decide_labels` with the best micro-F1 on held-out items (ties: the larger), or
    None when independent decisions (`decide_labels` without `basis`) score higher than every candidate: the
    taxonomy's structure is a prior, and labels that do not follow it (a random model, another citation
    format) should not be forced into it. Returns that and the micro-F1 of every candidate and of
    independent decisions (under "independent")."""
    Y = np.asarray(Y_true).astype(int)
    micro = lambda D: float(skm.f1_score(Y, D, average="micro", zero_division=0))  # noqa: E731
    scores = {str(t): micro(decide_labels(P, thresholds, basis, t)) for t in grid}
    best = max(grid, key=lambda t: (scores[str(t)], t))
    independent = micro(decide_labels(P, thresholds))
    return (None if independent > scores[str(best)] else float(best)), {"independent": independent, **scores}
