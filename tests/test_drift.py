"""Batch drift (imr_model.drift): the tests and the rule on constructed references, the reference a training
stores, and `imr score` / `imr drift` end to end with the tiny config on demo letters (and, marked slow +
shared, the acceptance check on the real letters: experiments/drift_check.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from imr_model import drift
from imr_model import familiarity as fam
from imr_model import inference
from imr_model.cli import app
from imr_model.demo import write_demo_letters
from imr_model.modeling import record_digest
from imr_model.scoring import drift_report, score

REPO = Path(__file__).resolve().parent.parent
JUNK_WORDS = ("harbor violet quantum saddle nimble orbit thimble canyon lantern frost pickle meadow weather shopping "
              "apples milk council budget road transit mayor spring football recipe garden").split()  # fmt: skip


# --------------------------------------------------------------------------- the tests and the rule


def _reference(rng, n: int = 200, k: int = 4) -> dict:
    """A reference whose scalar features are N(0, 1) and whose letters' coordinates are N(0, I_k)."""
    sketch = lambda: drift._sketch(rng.normal(size=n), "constructed")  # noqa: E731
    return {"distance": sketch(), "words": sketch(), "oov": sketch(), "p_overturned": sketch(),
            "embedding_mean": {"n": n, "mean": [0.0] * k, "covariance": np.eye(k).tolist()}}  # fmt: skip


def _batch(rng, n: int, k: int = 4, shift: dict | None = None) -> tuple[dict, tuple]:
    shift = shift or {}
    values = {f: rng.normal(size=n) + shift.get(f, 0.0) for f in drift.SCALARS}
    c = rng.normal(size=(n, k)) + shift.get("embedding_mean", 0.0)
    return values, (n, c.sum(axis=0), c.T @ c)


def test_same_distribution_is_no_drift_and_each_shifted_feature_is_named():
    rng = np.random.default_rng(0)
    ref = _reference(rng)
    report = drift.compare(ref, *_batch(rng, 150), n_items=300)
    assert report["verdict"] == "no drift" and report["drifted"] is False and report["n_letters"] == 150
    assert report["rule"]["alpha_per_feature"] == pytest.approx(drift.ALPHA / 5)
    for feature in drift.FEATURES:
        shifted = drift.compare(ref, *_batch(rng, 150, shift={feature: 1.5}), n_items=150)
        assert shifted["verdict"] == "drift" and shifted["drifted_features"] == [feature], feature


def test_one_sided_features_ignore_a_batch_closer_than_training():
    rng = np.random.default_rng(1)
    ref = _reference(rng)
    closer = drift.compare(ref, *_batch(rng, 150, shift={"distance": -1.5, "oov": -1.5}), n_items=150)
    assert closer["verdict"] == "no drift"
    assert "one-sided" in closer["features"]["distance"]["test"] and "one-sided" not in closer["features"]["words"]["test"]


def test_a_big_batch_does_not_flag_a_trivial_shift():
    rng = np.random.default_rng(2)
    ref = _reference(rng, n=20000)
    report = drift.compare(ref, *_batch(rng, 20000, shift={"words": 0.1}), n_items=20000)
    words = report["features"]["words"]
    assert words["p_value"] < 1e-6 and words["effect"] < drift.MIN_EFFECT["words"]  # significant, but trivial
    assert report["verdict"] == "no drift"


def test_small_batches_get_statistics_but_no_verdict():
    rng = np.random.default_rng(3)
    report = drift.compare(_reference(rng), *_batch(rng, drift.MIN_LETTERS - 1, shift={"words": 3.0}), n_items=40)
    assert report["verdict"] == "too few items" and report["drifted"] is None
    assert "too few items to judge" in report["message"] and report["features"]["words"]["p_value"] < 0.01
    assert drift.summary_line(report).startswith("drift: too few items to judge")


def test_missing_features_are_reported_and_not_counted():
    rng = np.random.default_rng(4)
    values, _ = _batch(rng, 60)
    del values["oov"]
    report = drift.compare(_reference(rng), values, None, n_items=60)
    assert report["features"]["oov"]["not_tested"] == "the model directory has no TF-IDF vocabulary"
    assert "no item embeddings" in report["features"]["embedding_mean"]["not_tested"]
    assert report["rule"]["features_tested"] == 3 and report["verdict"] == "no drift"


def test_letter_means_group_items_by_letter_in_first_appearance_order():
    got = drift.letter_means([1.0, 3.0, 10.0, np.nan, 5.0], ["b", "b", "a", "a", "c"])
    np.testing.assert_allclose(got, [2.0, 10.0, 5.0])
    np.testing.assert_allclose(drift.letter_means(np.eye(3), ["x", "x", "y"]), [[0.5, 0.5, 0], [0, 0, 1]])


def test_oov_rates_use_the_vocabulary_words():
    rates = drift.oov_rates(["Physical therapy zorblat", "", "THERAPY"], drift.unigrams(["physical", "therapy", "physical therapy"]))
    np.testing.assert_allclose(rates, [1 / 3, 1.0, 0.0])


def test_html_report_is_self_contained_and_escaped(tmp_path):
    rng = np.random.default_rng(5)
    report = {**drift.compare(_reference(rng), *_batch(rng, 30), n_items=30), "model": "<script>alert(1)</script>"}
    page = drift.write_report(report, tmp_path / "r.html").read_text(encoding="utf-8")
    assert "<script>" not in page and "&lt;script&gt;" in page and "http" not in page
    assert json.loads(drift.write_report(report, tmp_path / "r.json").read_text())["verdict"] == "no drift"
    with pytest.raises(ValueError, match="json or .html"):
        drift.write_report(report, tmp_path / "r.txt")


def test_profile_versions_round_trip_and_old_ones_have_no_reference():
    profile = fam.ReferenceProfile(mean=np.zeros(4), components=np.eye(4)[:2], distance_threshold=1.0, min_words=3,
                                   n_items=10, drift={"version": 1, "words": {"n": 2, "quantiles": [1.0, 2.0]}})  # fmt: skip
    record = profile.to_dict()
    assert record["version"] == fam.PROFILE_VERSION == 2
    assert fam.ReferenceProfile.from_dict(json.loads(json.dumps(record))).drift == profile.drift
    old = {k: v for k, v in record.items() if k != "drift"} | {"version": 1}
    loaded = fam.ReferenceProfile.from_dict(old)
    assert loaded.drift is None
    acc = drift.DriftAccumulator(loaded)
    acc.observe([{"letter_id": "a"}], ["some text"], np.array([0.2]), np.ones((1, 4)))
    report = acc.report()
    assert report["verdict"] == "no reference" and report["message"] == drift.NO_REFERENCE and report["n_items"] == 1


# --------------------------------------------------------------------------- end to end: tiny model, demo letters


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """The tiny config trained on demo letters (no MLflow): a model directory with a version-2 profile."""
    from imr_model.config import load_config
    from imr_model.demo import generate_letters
    from imr_model.experiment import run_training

    out = tmp_path_factory.mktemp("drift-model")
    records = [r for letter in generate_letters(50, seed=3) for r in letter.item_records()]
    cfg = load_config("tiny", [f"output_dir={out}", "mlflow.enabled=false"])
    return Path(run_training(cfg, records=records, quiet=True).model_dir)


@pytest.fixture(scope="module")
def other_demo(tmp_path_factory) -> Path:
    return write_demo_letters(tmp_path_factory.mktemp("demo-b"), 40, seed=11)[0].parent


@pytest.fixture(scope="module")
def junk_table(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("junk") / "junk.jsonl"
    rows = [{"letter_id": f"j{i}", "text": " ".join(rng.choice(JUNK_WORDS, size=rng.integers(8, 40)))} for i in range(30)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _fresh_cache():
    inference.clear_cache()
    yield
    inference.clear_cache()


def test_training_stores_a_drift_reference_of_numbers(trained):
    record = json.loads((trained / fam.PROFILE_FILE).read_text(encoding="utf-8"))
    ref = record["drift"]
    assert record["version"] == 2 and ref["version"] == drift.REFERENCE_VERSION
    assert ref["words"]["n"] == ref["distance"]["n"] == ref["embedding_mean"]["n"] >= 20  # letters
    assert len(ref["words"]["quantiles"]) == drift.QUANTILE_LEVELS and "validation" in ref["p_overturned"]["source"]

    def strings(x):
        if isinstance(x, dict):
            return [s for v in x.values() for s in strings(v)]
        return [x] if isinstance(x, str) else []

    assert all(len(s) < 120 for s in strings(ref))  # descriptions only: no text is stored


def test_demo_letters_against_a_demo_model_do_not_drift_and_junk_does(trained, other_demo, junk_table):
    same = drift_report([other_demo], model=str(trained), progress=False)
    assert same["verdict"] == "no drift", drift.report_lines(same)
    assert same["n_letters"] == 40 and same["rule"]["features_tested"] == 5
    junk = drift_report([junk_table], model=str(trained), progress=False)
    assert junk["verdict"] == "drift" and {"words", "oov"} <= set(junk["drifted_features"]), drift.report_lines(junk)
    few = drift_report(sorted(other_demo.glob("*.txt"))[:5], model=str(trained), progress=False)
    assert few["verdict"] == "too few items" and few["n_letters"] == 5


def test_score_summary_carries_the_drift_of_the_items_it_scored(trained, other_demo, tmp_path):
    out = tmp_path / "s.jsonl"
    summary = score([other_demo], out, model=str(trained), progress=False)
    assert summary.drift["verdict"] == "no drift" and summary.drift["n_items"] == summary.items
    again = score([other_demo], out, model=str(trained), progress=False)  # resumed: nothing new scored
    assert again.skipped == 40 and again.drift["verdict"] == "too few items" and "already in the output" in again.drift["scope"]
    assert score([other_demo], tmp_path / "n.jsonl", model=str(trained), progress=False, drift=False).drift is None


def test_cli_drift_writes_reports_and_exits_1_on_drift(trained, other_demo, junk_table, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(app, ["drift", str(other_demo), "--model", str(trained), "-o", str(tmp_path / "r.html")])
    assert ok.exit_code == 0, ok.output
    assert "drift: no drift" in ok.output and "<table>" in (tmp_path / "r.html").read_text(encoding="utf-8")
    bad = runner.invoke(app, ["drift", str(junk_table), "--model", str(trained), "-o", str(tmp_path / "r.json")])
    assert bad.exit_code == 1 and "DRIFT on" in bad.output
    assert json.loads((tmp_path / "r.json").read_text())["verdict"] == "drift"
    wrong = runner.invoke(app, ["drift", str(junk_table), "--model", str(trained), "-o", str(tmp_path / "r.txt")])
    assert wrong.exit_code == 2
    scored = runner.invoke(app, ["score", str(other_demo), "--model", str(trained), "-o", str(tmp_path / "s.jsonl")])
    assert scored.exit_code == 0 and "drift: no drift" in scored.output


def test_a_model_without_drift_statistics_says_retrain(trained, other_demo, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(trained, old)
    record = json.loads((old / fam.PROFILE_FILE).read_text(encoding="utf-8"))
    record.pop("drift")
    (old / fam.PROFILE_FILE).write_text(json.dumps({**record, "version": 1}), encoding="utf-8")
    record_digest(old, fam.PROFILE_FILE)
    report = drift_report([other_demo], model=str(old), progress=False)
    assert report["verdict"] == "no reference" and "retrain" in drift.summary_line(report)
    summary = score([other_demo], tmp_path / "s.jsonl", model=str(old), progress=False)
    assert summary.items > 0 and summary.drift["verdict"] == "no reference"


# --------------------------------------------------------------------------- acceptance on the real letters


@pytest.mark.slow
@pytest.mark.shared
def test_real_held_out_letters_do_not_drift_and_other_populations_do(shared_letters_dir):
    """experiments/drift_check.py with one seed: train `masked` (probe, no domain adaptation) on half the letters."""
    sys.path.insert(0, str(REPO / "experiments"))
    import drift_check

    dmhc = shared_letters_dir.parents[1] / "ca-dmhc-imr-eval-sample" / "eval_set_imr_preview.csv"
    args = argparse.Namespace(letters=str(shared_letters_dir), dmhc=str(dmhc), demo=60, seeds=[0], config="masked",
                              overrides=[])  # fmt: skip
    batches = drift_check.run(args)["seeds"]["0"]["batches"]
    assert batches["held-out half"]["verdict"] == "no drift"
    assert batches["60 demo letters"]["verdict"] == "drift" and batches["DMHC Findings"]["verdict"] == "drift"
