"""Metric functions against scikit-learn on fixed arrays; calibration (temperature, thresholds) on constructed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from imr_model.calibration import (
    binary_nll,
    decide_labels,
    fit_basis_extra,
    fit_temperature,
    half_max_f1_threshold,
)
from imr_model.metrics import (
    expected_calibration_error,
    format_table,
    guideline_metrics,
    majority_probabilities,
    outcome_metrics,
    summary_row,
)

Y = np.array([0, 0, 1, 0, 1, 0, 0, 1, 0, 0])
P = np.array([0.1, 0.4, 0.8, 0.2, 0.35, 0.05, 0.7, 0.9, 0.3, 0.15])


def test_outcome_metrics_match_sklearn():
    m = outcome_metrics(Y, P, threshold=0.5)
    pred = (P >= 0.5).astype(int)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(Y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(Y, pred))
    assert m["precision"] == pytest.approx(skm.precision_score(Y, pred))
    assert m["recall"] == pytest.approx(skm.recall_score(Y, pred))
    assert m["f1"] == pytest.approx(skm.f1_score(Y, pred))
    assert m["mcc"] == pytest.approx(skm.matthews_corrcoef(Y, pred))
    assert m["auroc"] == pytest.approx(skm.roc_auc_score(Y, P))
    assert m["auprc"] == pytest.approx(skm.average_precision_score(Y, P))
    assert m["brier"] == pytest.approx(skm.brier_score_loss(Y, P))
    assert m["confusion"] == {"tn": 6, "fp": 1, "fn": 1, "tp": 2}


def test_ece_by_hand():
    # top-label confidences: .9 .6 .8 .8 .65 .95 .7 .9 .7 .85 → bins of width 1/15
    conf = np.maximum(P, 1 - P)
    hit = ((P >= 0.5).astype(int) == Y).astype(float)
    bins = np.clip(np.ceil(conf * 15).astype(int) - 1, 0, 14)
    expected = sum((bins == b).mean() * abs(hit[bins == b].mean() - conf[bins == b].mean()) for b in set(bins))
    assert expected_calibration_error(Y, P) == pytest.approx(expected)
    # a perfectly calibrated constant predictor has ECE 0 on the positive class
    assert expected_calibration_error([1, 0, 0, 0], [0.25] * 4, top_label=False) == pytest.approx(0.0)
    assert expected_calibration_error([1, 1], [0.0, 0.0], top_label=False) == pytest.approx(1.0)


def test_single_class_gives_nan_not_crash():
    m = outcome_metrics([0, 0, 0], [0.1, 0.2, 0.3])
    assert math.isnan(m["auroc"]) and math.isnan(m["auprc"])
    assert m["f1"] == 0.0


def test_input_validation_messages():
    with pytest.raises(ValueError, match="3 items but the predictions have 2"):
        outcome_metrics([0, 1, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="0/1 labels"):
        outcome_metrics([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="threshold"):
        outcome_metrics([0, 1], [0.1, 0.2], threshold=1.5)


def test_guideline_metrics_match_sklearn():
    yt = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0]])
    yp = np.array([[1, 0, 0, 0], [0, 0, 0, 1], [1, 1, 0, 0], [0, 0, 1, 0]])
    m = guideline_metrics(yt, yp, ["a", "b", "c", "d"])
    assert m["micro_f1"] == pytest.approx(skm.f1_score(yt, yp, average="micro"))
    assert m["macro_f1_all_labels"] == pytest.approx(skm.f1_score(yt, yp, average="macro", zero_division=0))
    present = [0, 1, 2]  # label d has no true items
    assert m["macro_f1"] == pytest.approx(skm.f1_score(yt[:, present], yp[:, present], average="macro"))
    assert m["per_label"]["b"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    with pytest.raises(ValueError, match="label names"):
        guideline_metrics(yt, yp, ["a"])


def test_majority_row():
    p = majority_probabilities([0, 0, 0, 1], 5)
    assert np.allclose(p, 0.25)
    m = outcome_metrics([0, 1, 0, 0, 0], p)
    assert m["recall"] == 0.0 and m["accuracy"] == 0.8 and m["auroc"] == 0.5


def test_temperature_scaling_lowers_nll_on_overconfident_logits():
    rng = np.random.default_rng(0)
    true_logit = rng.normal(0, 1.5, 2000)
    y = (rng.random(2000) < 1 / (1 + np.exp(-true_logit))).astype(int)
    overconfident = 4.0 * true_logit
    t = fit_temperature(overconfident, y)
    assert 3.0 < t < 5.0
    assert binary_nll(overconfident / t, y) < binary_nll(overconfident, y) - 0.1


def test_temperature_defaults_to_one_without_both_classes():
    assert fit_temperature([1.0, 2.0], [0, 0]) == 1.0


def test_table_has_a_row_per_model():
    rows = {"majority": summary_row(outcome_metrics(Y, np.full(10, 0.3)), None),
            "tfidf": summary_row(outcome_metrics(Y, P), {"micro_f1": 0.5, "macro_f1": 0.25})}
    text = format_table(rows, "test")
    assert text.splitlines()[0] == "test"
    assert "majority" in text and "tfidf" in text and "0.250" in text


def test_half_max_f1_threshold_and_rules():
    y = np.array([0, 0, 0, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.6, 0.8])
    assert half_max_f1_threshold(y, s) == pytest.approx(0.5)  # best F1 is 1.0
    noisy = np.array([0.1, 0.7, 0.3, 0.6, 0.8])  # best F1 = 0.8 (3 predicted, 2 right)
    assert half_max_f1_threshold(y, noisy) == pytest.approx(0.4)
    assert half_max_f1_threshold([0, 0], [0.2, 0.9]) == 0.5


def test_decide_labels_gives_one_basis_label_per_item():
    # columns 0-2 are decision-basis labels, column 3 a source cited beside them (e.g. ODG)
    P = np.array([[0.30, 0.20, 0.10, 0.90],   # no basis label reaches 0.5: the top one is still chosen
                  [0.80, 0.70, 0.10, 0.20],   # two reach 0.5: only the top one (0.7 is below basis_extra)
                  [0.99, 0.98, 0.10, 0.60],   # a second basis label above basis_extra stays
                  [0.10, 0.40, 0.45, 0.40]])
    thr = np.full(4, 0.5)
    assert decide_labels(P, thr).tolist() == [[0, 0, 0, 1], [1, 1, 0, 0], [1, 1, 0, 1], [0, 0, 0, 0]]
    assert decide_labels(P, thr, [0, 1, 2], 0.97).tolist() == [[1, 0, 0, 1], [1, 0, 0, 0], [1, 1, 0, 1], [0, 0, 1, 0]]
    assert decide_labels(P, thr, [0, 1, 2], 1.0).tolist() == [[1, 0, 0, 1], [1, 0, 0, 0], [1, 0, 0, 1], [0, 0, 1, 0]]
    # a second basis label must also pass its own threshold
    assert decide_labels(P, np.array([0.5, 0.99, 0.5, 0.5]), [0, 1, 2], 0.9)[2].tolist() == [1, 0, 0, 1]
    assert decide_labels(np.zeros((0, 4)), thr, [0, 1, 2]).shape == (0, 4)
    with pytest.raises(ValueError, match=r"P has shape \(4, 4\) but thresholds \(3,\)"):
        decide_labels(P, np.full(3, 0.5))


def test_fit_basis_extra_picks_the_rule_the_held_out_labels_follow():
    rng = np.random.default_rng(0)
    n = 60
    truth = rng.integers(0, 3, n)
    Y = np.zeros((n, 3), dtype=int)
    Y[np.arange(n), truth] = 1
    P = rng.uniform(0.0, 0.3, (n, 3))
    P[np.arange(n), truth] = rng.uniform(0.4, 0.95, n)  # the true basis is the most probable, not always above 0.5
    P[np.arange(n), (truth + 1) % 3] = np.minimum(P[np.arange(n), truth] - 0.01, 0.9)  # a runner-up, often above 0.5
    thr = np.full(3, 0.5)
    extra, scores = fit_basis_extra(Y, P, thr, [0, 1, 2])
    assert scores["independent"] < scores["1.0"] == 1.0  # exactly one basis label is exactly right here
    assert extra == 1.0  # ties go to the larger threshold
    Y2 = Y.copy()
    Y2[:10, :] = 1  # ten items cite every chapter, with probabilities to match
    P2 = P.copy()
    P2[:10, :] = 0.99
    extra2, scores2 = fit_basis_extra(Y2, P2, thr, [0, 1, 2])
    assert extra2 == 0.97 and scores2["0.97"] > scores2["1.0"]
    Y3, P3 = Y.copy(), np.where(Y == 1, 0.9, 0.1)  # confident probabilities on the same labels, but
    Y3[:20, :] = 0  # a third of the items have no basis label at all, and the probabilities say so
    P3[:20, :] = 0.05
    extra3, scores3 = fit_basis_extra(Y3, P3, thr, [0, 1, 2])
    assert extra3 is None  # labels that do not follow the structure keep independent decisions
    assert scores3["independent"] > max(v for k, v in scores3.items() if k != "independent")
