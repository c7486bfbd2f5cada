"""Training loop, batching, freezing, reproducibility, the full `run_training` and cross-validation (tiny config)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from imr_model.experiment import (
    BASELINE_DIR,
    cross_validate,
    evaluate_model,
    label_matrix,
    outcome_metrics_per_item,
    records_to_split,
    run_training,
)
from imr_model.training import (
    Split,
    _micro_batches,
    guideline_features,
    refit_guideline_logistic,
    refit_outcome_head,
    freeze_lower_layers,
    length_batches,
    resolve_pos_weight,
    train_classifier,
)


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


def test_freeze_lower_layers(tiny_classifier):
    net = tiny_classifier.net
    try:
        frozen = freeze_lower_layers(net, 1)
        assert frozen > 0
        assert all(not p.requires_grad for p in net.encoder.embeddings.parameters())
        assert all(not p.requires_grad for p in net.encoder.encoder.layer[0].parameters())
        assert all(p.requires_grad for p in net.encoder.encoder.layer[1].parameters())
        with pytest.raises(ValueError, match="only 2 layers"):
            freeze_lower_layers(net, 5)
    finally:
        for p in net.parameters():
            p.requires_grad_(True)


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
    train, val = _small_splits(demo_records, label_names)
    cfg = tiny_config.model_copy(update={"train": tiny_config.train.model_copy(update={"epochs": 2})})
    clf_a, hist_a = train_classifier(cfg, train, val, label_names, quiet=True)
    clf_b, hist_b = train_classifier(cfg, train, val, label_names, quiet=True)
    assert [h["train_loss"] for h in hist_a] == [h["train_loss"] for h in hist_b]
    pa, Pa = clf_a.predict_proba(val.texts)
    pb, Pb = clf_b.predict_proba(val.texts)
    assert np.array_equal(pa, pb) and np.array_equal(Pa, Pb)
    assert 1 <= len(hist_a) <= 2 and {"val_loss", "val_auroc", "train_loss"} <= set(hist_a[0])
    assert clf_a.temperature > 0 and 0 < clf_a.outcome_threshold < 1
    assert clf_a.guideline_thresholds.shape == (len(label_names),)
    assert clf_a.metrics["best_epoch"] in (1, 2)


def _planted_split(n_letters: int, label_names, seed: int) -> Split:
    """Overturned items mention a planted drug name in one of their sentences; items come two per letter."""
    rng = np.random.default_rng(seed)
    filler = ["The injured worker reports pain in the lower back.", "Physical therapy was completed last year.",
              "Medication helps with sleep and daily activity.", "The treating physician requests a follow-up visit."]  # fmt: skip
    texts, y, groups = [], [], []
    for letter in range(n_letters):
        for _ in range(2):
            label = int(rng.random() < 0.3)
            sentences = list(rng.choice(filler, size=3, replace=False))
            if label:
                sentences.insert(int(rng.integers(0, 3)), "Zolvaxin improved function markedly.")
            texts.append(" ".join(sentences))
            y.append(label)
            groups.append(f"L{letter}")
    return Split(texts, y, np.zeros((len(texts), len(label_names))), groups=groups)


@pytest.mark.parametrize("pooling", ["mean", "mean_last"])
def test_logistic_outcome_head_is_the_regression_on_pooled_vectors(tiny_config, label_names, pooling):
    """train.outcome_head=logistic: the head's logit is the fitted regression, and it finds a planted word."""
    from imr_model.modeling import IMRClassifier

    torch.manual_seed(0)
    model_cfg = tiny_config.model.model_copy(update={"pooling": pooling, "window_unit": "sentences"})
    cfg = tiny_config.model_copy(update={"model": model_cfg})
    clf = IMRClassifier.build(model_cfg, label_names)
    train, test = _planted_split(30, label_names, 0), _planted_split(15, label_names, 1)
    info, oof = refit_outcome_head(clf, clf.make_windows(train.texts), train, cfg)
    assert info["C"] in cfg.train.outcome_head_Cs and info["folds"] == 5
    from sklearn.metrics import roc_auc_score

    # the returned out-of-fold logits are those the chosen C was scored on
    assert oof.shape == (len(train),) and not np.isnan(oof).any()
    assert roc_auc_score(train.y, oof) == pytest.approx(info["cv_auroc_by_C"][str(info["C"])])
    # Independently: mean of each item's attention-pooled window vectors (+ its last one for mean_last),
    # through the head's weights; the window bias enters once per pooled term.
    windows = clf.make_windows(test.texts)
    with torch.no_grad():
        attended, _ = clf.net.encode(windows.input_ids, windows.attention_mask)
    ids = windows.item_ids.numpy()
    X = np.stack([attended[ids == i].mean(dim=0).numpy() for i in range(len(test))])
    n_terms = 1
    if pooling == "mean_last":
        assert all((ids == i).sum() >= 2 for i in range(len(test)))  # else last and mean coincide
        X = X + np.stack([attended[ids == i][-1].numpy() for i in range(len(test))])
        n_terms = 2
    expected = X @ clf.net.outcome_head.weight.detach().numpy()[0] + n_terms * float(clf.net.outcome_head.bias.detach())
    logits, _ = clf.predict_logits(test.texts)
    assert np.allclose(logits, expected, atol=1e-3)
    assert roc_auc_score(test.y, logits) > 0.9  # the planted word separates unseen items


def test_logistic_outcome_head_fits_the_evidence_term(tiny_config, label_names):
    """model.outcome_cues: the regression also weighs the evidence cues; logit = pooled head + evidence @ v."""
    from sklearn.metrics import roc_auc_score

    from imr_model.cues import evidence_matrix, evidence_names
    from imr_model.modeling import IMRClassifier

    torch.manual_seed(0)
    model_cfg = tiny_config.model.model_copy(update={"pooling": "mean", "window_unit": "sentences", "outcome_cues": True})
    cfg = tiny_config.model_copy(update={"model": model_cfg})

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
    refit_outcome_head(clf, clf.make_windows(train.texts), train, cfg)
    v = dict(zip(evidence_names(), clf.net.outcome_cues.weight.detach().numpy()[0]))
    assert v["evidence:there_is_no"] < 0  # "there is no ..." pushes towards Upheld
    logits, _ = clf.predict_logits(test.texts)
    windows = clf.make_windows(test.texts)
    o, g = clf.forward_windows(windows)
    pooled, _ = clf.pool(o, g, windows.item_ids.numpy(), len(test))
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


def test_logistic_guideline_head_is_the_joint_regression(tiny_config, label_names):
    """train.guideline_head=logistic: item logits = [pooled vectors, cues, TF-IDF] @ W + b, fit per label;
    the TF-IDF term finds a planted guideline name and the fit survives save/load."""
    from imr_model.baseline import TfidfFeatures
    from imr_model.modeling import IMRClassifier, pool_logits

    torch.manual_seed(0)
    model_cfg = tiny_config.model.model_copy(update={"guideline_pooling": "mean", "window_unit": "sentences",
                                                     "guideline_tfidf": True})  # fmt: skip
    cfg = tiny_config.model_copy(update={"model": model_cfg,
                                         "train": tiny_config.train.model_copy(update={"guideline_head": "logistic",
                                                                                       "head_epochs": 0,
                                                                                       "guideline_cue_prior": 0.0,
                                                                                       # the C search then ignores
                                                                                       # the prior (see below)
                                                                                       "guideline_decoding": "independent"})})  # fmt: skip
    train, test = _planted_guideline_split(40, label_names, 0), _planted_guideline_split(20, label_names, 1)
    clf = IMRClassifier.build(model_cfg, label_names, tfidf=TfidfFeatures.fit(train.texts, max_features=500))
    assert clf.net.guideline_tfidf.in_features == len(clf.tfidf) <= 500
    info = refit_guideline_logistic(clf, clf.make_windows(train.texts), train, cfg)
    assert info["C"] in cfg.train.guideline_head_Cs and info["folds"] == 5
    assert set(info["cv_micro_f1_by_C"]) == {str(c) for c in cfg.train.guideline_head_Cs}
    _, logits = clf.predict_logits(test.texts)
    # Independently: refit the same regression with scikit-learn on the same design matrix.
    from sklearn.linear_model import LogisticRegression
    from imr_model.training import _scales, _window_vectors

    w_train, w_test = clf.make_windows(train.texts), clf.make_windows(test.texts)
    pooled = lambda w, n: pool_logits(_window_vectors(clf, w, 32)[1].double(), w.item_ids, n, "mean").numpy()  # noqa: E731
    p_train = pooled(w_train, len(train))
    scales = _scales(p_train)
    F_train = guideline_features(clf, p_train, train.texts, scales)
    F_test = guideline_features(clf, pooled(w_test, len(test)), test.texts, scales)
    for j in (0, 1):
        ref = LogisticRegression(C=info["C"], class_weight="balanced", max_iter=2000).fit(F_train, train.Y[:, j])
        assert np.allclose(logits[:, j], ref.decision_function(F_test), atol=1e-3)
    assert np.array_equal(logits[:, 0] > 0, test.Y[:, 0] > 0)  # the planted name decides label 0 on unseen items
    assert np.all(logits[:, 2:] < 0)  # labels never seen in training stay off
    # The cue prior: each label's naming cues get prior * s / (n + s) on top of the fitted weights.
    from imr_model.cues import cue_matrix, label_cue_columns

    prior_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"guideline_cue_prior": 8.0})})
    info = refit_guideline_logistic(clf, w_train, train, prior_cfg)
    assert info["cue_prior"]["ACOEM_NECK"] == pytest.approx(8.0)  # never seen: the full prior
    shifted = clf.predict_logits(test.texts)[1]
    n = train.Y.sum(axis=0)
    expected = np.zeros_like(shifted)
    cues = cue_matrix(test.texts)
    for j, columns in enumerate(label_cue_columns(label_names)):
        expected[:, j] = cues[:, columns].sum(axis=1) * 8.0 * 3.0 / (n[j] + 3.0)
    assert np.allclose(shifted - logits, expected, atol=1e-3)
    neck = list(label_names).index("ACOEM_NECK")  # "ACOEM ... cervical spine" names it; training never saw it
    assert n[neck] == 0 and np.array_equal(shifted[:, neck] > 0, cues[:, label_cue_columns(["ACOEM_NECK"])[0]].sum(1) > 0)
    assert (shifted[:, neck] > 0).any()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        clf.save_pretrained(tmp)
        loaded = IMRClassifier.from_pretrained(tmp)
        assert loaded.tfidf.vocabulary == clf.tfidf.vocabulary
        assert np.allclose(loaded.predict_logits(test.texts)[1], shifted, atol=1e-5)


def test_one_basis_decoding_is_chosen_out_of_fold_and_gives_each_item_one_basis(tiny_config, label_names):
    """train.guideline_decoding=one_basis: the extra-basis threshold comes from the regression's grouped
    out-of-fold probabilities, and every item gets exactly its most probable decision-basis label."""
    from imr_model.baseline import TfidfFeatures
    from imr_model.calibration import BASIS_EXTRA_GRID
    from imr_model.metrics import guideline_metrics
    from imr_model.modeling import IMRClassifier
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

    torch.manual_seed(0)
    model_cfg = tiny_config.model.model_copy(update={"guideline_pooling": "mean", "window_unit": "sentences",
                                                     "guideline_tfidf": True})  # fmt: skip
    train_cfg = tiny_config.train.model_copy(update={"guideline_head": "logistic", "head_epochs": 0,
                                                     "guideline_decoding": "one_basis"})  # fmt: skip
    cfg = tiny_config.model_copy(update={"model": model_cfg, "train": train_cfg})
    train, test = split(80, 0), split(40, 1)
    clf = IMRClassifier.build(model_cfg, names, tfidf=TfidfFeatures.fit(train.texts, max_features=500))
    info = refit_guideline_logistic(clf, clf.make_windows(train.texts), train, cfg)
    assert info["decoding"] == "one_basis" and info["basis_extra"] in BASIS_EXTRA_GRID
    assert set(info["cv_micro_f1_by_basis_extra"]) == {"independent", *map(str, BASIS_EXTRA_GRID)}
    assert info["cv_micro_f1_by_basis_extra"][str(info["basis_extra"])] == max(info["cv_micro_f1_by_basis_extra"].values())
    assert clf.guideline_basis == tuple(n for n in names if n in load_taxonomy().decision_basis)
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
    off = cfg.model_copy(update={"train": train_cfg.model_copy(update={"guideline_decoding": "independent"})})
    assert refit_guideline_logistic(clf, clf.make_windows(train.texts), train, off)["basis_extra"] is None
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
    info = refit_guideline_logistic(clf, clf.make_windows(loose.texts), loose, cfg)
    scores = info["cv_micro_f1_by_basis_extra"]
    assert scores["independent"] > max(v for key, v in scores.items() if key != "independent")
    assert info["decoding"] == "independent" and info["basis_extra"] is None and clf.guideline_basis == ()


def test_fit_on_validation_fits_heads_on_both_and_calibrates_out_of_fold(tiny_config, label_names):
    """train.fit_on_validation: same heads as training on train + validation; temperature/threshold from OOF logits."""
    from imr_model.calibration import bound_probability, fit_temperature, fit_threshold
    from imr_model.training import concat_splits

    update = {"epochs": 0, "head_epochs": 0, "outcome_head": "logistic", "guideline_head": "logistic"}
    model_cfg = tiny_config.model.model_copy(update={"pooling": "mean_last", "guideline_pooling": "mean",
                                                     "window_unit": "sentences"})  # fmt: skip
    base = tiny_config.model_copy(update={"model": model_cfg, "train": tiny_config.train.model_copy(update=update)})
    on_val = base.model_copy(update={"train": base.train.model_copy(update={"fit_on_validation": True})})
    train, val = _planted_split(30, label_names, 0), _planted_split(10, label_names, 1)
    val.groups = [f"V{g}" for g in val.groups]  # other letters than the training split's
    clf, _ = train_classifier(on_val, train, val, label_names, quiet=True)
    both = concat_splits(train, val)
    ref, _ = train_classifier(base, both, val, label_names, quiet=True)  # heads fit on the same 80 items
    assert torch.equal(clf.net.outcome_head.weight, ref.net.outcome_head.weight)
    assert torch.equal(clf.net.guideline_head.weight, ref.net.guideline_head.weight)
    assert clf.metrics["calibrated_on"].endswith(f"{len(both)} train + validation items")
    _, oof = refit_outcome_head(ref, ref.make_windows(both.texts), both, base)
    assert clf.temperature == pytest.approx(fit_temperature(oof, both.y))
    assert clf.temperature != pytest.approx(ref.temperature)  # the reference calibrated on validation instead
    p = 1 / (1 + np.exp(-oof / clf.temperature))
    assert clf.outcome_threshold == pytest.approx(bound_probability(fit_threshold(both.y, p, base.train.threshold_rule)))
    assert np.all(clf.guideline_thresholds == 0.5)


def test_head_config_errors():
    from imr_model.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="pooling mean, last or mean_last"):
        load_config("tiny", ["train.outcome_head=logistic", "model.pooling=max"])
    with pytest.raises(ConfigError, match="outcome_head: logistic"):
        load_config("tiny", ["train.epochs=0"])
    with pytest.raises(ConfigError, match="guideline_pooling mean, last or mean_last"):
        load_config("tiny", ["train.guideline_head=logistic", "train.head_epochs=0", "model.guideline_pooling=max"])
    with pytest.raises(ConfigError, match="head_epochs: 0"):
        load_config("tiny", ["train.guideline_head=logistic", "model.guideline_pooling=mean"])
    with pytest.raises(ConfigError, match="guideline_tfidf.*guideline_head: logistic"):
        load_config("tiny", ["model.guideline_tfidf=true"])
    with pytest.raises(ConfigError, match="fit_on_validation needs train.epochs: 0"):
        load_config("tiny", ["train.fit_on_validation=true"])


def test_train_classifier_input_errors(tiny_config, label_names):
    one = Split(["a"], [0], np.zeros((1, len(label_names))))
    with pytest.raises(ValueError, match="validation"):
        train_classifier(tiny_config, one, Split([], [], np.zeros((0, len(label_names)))), label_names)
    with pytest.raises(ValueError, match="label columns"):
        train_classifier(tiny_config, Split(["a"], [0], np.zeros((1, 3))), one, label_names)


@pytest.mark.slow
def test_run_training_without_mlflow_saves_model_and_baseline(tiny_config, tmp_path):
    """Also the shipped configs' guideline setup end to end: logistic head with cue and TF-IDF terms."""
    from imr_model.config import load_config

    cfg = load_config("tiny", [f"output_dir={tiny_config.output_dir}", "mlflow.enabled=false", "train.head_epochs=0",
                               "train.guideline_head=logistic", "model.guideline_tfidf=true",
                               "model.guideline_pooling=mean"])  # fmt: skip
    result = run_training(cfg, None, quiet=True)
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
    bad = CliRunner().invoke(app, ["train", "--config", "tiny", "--set", "train.epoch=2"])
    assert bad.exit_code == 2 and "unknown key 'train.epoch'" in bad.output


def test_run_training_fit_on_validation_reports_held_out_rows_only(tiny_config, tmp_path, label_names):
    """The masked/forecast setup: no fine-tuning, heads and baseline fit on train + validation, test rows only."""
    from imr_model.config import load_config
    from imr_model.experiment import fit_baseline

    cfg = load_config("tiny", [f"output_dir={tiny_config.output_dir}", "mlflow.enabled=false", "train.epochs=0",
                               "train.head_epochs=0", "train.outcome_head=logistic", "train.guideline_head=logistic",
                               "train.fit_on_validation=true", "model.pooling=mean_last",
                               "model.guideline_pooling=mean", "model.window_unit=sentences"])  # fmt: skip
    result = run_training(cfg, None, quiet=True)
    assert "test" in result.metrics and "validation" not in result.metrics  # validation items were fit on
    assert "test/model" in result.table and "validation/" not in result.table
    assert "train + validation items" in result.metrics["calibrated_on"]
    # the baseline saw the validation items too: a word only they contain is in its vocabulary
    train, val = _planted_split(20, label_names, 0), _planted_split(8, label_names, 1)
    val.texts = [t + " Quixotrel was noted." for t in val.texts]
    val.groups = [f"V{g}" for g in val.groups]
    baseline = fit_baseline(cfg, train, val, label_names)
    assert "quixotrel" in baseline.vocabulary
    assert baseline.outcome_threshold == 0.5 and np.all(baseline.guideline_thresholds == 0.5)
    off = cfg.model_copy(update={"train": cfg.train.model_copy(update={"fit_on_validation": False})})
    assert "quixotrel" not in fit_baseline(off, train, val, label_names).vocabulary


@pytest.mark.slow
def test_cross_validation_scores_every_item_once(tiny_config, demo_records, label_names):
    cfg = tiny_config.model_copy(update={"train": tiny_config.train.model_copy(update={"epochs": 1})})
    out = cross_validate(cfg, demo_records, 2, label_names, quiet=True)
    assert set(out) == {"majority", "tfidf", "model", "_y"}
    assert out["model"]["outcome"]["n"] == len(demo_records)
    assert out["model"]["guidelines"]["n"] == len(demo_records)
    assert np.array_equal(out["_y"], records_to_split(demo_records, "rationale", label_names).y)


@pytest.mark.slow
def test_pretrain_lowers_perplexity_and_writes_a_usable_backbone(tiny_config, demo_records, tmp_path, label_names,
                                                                 capfd):  # fmt: skip
    from imr_model.config import load_config
    from imr_model.modeling import IMRClassifier
    from imr_model.pretrain import REPORT_FILE, backbone_report, run_pretrain

    cfg = load_config("tiny", ["pretrain.epochs=3", "pretrain.max_length=32", "pretrain.head_warmup_steps=10",
                               "pretrain.batch_size=16", "pretrain.learning_rate=1e-3"])  # fmt: skip
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
def test_pretraining_is_reproducible_and_seeded(demo_records, tmp_path):
    """Same config + seed + letters -> bitwise the same adapted backbone (the --cv folds and the final model
    rely on it); another seed -> another backbone."""
    from safetensors.torch import load_file

    from imr_model.config import load_config
    from imr_model.pretrain import run_pretrain

    sets = ["pretrain.epochs=1", "pretrain.max_length=32", "pretrain.head_warmup_steps=3", "pretrain.batch_size=16"]
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
def test_domain_adaptation_pretrains_on_the_training_letters_then_fits_on_that_encoder(tiny_config, caplog):
    """train.domain_adaptation: the saved model's encoder is the MLM-adapted one (not the seed's random init),
    the run reports the perplexities and names the backbone; --cv adapts once per fold. Its report has an
    `unadapted` row (train.compare_unadapted) that is exactly the same config's run without adaptation."""
    from imr_model.config import apply_overrides
    from imr_model.experiment import run_training
    from imr_model.modeling import IMRClassifier

    frozen = ["train.epochs=0", "train.outcome_head=logistic", "train.guideline_head=logistic", "train.head_epochs=0",
              "model.pooling=mean", "pretrain.epochs=2", "pretrain.max_length=32", "pretrain.head_warmup_steps=5",
              "pretrain.learning_rate=1e-3", "mlflow.enabled=false"]  # fmt: skip
    plain_cfg = type(tiny_config).model_validate(apply_overrides(tiny_config.model_dump(), frozen))
    adapted_cfg = type(tiny_config).model_validate(apply_overrides(plain_cfg.model_dump(), ["train.domain_adaptation=true"]))
    plain = IMRClassifier.from_pretrained(run_training(plain_cfg, None, quiet=True).model_dir)
    with caplog.at_level(logging.INFO, logger="imr_model.experiment"):
        result = run_training(adapted_cfg, None, cv=2, quiet=True)
    assert sum("domain adaptation: held-out MLM perplexity" in r.getMessage() for r in caplog.records) == 3  # 2 folds + final
    adapted = IMRClassifier.from_pretrained(result.model_dir)
    report = adapted.metrics["domain_adaptation"]
    assert report["perplexity_after"] < report["perplexity_before"] and report["steps"] > 0
    assert adapted.config.backbone == "minilm + domain adaptation"
    emb = lambda clf: clf.net.encoder.get_input_embeddings().weight  # noqa: E731
    assert emb(adapted).shape == emb(plain).shape and not torch.allclose(emb(adapted), emb(plain))
    p, _ = adapted.predict_proba(["There is no documentation of functional improvement."])
    assert 0 < p[0] < 1
    cv_model = adapted.metrics["cv"]["model"]["outcome"]
    assert cv_model["n"] == adapted.metrics["cv"]["majority"]["outcome"]["n"] > 0 and 0 <= cv_model["auroc"] <= 1
    # the comparison row: the plain run's model, to the last digit, on every held-out split and in CV
    plain_metrics = plain.metrics
    for split in ("validation", "test"):
        assert adapted.metrics[split]["unadapted"] == plain_metrics[split]["model"]
        assert adapted.metrics[split]["model"] != plain_metrics[split]["model"]
    assert set(adapted.metrics["cv"]) == {"k", "majority", "tfidf", "unadapted", "model"}
    assert adapted.metrics["cv"]["unadapted"]["outcome"]["n"] == cv_model["n"]
    effect = [r.getMessage() for r in caplog.records if r.getMessage().startswith("domain adaptation, ")]
    assert [m.split(":")[0] for m in effect] == ["domain adaptation, cv", "domain adaptation, validation",
                                                 "domain adaptation, test"]  # fmt: skip
    for split in ("cv", "validation", "test"):  # printed just above the adapted model's row
        assert result.table.index(f"{split}/tfidf") < result.table.index(f"{split}/unadapted") < result.table.index(f"{split}/model")


def test_unadapted_row_config(tiny_config, tmp_path):
    """Which backbone the `unadapted` row uses: the configured one under train.domain_adaptation; the one named
    in an `imr pretrain` directory's report, when that is on this machine; none without adaptation or when off."""
    import json

    from imr_model.config import apply_overrides
    from imr_model.experiment import unadapted_config
    from imr_model.pretrain import REPORT_FILE

    def cfg(*overrides):
        return type(tiny_config).model_validate(apply_overrides(tiny_config.model_dump(), list(overrides)))

    assert unadapted_config(tiny_config) is None  # no adaptation in play
    wired = unadapted_config(cfg("train.domain_adaptation=true"))
    assert wired is not None and not wired.train.domain_adaptation and wired.model == tiny_config.model
    assert unadapted_config(cfg("train.domain_adaptation=true", "train.compare_unadapted=false")) is None
    backbone = tmp_path / "backbone-mlm"
    backbone.mkdir()
    (backbone / "config.json").write_text("{}", encoding="utf-8")
    (backbone / REPORT_FILE).write_text(json.dumps({"backbone": "minilm"}), encoding="utf-8")
    from_dir = unadapted_config(cfg(f"model.backbone={backbone}"))
    assert from_dir is not None and from_dir.model.backbone == "minilm" and not from_dir.train.domain_adaptation
    (backbone / REPORT_FILE).write_text(json.dumps({"backbone": str(tmp_path / "gone")}), encoding="utf-8")
    assert unadapted_config(cfg(f"model.backbone={backbone}")) is None


def test_training_log_handler_writes_to_the_current_stderr_not_a_closed_earlier_one(monkeypatch):
    """`imr train` logs progress through a handler that looks up sys.stderr at each record: one made while stderr
    was some stream that is later closed (pytest's capture, a redirect) neither fails nor writes there."""
    import io
    import sys

    from train.train import _StderrHandler

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


def _context_split(n_letters: int, label_names, seed: int) -> Split:
    """Model inputs whose signal sits only in the context part: the planted word closes the context of Overturned items."""
    from imr_model.views import CONTEXT_SEPARATOR

    plain = _planted_split(n_letters, label_names, seed)
    rng = np.random.default_rng(seed + 100)
    filler = ["Request: lumbar MRI.", "The worker was seen in clinic on several occasions for back pain."]
    texts = []
    for label in plain.y:
        main = " ".join(rng.choice(["The guideline criteria are discussed below.", "Records were reviewed in full."],
                                   size=2, replace=False))  # fmt: skip
        last = "Zolvaxin improved function markedly." if label else "The worker reports ongoing pain at rest."
        texts.append(main + CONTEXT_SEPARATOR + " ".join(filler) + " " + last)
    return Split(texts, plain.y, plain.Y, groups=plain.groups)


def test_context_head_reads_the_context_views_last_sentence(tiny_config, label_names):
    """model.context_view: the main head is the regression without context; the context head adds weight × a
    regression on the context's last-sentence vector; the out-of-fold logits add up the same way."""
    from sklearn.metrics import roc_auc_score

    from imr_model.modeling import IMRClassifier
    from imr_model.views import main_text

    model_cfg = tiny_config.model.model_copy(update={"pooling": "mean_last", "window_unit": "sentences",
                                                     "context_view": "forecast", "context_weight": 0.5})  # fmt: skip
    cfg = tiny_config.model_copy(update={"model": model_cfg})
    train, test = _context_split(30, label_names, 0), _context_split(15, label_names, 1)
    torch.manual_seed(0)
    clf = IMRClassifier.build(model_cfg, label_names)
    info, oof = refit_outcome_head(clf, clf.make_windows(train.texts), train, cfg)
    torch.manual_seed(0)  # the same random encoder, without the context head
    plain_cfg = model_cfg.model_copy(update={"context_view": None})
    plain = IMRClassifier.build(plain_cfg, label_names)
    main_train = Split([main_text(t) for t in train.texts], train.y, train.Y, groups=train.groups)
    plain_info, plain_oof = refit_outcome_head(plain, plain.make_windows(main_train.texts), main_train,
                                               cfg.model_copy(update={"model": plain_cfg}))  # fmt: skip
    assert torch.equal(clf.net.outcome_head.weight, plain.net.outcome_head.weight)
    assert info["context"]["view"] == "forecast" and info["context"]["C"] in cfg.train.outcome_head_Cs
    from imr_model.calibration import fit_temperature

    # the context regression's logits count at the main head's calibrated scale × context_weight
    ratio = fit_temperature(plain_oof, train.y) / fit_temperature((oof - plain_oof) / info["context"]["scale"], train.y)
    assert info["context"]["scale"] == pytest.approx(0.5 * ratio, rel=1e-3)
    # Independently: the context's last sentence through the context head, added to the main part's logit.
    windows = clf.make_windows(test.texts)
    ctx = windows.segments.numpy() == 1
    with torch.no_grad():
        attended, _ = clf.net.encode(windows.input_ids, windows.attention_mask)
        head_logits = clf.net.context_head(attended).numpy()[:, 0]
    ids = windows.item_ids.numpy()
    last_ctx = np.array([np.flatnonzero((ids == i) & ctx)[-1] for i in range(len(test))])
    main_logits, _ = plain.predict_logits([main_text(t) for t in test.texts])
    logits, _ = clf.predict_logits(test.texts)
    assert np.allclose(logits, main_logits + head_logits[last_ctx], atol=1e-4)
    assert roc_auc_score(test.y, logits) > 0.9 > roc_auc_score(test.y, main_logits)  # the signal is in the context
    assert roc_auc_score(test.y, head_logits[last_ctx]) == 1.0
    # calibration sees main out-of-fold logits + weight × the context regression's, at its C
    ctx_oof = (oof - plain_oof) / info["context"]["scale"]
    assert roc_auc_score(train.y, ctx_oof) == pytest.approx(info["context"]["cv_auroc_by_C"][str(info["context"]["C"])])


def test_context_config_errors():
    from imr_model.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="context_view.*train.epochs: 0"):
        load_config("tiny", ["model.context_view=forecast"])
    with pytest.raises(ConfigError, match="must differ from model.text_view"):
        load_config("forecast", ["model.context_view=forecast"])
    with pytest.raises(ConfigError, match="context_view"):
        load_config("masked", ["model.context_view=rationale"])  # the verdict may not come back as context
