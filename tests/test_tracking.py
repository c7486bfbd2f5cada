"""MLflow: URI resolution, the pyfunc input contract, and train → register → load → predict → promote."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from imr_model import registry, tracking
from imr_model.pyfunc_model import OUTPUT_COLUMNS, frame_to_texts


def test_tracking_uri_precedence(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri() == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri() == "http://127.0.0.1:5000"
    assert tracking.tracking_uri("sqlite:///x.db") == "sqlite:///x.db"


def test_frame_to_texts_applies_the_view_and_keeps_ready_text():
    frame = pd.DataFrame({"request": ["MRI knee", None], "case_summary": ["History.", None],
                          "text": [None, "ready model input"]})  # fmt: skip
    assert frame_to_texts(frame, "forecast") == ["Request: MRI knee\nCase summary: History.", "ready model input"]
    assert frame_to_texts(pd.DataFrame({"request": ["x"]}), "rationale") == [""]
    with pytest.raises(ValueError, match="expected some of"):
        frame_to_texts(pd.DataFrame({"letter": ["x"]}), "rationale")


def test_signature_and_input_example_are_synthetic():
    sig = tracking.model_signature()
    assert sig.inputs.input_names() == ["request", "rationale", "case_summary", "text"]
    assert sig.outputs.input_names() == list(OUTPUT_COLUMNS)
    example = tracking.input_example()
    assert list(example.columns) == ["request", "rationale", "case_summary"] and len(example) == 2


def test_resolve_model_dir_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no IMR model directory"):
        tracking.resolve_model_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a directory nor an MLflow URI"):
        tracking.resolve_model_dir(tmp_path / "missing")


@pytest.mark.slow
def test_train_register_load_predict_promote(tiny_config, demo_records, monkeypatch, tmp_path, capfd):
    """The issue's end-to-end check on the tiny config (< 2 minutes)."""
    import mlflow

    from imr_model.experiment import run_training

    monkeypatch.chdir(tmp_path)  # artifacts (./mlruns) stay in tmp
    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)
    first = run_training(tiny_config, records=demo_records, quiet=True)
    assert first.version == "1" and first.run_id
    # logging the model validates its input example on a downloaded copy: no "Downloading artifacts"
    # bar in the middle of a training run's output, and the user's environment is left as it was
    assert "Downloading artifacts" not in capfd.readouterr().err
    assert "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR" not in os.environ

    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias("imr-classifier", "candidate").version) == "1"
    run = client.get_run(first.run_id)
    assert run.data.params["model.text_view"] == "rationale" and "test_auprc" in run.data.metrics
    assert run.data.tags["dataset.digest"] == first.metrics["data_digest"]
    assert {i.dataset.name for i in run.inputs.dataset_inputs} >= {"imr-items-train", "imr-items-test"}
    artifacts = {a.path for a in client.list_artifacts(first.run_id, "plots")}
    assert {"plots/test_reliability.png", "plots/test_pr_curve.png", "plots/test_confusion.png"} <= artifacts
    assert "epoch" not in run.data.params and client.get_metric_history(first.run_id, "val_loss")

    model = mlflow.pyfunc.load_model("models:/imr-classifier@candidate")
    frame = pd.DataFrame({"request": ["Physical therapy x6"], "rationale": ["Synthetic text: not medically necessary."],
                          "case_summary": ["Synthetic summary."]})  # fmt: skip
    out = model.predict(frame)
    assert list(out.columns) == list(OUTPUT_COLUMNS) and len(out) == 1
    assert out["outcome"][0] in ("Upheld", "Overturned") and 0 <= out["p_overturned"][0] <= 1
    assert set(json.loads(out["guidelines"][0])) >= set(out["guideline_labels"][0])

    assert registry.promote(metric="test_auprc").promoted  # no champion yet
    second = run_training(tiny_config, records=demo_records, quiet=True)  # same data + seed → same held-out items
    assert second.version == "2"
    result = registry.promote(metric="test_auprc")
    assert result.promoted and result.candidate_value == pytest.approx(result.champion_value)
    assert str(client.get_model_version_by_alias("imr-classifier", "champion").version) == "2"

    # a candidate worse than the champion is not promoted
    third = run_training(tiny_config, records=demo_records, quiet=True)
    client.log_metric(second.run_id, "test_auprc", 1.0)
    client.log_metric(third.run_id, "test_auprc", 0.1)
    refused = registry.promote(metric="test_auprc")
    assert not refused.promoted and "worse than" in refused.reason
    assert str(client.get_model_version_by_alias("imr-classifier", "champion").version) == "2"
    assert refused.paired is None and "pass --data" in refused.reason  # logged metrics cannot be paired

    # with --data both versions are scored on the same letters: the gain comes with its paired interval
    from imr_model.demo import write_demo_letters

    letters = write_demo_letters(tmp_path / "letters", 12, seed=5)
    # (first) the letters all versions were trained on: promote says so (per-letter digests, #21 item 6);
    # a tolerance no candidate can meet keeps the aliases as they are for the paired check below
    seen = write_demo_letters(tmp_path / "seen", 40, seed=3)  # the letters of `demo_records`
    warned = registry.promote(metric="test_auroc", data=[str(p) for p in seen], tolerance=-2.0)
    assert not warned.promoted
    assert warned.overlap["candidate"]["fitted_letters"] > 0 and warned.overlap["champion"]["fitted_letters"] > 0
    assert "WARNING (candidate)" in warned.reason and "training data" in warned.reason

    scored = registry.promote(metric="test_auroc", data=[str(p) for p in letters])
    assert scored.paired is not None and scored.paired["metric"] == "auroc"
    low, high = scored.paired["difference_ci95"]
    assert low <= scored.paired["difference"] <= high
    assert scored.paired["difference"] == pytest.approx(scored.candidate_value - scored.champion_value, abs=1e-9)
    assert "paired difference" in scored.reason and "noise" in scored.reason
    assert scored.overlap["candidate"]["checked"] and scored.overlap["candidate"]["fitted_letters"] == 0
    assert "WARNING" not in scored.reason


def test_local_dataset_source_resolves_without_mlflows_ambiguity_warning(tmp_path):
    """MLflow registers its local-artifact source twice and warns "can be interpreted in multiple ways" on every
    training run; the source still resolves to a local artifact and nothing is shown."""
    import warnings

    from imr_model.tracking import _dataset_source

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        src = _dataset_source(str(tmp_path))
    assert type(src).__name__ == "LocalArtifactDatasetSource"
    assert not [w for w in caught if "multiple ways" in str(w.message)]


def test_configure_twice_follows_the_second_tracking_uri(tmp_path, monkeypatch):
    """mlflow.set_registry_uri copies the URI into $MLFLOW_REGISTRY_URI; a later configure() must not read
    that back as the user's setting and keep the first store's registry."""
    import mlflow

    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    a, b = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
    try:
        tracking.configure(a)
        tracking.configure(b)
        assert mlflow.get_registry_uri() == b
        monkeypatch.setenv("MLFLOW_REGISTRY_URI", f"sqlite:///{tmp_path / 'user.db'}")  # the user's own
        tracking.configure(a)
        assert mlflow.get_registry_uri() == f"sqlite:///{tmp_path / 'user.db'}"
    finally:
        monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
