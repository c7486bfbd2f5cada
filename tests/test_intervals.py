"""Letter-level bootstrap intervals (imr_model.intervals): exactness, grouping, dropped resamples, wiring."""

from __future__ import annotations

import time

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from imr_model.intervals import Resampler, bootstrap_metrics, paired_difference
from imr_model.metrics import format_table, guideline_metrics, outcome_metrics, summary_row


def _data(n_letters=120, seed=0, rate=0.15, per_letter=(1, 4)):
    """Letters of 1-3 items sharing the outcome; P(Overturned) informative with ties; 4 guideline columns."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(*per_letter, n_letters)
    groups = np.repeat([f"L{i:03d}" for i in range(n_letters)], sizes)
    y = np.repeat((rng.random(n_letters) < rate).astype(int), sizes)
    p = np.round(np.clip(0.35 * y + 0.65 * rng.random(y.size), 0, 1), 2)
    Y = (rng.random((y.size, 4)) < 0.3).astype(int)
    D = np.where(rng.random(Y.shape) < 0.8, Y, 1 - Y)
    return y, p, groups, Y, D


def test_draws_equal_the_metrics_functions_on_each_expanded_resample():
    y, p, groups, Y, D = _data()
    rs = Resampler(y, groups, n=25, seed=3)
    out, gl = rs.outcome_draws(p, 0.4), rs.guideline_draws(Y, D)
    for b in range(25):
        idx = np.repeat(np.arange(y.size), rs.weights[b].astype(int))
        ref = outcome_metrics(y[idx], p[idx], 0.4)
        gref = guideline_metrics(Y[idx], D[idx], list("abcd"))
        for key, draws in out.items():
            assert draws[b] == pytest.approx(ref[key], abs=1e-12, nan_ok=True), key
        for key, draws in gl.items():
            assert draws[b] == pytest.approx(gref[key], abs=1e-12, nan_ok=True), key


def test_interval_contains_point_estimate_and_beside_every_metric():
    y, p, groups, Y, D = _data()
    res = bootstrap_metrics(y, p, 0.4, groups=groups, Y=Y, decided=D, n=1000, seed=0)
    point, gpoint = outcome_metrics(y, p, 0.4), guideline_metrics(Y, D, list("abcd"))
    assert res["n_resamples"] == 1000 and res["unit"] == "letter" and res["seed"] == 0
    for key in ("auroc", "auprc", "f1", "mcc", "brier", "ece", "balanced_accuracy", "accuracy", "precision", "recall"):
        lo, hi = res["outcome"][key]
        assert lo <= point[key] <= hi, key
    for key in ("micro_f1", "macro_f1"):
        lo, hi = res["guidelines"][key]
        assert lo <= gpoint[key] <= hi, key


def test_matches_an_independent_hand_written_letter_bootstrap():
    y, p, groups, _, _ = _data(seed=1)
    res = bootstrap_metrics(y, p, groups=groups, n=2000, seed=7)
    ids = np.unique(groups)
    rows = {g: np.flatnonzero(groups == g) for g in ids}
    rng = np.random.default_rng(12345)  # different draws: agreement is statistical, not by construction
    aucs, aps = [], []
    for _ in range(2000):
        idx = np.concatenate([rows[g] for g in rng.choice(ids, size=len(ids), replace=True)])
        if len(set(y[idx].tolist())) < 2:
            continue
        aucs.append(roc_auc_score(y[idx], p[idx]))
        aps.append(average_precision_score(y[idx], p[idx]))
    for key, draws in (("auroc", aucs), ("auprc", aps)):
        assert np.allclose(res["outcome"][key], np.percentile(draws, [2.5, 97.5]), atol=0.02), key


def test_single_class_resamples_are_dropped_and_counted():
    # 20 letters, one Overturned: about (19/20)^20 = 36% of resamples hold no Overturned item
    groups = np.repeat([f"L{i}" for i in range(20)], 2)
    y = np.zeros(40, dtype=int)
    y[:2] = 1
    p = np.linspace(0.9, 0.1, 40)
    res = bootstrap_metrics(y, p, groups=groups, n=500, seed=0)
    assert 0.25 * 500 < res["n_dropped"] < 0.5 * 500
    assert res["n_resamples"] == 500
    assert all(np.isfinite(res["outcome"]["auroc"])) and res["outcome"]["auroc"][1] == 1.0
    assert all(np.isfinite(res["outcome"]["f1"]))  # decision metrics keep every resample
    one_class = bootstrap_metrics(np.zeros(10, dtype=int), np.linspace(0, 1, 10), n=50)
    assert one_class["n_dropped"] == 50 and np.isnan(one_class["outcome"]["auroc"]).all()
    assert np.isfinite(one_class["outcome"]["brier"]).all()


def test_paired_difference_of_a_model_with_itself_is_exactly_zero():
    y, p, groups, _, _ = _data()
    for metric in ("auroc", "auprc", "f1", "brier"):
        res = paired_difference(y, p, p, groups, metric, n=300)
        assert res["difference"] == 0.0 and res["difference_ci95"] == [0.0, 0.0]


def test_paired_difference_point_and_sign():
    y, p, groups, _, _ = _data()
    rng = np.random.default_rng(5)
    worse = np.clip(p + rng.normal(0, 0.3, p.size), 0, 1)
    res = paired_difference(y, worse, p, groups, "auroc", n=1000)
    assert res["difference"] == pytest.approx(roc_auc_score(y, p) - roc_auc_score(y, worse))
    lo, hi = res["difference_ci95"]
    assert lo <= res["difference"] <= hi and res["difference"] > 0


def test_intervals_narrow_as_the_number_of_letters_grows():
    widths = []
    for n_letters in (40, 160, 640):
        y, p, groups, _, _ = _data(n_letters=n_letters, seed=2, rate=0.3)
        lo, hi = bootstrap_metrics(y, p, groups=groups, n=500)["outcome"]["auroc"]
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]


def test_grouped_resampling_keeps_a_letters_items_together():
    # 30 letters of 8 identical items: resampling letters is wider than resampling the 240 items
    rng = np.random.default_rng(0)
    y = np.repeat((np.arange(30) % 3 == 0).astype(int), 8)
    p = np.repeat(np.clip(0.3 * (np.arange(30) % 3 == 0) + 0.7 * rng.random(30), 0, 1), 8)
    groups = np.repeat([f"L{i}" for i in range(30)], 8)
    rs = Resampler(y, groups, n=200, seed=0)
    w = rs.weights.reshape(200, 30, 8)
    assert (w == w[:, :, :1]).all()  # all items of a letter drawn the same number of times
    assert (rs.weights.sum(axis=1) == 240).all()
    by_letter = bootstrap_metrics(y, p, groups=groups, n=1000)["outcome"]["auroc"]
    by_item = bootstrap_metrics(y, p, groups=None, n=1000)["outcome"]["auroc"]
    assert (by_letter[1] - by_letter[0]) > 1.8 * (by_item[1] - by_item[0])


def test_per_item_thresholds_decide_like_pooled_cross_validation():
    from imr_model.evaluation import outcome_metrics_per_item

    y, p, groups, _, _ = _data()
    thr = np.random.default_rng(1).choice([0.3, 0.5, 0.6], y.size)
    rs = Resampler(y, groups, n=5, seed=0)
    draws = rs.outcome_draws(p, thr)
    idx = np.repeat(np.arange(y.size), rs.weights[0].astype(int))
    ref = outcome_metrics_per_item(y[idx], p[idx], thr[idx])
    for key in ("f1", "mcc", "accuracy", "auroc", "ece"):
        assert draws[key][0] == pytest.approx(ref[key], abs=1e-12), key


def test_a_thousand_resamples_of_258_items_take_well_under_a_second():
    y, p, groups, Y, D = _data(n_letters=180, seed=4)
    y, p, groups, Y, D = y[:258], p[:258], groups[:258], Y[:258], D[:258]
    start = time.perf_counter()
    bootstrap_metrics(y, p, groups=groups, Y=Y, decided=D, n=1000)
    assert time.perf_counter() - start < 2.0


def test_table_prints_auroc_and_auprc_with_intervals_and_flat_rows_skip_lists():
    from imr_model.metrics import flat_metrics

    y, p, groups, _, _ = _data()
    outcome = outcome_metrics(y, p)
    outcome.update({f"{k}_ci95": v for k, v in bootstrap_metrics(y, p, groups=groups, n=200)["outcome"].items()})
    row = summary_row(outcome, {"micro_f1": 0.5, "macro_f1": 0.4, "micro_f1_ci95": [0.4, 0.6]})
    text = format_table({"eval/model": row})
    lo, hi = outcome["auroc_ci95"]
    assert f"{outcome['auroc']:.3f} [{lo:.3f}, {hi:.3f}]" in text
    assert "letter-level bootstrap" in text
    flat = flat_metrics("test", row)
    assert "test_auroc" in flat and not any(k.endswith("_ci95") for k in flat)


def test_evaluate_model_puts_an_interval_beside_each_metric(tmp_path, label_names):
    from inference_helpers import tiny_model

    from imr_model.demo import write_demo_letters
    from imr_model.evaluation import evaluate_model

    model_dir = tiny_model(tmp_path / "model", labels=list(label_names))
    write_demo_letters(tmp_path / "letters", 10, seed=3)
    result, table = evaluate_model(model_dir, [str(tmp_path / "letters")])
    assert result["bootstrap"]["unit"] == "letter" and result["bootstrap"]["n_resamples"] == 1000
    assert 0 <= result["bootstrap"]["n_dropped"] <= 1000
    for name, row in result["evaluation"].items():
        for key in ("auroc", "auprc", "f1", "mcc", "brier", "ece", "balanced_accuracy", "accuracy"):
            assert key in row["outcome"] and f"{key}_ci95" in row["outcome"], (name, key)
            assert len(row["outcome"][f"{key}_ci95"]) == 2
        for key in ("micro_f1", "macro_f1"):
            assert f"{key}_ci95" in row["guidelines"], (name, key)
    model_ci = result["evaluation"]["model"]["outcome"]["auroc_ci95"]
    if np.isfinite(result["evaluation"]["model"]["outcome"]["auroc"]):
        assert model_ci[0] <= result["evaluation"]["model"]["outcome"]["auroc"] <= model_ci[1]
        assert f"[{model_ci[0]:.3f}, {model_ci[1]:.3f}]" in table
    assert result["paired"] == {}  # a bare model directory has no TF-IDF baseline to pair with


def test_mlflow_interval_keys_for_a_row():
    from imr_model.experiment import _interval_metrics

    row = {"outcome": {"auroc": 0.9, "auroc_ci95": [0.8, 0.95], "brier": 0.1, "brier_ci95": [float("nan"), 0.2],
                       "mcc": 0.3, "mcc_ci95": [0.1, 0.5]},
           "guidelines": {"micro_f1": 0.5, "micro_f1_ci95": [0.4, 0.6]}}  # fmt: skip
    out = _interval_metrics("tfidf_test", row)
    assert out["tfidf_test_auroc_ci_low"] == 0.8 and out["tfidf_test_auroc_ci_high"] == 0.95
    assert out["tfidf_test_guideline_micro_f1_ci_low"] == 0.4 and "tfidf_test_mcc_ci_low" not in out
    from imr_model.tracking import _finite

    assert not _finite(out["tfidf_test_brier_ci_low"])  # tracking.log_metrics drops non-finite bounds
