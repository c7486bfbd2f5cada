"""Fine-tune `IMRNet` on items: both heads, imbalance handling, early stopping, calibration.

One step takes `batch_size` items, stacks all their windows, pools window logits back to items
(the model's pooling, so training sees what inference computes) and adds the outcome loss
(binary cross-entropy with `pos_weight` on Overturned) to the guideline loss (multi-label BCE).
After each epoch the validation split is scored; the best epoch by `train.early_stopping_metric`
is kept and training stops after `train.patience` epochs without improvement.

`pos_weight` multiplies the Overturned loss, which shifts the learned logit by log(pos_weight);
that shift is subtracted from the outcome bias at the end so probabilities are again estimates of
P(Overturned). Then, on validation: the temperature of the outcome logit (NLL), the outcome decision
threshold (F1 of Overturned) and one threshold per guideline label (F1).
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from imr_model import familiarity
from imr_model.baseline import TfidfFeatures, fit_binary_logistic
from imr_model.calibration import calibrate, calibrate_outcome, decide_labels, fit_basis_extra, fit_temperature
from imr_model.config import LINEAR_POOLINGS, TrainConfig
from imr_model.cues import cue_matrix, evidence_matrix, label_cue_columns
from imr_model.metrics import guideline_metrics, outcome_metrics
from imr_model.modeling import IMRClassifier, Windows, bias_multiplicity, pool_logits
from imr_model.progress import progress_bar
from imr_model.taxonomy import decision_basis_columns
from imr_model.views import main_text

EpochCallback = Callable[[int, dict], None]
logger = logging.getLogger(__name__)


@dataclass
class Split:
    """Texts in the model's view with their labels: y (N,) 1 = Overturned, Y (N, L) guideline 0/1."""

    texts: list[str]
    y: np.ndarray
    Y: np.ndarray
    groups: list[str] | None = None  # letter of each item (grouped inner cross-validation)

    def __post_init__(self) -> None:
        self.y = np.asarray(self.y).astype(int)
        self.Y = np.asarray(self.Y).astype(int)
        if self.Y.ndim != 2:
            raise ValueError(f"Y must be a 2-D (items, labels) matrix, got shape {self.Y.shape}")
        if not len(self.y) == len(self.Y) == len(self.texts):
            raise ValueError(f"{len(self.texts)} texts, {len(self.y)} outcome labels and {len(self.Y)} guideline rows")
        if self.groups is not None and len(self.groups) != len(self.texts):
            raise ValueError(f"{len(self.texts)} texts but {len(self.groups)} groups")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def group_ids(self) -> np.ndarray:
        """The letter of each item for grouped folds; each item its own group when letters are unknown."""
        return np.asarray(self.groups if self.groups is not None else np.arange(len(self)))


def concat_splits(a: Split, b: Split) -> Split:
    """The items of `a` then those of `b` (groups kept when both have them)."""
    groups = a.groups + b.groups if a.groups is not None and b.groups is not None else None
    return Split(list(a.texts) + list(b.texts), np.concatenate([a.y, b.y]), np.concatenate([a.Y, b.Y]), groups=groups)


class Scorer(Protocol):
    """Anything with calibrated probabilities and fitted decision rules (IMRClassifier, BaselineModel)."""

    outcome_threshold: float

    def predict_proba(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]: ...

    def decide_guidelines(self, guideline_probs: np.ndarray) -> np.ndarray: ...


def seed_everything(seed: int) -> None:
    """Seed every RNG the training touches (Python, NumPy, torch)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_pos_weight(setting: float | str, y: np.ndarray) -> float:
    """`auto` → sqrt(n_upheld / n_overturned): up-weights the rare class without swamping the rest."""
    if setting != "auto":
        return float(setting)
    pos = int(np.sum(y))
    neg = int(len(y) - pos)
    return float(math.sqrt(neg / pos)) if pos and neg else 1.0


def freeze_lower_layers(net: nn.Module, n_layers: int, *, embeddings: bool = False) -> int:
    """Stop gradients into the embeddings (if asked, or if any layer is frozen) and the first `n_layers`
    encoder layers; returns the number of frozen tensors."""
    if n_layers <= 0 and not embeddings:
        return 0
    encoder = net.encoder
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    emb = getattr(encoder, "embeddings", None)
    if layers is None or emb is None:
        raise ValueError(f"freezing needs a BERT-like encoder; {type(encoder).__name__} has no embeddings/encoder.layer")
    if n_layers > len(layers):
        raise ValueError(f"model.freeze_layers={n_layers} but the encoder has only {len(layers)} layers")
    frozen = 0
    for module in [emb, *layers[:n_layers]]:
        for p in module.parameters():
            p.requires_grad_(False)
            frozen += 1
    return frozen


def _optimizer(net: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    t = cfg.train
    outcome = {id(p) for m in (net.outcome_head, net.outcome_attention) for p in m.parameters()}
    guideline = {id(p) for p in net.guideline_head.parameters()}
    groups: dict[str, list] = {"decay": [], "no_decay": [], "outcome": [], "guideline": []}
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in outcome:
            groups["outcome"].append(p)
        elif id(p) in guideline:
            groups["guideline"].append(p)
        elif p.ndim < 2 or "norm" in name.lower():
            groups["no_decay"].append(p)  # biases and norms: decay would only pull them to 0
        else:
            groups["decay"].append(p)
    return torch.optim.AdamW(
        [
            {"params": groups["decay"], "lr": t.learning_rate, "weight_decay": t.weight_decay},
            {"params": groups["no_decay"], "lr": t.learning_rate, "weight_decay": 0.0},
            {"params": groups["outcome"], "lr": t.head_learning_rate, "weight_decay": t.weight_decay},
            {"params": groups["guideline"], "lr": t.guideline_head_learning_rate, "weight_decay": t.weight_decay},
        ]
    )


def _schedule(optimizer: torch.optim.Optimizer, total: int, warmup_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = int(round(total * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _loss(o: torch.Tensor, g: torch.Tensor, y: torch.Tensor, Y: torch.Tensor, pos_weight: float, lam: float) -> torch.Tensor:
    outcome = nn.functional.binary_cross_entropy_with_logits(o, y, pos_weight=torch.tensor(pos_weight))
    if lam == 0 or g.shape[-1] == 0:
        return outcome
    return outcome + lam * nn.functional.binary_cross_entropy_with_logits(g, Y)


def item_logits(clf: IMRClassifier, windows: Windows, texts: Sequence[str], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pooled, uncalibrated item logits (cue term included) for pre-tokenized windows (eval mode)."""
    return clf.window_item_logits(windows, texts, batch_size=batch_size)


def _validate(clf: IMRClassifier, windows: Windows, split: Split, cfg: TrainConfig, pos_weight: float) -> dict:
    o, g = item_logits(clf, windows, split.texts, cfg.train.eval_batch_size)
    o_t, y_t = torch.from_numpy(o), torch.from_numpy(split.y).float()
    loss = _loss(o_t, torch.from_numpy(g), y_t, torch.from_numpy(split.Y).float(), pos_weight,
                 cfg.train.guideline_loss_weight)  # fmt: skip
    outcome_loss = nn.functional.binary_cross_entropy_with_logits(o_t, y_t, pos_weight=torch.tensor(pos_weight))
    p, P = 1 / (1 + np.exp(-o)), 1 / (1 + np.exp(-g))
    out = outcome_metrics(split.y, p, 0.5)
    gl = guideline_metrics(split.Y, (P >= 0.5).astype(int), clf.label_names)
    return {"loss": float(loss), "outcome_loss": float(outcome_loss), "auroc": out["auroc"], "auprc": out["auprc"],
            "guideline_micro_f1": gl["micro_f1"]}  # fmt: skip


def _improved(metric: str, value: float, best: float | None) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return best is None
    if best is None or (isinstance(best, float) and math.isnan(best)):
        return True
    return value < best - 1e-6 if metric.endswith("loss") else value > best + 1e-6


def length_batches(lengths: Sequence[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """Shuffled batches of items with similar token counts (less padding), in random order.

    Items are shuffled, cut into pools of 50 batches, sorted by length inside a pool and batched;
    the batch order is shuffled again, so every epoch still sees a different mix.
    """
    order = torch.randperm(len(lengths), generator=generator).tolist()
    pool = 50 * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lambda i: lengths[i])
        batches.extend(chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size))
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffled]


def _micro_batches(items: list[int], n_windows: Sequence[int], cap: int) -> list[list[int]]:
    """Split a batch so no forward pass holds more than `cap` windows (an item is never split)."""
    groups: list[list[int]] = [[]]
    count = 0
    for item in items:
        if groups[-1] and count + n_windows[item] > cap:
            groups.append([])
            count = 0
        groups[-1].append(item)
        count += n_windows[item]
    return groups


def _forward_by_length(net: nn.Module, win: Windows, chunk_tokens: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward windows in length-sorted chunks, each padded only to its own longest window.

    Sentence windows vary from 5 to 100+ tokens; one padded batch would be mostly padding. The
    chunks stay in one autograd graph, so the pooled loss still sees every window of an item.
    """
    lengths = win.attention_mask.sum(dim=1)
    order = torch.argsort(lengths, descending=True, stable=True)
    outs_o, outs_g, start = [], [], 0
    while start < len(order):
        width = max(1, int(lengths[order[start]]))
        size = max(1, chunk_tokens // width)
        idx = order[start : start + size]
        o, g = net(win.input_ids[idx, :width], win.attention_mask[idx, :width])
        outs_o.append(o)
        outs_g.append(g)
        start += size
    inverse = torch.argsort(order)
    return torch.cat(outs_o)[inverse], torch.cat(outs_g)[inverse]


class _Trainer:
    """State of one fine-tuning run; `epoch()` does one pass over the training items."""

    def __init__(self, cfg: TrainConfig, clf: IMRClassifier, train: Split, pos_weight: float):
        self.cfg, self.clf, self.net, self.pos_weight = cfg, clf, clf.net, pos_weight
        self.windows = clf.make_windows(train.texts)
        self.n_windows = torch.bincount(self.windows.item_ids, minlength=len(train)).tolist()
        tokens = torch.zeros(len(train), dtype=torch.long).index_add_(
            0, self.windows.item_ids, self.windows.attention_mask.sum(dim=1)
        )
        self.lengths = tokens.tolist()
        self.y, self.Y = torch.from_numpy(train.y).float(), torch.from_numpy(train.Y).float()
        t = cfg.train
        self.steps_per_epoch = math.ceil(len(train) / t.batch_size)
        self.optimizer = _optimizer(self.net, cfg)
        self.scheduler = _schedule(self.optimizer, self.steps_per_epoch * t.epochs, t.warmup_ratio)
        self.generator = torch.Generator().manual_seed(cfg.seed)

    def _step(self, items: list[int]) -> float:
        t, m = self.cfg.train, self.cfg.model
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for group in _micro_batches(items, self.n_windows, t.max_windows_per_step):
            win = self.windows.select(group)
            o, g = _forward_by_length(self.net, win)
            n = len(group)
            loss = _loss(pool_logits(o, win.item_ids, n, m.pooling), pool_logits(g, win.item_ids, n, m.guideline_pool),
                         self.y[group], self.Y[group], self.pos_weight, t.guideline_loss_weight)  # fmt: skip
            (loss * (n / len(items))).backward()  # gradient of the batch mean, however it is split
            total += loss.item() * n
        nn.utils.clip_grad_norm_([p for p in self.net.parameters() if p.requires_grad], t.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        return total

    def epoch(self, label: str, quiet: bool) -> float:
        """One pass; returns the mean training loss per item."""
        self.net.train()
        total = 0.0
        batches = length_batches(self.lengths, self.cfg.train.batch_size, self.generator)
        with progress_bar(label, total=len(batches), unit="steps", disable=quiet) as bar:
            for items in batches:
                total += self._step(items)
                bar.advance()
        return total / max(1, len(self.lengths))


def _window_vectors(clf: IMRClassifier, windows: Windows, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention-pooled and mean-pooled encoder states (W, H) of all windows (the heads' inputs), computed once."""
    n = len(windows)
    hidden = int(clf.net.encoder.config.hidden_size)
    attended, mean = torch.zeros(n, hidden), torch.zeros(n, hidden)
    lengths = windows.attention_mask.sum(dim=1)
    order = torch.argsort(lengths, descending=True, stable=True)
    clf.net.eval()
    with torch.no_grad():  # not inference_mode: these tensors feed a backward pass later
        for b in range(0, n, batch_size):
            idx = order[b : b + batch_size]
            t = max(1, int(lengths[idx].max()))
            attended[idx], mean[idx] = clf.net.encode(windows.input_ids[idx, :t], windows.attention_mask[idx, :t])
    return attended, mean


def refit_outcome_head(clf: IMRClassifier, windows: Windows, split: Split, cfg: TrainConfig,
                       vectors: torch.Tensor | None = None) -> tuple[dict, np.ndarray | None]:  # fmt: skip
    """Refit the outcome head as an L2 logistic regression on the encoder's pooled vectors; C by grouped CV.

    Returns what was chosen (JSON-ready) and the grouped out-of-fold logits at the chosen C (NaN for
    items whose fold could not be fit; None without folds), which `train.fit_on_validation` calibrates on.

    With ~200 training items and ~25 Overturned, fine-tuning 22M parameters on a view without the
    verdict learns noise: on the shared letters (grouped 5-fold CV) the fine-tuned masked model
    reached AUROC .63, while a strongly regularised logistic regression on the frozen encoder's
    mean sentence vectors reached .81. The head is linear and the pooling (`mean`, `last` or `mean_last`) is
    linear in the window vectors, so the regression on item vectors *is* the head: its weights
    (standardisation folded in) replace the head's. C is chosen from `train.outcome_head_Cs` by
    pooled out-of-fold AUROC over letters (`split.groups`; items when groups are unknown). With
    `model.outcome_cues` the evidence cues join the design matrix (standardised, × `EVIDENCE_BLOCK_WEIGHT`)
    and their weights go to the model's evidence term.
    """
    from sklearn.model_selection import GroupKFold

    mode = clf.config.pooling
    if mode not in LINEAR_POOLINGS:
        raise ValueError(f"train.outcome_head=logistic needs model.pooling {', '.join(LINEAR_POOLINGS)}, not {mode!r}")
    if vectors is None:
        vectors = _window_vectors(clf, windows, cfg.train.eval_batch_size)[0]
    X = _pool_part(vectors, windows, len(split), mode, 0)  # pooling is linear: pool vectors
    y = split.y
    mu, sd = _scales(X)
    Z = (X - mu) / sd
    evidence = clf.net.outcome_cues is not None  # model.outcome_cues: standardised evidence cues join the vectors
    if evidence:
        E = evidence_matrix([main_text(t) for t in split.texts]).astype(np.float64)
        e_mu, e_sd = E.mean(axis=0), E.std(axis=0)
        e_sd = np.where(e_sd > 1e-12, e_sd, 1.0)  # a cue that never fires (or always the same) gets no weight
        Z = np.hstack([Z, (E - e_mu) / e_sd * EVIDENCE_BLOCK_WEIGHT])
    groups = split.group_ids
    k = min(5, len(set(groups.tolist())), int(y.sum()), int(len(y) - y.sum()))
    folds = list(GroupKFold(n_splits=k).split(Z, y, groups)) if k >= 2 else []
    model, best_C, scores, oof = _grouped_logistic(Z, y, folds, cfg.train.outcome_head_Cs)
    w = model.coef_[0][: X.shape[1]] / sd
    b = float(model.intercept_[0] - np.dot(w, mu))
    if evidence:
        evidence_w = model.coef_[0][X.shape[1] :] * EVIDENCE_BLOCK_WEIGHT / e_sd
        b -= float(np.dot(evidence_w, e_mu))
    with torch.no_grad():
        clf.net.outcome_head.weight.copy_(torch.as_tensor(w, dtype=torch.float32).view(1, -1))
        clf.net.outcome_head.bias.fill_(b / bias_multiplicity(mode))
        if evidence:
            clf.net.outcome_cues.weight.copy_(torch.as_tensor(evidence_w, dtype=torch.float32).view(1, -1))
    info = {"C": best_C, "cv_auroc_by_C": {str(c): v for c, v in scores.items()}, "folds": k}
    if evidence:  # logit change per unit of each cue (per log(1 + matches); per log(words) for log_words)
        info["evidence_weights"] = {name: round(float(x), 4) for name, x in zip(clf.config.outcome_cue_names, evidence_w)}
    if clf.net.context_head is not None:
        info["context"], oof_context = _refit_context_head(clf, vectors, windows, y, folds, cfg, oof)
        oof = None if oof is None or oof_context is None else oof + oof_context
    return info, oof


def _grouped_logistic(Z: np.ndarray, y: np.ndarray, folds: list, Cs: Sequence[float]):
    """L2 logistic regression on Z with C chosen by pooled out-of-fold AUROC over `folds`.

    Returns the model fit on all rows, the C, AUROC by C, and the out-of-fold logits at that C (NaN where
    a fold could not be fit; None without folds).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    scores: dict[float, float] = {}
    oof_by_C: dict[float, np.ndarray] = {}
    for C in Cs if folds else []:
        oof = np.full(len(y), np.nan)
        for tr, te in folds:
            if len(set(y[tr].tolist())) < 2:
                continue
            oof[te] = LogisticRegression(C=C, max_iter=5000).fit(Z[tr], y[tr]).decision_function(Z[te])
        scored = ~np.isnan(oof)
        scores[C] = float(roc_auc_score(y[scored], oof[scored])) if len(set(y[scored].tolist())) == 2 else 0.5
        oof_by_C[C] = oof
    best_C = max(scores, key=lambda c: (scores[c], -c)) if scores else min(Cs)
    return LogisticRegression(C=best_C, max_iter=5000).fit(Z, y), best_C, scores, oof_by_C.get(best_C)


def _pool_part(vectors: torch.Tensor, windows: Windows, n_items: int, mode: str, segment: int) -> np.ndarray:
    """Pool the window vectors of one part of the inputs (0 main view, 1 context view) to the items, (N, H)."""
    keep = windows.segments == segment
    return pool_logits(vectors[keep].double(), windows.item_ids[keep], n_items, mode).numpy()


def _refit_context_head(clf: IMRClassifier, vectors: torch.Tensor, windows: Windows, y: np.ndarray, folds: list,
                        cfg: TrainConfig, main_oof: np.ndarray | None) -> tuple[dict, np.ndarray | None]:  # fmt: skip
    """Fit the context head (`model.context_view`) as the forecast model's outcome head is fit: an L2 logistic
    regression on the vector of the context's last sentence, C by the same grouped folds. Both regressions'
    logits are first put on the scale of calibrated log-odds (each divided by the temperature its own
    out-of-fold logits call for), then the context's enters × `model.context_weight`: so the head's logit is
    context_weight × T_main / T_context × the regression's. Returns what was chosen and the scaled out-of-fold
    logits (added to the main head's for calibration).

    Probe on the shared letters (grouped 5-fold CV, per-fold domain-adapted MiniLM, the masked and
    forecast models fit separately and their logits added afterwards): masked outcome AUROC / AUPRC
    .880 / .551 → .897 / .604 with weight .5 (fold assignment 13), .890 / .522 → .902 / .601 (15),
    .886 / .518 → .902 / .582 (13, another pretraining seed); weights .3 to .5 helped in all three.
    """
    X = _pool_part(vectors, windows, len(y), "last", 1)
    mu, sd = _scales(X)
    model, best_C, scores, oof = _grouped_logistic((X - mu) / sd, y, folds, cfg.train.outcome_head_Cs)
    weight = clf.config.context_weight
    if oof is not None and main_oof is not None and not (np.isnan(oof).any() or np.isnan(main_oof).any()):
        weight *= fit_temperature(main_oof, y) / fit_temperature(oof, y)
    w = model.coef_[0] / sd * weight
    b = float(model.intercept_[0] * weight - np.dot(w, mu))
    with torch.no_grad():
        clf.net.context_head.weight.copy_(torch.as_tensor(w, dtype=torch.float32).view(1, -1))
        clf.net.context_head.bias.fill_(b)
    info = {"view": clf.config.context_view, "weight": clf.config.context_weight, "scale": weight, "C": best_C,
            "cv_auroc_by_C": {str(c): v for c, v in scores.items()}}  # fmt: skip
    return info, None if oof is None else oof * weight


# Weight of the standardised evidence cues against the standardised pooled vectors (weight 1 each) in the
# outcome regression (`model.outcome_cues`). Probe on the shared letters (frozen MiniLM, rationale_masked,
# mean_last, grouped 5-fold CV x 8 fold assignments, C by inner grouped CV as here): outcome AUROC .782
# without the cues; .799 with weight 1, .829 with 2, .846 with 4, .846 with 8, .841 with 16.
EVIDENCE_BLOCK_WEIGHT = 4.0


def _scales(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column means and standard deviations for standardising pooled vectors.

    A near-constant dimension (MiniLM has one) would get a weight of coef / ~0 and amplify any noise
    in it, e.g. int8 rounding in the ONNX path: scales are floored at a tenth of the median one.
    """
    mu, sd = X.mean(axis=0), X.std(axis=0)
    return mu, np.maximum(sd, 0.1 * float(np.median(sd)) + 1e-12)


# Weights of the blocks of the joint guideline regression: standardised encoder vectors × 0.5/sqrt(H),
# TF-IDF rows as they are (unit L2 norm), 0/1 cues × 1/3. Probe on the shared letters (frozen MiniLM,
# rationale view, grouped 5-fold CV over 3 fold assignments, C 16): micro-F1 .841 with vector weight
# 0.5, .832 with 1 and .814 with 2; TF-IDF + cues alone .832, vectors + cues alone .810.
VECTOR_BLOCK_WEIGHT = 0.5
CUE_BLOCK_WEIGHT = 1.0 / 3.0


def guideline_features(clf: IMRClassifier, pooled: np.ndarray, texts: Sequence[str],
                       scales: tuple[np.ndarray, np.ndarray]):  # fmt: skip
    """Design matrix (N, H + C + V), sparse, of the joint guideline regression: the pooled mean window
    vectors (N, H) standardised by `scales`, then the citation cues and the TF-IDF vector, if the model has them."""
    from scipy import sparse

    texts = [main_text(t) for t in texts]  # cues and TF-IDF read the main view (not model.context_view's)
    mu, sd = scales
    blocks = [sparse.csr_matrix((pooled - mu) / sd * (VECTOR_BLOCK_WEIGHT / math.sqrt(pooled.shape[1])))]
    if clf.net.guideline_cues is not None:
        blocks.append(sparse.csr_matrix(cue_matrix(texts).astype(np.float64) * CUE_BLOCK_WEIGHT))
    if clf.net.guideline_tfidf is not None:
        blocks.append(clf.tfidf.transform(texts))
    return sparse.hstack(blocks).tocsr()


def refit_guideline_logistic(clf: IMRClassifier, windows: Windows, split: Split, cfg: TrainConfig,
                             vectors: torch.Tensor | None = None) -> dict:  # fmt: skip
    """Refit the guideline head and its item-level terms as one class-balanced logistic regression per label.

    Features: the pooled mean window vectors (standardised), the citation cues and the TF-IDF vector
    (whichever the model has), weighted as `VECTOR_BLOCK_WEIGHT` / `CUE_BLOCK_WEIGHT` say. With
    `mean`/`last`/`mean_last` pooling the head is linear in the pooled vector, so the regression's weights *are*
    the head's (standardisation folded in), the cue term's and the TF-IDF term's. C is chosen from
    `train.guideline_head_Cs` by pooled out-of-fold micro-F1 at 0.5 over letters (`split.groups`).
    Balanced class weights put each label's decision point at probability 0.5, so the thresholds stay
    there (see `calibration.calibrate`): on ~40 validation items, per-label threshold fits cost F1.
    On the shared letters (rationale view, grouped 5-fold CV) this took the fine-tuned model's
    guideline micro-F1 from .762 (gradient-trained head + cues) to the numbers in the README.

    Cue prior (`train.guideline_cue_prior`, with cues): a regression cannot learn a label it saw
    once or twice, and 7 of the 18 labels have ≤ 7 examples in the shared letters. Each label gets
    a fixed extra weight of prior · s / (n + s) (n = its training positives, s =
    `guideline_cue_prior_support`) on the cues that name it (its `taxonomy:` cue and the
    `label_cues` of cues.yaml, e.g. ACOEM named with the elbow → ACOEM_ELBOW): the citation matcher
    decides rare labels, the regression frequent ones. Frozen-MiniLM probe on the shared letters
    (grouped 5-fold CV, 3 fold assignments): macro-F1 .485 → .678 on `rationale`, .485 → .673 on
    `rationale_masked`, micro-F1 .841 → .843 and .835 → .833.

    One-basis decoding (`train.guideline_decoding: one_basis`, `calibration.decide_labels`): C and the
    extra-basis threshold are chosen together, by the micro-F1 of one-basis decisions on the same grouped
    out-of-fold probabilities, which then include the cue prior (from each fold's label counts), because
    argmax across labels compares the prior-shifted logits the final head will have. Where independent
    decisions score higher out of fold than every one-basis candidate, the head keeps them
    (`calibration.fit_basis_extra`; `decoding` in the returned info says which rule was kept).
    """
    from sklearn.metrics import f1_score
    from sklearn.model_selection import GroupKFold

    if clf.config.guideline_pool not in LINEAR_POOLINGS:
        raise ValueError(f"train.guideline_head=logistic needs model.guideline_pooling {', '.join(LINEAR_POOLINGS)}, "
                         f"not {clf.config.guideline_pool!r}")  # fmt: skip
    if vectors is None:
        vectors = _window_vectors(clf, windows, cfg.train.eval_batch_size)[1]
    pooled = _pool_part(vectors, windows, len(split), clf.config.guideline_pool, 0)
    mu, sd = _scales(pooled)
    F = guideline_features(clf, pooled, split.texts, (mu, sd))
    Y, seed = split.Y, cfg.seed
    groups = split.group_ids
    k = min(5, len(set(groups.tolist())))
    Cs = list(cfg.train.guideline_head_Cs)
    basis = decision_basis_columns(clf.label_names) if cfg.train.guideline_decoding == "one_basis" else []
    half = np.full(Y.shape[1], 0.5)
    scores: dict[float, float] = {}
    extra: dict[float, tuple[float, dict]] = {}  # C → (basis_extra, held-out micro-F1 of each candidate)
    if k >= 2 and (len(Cs) > 1 or basis):
        folds = list(GroupKFold(n_splits=k).split(F, Y[:, 0], groups))
        # one_basis compares probabilities across labels, so the held-out logits get the cue prior the final head
        # will have (from each fold's own label counts); independent decisions keep the plain regression's
        named = _cue_prior_inputs(clf, split.texts) if basis and cfg.train.guideline_cue_prior > 0 else None
        for C in Cs:
            oof = np.zeros(Y.shape)
            for tr, te in folds:
                for j in range(Y.shape[1]):
                    w, b = fit_binary_logistic(F[tr], Y[tr, j], C=C, seed=seed)
                    oof[te, j] = F[te] @ w + b
                if named is not None:
                    oof[te] += named[te] * _cue_prior(cfg, Y[tr])[None, :]
            P = 1.0 / (1.0 + np.exp(-oof))
            if basis:
                extra[C] = fit_basis_extra(Y, P, half, basis)
                scores[C] = max(extra[C][1].values())  # the better of one-basis and independent decisions
            else:
                scores[C] = float(f1_score(Y, decide_labels(P, half), average="micro", zero_division=0))
    best_C = max(scores, key=lambda c: (scores[c], -c)) if scores else Cs[0]
    clf.set_guideline_decoding(basis, extra[best_C][0] if best_C in extra else 1.0)  # None: independent won out of fold
    W = np.zeros((Y.shape[1], F.shape[1]))
    b = np.zeros(Y.shape[1])
    for j in range(Y.shape[1]):
        W[j], b[j] = fit_binary_logistic(F, Y[:, j], C=best_C, seed=seed)
    H = pooled.shape[1]
    w_vec = W[:, :H] * (VECTOR_BLOCK_WEIGHT / math.sqrt(H)) / sd
    t = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32)  # noqa: E731
    net, offset, applied = clf.net, H, {}
    with torch.no_grad():
        net.guideline_head.weight.copy_(t(w_vec))
        net.guideline_head.bias.copy_(t((b - w_vec @ mu) / bias_multiplicity(clf.config.guideline_pool)))
        if net.guideline_cues is not None:
            n = net.guideline_cues.in_features
            cue_w = W[:, offset : offset + n] * CUE_BLOCK_WEIGHT
            prior = _cue_prior(cfg, Y)
            for j, columns in enumerate(label_cue_columns(clf.label_names)):
                cue_w[j, columns] += prior[j]
                applied[clf.label_names[j]] = round(float(prior[j]), 4)
            net.guideline_cues.weight.copy_(t(cue_w))
            offset += n
        if net.guideline_tfidf is not None:
            net.guideline_tfidf.weight.copy_(t(W[:, offset:]))
    return {"C": best_C, "cv_micro_f1_by_C": {str(c): v for c, v in scores.items()}, "folds": k,
            "features": int(F.shape[1]), "cue_prior": applied,
            "decoding": "one_basis" if clf.guideline_basis else "independent",  # one_basis falls back out of fold
            "basis_extra": clf.guideline_basis_extra if clf.guideline_basis else None,
            "cv_micro_f1_by_basis_extra": extra[best_C][1] if best_C in extra else None}  # fmt: skip


def _cue_prior(cfg: TrainConfig, Y: np.ndarray) -> np.ndarray:
    """(L,) the cue prior's weight per label, prior · s / (n + s), n = the label's positives in `Y`."""
    support = cfg.train.guideline_cue_prior_support
    return cfg.train.guideline_cue_prior * support / (Y.sum(axis=0) + support)


def _cue_prior_inputs(clf: IMRClassifier, texts: Sequence[str]) -> np.ndarray | None:
    """(N, L) how many of each label's naming cues every text matches (what the cue prior multiplies)."""
    if clf.net.guideline_cues is None:
        return None
    cues = cue_matrix([main_text(t) for t in texts]).astype(np.float64)
    return np.stack([cues[:, columns].sum(axis=1) for columns in label_cue_columns(clf.label_names)], axis=1)


def refit_guideline_head(clf: IMRClassifier, w_train: Windows, train: Split, w_val: Windows, val: Split,
                         cfg: TrainConfig, train_vectors: torch.Tensor | None = None) -> dict:  # fmt: skip
    """Train the guideline head further on the frozen fine-tuned encoder; keep the best epoch by val loss.

    Fine-tuning stops when the validation loss of both heads stops improving, before 18 labels
    have seen enough of their few examples. Window vectors are cached once, so these epochs cost
    a fraction of a second each.
    """
    t, head, mode = cfg.train, clf.net.guideline_head, clf.config.guideline_pool
    cue_head = clf.net.guideline_cues  # None without citation cues
    data = {}
    for name, win, split in (("train", w_train, train), ("val", w_val, val)):
        cues = torch.from_numpy(cue_matrix(split.texts)) if cue_head is not None else None
        vectors = train_vectors if name == "train" and train_vectors is not None else _window_vectors(clf, win, t.eval_batch_size)[1]
        data[name] = (vectors, win.item_ids, torch.from_numpy(split.Y).float(), cues)

    def loss_of(name: str, items: torch.Tensor | None, training: bool) -> torch.Tensor:
        vectors, item_ids, Y, cues = data[name]
        if items is None:
            rows, ids, n, target, item_cues = vectors, item_ids, len(Y), Y, cues
        else:
            remap = torch.full((len(Y),), -1, dtype=torch.long)
            remap[items] = torch.arange(len(items))
            keep = remap[item_ids] >= 0
            rows, ids, n, target = vectors[keep], remap[item_ids[keep]], len(items), Y[items]
            item_cues = cues[items] if cues is not None else None
        logits = pool_logits(head(clf.net.dropout(rows) if training else rows), ids, n, mode)
        if cue_head is not None:
            logits = logits + cue_head(item_cues)
        return nn.functional.binary_cross_entropy_with_logits(logits, target)

    params = list(head.parameters()) + (list(cue_head.parameters()) if cue_head is not None else [])
    optimizer = torch.optim.AdamW(params, lr=t.guideline_head_learning_rate, weight_decay=t.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    with torch.no_grad():
        best = start = float(loss_of("val", None, False))
    modules = nn.ModuleList([head] + ([cue_head] if cue_head is not None else []))
    best_state, best_epoch, waited = copy.deepcopy(modules.state_dict()), 0, 0
    for epoch in range(1, t.head_epochs + 1):
        clf.net.train()
        order = torch.randperm(len(train), generator=gen)
        for b in range(0, len(order), t.batch_size):
            loss = loss_of("train", order[b : b + t.batch_size], True)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        clf.net.eval()
        with torch.no_grad():
            current = float(loss_of("val", None, False))
        if current < best - 1e-6:
            best, best_state, best_epoch, waited = current, copy.deepcopy(modules.state_dict()), epoch, 0
        else:
            waited += 1
            if waited > t.head_patience:
                break
    modules.load_state_dict(best_state)
    return {"val_loss_before": start, "val_loss_after": best, "best_epoch": best_epoch}


def train_classifier(
    cfg: TrainConfig,
    train: Split,
    val: Split,
    label_names: Sequence[str],
    *,
    on_epoch: EpochCallback | None = None,
    quiet: bool = False,
) -> tuple[IMRClassifier, list[dict]]:
    """Train a classifier with early stopping on `val`, then calibrate on `val`; returns it and per-epoch logs."""
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"need items in both train ({len(train)}) and validation ({len(val)}) splits")
    if train.Y.shape[1] != len(label_names):
        raise ValueError(f"train.Y has {train.Y.shape[1]} label columns but {len(label_names)} label names")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.fit_on_validation:  # nothing is early-stopped: the heads are fit on both, calibrated out of fold
        train = concat_splits(train, val)
    seed_everything(cfg.seed)
    tfidf = None
    if cfg.model.guideline_tfidf:
        tfidf = TfidfFeatures.fit([main_text(t) for t in train.texts], max_features=cfg.model.tfidf_max_features,
                                  min_df=min(cfg.model.tfidf_min_df, len(train)), ngram_max=2)  # fmt: skip
    clf = IMRClassifier.build(cfg.model, label_names, tfidf=tfidf)
    freeze_lower_layers(clf.net, cfg.model.freeze_layers, embeddings=cfg.model.freeze_embeddings)
    pos_weight = resolve_pos_weight(cfg.train.pos_weight, train.y)
    trainer = _Trainer(cfg, clf, train, pos_weight)
    w_val = None if cfg.train.fit_on_validation else clf.make_windows(val.texts)  # fit_on_validation: no epochs
    metric, history = cfg.train.early_stopping_metric, []
    best_value, best_state, best_epoch, waited = None, None, 0, 0
    for epoch in range(1, cfg.train.epochs + 1):
        start = time.perf_counter()
        log = {"epoch": epoch, "train_loss": trainer.epoch(f"epoch {epoch}/{cfg.train.epochs}", quiet)}
        log.update({f"val_{k}": v for k, v in _validate(clf, w_val, val, cfg, pos_weight).items()})
        log["seconds"] = time.perf_counter() - start
        history.append(log)
        logger.info("epoch %d: %s", epoch, ", ".join(f"{k} {v:.4g}" for k, v in log.items() if k != "epoch"))
        if on_epoch is not None:
            on_epoch(epoch, log)
        if _improved(metric, log[f"val_{metric}"], best_value):
            best_value, best_epoch, waited = log[f"val_{metric}"], epoch, 0
            best_state = copy.deepcopy(clf.net.state_dict())
        else:
            waited += 1
            if waited > cfg.train.patience:
                break
    if best_state is not None:
        clf.net.load_state_dict(best_state)
    vectors = None
    if cfg.train.head_epochs or "logistic" in (cfg.train.outcome_head, cfg.train.guideline_head):
        vectors = _window_vectors(clf, trainer.windows, cfg.train.eval_batch_size)  # (attended, mean), once
    if cfg.train.guideline_head == "logistic":
        clf.metrics["guideline_head_refit"] = refit_guideline_logistic(clf, trainer.windows, train, cfg, vectors[1])
    elif cfg.train.head_epochs:
        clf.metrics["guideline_head_refit"] = refit_guideline_head(clf, trainer.windows, train, w_val, val, cfg, vectors[1])
    with torch.no_grad():
        clf.net.outcome_head.bias -= math.log(pos_weight)  # undo the prior shift pos_weight taught the head
    oof = None
    if cfg.train.outcome_head == "logistic":
        clf.metrics["outcome_head_refit"], oof = refit_outcome_head(clf, trainer.windows, train, cfg, vectors[0])
    if cfg.train.fit_on_validation:
        if oof is None or np.isnan(oof).any():
            raise ValueError(f"train.fit_on_validation calibrates on grouped out-of-fold logits, but the {len(train)} "
                             f"training + validation items ({int(train.y.sum())} Overturned) do not make 2+ folds "
                             "with both outcomes in every training part; set train.fit_on_validation: false")  # fmt: skip
        calibrate_outcome(clf, oof, train.y, cfg.train.threshold_rule)
        clf.guideline_thresholds = np.full(len(label_names), 0.5)
        clf.metrics["calibrated_on"] = f"grouped out-of-fold logits of {len(train)} train + validation items"
    else:
        finetuned_head = cfg.train.guideline_head != "logistic"  # the logistic refit chose its decoding out of fold
        calibrate(clf, w_val, val, cfg.train.eval_batch_size, cfg.train.threshold_rule, label_thresholds=finetuned_head,
                  one_basis=finetuned_head and cfg.train.guideline_decoding == "one_basis")  # fmt: skip
        clf.metrics["calibrated_on"] = f"{len(val)} validation items"
    clf.metrics.update({"best_epoch": best_epoch, "pos_weight": pos_weight})
    # Statistics of the training items for the input checks (imr_model.familiarity), from the final encoder's
    # window vectors (those the head refits read, when they were computed); saved by familiarity.save_classifier_profile.
    familiarity.attach_profile(clf, familiarity.fit_classifier_profile(
        clf, train.texts, trainer.windows, None if vectors is None else vectors[1].numpy(), cfg.train.eval_batch_size,
        groups=train.groups))
    clf.net.eval()
    return clf, history


def predict_split(model: Scorer, split: Split) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated probabilities of any scorer on a split."""
    return model.predict_proba(split.texts)


def score_predictions(
    split: Split, p: np.ndarray, decided: np.ndarray, outcome_threshold: float, label_names: Sequence[str],
) -> dict:  # fmt: skip
    """{"outcome": outcome_metrics, "guidelines": guideline_metrics} for outcome probabilities and 0/1 guideline decisions."""
    return {
        "outcome": outcome_metrics(split.y, p, outcome_threshold),
        "guidelines": guideline_metrics(split.Y, np.asarray(decided).astype(int), label_names),
    }


def evaluate(model: Scorer, split: Split, label_names: Sequence[str]) -> dict:
    """Score a fitted model on a split with its own thresholds."""
    p, P = predict_split(model, split)
    return score_predictions(split, p, model.decide_guidelines(P), model.outcome_threshold, label_names)
