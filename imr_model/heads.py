"""The logistic-regression fits of the classifier's heads, on pooled encoder vectors (numpy in, arrays out).

`IMRClassifier.fit_heads` pools its cached window vectors, calls these and writes the returned weights
into its own heads; nothing here touches a network. Both heads are linear and every pooling is linear
in the window vectors (`imr_model.pooling`), so a logistic regression on pooled vectors *is* the head.

* Outcome (`fit_outcome`, probe recipe): an L2 logistic regression on the standardised pooled vectors
  (plus the standardised evidence cues × `EVIDENCE_BLOCK_WEIGHT` with `model.outcome_cues`), C from
  `OUTCOME_CS` by pooled grouped out-of-fold AUROC over letters. The out-of-fold logits at that C are
  returned: the probe recipe calibrates on them.
* Guidelines (`fit_guideline`, both recipes): one class-balanced logistic regression per label on the
  pooled mean vectors (standardised × `VECTOR_BLOCK_WEIGHT`/√H), the citation cues (× `CUE_BLOCK_WEIGHT`)
  and the TF-IDF vector, C from `GUIDELINE_CS` by grouped out-of-fold micro-F1. A label seen n times in
  training gets a fixed extra weight `CUE_PRIOR`·s/(n + s) (s = `CUE_PRIOR_SUPPORT`) on the cues that name
  it (cues.yaml `label_cues`). With one-basis decoding the extra-basis threshold is chosen with C, on the
  same out-of-fold probabilities (which then include the cue prior), or independent decisions are kept
  where those score higher out of fold (`calibration.fit_basis_extra`).

The constants were chosen by probes on the shared letters, recorded in docs/experiments.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import sparse
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score, roc_auc_score
from sklearn.model_selection import GroupKFold

from imr_model.baseline import fit_binary_logistic
from imr_model.calibration import decide_labels, fit_basis_extra

OUTCOME_CS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)  # outcome head's C grid (strong regularisation: ~25 Overturned)
GUIDELINE_CS = (1.0, 4.0, 16.0)  # guideline regressions' C grid
EVIDENCE_BLOCK_WEIGHT = 4.0  # standardised evidence cues against standardised pooled vectors (weight 1 each)
VECTOR_BLOCK_WEIGHT = 0.5  # standardised pooled vectors, × 1/sqrt(H), in the guideline regressions
CUE_BLOCK_WEIGHT = 1.0 / 3.0  # 0/1 citation cues in the guideline regressions (TF-IDF rows keep unit norm)
CUE_PRIOR, CUE_PRIOR_SUPPORT = 8.0, 3.0  # fixed cue weight of a label seen n times: prior * s / (n + s)
MAX_FOLDS = 5


def scales(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column means and standard deviations for standardising pooled vectors.

    A near-constant dimension (MiniLM has one) would get a weight of coef / ~0 and amplify any noise in
    it, e.g. int8 rounding in the ONNX path: scales are floored at a tenth of the median one.
    """
    mu, sd = X.mean(axis=0), X.std(axis=0)
    return mu, np.maximum(sd, 0.1 * float(np.median(sd)) + 1e-12)


@dataclass
class OutcomeFit:
    """The outcome head on the raw pooled-vector scale: logit = X @ weight + bias (+ evidence @ evidence_weight)."""

    weight: np.ndarray  # (H,)
    bias: float  # item-level intercept (the window bias is this / the pooling's bias multiplicity)
    evidence_weight: np.ndarray | None  # (E,) or None without evidence cues
    info: dict  # JSON-ready: C, out-of-fold AUROC by C, folds
    oof: np.ndarray | None  # (N,) grouped out-of-fold logits at the chosen C (NaN where a fold could not be fit)


def fit_outcome(X: np.ndarray, y: np.ndarray, groups: np.ndarray, evidence: np.ndarray | None = None) -> OutcomeFit:
    """L2 logistic regression of the outcome on pooled vectors X (N, H) (+ evidence cues (N, E)), C by grouped CV."""
    mu, sd = scales(X)
    Z = (X - mu) / sd
    if evidence is not None:
        E = np.asarray(evidence, dtype=np.float64)
        e_mu, e_sd = E.mean(axis=0), E.std(axis=0)
        e_sd = np.where(e_sd > 1e-12, e_sd, 1.0)  # a cue that never fires (or always the same) gets no weight
        Z = np.hstack([Z, (E - e_mu) / e_sd * EVIDENCE_BLOCK_WEIGHT])
    k = min(MAX_FOLDS, len(set(groups.tolist())), int(y.sum()), int(len(y) - y.sum()))
    folds = list(GroupKFold(n_splits=k).split(Z, y, groups)) if k >= 2 else []
    scores: dict[float, float] = {}
    oof_by_C: dict[float, np.ndarray] = {}
    for C in OUTCOME_CS if folds else ():
        oof = np.full(len(y), np.nan)
        for tr, te in folds:
            if len(set(y[tr].tolist())) < 2:
                continue
            oof[te] = LogisticRegression(C=C, max_iter=5000).fit(Z[tr], y[tr]).decision_function(Z[te])
        scored = ~np.isnan(oof)
        scores[C] = float(roc_auc_score(y[scored], oof[scored])) if len(set(y[scored].tolist())) == 2 else 0.5
        oof_by_C[C] = oof
    best_C = max(scores, key=lambda c: (scores[c], -c)) if scores else min(OUTCOME_CS)
    model = LogisticRegression(C=best_C, max_iter=5000).fit(Z, y)
    w = model.coef_[0][: X.shape[1]] / sd
    b = float(model.intercept_[0] - np.dot(w, mu))
    evidence_w = None
    if evidence is not None:
        evidence_w = model.coef_[0][X.shape[1] :] * EVIDENCE_BLOCK_WEIGHT / e_sd
        b -= float(np.dot(evidence_w, e_mu))
    info = {"C": best_C, "cv_auroc_by_C": {str(c): v for c, v in scores.items()}, "folds": k}
    return OutcomeFit(w, b, evidence_w, info, oof_by_C.get(best_C))


@dataclass
class GuidelineFit:
    """The guideline head and its item-level terms on the raw feature scales: logits = pooled @ weight.T + bias
    + cues @ cue_weight.T + tfidf @ tfidf_weight.T."""

    weight: np.ndarray  # (L, H)
    bias: np.ndarray  # (L,) item-level intercepts
    cue_weight: np.ndarray | None  # (L, C)
    tfidf_weight: np.ndarray | None  # (L, V)
    basis_extra: float | None  # one-basis decoding's extra threshold; None = independent decisions won out of fold
    info: dict


def fit_guideline(pooled: np.ndarray, Y: np.ndarray, groups: np.ndarray, *, cues: np.ndarray | None = None,
                  tfidf: sparse.csr_matrix | None = None, label_cues: Sequence[Sequence[int]] = (),
                  basis: Sequence[int] = (), seed: int = 0) -> GuidelineFit:  # fmt: skip
    """Per-label balanced logistic regressions on [pooled vectors, cues, TF-IDF]; C (and the one-basis rule) by CV.

    `label_cues[j]`: the cue columns that name label j (the cue prior's inputs); `basis`: the decision-basis
    label columns for one-basis decoding (empty: independent decisions).
    """
    H = pooled.shape[1]
    mu, sd = scales(pooled)
    blocks = [sparse.csr_matrix((pooled - mu) / sd * (VECTOR_BLOCK_WEIGHT / math.sqrt(H)))]
    if cues is not None:
        blocks.append(sparse.csr_matrix(np.asarray(cues, dtype=np.float64) * CUE_BLOCK_WEIGHT))
    if tfidf is not None:
        blocks.append(tfidf)
    F = sparse.hstack(blocks).tocsr()
    k = min(MAX_FOLDS, len(set(groups.tolist())))
    half = np.full(Y.shape[1], 0.5)
    named = None
    if cues is not None and basis:  # (N, L) how many of each label's naming cues every text matches
        c = np.asarray(cues, dtype=np.float64)
        named = np.stack([c[:, list(columns)].sum(axis=1) for columns in label_cues], axis=1)
    scores: dict[float, float] = {}
    extra: dict[float, tuple[float | None, dict]] = {}  # C → (basis_extra, held-out micro-F1 of each candidate)
    if k >= 2:
        folds = list(GroupKFold(n_splits=k).split(F, Y[:, 0], groups))
        for C in GUIDELINE_CS:
            oof = np.zeros(Y.shape)
            for tr, te in folds:
                for j in range(Y.shape[1]):
                    w, b = fit_binary_logistic(F[tr], Y[tr, j], C=C, seed=seed)
                    oof[te, j] = F[te] @ w + b
                if named is not None:  # argmax across labels compares the prior-shifted logits the final head has
                    oof[te] += named[te] * cue_prior(Y[tr])[None, :]
            P = 1.0 / (1.0 + np.exp(-oof))
            if basis:
                extra[C] = fit_basis_extra(Y, P, half, basis)
                scores[C] = max(extra[C][1].values())  # the better of one-basis and independent decisions
            else:
                scores[C] = float(f1_score(Y, decide_labels(P, half), average="micro", zero_division=0))
    best_C = max(scores, key=lambda c: (scores[c], -c)) if scores else GUIDELINE_CS[0]
    basis_extra = extra[best_C][0] if best_C in extra else (1.0 if basis else None)
    W = np.zeros((Y.shape[1], F.shape[1]))
    b = np.zeros(Y.shape[1])
    for j in range(Y.shape[1]):
        W[j], b[j] = fit_binary_logistic(F, Y[:, j], C=best_C, seed=seed)
    w_vec = W[:, :H] * (VECTOR_BLOCK_WEIGHT / math.sqrt(H)) / sd
    offset, cue_w, prior_applied = H, None, {}
    if cues is not None:
        n = np.asarray(cues).shape[1]
        cue_w = W[:, offset : offset + n] * CUE_BLOCK_WEIGHT
        prior = cue_prior(Y)
        for j, columns in enumerate(label_cues):
            cue_w[j, list(columns)] += prior[j]
            prior_applied[j] = round(float(prior[j]), 4)
        offset += n
    tfidf_w = W[:, offset:] if tfidf is not None else None
    one_basis = bool(basis) and basis_extra is not None
    info = {"C": best_C, "cv_micro_f1_by_C": {str(c): v for c, v in scores.items()}, "folds": k,
            "features": int(F.shape[1]), "cue_prior": prior_applied,
            "decoding": "one_basis" if one_basis else "independent",  # one_basis falls back out of fold
            "basis_extra": basis_extra if one_basis else None,
            "cv_micro_f1_by_basis_extra": extra[best_C][1] if best_C in extra else None}  # fmt: skip
    return GuidelineFit(w_vec, b - w_vec @ mu, cue_w, tfidf_w, basis_extra if one_basis else None, info)


def cue_prior(Y: np.ndarray) -> np.ndarray:
    """(L,) the cue prior's weight per label, CUE_PRIOR · s / (n + s), n = the label's positives in `Y`."""
    return CUE_PRIOR * CUE_PRIOR_SUPPORT / (np.asarray(Y).sum(axis=0) + CUE_PRIOR_SUPPORT)
