"""Calibration fitted on validation items: temperature scaling and decision thresholds.

The outcome logit is divided by a temperature T that minimises the validation NLL (Guo et al.,
2017) against Platt's smoothed targets ((N₊+1)/(N₊+2) for positives, 1/(N₋+2) for negatives): on
separable validation items (a handful of Overturned, all ranked above every Upheld) the hard-target
NLL falls without bound as T → 0, and the fit ran to its lower bound 0.05, which turned logits into
probabilities of exactly 0 and 1. Thresholds turn probabilities into decisions: `half_max_f1`
(default for the transformer, whose probabilities are calibrated) or `best_f1`, the empirical
argmax. The TF-IDF baseline keeps scikit-learn's 0.5 (see `calibrate_baseline`).

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
from imr_model.taxonomy import decision_basis_columns

#: Bounds of every probability the classifier outputs: no letter is decided with certainty by a model
#: calibrated on ~40 validation items (5 Overturned), and 0.0/1.0/8.8e-27 read as certainty.
PROB_MIN, PROB_MAX = 0.001, 0.999


def bound_probability(p):
    """[0, 1] → [PROB_MIN, PROB_MAX], affine and strictly increasing (float64): p' = 0.001 + 0.998 p.

    Used for probabilities and for the thresholds they are compared with; affine, so the midpoint
    between two probabilities (a `best_f1` threshold) maps to the midpoint of their images. Raises on NaN
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


def best_f1_threshold(y_true, scores, default: float = 0.5) -> float:
    """Threshold maximising F1 of the positive class; the middle of the best plateau; default if no positive."""
    y = _as_binary(y_true, "y_true")
    s = np.asarray(scores, dtype=float)
    _check_same_length(y, s)
    if y.sum() == 0 or y.sum() == y.size:
        return float(default)
    cuts = np.unique(s)
    f1 = np.array([skm.f1_score(y, (s >= c).astype(int), zero_division=0) for c in cuts])
    best = np.flatnonzero(np.isclose(f1, f1.max()))
    # Any threshold in (score below the plateau, top of the plateau] gives the same F1 here; the
    # middle of that gap is the least sensitive to noise in a small validation set.
    lo_idx, hi_idx = best[0], best[-1]
    upper = cuts[hi_idx]
    lower = cuts[lo_idx - 1] if lo_idx > 0 else max(0.0, cuts[lo_idx] - 0.05)
    return float((lower + upper) / 2.0) if lower < upper else float(upper)


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


THRESHOLD_RULES = {"half_max_f1": half_max_f1_threshold, "best_f1": best_f1_threshold}


def fit_threshold(y_true, p, rule: str = "half_max_f1", default: float = 0.5) -> float:
    """Decision threshold by rule: `half_max_f1` (calibrated probabilities) or `best_f1` (empirical argmax)."""
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"unknown threshold rule {rule!r}; valid: {', '.join(THRESHOLD_RULES)}")
    return THRESHOLD_RULES[rule](y_true, p, default)


def fit_label_thresholds(Y_true, P, default: float = 0.5, rule: str = "best_f1") -> np.ndarray:
    """Per-label thresholds (L,) by `rule`; labels without positives keep `default`."""
    yt, pr = np.asarray(Y_true).astype(int), np.asarray(P, dtype=float)
    if yt.shape != pr.shape:
        raise ValueError(f"Y_true has shape {yt.shape} but P has {pr.shape}")
    return np.array([fit_threshold(yt[:, j], pr[:, j], rule, default) for j in range(yt.shape[1])])


def calibrate(clf, windows, val, batch_size: int = 32, rule: str = "half_max_f1", *,
              label_thresholds: bool = True, one_basis: bool = False) -> None:  # fmt: skip
    """Fit temperature, outcome threshold and per-label thresholds on validation items, in place.

    The transformer's probabilities are calibrated (temperature for the outcome; unweighted BCE for
    the guidelines), so `rule` defaults to half the best F1 (see metrics.half_max_f1_threshold).
    `label_thresholds=False` keeps every label at 0.5: a class-balanced guideline head
    (`train.guideline_head: logistic`) puts its decision point there, as the baseline's does.
    `one_basis=True` also fits one-basis decoding (`decide_labels`) on the same items, or keeps independent
    decisions where those score higher there (`fit_basis_extra`).
    Rules are fitted on the calibrated probabilities (`clf.calibrate(..., bounded=False)`); the thresholds
    kept are mapped to the output scale (`bound_probability`), see the module docstring.
    """
    from imr_model.training import item_logits

    o, g = item_logits(clf, windows, val.texts, batch_size)
    calibrate_outcome(clf, o, val.y, rule)
    _, P = clf.calibrate(o, g, bounded=False)
    thresholds = (fit_label_thresholds(val.Y, P, rule=rule) if label_thresholds
                  else np.full(len(clf.label_names), 0.5))  # fmt: skip
    clf.guideline_thresholds = np.asarray(bound_probability(thresholds), dtype=np.float64).reshape(-1)
    basis = decision_basis_columns(clf.label_names) if one_basis else []
    if basis:
        extra, scores = fit_basis_extra(val.Y, P, thresholds, basis)
        clf.set_guideline_decoding(basis, extra)
        clf.metrics["guideline_basis_extra_val_micro_f1"] = scores


def calibrate_outcome(clf, outcome_logits, y_true, rule: str = "half_max_f1") -> None:
    """Temperature and outcome threshold from held-out outcome logits, in place.

    The logits are the validation items' or, with `train.fit_on_validation`, the grouped out-of-fold
    logits of the logistic outcome head's C search (`training.refit_outcome_head`). The threshold rule
    sees the calibrated probabilities; the threshold kept is on the output scale (`bound_probability`).
    """
    o = np.asarray(outcome_logits, dtype=float)
    clf.temperature = fit_temperature(o, y_true)
    p, _ = clf.calibrate(o, np.zeros((len(o), 0)), bounded=False)
    clf.outcome_threshold = bound_probability(fit_threshold(y_true, p, rule))


def calibrate_baseline(model, val) -> None:
    """Temperature of the baseline's outcome logit; its decisions stay at 0.5 (scikit-learn's `predict`).

    Balanced class weights move the baseline's 0.5 to the balanced decision point, and they inflate
    rare-class probabilities, so the F1*/2 rule does not apply; the empirical argmax on ~40
    validation items overfits (on the shared letters it cost the guideline micro-F1 ~0.25 on test).
    """
    o, _ = model.decision_function(val.texts)
    model.temperature = fit_temperature(o, val.y)
    model.outcome_threshold = 0.5
    model.guideline_thresholds = np.full(len(model.label_names), 0.5)


# Candidates for the extra-basis threshold (`fit_basis_extra`): 0.5 is independent decisions with at least
# one basis label; 1.0 allows exactly one basis label. Frozen-MiniLM probe on the shared letters
# (`rationale_masked`, grouped 5-fold CV, fold assignments 13 / 14): guideline micro-F1 .852 / .849 with
# independent decisions, .871 / .859 with exactly one basis, .876 / .864 with a second one above 0.97.
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
