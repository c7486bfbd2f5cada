"""The trainer: runs a recipe's phases on a classifier, and scores fitted models on a split.

`train_classifier` builds an `IMRClassifier` and runs, in order:

1. recipe `finetune` only: fine-tune the encoder and both heads on the training items, early-stopped
   on validation (`imr_model.finetune`);
2. `clf.fit_heads`: the guideline head as logistic regressions on the encoder's cached window vectors,
   and with recipe `probe` the outcome head too (`imr_model.heads`);
3. `clf.fit_calibration`: the outcome temperature and threshold, on the validation items (finetune) or
   on the outcome head's grouped out-of-fold logits (probe, whose heads are fit on train + validation:
   nothing is early-stopped);
4. the reference profile of the training items for input warnings (`imr_model.familiarity`) and batch
   drift (`imr_model.drift`).

Every fitted parameter is written by the classifier's own methods; this module only orders them.
"""

from __future__ import annotations

import logging
import random
from typing import Protocol, Sequence

import numpy as np
import torch

from imr_model import devices, drift, familiarity
from imr_model.baseline import TfidfFeatures
from imr_model.config import TrainConfig
from imr_model.finetune import EpochCallback, fine_tune
from imr_model.metrics import guideline_metrics, outcome_metrics
from imr_model.modeling import IMRClassifier
from imr_model.splits import Split, concat_splits

logger = logging.getLogger(__name__)


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


def train_classifier(
    cfg: TrainConfig,
    train: Split,
    val: Split,
    label_names: Sequence[str],
    *,
    on_epoch: EpochCallback | None = None,
    quiet: bool = False,
) -> tuple[IMRClassifier, list[dict]]:
    """Build and fit a classifier by `cfg.train.recipe`; returns it and the per-epoch fine-tuning logs."""
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"need items in both train ({len(train)}) and validation ({len(val)}) splits")
    if train.Y.shape[1] != len(label_names):
        raise ValueError(f"train.Y has {train.Y.shape[1]} label columns but {len(label_names)} label names")
    t, probe = cfg.train, cfg.train.recipe == "probe"
    device = devices.resolve_device(t.device)  # `train.device`; a missing GPU fails before any work
    if t.threads:
        torch.set_num_threads(t.threads)
    if probe:  # nothing is early-stopped: the heads are fit on both, calibrated out of fold
        train = concat_splits(train, val)
    seed_everything(cfg.seed)
    tfidf = None
    if cfg.model.guideline_tfidf:
        b = cfg.baseline
        tfidf = TfidfFeatures.fit(train.texts, max_features=b.max_features, min_df=min(b.min_df, len(train)),
                                  ngram_max=b.ngram_max)  # fmt: skip
    clf = IMRClassifier.build(cfg.model, label_names, tfidf=tfidf, device=device)
    clf.metrics["device"] = devices.describe(device)  # where it was trained (metrics.json, MLflow), not its config
    windows = clf.make_windows(train.texts)
    history: list[dict] = []
    w_val = None if probe else clf.make_windows(val.texts)  # early stopping and calibration read the same windows
    if not probe:
        tuned = fine_tune(clf, windows, train, w_val, val, t, seed=cfg.seed, on_epoch=on_epoch, quiet=quiet)
        history = tuned["history"]
        clf.metrics.update({"best_epoch": tuned["best_epoch"], "pos_weight": tuned["pos_weight"]})
    vectors = clf.window_vectors(windows, t.eval_batch_size)  # (attended, mean), once for every head fit
    oof = clf.fit_heads(train.texts, windows, train.y, train.Y, train.group_ids, refit_outcome=probe,
                        decoding=t.guideline_decoding, seed=cfg.seed, vectors=vectors)  # fmt: skip
    if probe:
        if oof is None:
            raise ValueError(f"train.recipe: probe calibrates on grouped out-of-fold logits, but the {len(train)} "
                             f"training + validation items ({int(train.y.sum())} Overturned) do not make 2+ folds "
                             "with both outcomes; train on more letters or use train.recipe: finetune")  # fmt: skip
        held_out, held_out_groups = oof, train.groups
        held_out_on = f"grouped out-of-fold calibrated probabilities of {len(train)} train + validation items"
        clf.fit_calibration(oof, train.y, on=f"grouped out-of-fold logits of {len(train)} train + validation items")
    else:
        held_out, _ = clf.window_item_logits(w_val, val.texts, batch_size=t.eval_batch_size)
        held_out_on, held_out_groups = f"calibrated probabilities of {len(val)} validation items", val.groups
        clf.fit_calibration(held_out, val.y, on=f"{len(val)} validation items")
    # Statistics of the training items for the input checks (imr_model.familiarity) and batch drift
    # (imr_model.drift), from the final encoder's window vectors; saved by familiarity.save_classifier_profile.
    means = vectors[1].numpy()
    profile = familiarity.fit_classifier_profile(clf, train.texts, windows, means, t.eval_batch_size, groups=train.groups)
    p_held_out = clf.probabilities(held_out, np.zeros((len(held_out), 0)))[0]
    b = cfg.baseline  # the TF-IDF vocabulary settings of the baseline (and the guideline term)
    familiarity.attach_profile(clf, drift.with_reference(
        profile, familiarity.item_vectors(windows, means, len(train)), train.texts, train.groups, p_held_out,
        held_out_groups, probability_source=held_out_on, y=train.y,
        tfidf={"max_features": b.max_features, "min_df": b.min_df, "ngram_max": b.ngram_max}))  # fmt: skip
    clf.net.eval()
    return clf, history


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
    p, P = model.predict_proba(split.texts)
    return score_predictions(split, p, model.decide_guidelines(P), model.outcome_threshold, label_names)
