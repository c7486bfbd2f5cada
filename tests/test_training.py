"""The trainer and its recipes (finetune, probe), the head fits, batching, reproducibility, the full `run_training`,
cross-validation and domain adaptation (tiny config)."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
from scipy.special import expit
from sklearn.metrics import roc_auc_score

from imr_model import heads
from imr_model.calibration import (
    bound_probability,
    fit_temperature,
    half_max_f1_threshold,
)
from imr_model.evaluation import BASELINE_DIR, evaluate_model, outcome_metrics_per_item
from imr_model.experiment import cross_validate, run_training
from imr_model.finetune import (
    _micro_batches,
    fine_tune,
    length_batches,
    resolve_pos_weight,
)
from imr_model.modeling import GUIDELINE_POOLING, IMRClassifier
from imr_model.pooling import POOLINGS, bias_multiplicity, pool
from imr_model.splits import Split, concat_splits, label_matrix, records_to_split
from imr_model.training import seed_everything, train_classifier


def _cfg(base, *overrides):
    """`base` (a TrainConfig) with `key=value` overrides, validated like a config file."""
    from imr_model.config import apply_overrides

    return type(base).model_validate(apply_overrides(base.model_dump(), list(overrides)))


def test_pos_weight_auto_and_fixed():
    y = np.array([1] + [0] * 9)
    assert resolve_pos_weight("auto", y) == pytest.approx(3.0)
    assert resolve_pos_weight(2.0, y) == 2.0
    assert resolve_pos_weight("auto", np.zeros(5)) == 1.0


def test_length_batches_cover_every_item_once_and_are_seeded():
    lengths = list(np.random.default_rng(0).integers(5, 300, 103))
    a = length_batches(lengths, 8, torch.Generator().manual_seed(1))
    b = length_batches(lengths, 8, torch.Generator().manual_seed(1))
    c = length_batches(lengths, 8, torch.Generator().manual_seed(2))
    assert a == b and a != c
    assert sorted(i for batch in a for i in batch) == list(range(103))
    assert max(len(batch) for batch in a) == 8
    # batches group similar lengths: far less padding than random batches
    spread = np.mean([np.ptp([lengths[i] for i in batch]) for batch in a])
    assert spread < 100


def test_micro_batches_respect_window_cap():
    n_windows = [1, 5, 2, 9, 1]
    groups = _micro_batches([0, 1, 2, 3, 4], n_windows, cap=6)
    assert [i for g in groups for i in g] == [0, 1, 2, 3, 4]
    assert groups == [[0, 1], [2], [3], [4]]  # item 3 alone exceeds the cap and is never split


def test_label_matrix_rejects_unknown_labels(label_names):
    Y = label_matrix([{"guideline_labels": ["ODG"]}, {"guideline_labels": []}], label_names)
    assert Y.sum() == 1 and Y[0, label_names.index("ODG")] == 1
    with pytest.raises(ValueError, match="not in the taxonomy"):
        label_matrix([{"guideline_labels": ["NOPE"]}], label_names)


def test_pooled_cv_decisions_use_each_folds_threshold():
    y = np.array([1, 0, 1, 0])
    p = np.array([0.3, 0.2, 0.9, 0.6])
    thr = np.array([0.25, 0.25, 0.7, 0.7])  # fold 1 threshold .25, fold 2 threshold .7
    m = outcome_metrics_per_item(y, p, thr)
    assert m["f1"] == 1.0 and m["confusion"] == {"tn": 2, "fp": 0, "fn": 0, "tp": 2}
    assert m["auroc"] == pytest.approx(0.75)  # threshold-free metrics use the pooled probabilities


def _small_splits(demo_records, label_names):
    train = records_to_split(demo_records[:60], "rationale", label_names)
    val = records_to_split(demo_records[60:], "rationale", label_names)
    return train, val


@pytest.mark.slow
def test_train_classifier_is_reproducible_and_calibrated(tiny_config, demo_records, label_names):
    """Recipe finetune: same seed, same model; calibrated on the validation items; the guideline head is refit as
    logistic regressions after fine-tuning, the outcome head is the fine-tuned one."""
    train, val = _small_splits(demo_records, label_names)
    cfg = _cfg(tiny_config, "train.epochs=2")
    assert cfg.train.recipe == "finetune"
    clf_a, hist_a = train_classifier(cfg, train, val, label_names, quiet=True)
    clf_b, hist_b = train_classifier(cfg, train, val, label_names, quiet=True)
    assert [h["train_loss"] for h in hist_a] == [h["train_loss"] for h in hist_b]
    pa, Pa = clf_a.predict_proba(val.texts)
    pb, Pb = clf_b.predict_proba(val.texts)
    assert np.array_equal(pa, pb) and np.array_equal(Pa, Pb)
    assert 1 <= len(hist_a) <= 2 and {"val_loss", "val_outcome_loss", "val_auroc", "train_loss"} <= set(hist_a[0])
    assert clf_a.temperature > 0 and 0 < clf_a.outcome_threshold < 1
    assert clf_a.guideline_thresholds.shape == (len(label_names),)
    assert clf_a.metrics["best_epoch"] in (1, 2)
    losses = [h["val_outcome_loss"] for h in hist_a]
    assert clf_a.metrics["best_epoch"] == 1 + int(np.argmin(losses))  # early stopping on the validation outcome loss
    assert clf_a.metrics["calibrated_on"] == f"{len(val)} validation items"
    o_val, _ = clf_a.predict_logits(val.texts)
    assert clf_a.temperature == pytest.approx(fit_temperature(o_val, val.y), rel=1e-4)
    assert "guideline_head_refit" in clf_a.metrics and "outcome_head_refit" not in clf_a.metrics


def test_fine_tune_keeps_the_best_epoch_and_takes_the_pos_weight_shift_back_out(tiny_config, label_names):
    """fine_tune: the network it leaves is the epoch with the lowest validation outcome loss (restored after later
    epochs), with log(pos_weight) taken out of the outcome bias; the encoder moved."""
    from imr_model.finetune import _validate

    cfg = _cfg(tiny_config, "train.epochs=3", "train.patience=2", "model.window_unit=sentences")
    train, val = _planted_split(12, label_names, 0), _planted_split(6, label_names, 1)
    torch.manual_seed(0)
    clf = IMRClassifier.build(cfg.model, label_names)
    before = clf.net.encoder.get_input_embeddings().weight.detach().clone()
    out = fine_tune(clf, clf.make_windows(train.texts), train, clf.make_windows(val.texts), val, cfg.train, seed=cfg.seed, quiet=True)
    history, best = out["history"], out["best_epoch"]
    assert [h["epoch"] for h in history] == [1, 2, 3]  # patience 2: three epochs always run
    assert best == 1 + int(np.argmin([h["val_outcome_loss"] for h in history]))
    assert out["pos_weight"] == pytest.approx(resolve_pos_weight("auto", train.y)) and out["pos_weight"] > 1
    assert not torch.equal(before, clf.net.encoder.get_input_embeddings().weight)
    clf.shift_outcome_bias(math.log(out["pos_weight"]))  # back to the logits the validation loss was measured on
    again = _validate(clf, clf.make_windows(val.texts), val, cfg.train, out["pos_weight"])
    assert again["outcome_loss"] == pytest.approx(history[best - 1]["val_outcome_loss"], rel=1e-4)


def _planted_split(n_letters: int, label_names, seed: int, *, last: bool = False) -> Split:
    """Overturned items mention a planted drug name in one of their sentences (`last`: the closing one, which
    `last` pooling reads); items come two per letter."""
    rng = np.random.default_rng(seed)
    filler = ["The injured worker reports pain in the lower back.", "Physical therapy was completed last year.",
              "Medication helps with sleep and daily activity.", "The treating physician requests a follow-up visit."]  # fmt: skip
    texts, y, groups = [], [], []
    for letter in range(n_letters):
        for _ in range(2):
            label = int(rng.random() < 0.3)
            sentences = list(rng.choice(filler, size=3, replace=False))
            if label:
                sentences.insert(3 if last else int(rng.integers(0, 3)), "Zolvaxin improved function markedly.")
            texts.append(" ".join(sentences))
            y.append(label)
            groups.append(f"L{letter}")
    return Split(texts, y, np.zeros((len(texts), len(label_names))), groups=groups)


def _pooled_by_hand(vectors: np.ndarray, ids: np.ndarray, n: int, pooling: str) -> np.ndarray:
    """Item rows from window rows without imr_model.pooling: mean, last, or mean + last of each item's windows."""
    mean = np.stack([vectors[ids == i].mean(axis=0) for i in range(n)])
    last = np.stack([vectors[ids == i][-1] for i in range(n)])
    return {"mean": mean, "last": last, "mean_last": mean + last}[pooling]


@pytest.mark.parametrize("pooling", POOLINGS)
def test_probe_outcome_head_is_the_regression_on_pooled_vectors(tiny_config, label_names, pooling):
    """fit_heads(refit_outcome=True): the weights written into the outcome head are heads.fit_outcome on the pooled
    window vectors, so the classifier's logit is X @ w + b; it returns the fit's out-of-fold logits and finds a
    planted word in unseen items."""
    torch.manual_seed(0)
    model_cfg = tiny_config.model.model_copy(update={"pooling": pooling, "window_unit": "sentences"})
    clf = IMRClassifier.build(model_cfg, label_names)
    at_end = pooling == "last"  # the planted sentence where the pooling reads it
    train, test = _planted_split(30, label_names, 0, last=at_end), _planted_split(15, label_names, 1, last=at_end)
    windows = clf.make_windows(train.texts)
    attended, _ = clf.window_vectors(windows)
    direct = heads.fit_outcome(pool(attended.double(), windows.item_ids, len(train), pooling).numpy(), train.y,
                               train.group_ids)  # fmt: skip
    oof = clf.fit_heads(train.texts, windows, train.y, train.Y, train.group_ids, refit_outcome=True,
                        decoding="independent")  # fmt: skip
    info = clf.metrics["outcome_head_refit"]
    assert info == direct.info and info["C"] in heads.OUTCOME_CS and info["folds"] == 5
    # the returned out-of-fold logits are those the chosen C was scored on
    assert oof.shape == (len(train),) and not np.isnan(oof).any() and np.array_equal(oof, direct.oof)
    assert roc_auc_score(train.y, oof) == pytest.approx(info["cv_auroc_by_C"][str(info["C"])])
    w = clf.net.outcome_head.weight.detach().numpy()[0]
    b = float(clf.net.outcome_head.bias.detach()) * bias_multiplicity(pooling)
    assert np.allclose(w, direct.weight, rtol=1e-5, atol=1e-7) and b == pytest.approx(direct.bias, rel=1e-5, abs=1e-6)
    # Independently: each unseen item's attention-pooled window vectors, pooled by hand, through the fitted regression.
    w_test = clf.make_windows(test.texts)
    with torch.no_grad():
        att_test, _ = clf.net.encode(w_test.input_ids, w_test.attention_mask)
    ids = w_test.item_ids.numpy()
    if pooling != "mean":
        assert all((ids == i).sum() >= 2 for i in range(len(test)))  # else last and mean coincide
    X = _pooled_by_hand(att_test.double().numpy(), ids, len(test), pooling)
    logits, _ = clf.predict_logits(test.texts)
    assert np.allclose(logits, X @ direct.weight + direct.bias, atol=1e-3)
    assert roc_auc_score(test.y, logits) > 0.9  # the planted word separates unseen items


def test_probe_outcome_head_fits_the_evidence_term(tiny_config, label_names):
    """model.outcome_cues: the regression also weighs the evidence cues; logit = pooled head + evidence @ v."""
    from imr_model.cues import evidence_matrix, evidence_names

    torch.manual_seed(0)
    model_cfg = tiny_config.model.model_copy(update={"pooling": "mean", "window_unit": "sentences", "outcome_cues": True})

    def split(n_letters: int, seed: int) -> Split:  # Upheld items say what the record lacks, twice
        rng = np.random.default_rng(seed)
        filler = ["The injured worker reports pain in the lower back.", "Physical therapy was completed last year.",
                  "Medication helps with sleep and daily activity.", "The physician requests a follow-up visit."]  # fmt: skip
        texts, y = [], []
        for _ in range(2 * n_letters):
            label = int(rng.random() < 0.35)
            sentences = list(rng.choice(filler, size=3, replace=False))
            if not label:
                sentences += ["There is no documentation of benefit.", "There is no record of a home program."]
            texts.append(" ".join(sentences))
            y.append(label)
        return Split(texts, y, np.zeros((len(texts), len(label_names))), groups=[f"L{i // 2}" for i in range(len(texts))])

    clf = IMRClassifier.build(model_cfg, label_names)
    train, test = split(30, 0), split(15, 1)
    windows = clf.make_windows(train.texts)
    attended, _ = clf.window_vectors(windows)
    direct = heads.fit_outcome(pool(attended.double(), windows.item_ids, len(train), "mean").numpy(), train.y,
                               train.group_ids, evidence_matrix(train.texts).astype(np.float64))  # fmt: skip
    clf.fit_heads(train.texts, windows, train.y, train.Y, train.group_ids, refit_outcome=True, decoding="independent")
    v = dict(zip(evidence_names(), clf.net.outcome_cues.weight.detach().numpy()[0]))
    assert np.allclose(list(v.values()), direct.evidence_weight, rtol=1e-5, atol=1e-6)
    assert v["evidence:there_is_no"] < 0  # "there is no ..." pushes towards Upheld
    assert clf.metrics["outcome_head_refit"]["evidence_weights"]["evidence:there_is_no"] == pytest.approx(
        v["evidence:there_is_no"], abs=1e-4)  # fmt: skip
    logits, _ = clf.predict_logits(test.texts)
    w_test = clf.make_windows(test.texts)
    o, g = clf.forward_windows(w_test)
    pooled, _ = clf.pool(o, g, w_test.item_ids.numpy(), len(test))
    assert np.allclose(logits, pooled + evidence_matrix(test.texts) @ np.array(list(v.values())), atol=1e-4)
    assert roc_auc_score(test.y, logits) > 0.95


def _planted_guideline_split(n_letters: int, label_names, seed: int) -> Split:
    """Items citing a planted guideline name carry label 0; items naming ACOEM and the neck carry label 1."""
    rng = np.random.default_rng(seed)
    filler = ["The injured worker reports pain.", "Physical therapy was completed last year.",
              "Medication helps with sleep.", "The physician requests a follow-up visit."]  # fmt: skip
    texts, Y, groups = [], np.zeros((2 * n_letters, len(label_names))), []
    for i in range(2 * n_letters):
        sentences = list(rng.choice(filler, size=2, replace=False))
        if rng.random() < 0.4:
            sentences.append("The Quorvane guideline supports this.")
            Y[i, 0] = 1
        if rng.random() < 0.3:
            sentences.append("ACOEM addresses imaging of the cervical spine.")
            Y[i, 1] = 1
        texts.append(" ".join(sentences))
        groups.append(f"L{i // 2}")
    return Split(texts, np.zeros(len(texts)), Y, groups=groups)


def test_guideline_head_is_the_joint_regression_plus_the_cue_prior(tiny_config, label_names, tmp_path):
    """fit_heads: guideline logits = [pooled mean vectors, cues, TF-IDF] @ W + b, fit per label (C by grouped CV), plus
    the cue prior CUE_PRIOR·s/(n + s) on the cues naming each label; the TF-IDF term finds a planted guideline name,
    the outcome head is left alone without refit_outcome, and the fit survives save/load."""
    from scipy import sparse
    from sklearn.linear_model import LogisticRegression

    from imr_model.baseline import TfidfFeatures
    from imr_model.cues import cue_matrix, label_cue_columns

    torch.manual_seed(0)
    model_cfg = tiny_config.model.model_copy(update={"window_unit": "sentences", "guideline_tfidf": True})
    train, test = _planted_guideline_split(40, label_names, 0), _planted_guideline_split(20, label_names, 1)
    clf = IMRClassifier.build(model_cfg, label_names, tfidf=TfidfFeatures.fit(train.texts, max_features=500))
    assert clf.net.guideline_tfidf.in_features == len(clf.tfidf) <= 500
    outcome_before = clf.net.outcome_head.weight.detach().clone()
    w_train = clf.make_windows(train.texts)
    assert clf.fit_heads(train.texts, w_train, train.y, train.Y, train.group_ids, refit_outcome=False,
                         decoding="independent") is None  # fmt: skip
    assert torch.equal(clf.net.outcome_head.weight, outcome_before) and "outcome_head_refit" not in clf.metrics
    info = clf.metrics["guideline_head_refit"]
    assert info["C"] in heads.GUIDELINE_CS and info["folds"] == 5 and info["decoding"] == "independent"
    assert set(info["cv_micro_f1_by_C"]) == {str(c) for c in heads.GUIDELINE_CS}
    _, logits = clf.predict_logits(test.texts)
    # Independently: the prior's shift, and the same regressions refit with scikit-learn on the same design matrix.
    n = train.Y.sum(axis=0)
    prior = heads.CUE_PRIOR * heads.CUE_PRIOR_SUPPORT / (n + heads.CUE_PRIOR_SUPPORT)
    cues = cue_matrix(test.texts)
    named = np.stack([cues[:, columns].sum(axis=1) for columns in label_cue_columns(label_names)], axis=1)
    neck = label_names.index("ACOEM_NECK")  # "ACOEM ... cervical spine" names it; training never saw it
    assert info["cue_prior"]["ACOEM_NECK"] == pytest.approx(heads.CUE_PRIOR) and n[neck] == 0
    assert (named[:, neck] > 0).any() and np.array_equal(logits[:, neck] > 0, named[:, neck] > 0)
    fitted = logits - named * prior[None, :]

    def design(split, windows, mu_sd=None):
        _, mean = clf.window_vectors(windows)
        P = pool(mean.double(), windows.item_ids, len(split), GUIDELINE_POOLING).numpy()
        mu, sd = mu_sd or heads.scales(P)
        vec = (P - mu) / sd * (heads.VECTOR_BLOCK_WEIGHT / math.sqrt(P.shape[1]))
        F = sparse.hstack([sparse.csr_matrix(vec), sparse.csr_matrix(cue_matrix(split.texts) * heads.CUE_BLOCK_WEIGHT),
                           clf.tfidf.transform(split.texts)]).tocsr()  # fmt: skip
        return F, (mu, sd)

    F_train, mu_sd = design(train, w_train)
    F_test, _ = design(test, clf.make_windows(test.texts), mu_sd)
    for j in (0, 1):
        ref = LogisticRegression(C=info["C"], class_weight="balanced", max_iter=2000).fit(F_train, train.Y[:, j])
        assert np.allclose(fitted[:, j], ref.decision_function(F_test), atol=1e-3)
    assert np.array_equal(logits[:, 0] > 0, test.Y[:, 0] > 0)  # the planted name decides label 0 on unseen items
    assert np.all(fitted[:, 2:] < 0)  # labels never seen in training stay off, but for their naming cues
    assert np.all(clf.guideline_thresholds == bound_probability(0.5)) and clf.guideline_basis == ()
    clf.save_pretrained(tmp_path)
    loaded = IMRClassifier.from_pretrained(tmp_path)
    assert loaded.tfidf.vocabulary == clf.tfidf.vocabulary
    assert np.allclose(loaded.predict_logits(test.texts)[1], logits, atol=1e-5)


def test_one_basis_decoding_is_chosen_out_of_fold_and_gives_each_item_one_basis(tiny_config, label_names):
    """train.guideline_decoding=one_basis: the extra-basis threshold comes from the regression's grouped
    out-of-fold probabilities, and every item gets exactly its most probable decision-basis label."""
    from imr_model.baseline import TfidfFeatures
    from imr_model.calibration import BASIS_EXTRA_GRID
    from imr_model.metrics import guideline_metrics
    from imr_model.taxonomy import load_taxonomy

    names = list(label_names)
    odg = names.index("ODG")
    named = {names.index("MTUS_CHRONIC_PAIN"): "Chronic pain guidelines apply.",
             names.index("ACOEM_NECK"): "Neck complaints are addressed.",
             names.index("ACOEM_LOW_BACK"): "Low back complaints are addressed."}  # fmt: skip

    def split(n: int, seed: int) -> Split:  # one basis per item, named by a sentence; ODG cited beside it sometimes
        rng = np.random.default_rng(seed)
        texts, Y, groups = [], np.zeros((n, len(names))), []
        for i in range(n):
            j = int(rng.choice(list(named)))
            sentences = ["The injured worker reports pain.", "Medication helps with sleep."]
            if rng.random() < 0.7:  # the other items never say which basis: the regression must guess
                sentences.append(named[j])
            if rng.random() < 0.3:
                sentences.append("ODG was also consulted.")
                Y[i, odg] = 1
            Y[i, j] = 1
            texts.append(" ".join(sentences))
            groups.append(f"L{i // 2}")
        return Split(texts, np.zeros(n), Y, groups=groups)

    def fit(clf, s: Split, decoding: str) -> dict:
        clf.fit_heads(s.texts, clf.make_windows(s.texts), s.y, s.Y, s.group_ids, refit_outcome=False, decoding=decoding)
        return clf.metrics["guideline_head_refit"]

    torch.manual_seed(0)
    model_cfg = tiny_config.model.model_copy(update={"window_unit": "sentences", "guideline_tfidf": True})
    train, test = split(80, 0), split(40, 1)
    clf = IMRClassifier.build(model_cfg, names, tfidf=TfidfFeatures.fit(train.texts, max_features=500))
    info = fit(clf, train, "one_basis")
    assert info["decoding"] == "one_basis" and info["basis_extra"] in BASIS_EXTRA_GRID
    assert set(info["cv_micro_f1_by_basis_extra"]) == {"independent", *map(str, BASIS_EXTRA_GRID)}
    assert info["cv_micro_f1_by_basis_extra"][str(info["basis_extra"])] == max(info["cv_micro_f1_by_basis_extra"].values())
    assert clf.guideline_basis == tuple(n for n in names if n in load_taxonomy().decision_basis)
    assert clf.guideline_basis_extra == info["basis_extra"]
    _, P = clf.predict_proba(test.texts)
    decided = clf.decide_guidelines(P)
    basis = [names.index(b) for b in clf.guideline_basis]
    assert (decided[:, basis].sum(axis=1) >= 1).all()
    if info["basis_extra"] == 1.0:
        assert (decided[:, basis].sum(axis=1) == 1).all()
    assert np.array_equal(decided[:, odg], (P[:, odg] >= 0.5).astype(int))  # ODG is decided on its own
    one = guideline_metrics(test.Y, decided, names)["micro_f1"]
    independent = guideline_metrics(test.Y, (P >= 0.5).astype(int), names)["micro_f1"]
    assert (((P[:, basis] >= 0.5).sum(axis=1)) != 1).any()  # independent decisions left items with none or two
    assert one >= independent
    assert fit(clf, train, "independent")["basis_extra"] is None
    assert clf.guideline_basis == () and np.array_equal(clf.decide_guidelines(P), (P >= 0.5).astype(int))

    # labels that do not follow the structure (each chapter cited or not on its own, so some items have
    # none and some two): independent decisions win out of fold, and the head keeps them
    rng = np.random.default_rng(2)
    texts, Y = [], np.zeros((80, len(names)))
    for i in range(80):
        on = [j for j in named if rng.random() < 0.5]
        Y[i, on] = 1
        texts.append(" ".join(["The injured worker reports pain."] + [named[j] for j in on]))
    loose = Split(texts, np.zeros(80), Y, groups=[f"L{i // 2}" for i in range(80)])
    info = fit(clf, loose, "one_basis")
    scores = info["cv_micro_f1_by_basis_extra"]
    assert scores["independent"] > max(v for key, v in scores.items() if key != "independent")
    assert info["decoding"] == "independent" and info["basis_extra"] is None and clf.guideline_basis == ()


def test_probe_recipe_fits_both_heads_on_train_and_validation_and_calibrates_out_of_fold(tiny_config, label_names):
    """train.recipe=probe: the encoder is not trained; both heads are the logistic fits on train + validation (the
    outcome head exactly heads.fit_outcome on the pooled vectors); temperature and threshold come from the outcome
    fit's grouped out-of-fold logits."""
    cfg = _cfg(tiny_config, "train.recipe=probe", "model.pooling=mean_last", "model.window_unit=sentences")
    train, val = _planted_split(30, label_names, 0), _planted_split(10, label_names, 1)
    val.groups = [f"V{g}" for g in val.groups]  # other letters than the training split's
    clf, history = train_classifier(cfg, train, val, label_names, quiet=True)
    assert history == [] and "best_epoch" not in clf.metrics
    both = concat_splits(train, val)
    seed_everything(cfg.seed)  # the same random encoder train_classifier built
    ref = IMRClassifier.build(cfg.model, label_names)
    for (name, a), b in zip(clf.net.encoder.state_dict().items(), ref.net.encoder.state_dict().values()):
        assert torch.equal(a, b), name  # nothing fine-tuned
    windows = ref.make_windows(both.texts)
    attended, _ = ref.window_vectors(windows)
    direct = heads.fit_outcome(pool(attended.double(), windows.item_ids, len(both), "mean_last").numpy(), both.y,
                               both.group_ids)  # fmt: skip
    assert clf.metrics["outcome_head_refit"] == direct.info and direct.info["folds"] == 5
    assert np.allclose(clf.net.outcome_head.weight.detach().numpy()[0], direct.weight, rtol=1e-5, atol=1e-7)
    assert 2 * float(clf.net.outcome_head.bias.detach()) == pytest.approx(direct.bias, rel=1e-5, abs=1e-6)  # mean_last: twice
    ref.fit_heads(both.texts, windows, both.y, both.Y, both.group_ids, refit_outcome=True,
                  decoding=cfg.train.guideline_decoding, seed=cfg.seed)  # fmt: skip
    assert torch.equal(clf.net.guideline_head.weight, ref.net.guideline_head.weight)
    assert torch.equal(clf.net.outcome_head.weight, ref.net.outcome_head.weight)
    assert clf.metrics["calibrated_on"] == f"grouped out-of-fold logits of {len(both)} train + validation items"
    assert clf.temperature == pytest.approx(fit_temperature(direct.oof, both.y))
    assert clf.temperature != pytest.approx(1.0)
    p = expit(direct.oof / clf.temperature)
    assert clf.outcome_threshold == pytest.approx(bound_probability(half_max_f1_threshold(both.y, p)))
    assert np.all(clf.guideline_thresholds == 0.5)


def test_probe_recipe_needs_folds_with_both_outcomes(tiny_config, label_names):
    cfg = _cfg(tiny_config, "train.recipe=probe")
    train = Split(["It is not medically necessary."] * 4 + ["It is medically necessary."], [0, 0, 0, 0, 1],
                  np.zeros((5, len(label_names))), groups=["a", "b", "c", "d", "e"])  # fmt: skip
    val = Split(["It is not medically necessary."] * 2, [0, 0], np.zeros((2, len(label_names))), groups=["f", "g"])
    with pytest.raises(ValueError, match=r"train.recipe: probe calibrates on grouped out-of-fold logits.*1 Overturned"):
        train_classifier(cfg, train, val, label_names, quiet=True)


def test_train_classifier_input_errors(tiny_config, label_names):
    one = Split(["a"], [0], np.zeros((1, len(label_names))))
    with pytest.raises(ValueError, match="validation"):
        train_classifier(tiny_config, one, Split([], [], np.zeros((0, len(label_names)))), label_names)
    with pytest.raises(ValueError, match="label columns"):
        train_classifier(tiny_config, Split(["a"], [0], np.zeros((1, 3))), one, label_names)


def test_training_needs_data_and_a_current_config(tiny_config, tmp_path):
    """No data → an error saying how to get some (demo letters are no longer a config switch); a retired key on the
    command line → exit 2 with what replaces it; --cv 1 is refused before anything runs."""
    from typer.testing import CliRunner

    from imr_model.cli import app
    from imr_model.config import ConfigError
    from imr_model.experiment import (
        TrainResult,
        load_training_records,
        result_lines,
        train_from_config,
    )

    for call in (lambda: run_training(tiny_config), lambda: run_training(tiny_config, []),
                 lambda: load_training_records([])):  # fmt: skip
        with pytest.raises(ValueError, match="no training data: give --data.*imr data demo"):
            call()
    with pytest.raises(ValueError, match="no labelled items found"):
        load_training_records([str(tmp_path)])
    with pytest.raises(ValueError, match="--cv must be 0"):
        train_from_config("tiny", None, cv=1)
    with pytest.raises(ConfigError, match="train.fit_on_validation was removed.*train.recipe: probe"):
        train_from_config("tiny", None, ["train.fit_on_validation=true"])
    bad = CliRunner().invoke(app, ["train", "--config", "tiny", "--set", "train.fit_on_validation=true"])
    assert bad.exit_code == 2 and "train.recipe: probe" in bad.output
    bad = CliRunner().invoke(app, ["train", "--config", "tiny", "--set", "train.epoch=2"])
    assert bad.exit_code == 2 and "unknown key 'train.epoch'" in bad.output
    lines = result_lines(TrainResult(model_dir=tmp_path / "m", metrics={}, table="TABLE", run_id="abc",
                                     model_uri="models:/imr-classifier/3", version="3"))  # fmt: skip
    assert lines == ["TABLE", f"model directory: {tmp_path / 'm'}",
                     "MLflow run: abc  registered: models:/imr-classifier/3 (alias candidate)"]  # fmt: skip


@pytest.mark.parametrize("recipe", [pytest.param("finetune", marks=pytest.mark.slow), "probe"])
def test_each_recipe_trains_end_to_end_and_round_trips(tiny_config, demo_records, tmp_path, monkeypatch, recipe):
    """Both recipes on the tiny config and the demo records: `run_training` fits, scores the held-out splits the
    recipe did not fit on, and saves a directory whose model gives the fitted model's probabilities exactly."""
    from imr_model import experiment
    from imr_model.dataset import build_dataset

    cfg = _cfg(tiny_config, f"train.recipe={recipe}", "mlflow.enabled=false")
    fitted = {}
    save = experiment._save

    def keep(cfg, clf, *args, **kwargs):  # the model as fitted, before it is written
        fitted["clf"] = clf
        return save(cfg, clf, *args, **kwargs)

    monkeypatch.setattr(experiment, "_save", keep)
    result = run_training(cfg, records=demo_records, quiet=True)
    assert result.run_id is None and result.model_dir.parent == tmp_path / "models"
    held_out = {"finetune": {"validation", "test"}, "probe": {"test"}}[recipe]  # probe fits on validation
    assert held_out == {k for k in ("validation", "test") if k in result.metrics}
    for split in held_out:
        assert set(result.metrics[split]) == {"majority", "tfidf", "model"}
        assert f"{split}/model" in result.table
    assert ("validation/" in result.table) == (recipe == "finetune")
    calibrated_on = {"finetune": "validation items", "probe": "train + validation items"}[recipe]
    assert result.metrics["calibrated_on"].endswith(calibrated_on)
    assert ("best_epoch" in result.metrics) == (recipe == "finetune")
    assert ("outcome_head_refit" in result.metrics) == (recipe == "probe") and "guideline_head_refit" in result.metrics
    loaded = IMRClassifier.from_pretrained(result.model_dir)
    clf = fitted["clf"]
    dd = build_dataset(demo_records, seed=cfg.seed, val_size=cfg.data.val_size, test_size=cfg.data.test_size)
    test = records_to_split(list(dd["test"]), cfg.model.text_view, loaded.label_names)
    texts = test.texts + ["", "There is no documentation of functional improvement."]
    for a, b in zip(clf.predict_proba(texts), loaded.predict_proba(texts)):
        assert np.array_equal(a, b)
    assert loaded.calibration_dict() == clf.calibration_dict()
    as_json = lambda x: json.dumps(x, sort_keys=True, default=lambda v: v.tolist())  # NaN-safe equality
    assert as_json(loaded.config.model_dump(mode="json")) == as_json(clf.config.model_dump(mode="json"))
    assert loaded.config.data_source == f"demo:records:{len(demo_records)}" and loaded.config.version
    assert as_json(loaded.metrics) == as_json(clf.metrics)
    # what training reported on the test split is what the saved model scores there
    from imr_model.training import evaluate

    point = {part: {k: v for k, v in values.items() if not k.endswith("_ci95")}  # intervals sit beside the metrics
             for part, values in result.metrics["test"]["model"].items()}
    assert as_json(evaluate(loaded, test, loaded.label_names)) == as_json(point)
    assert result.metrics["test"]["model"]["outcome"]["auroc_ci95"][0] <= result.metrics["test"]["model"]["outcome"]["auroc"]


def test_probe_baseline_fits_on_train_and_validation(tiny_config, label_names):
    """The TF-IDF baseline sees the items the classifier's heads see: train + validation under the probe recipe
    (uncalibrated thresholds 0.5), train alone under finetune."""
    from imr_model.experiment import fit_baseline

    cfg = _cfg(tiny_config, "train.recipe=probe")
    train, val = _planted_split(20, label_names, 0), _planted_split(8, label_names, 1)
    val.texts = [t + " Quixotrel was noted." for t in val.texts]
    val.groups = [f"V{g}" for g in val.groups]
    baseline = fit_baseline(cfg, train, val, label_names)
    assert "quixotrel" in baseline.vocabulary
    assert baseline.outcome_threshold == 0.5 and np.all(baseline.guideline_thresholds == 0.5)
    assert baseline.temperature != 1.0  # calibrated on grouped out-of-fold logits
    assert "quixotrel" not in fit_baseline(tiny_config, train, val, label_names).vocabulary


@pytest.mark.slow
def test_run_training_without_mlflow_saves_model_and_baseline(tiny_config, demo_records, tmp_path):
    """Also the shipped configs' guideline setup end to end: logistic head with cue and TF-IDF terms; then
    `imr evaluate` on letters written to disk."""
    cfg = _cfg(tiny_config, "mlflow.enabled=false", "model.guideline_tfidf=true")
    result = run_training(cfg, records=demo_records, quiet=True)
    assert result.run_id is None
    assert (result.model_dir / "tfidf_vocabulary.json").is_file()
    assert set(json.loads((result.model_dir / "calibration.json").read_text())["guideline_thresholds"].values()) == {0.5}
    for split in ("validation", "test"):
        rows = result.metrics[split]
        assert set(rows) == {"majority", "tfidf", "model"}
        assert rows["majority"]["outcome"]["recall"] == 0.0
        assert 0 <= rows["model"]["outcome"]["auroc"] <= 1 or np.isnan(rows["model"]["outcome"]["auroc"])
    assert (result.model_dir / BASELINE_DIR / "baseline.json").is_file()
    saved = json.loads((result.model_dir / "config.json").read_text())
    assert saved["data_digest"] == result.metrics["data_digest"] and saved["version"].startswith("tiny-")
    assert saved["format_version"] == 4 and "guideline_pooling" not in saved and "context_view" not in saved
    assert "validation/tfidf" in result.table and "test/model" in result.table

    # imr evaluate on labelled letters written to disk
    from imr_model.demo import write_demo_letters

    letters = write_demo_letters(tmp_path / "letters", 8, seed=11)
    evaluation, table = evaluate_model(result.model_dir, [str(tmp_path / "letters")])
    assert evaluation["n_items"] >= len(letters)
    assert set(evaluation["evaluation"]) == {"majority", "tfidf", "model"}
    assert "eval/model" in table

    from typer.testing import CliRunner

    from imr_model.cli import app

    out = tmp_path / "eval.json"
    cli = CliRunner().invoke(app, ["evaluate", "--model", str(result.model_dir), "--data", str(tmp_path / "letters"),
                                   "--json", str(out)])  # fmt: skip
    assert cli.exit_code == 0, cli.output
    assert "eval/tfidf" in cli.output
    assert json.loads(out.read_text())["evaluation"]["model"]["outcome"]["n"] == evaluation["n_items"]


@pytest.mark.slow
def test_cross_validation_scores_every_item_once(tiny_config, demo_records, label_names):
    cfg = _cfg(tiny_config, "train.epochs=1")
    out = cross_validate(cfg, demo_records, 2, label_names, quiet=True)
    assert set(out) == {"majority", "tfidf", "model", "_y"}
    assert out["model"]["outcome"]["n"] == len(demo_records)
    assert out["model"]["guidelines"]["n"] == len(demo_records)
    assert np.array_equal(out["_y"], records_to_split(demo_records, "rationale", label_names).y)


@pytest.mark.slow
def test_pretrain_lowers_perplexity_and_writes_a_usable_backbone(tiny_config, demo_records, tmp_path, label_names,
                                                                 capfd, monkeypatch):  # fmt: skip
    from imr_model import pretrain
    from imr_model.config import load_config
    from imr_model.pretrain import REPORT_FILE, backbone_report, run_pretrain

    monkeypatch.setattr(pretrain, "HEAD_WARMUP_STEPS", 10)  # a constant since #20 (was pretrain.head_warmup_steps)
    cfg = load_config("tiny", ["pretrain.epochs=3", "pretrain.max_length=32", "pretrain.batch_size=16",
                               "pretrain.learning_rate=1e-3"])  # fmt: skip
    out = tmp_path / "backbone"
    report = run_pretrain(cfg, demo_records[:30], out, quiet=True)
    assert "Writing model shards" not in capfd.readouterr().err  # quiet: no transformers bar either
    assert report["letters"]["held_out"] >= 1 and report["blocks"]["held_out"] >= 1
    assert report["perplexity_after"] < report["perplexity_before"]
    assert (out / REPORT_FILE).is_file() and (out / "model.safetensors").is_file()
    assert backbone_report(str(out))["perplexity_after"] == report["perplexity_after"]
    # the directory works as model.backbone: same encoder weights as the adapted model
    from transformers import AutoModelForMaskedLM

    mlm = AutoModelForMaskedLM.from_pretrained(str(out), trust_remote_code=False)
    clf = IMRClassifier.build(cfg.model.model_copy(update={"backbone": str(out), "init": "pretrained",
                                                           "encoder_overrides": {}}), label_names)  # fmt: skip
    emb = clf.net.encoder.get_input_embeddings().weight
    assert torch.equal(emb, mlm.get_input_embeddings().weight)


@pytest.mark.slow
def test_pretraining_is_reproducible_and_seeded(demo_records, tmp_path, monkeypatch):
    """Same config + seed + letters -> bitwise the same adapted backbone (the --cv folds and the final model
    rely on it); another seed -> another backbone."""
    from safetensors.torch import load_file

    from imr_model import pretrain
    from imr_model.config import load_config
    from imr_model.pretrain import run_pretrain

    monkeypatch.setattr(pretrain, "HEAD_WARMUP_STEPS", 3)
    sets = ["pretrain.epochs=1", "pretrain.max_length=32", "pretrain.batch_size=16"]
    reports, weights = [], []
    for run, seed in (("a", 7), ("b", 7), ("c", 8)):
        out = tmp_path / run
        reports.append(run_pretrain(load_config("tiny", [*sets, f"seed={seed}"]), demo_records[:20], out, quiet=True))
        weights.append(load_file(str(out / "model.safetensors")))
    assert weights[0].keys() == weights[1].keys() and len(weights[0]) > 0
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert reports[0]["perplexity_after"] == reports[1]["perplexity_after"]
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])


def test_pretraining_minilm_names_its_fresh_mlm_head_instead_of_a_corrupted_checkpoint_report(caplog, capfd):
    """MiniLM ships without a masked-LM head: one log line says which tensors start random; transformers'
    load report (which calls the checkpoint "corrupted") is not shown. The encoder weights are MiniLM's."""
    from transformers import AutoModel

    from imr_model.config import load_config, resolve_backbone
    from imr_model.pretrain import _masked_lm

    cfg = load_config("masked")
    source = resolve_backbone(cfg.model.backbone)
    with caplog.at_level(logging.INFO, logger="imr_model.pretrain"):
        mlm = _masked_lm(cfg, source)
    lines = [r.getMessage() for r in caplog.records if "start random" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("6 tensors") and "cls.predictions.bias" in lines[0]
    out, err = capfd.readouterr()
    assert "This checkpoint seem corrupted" not in out + err and "LOAD REPORT" not in out + err
    plain = AutoModel.from_pretrained(source, add_pooling_layer=False, trust_remote_code=False)
    assert torch.equal(mlm.bert.embeddings.word_embeddings.weight, plain.embeddings.word_embeddings.weight)
    assert torch.equal(mlm.bert.encoder.layer[-1].output.dense.weight, plain.encoder.layer[-1].output.dense.weight)


@pytest.mark.slow
def test_domain_adaptation_pretrains_on_the_training_letters_then_fits_on_that_encoder(tiny_config, demo_records,
                                                                                      caplog, monkeypatch):  # fmt: skip
    """train.domain_adaptation: the saved model's encoder is the MLM-adapted one (not the seed's random init),
    the run reports the perplexities and names the backbone; --cv adapts once per fold."""
    from imr_model import pretrain

    monkeypatch.setattr(pretrain, "HEAD_WARMUP_STEPS", 5)
    plain_cfg = _cfg(tiny_config, "train.recipe=probe", "model.pooling=mean", "pretrain.epochs=2",
                     "pretrain.max_length=32", "pretrain.learning_rate=1e-3", "mlflow.enabled=false")  # fmt: skip
    adapted_cfg = _cfg(plain_cfg, "train.domain_adaptation=true")
    plain = IMRClassifier.from_pretrained(run_training(plain_cfg, records=demo_records, quiet=True).model_dir)
    with caplog.at_level(logging.INFO, logger="imr_model.experiment"):
        result = run_training(adapted_cfg, records=demo_records, cv=2, quiet=True)
    assert sum("domain adaptation: held-out MLM perplexity" in r.getMessage() for r in caplog.records) == 3  # 2 folds + final
    adapted = IMRClassifier.from_pretrained(result.model_dir)
    report = adapted.metrics["domain_adaptation"]
    assert report["perplexity_after"] < report["perplexity_before"] and report["steps"] > 0
    assert adapted.config.backbone == "minilm + domain adaptation" and plain.config.backbone == "minilm"
    assert "domain_adaptation" not in plain.metrics
    emb = lambda clf: clf.net.encoder.get_input_embeddings().weight
    assert emb(adapted).shape == emb(plain).shape and not torch.allclose(emb(adapted), emb(plain))
    p, _ = adapted.predict_proba(["There is no documentation of functional improvement."])
    assert 0 < p[0] < 1
    cv_model = adapted.metrics["cv"]["model"]["outcome"]
    assert cv_model["n"] == adapted.metrics["cv"]["majority"]["outcome"]["n"] == len(demo_records)
    assert 0 <= cv_model["auroc"] <= 1
    assert set(adapted.metrics["cv"]) == {"k", "bootstrap", "majority", "tfidf", "model"}  # no `unadapted` row any more
    assert set(adapted.metrics["test"]) == {"majority", "tfidf", "model"} and "validation" not in adapted.metrics
    assert adapted.metrics["test"]["model"] != plain.metrics["test"]["model"]


def test_training_log_handler_writes_to_the_current_stderr_not_a_closed_earlier_one(monkeypatch):
    """`imr train` logs progress through a handler that looks up sys.stderr at each record: one made while stderr
    was some stream that is later closed (pytest's capture, a redirect) neither fails nor writes there."""
    import io
    import sys

    from imr_model.logs import _StderrHandler

    before, after = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", before)
    handler = _StderrHandler()
    log = logging.getLogger("imr_model.test_handler")
    monkeypatch.setattr(log, "propagate", False)
    log.addHandler(handler)
    try:
        before.close()
        monkeypatch.setattr(sys, "stderr", after)
        log.warning("fold %d done", 3)
    finally:
        log.removeHandler(handler)
    assert after.getvalue() == "fold 3 done\n"
