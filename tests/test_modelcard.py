"""The model card (imr_model/modelcard.py): README.md in every trained model directory, Hugging Face format."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest
from huggingface_hub import ModelCard

from imr_model import modelcard
from imr_model.config import load_config
from imr_model.dataset import build_dataset
from imr_model.modeling import (
    CONFIG_FILE,
    DIGESTS_KEY,
    METRICS_FILE,
    IMRClassifier,
    ModelDirectoryError,
    verify_digests,
)

TEXT_FIELDS = ("request", "rationale", "case_summary", "maximus_guideline", "claims_admin_guideline")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_records):
    """One tiny training run on the demo letters, logged to a sqlite MLflow store in tmp."""
    from imr_model.experiment import run_training

    tmp = tmp_path_factory.mktemp("card")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)  # artifacts (./mlruns) stay in tmp
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        cfg = load_config("tiny", [f"output_dir={tmp / 'models'}", f"mlflow.tracking_uri={uri}", "train.epochs=1"])
        result = run_training(cfg, records=demo_records, quiet=True)
        yield result, uri


def _sentences(records) -> set[str]:
    out = set()
    for rec in records:
        for field in TEXT_FIELDS:
            for part in re.split(r"(?<=[.!?:;])\s+|\n+", str(rec.get(field) or "")):
                if len(part.strip()) >= 20:
                    out.add(part.strip())
        if len(str(rec.get("request") or "")) >= 8:
            out.add(str(rec["request"]).strip())
    return out


@pytest.mark.slow
def test_training_writes_a_card_hugging_face_reads_with_the_metrics_json_values(trained):
    result, _ = trained
    path = result.model_dir / modelcard.CARD_FILE
    card = ModelCard.load(path)
    data = card.data
    assert data.language == "en" and data.library_name == "imr-model" and data.license == "other"
    assert {"imr", "workers-compensation", "text-classification", "synthetic-demo"} <= set(data.tags)
    assert data.base_model is None  # the tiny config's encoder is random: no Hub model it derives from
    metrics = json.loads((result.model_dir / METRICS_FILE).read_text(encoding="utf-8"))
    row = metrics["test"]["model"]
    got = {r.metric_type: r.metric_value for r in data.eval_results if r.dataset_split == "test"}
    expected = {modelcard.metric_type(part, key): row[part][key] for part, key, _ in modelcard.CARD_METRICS
                if math.isfinite(row[part][key])}  # fmt: skip
    assert got == expected and "auroc" in got and "guideline_micro_f1" in got
    assert {r.dataset_revision for r in data.eval_results} == {metrics["data_digest"]}
    text = card.text
    for part, key in (("outcome", "auroc"), ("outcome", "ece"), ("guidelines", "micro_f1")):
        low, high = row[part][f"{key}_ci95"]
        assert f"{row[part][key]:.3f} [{low:.3f}, {high:.3f}]" in text
    for heading in ("Intended use and misuse", "Training data", "Recipe and configuration", "Evaluation",
                    "Calibration", "Limitations", "How to reproduce"):  # fmt: skip
        assert f"## {heading}" in text
    assert "Trained only on synthetic demo letters" in text and "parsing and consistency" in text
    assert "imr train --config tiny --data LETTERS --set train.epochs=1" in text
    assert metrics["training"]["data"]["items"] == sum(s["items"] for s in metrics["training"]["data"]["splits"].values())
    if metrics.get("slices"):  # the test split's slices (imr_model.slices), one table per dimension
        assert "## Slices" in text and all(f"### {dimension}" in text for dimension in metrics["slices"])
    else:
        assert "## Slices" not in text


@pytest.mark.slow
def test_the_card_holds_no_letter_text(trained, demo_records):
    result, _ = trained
    text = (result.model_dir / modelcard.CARD_FILE).read_text(encoding="utf-8")
    sentences = _sentences(demo_records)
    assert len(sentences) > 100
    leaked = sorted(s for s in sentences if s in text)
    assert not leaked, f"letter text in the model card: {leaked[:3]}"
    assert not any(str(r["letter_id"]) in text or str(r["case_number"]) in text for r in demo_records)


@pytest.mark.slow
def test_the_card_is_in_the_digest_manifest_and_logged_to_mlflow(trained, tmp_path):
    import mlflow

    result, uri = trained
    assert modelcard.CARD_FILE in verify_digests(result.model_dir)
    IMRClassifier.from_pretrained(result.model_dir)  # the new file fits the manifest
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    assert "model_card/README.md" in {a.path for a in client.list_artifacts(result.run_id, "model_card")}
    logged = client.download_artifacts(result.run_id, "model_card/README.md", str(tmp_path))
    assert ModelCard.load(logged).data.eval_results
    from imr_model.tracking import resolve_model_dir

    downloaded = resolve_model_dir(result.model_uri, tmp_path / "dl")  # the logged model carries its card
    assert (downloaded / modelcard.CARD_FILE).read_text(encoding="utf-8") == (
        result.model_dir / modelcard.CARD_FILE).read_text(encoding="utf-8")  # fmt: skip


@pytest.mark.slow
def test_imr_card_rewrites_the_card_and_refuses_changed_metrics(trained, tmp_path):
    from typer.testing import CliRunner

    from imr_model.cli import app

    result, _ = trained
    copy = tmp_path / "model"
    shutil.copytree(result.model_dir, copy)
    (copy / modelcard.CARD_FILE).write_text("edited by hand\n", encoding="utf-8")
    with pytest.raises(ModelDirectoryError, match="README.md: SHA-256 mismatch"):
        IMRClassifier.from_pretrained(copy)
    run = CliRunner().invoke(app, ["card", str(copy)])
    assert run.exit_code == 0, run.output
    assert (copy / modelcard.CARD_FILE).read_bytes() == (result.model_dir / modelcard.CARD_FILE).read_bytes()
    IMRClassifier.from_pretrained(copy)
    metrics = json.loads((copy / METRICS_FILE).read_text(encoding="utf-8"))
    metrics["test"]["model"]["outcome"]["auroc"] = 1.0
    (copy / METRICS_FILE).write_text(json.dumps(metrics), encoding="utf-8")
    run = CliRunner().invoke(app, ["card", str(copy)])
    assert run.exit_code == 2 and "metrics.json: SHA-256 mismatch" in run.output


def test_overrides_in_the_training_record_rebuild_the_config(demo_records):
    sets = ["train.epochs=3", "train.learning_rate=1.0e-05", "model.pooling=last", "baseline.min_df=1",
            "model.encoder_overrides.hidden_size=64", "output_dir=/tmp/elsewhere", "mlflow.enabled=false"]  # fmt: skip
    cfg = load_config("tiny", sets)
    dd = build_dataset(demo_records, seed=cfg.seed)
    record = modelcard.training_record(cfg, dd, demo_prefix="CM99-")
    assert not any(o.startswith(("output_dir", "mlflow.")) for o in record["overrides"])
    rebuilt = load_config(record["config"], record["overrides"])
    keep = lambda c: {k: v for k, v in c.flat().items() if not k.startswith(("output_dir", "mlflow."))}
    assert keep(rebuilt) == keep(cfg)
    data = record["data"]
    assert data["items"] == len(demo_records) and data["demo_letters"] == data["letters"] == 40
    assert data["overturned"] == sum(r["decision"] == "Overturned" for r in demo_records)
    assert data["decision_dates"] == [min(r["decision_date"] for r in demo_records),
                                      max(r["decision_date"] for r in demo_records)]  # fmt: skip
    json.dumps(record)  # JSON-ready for metrics.json


def _metrics(**extra) -> dict:
    outcome = {"auroc": 0.8, "auroc_ci95": [0.6, 0.9], "auprc": 0.4, "auprc_ci95": [0.2, 0.7], "f1": 0.5,
               "mcc": float("nan"), "balanced_accuracy": 0.7, "brier": 0.1, "ece": 0.05, "ece_ci95": [0.01, 0.1],
               "n": 40, "n_overturned": 6}  # fmt: skip
    guidelines = {"micro_f1": 0.8, "micro_f1_ci95": [0.7, 0.85], "macro_f1": 0.6}
    return {"data_digest": "d" * 64, "test": {"model": {"outcome": outcome, "guidelines": guidelines}}, **extra}


def test_card_from_renders_slices_skips_non_finite_metrics_and_names_the_hub_backbone():
    config = {"version": "masked-1", "text_view": "forecast", "backbone": "minilm + domain adaptation",
              "init": "pretrained", "data_source": "/letters", "data_digest": "d" * 64}  # fmt: skip
    slices = {"layout": {"2016": {"n_items": 30, "n_letters": 14, "n_overturned": 4,
                                  "outcome": {"auroc": 0.75, "auroc_ci95": [0.5, 0.95]}},
                         "2013": {"n_items": 10, "n_letters": 5, "n_overturned": 0, "outcome": {}}}}  # fmt: skip
    card = modelcard.card_from(config, _metrics(slices=slices), {"temperature": 1.2, "outcome_threshold": 0.3})
    card = ModelCard(str(card))  # what a reader of the file gets
    assert card.data.base_model == modelcard.MINILM_HUB_ID and "synthetic-demo" not in card.data.tags
    types = {r.metric_type for r in card.data.eval_results}
    assert "mcc" not in types and {"auroc", "guideline_micro_f1", "guideline_macro_f1"} <= types
    assert "## Slices" in card.text and "| 2016 | 30 | 14 | 4 | 0.750 [0.500, 0.950] | n/a | n/a |" in card.text
    assert "decision-support view" in card.text and "Trained only on synthetic" not in card.text
    assert "imr train --config default --data /letters" in card.text


def test_card_without_slices_or_held_out_split_still_loads():
    card = modelcard.card_from({"data_source": "demo:records:12"}, {}, {})
    loaded = ModelCard(str(card))
    assert not loaded.data.eval_results and "## Slices" not in loaded.text
    assert "No held-out split was evaluated" in loaded.text and "Trained only on synthetic demo letters" in loaded.text


def test_build_card_needs_a_model_directory(tmp_path, tiny_classifier):
    with pytest.raises(FileNotFoundError, match="missing config.json"):
        modelcard.build_card(tmp_path)
    tiny_classifier.save_pretrained(tmp_path / "m")
    path = modelcard.write_card(tmp_path / "m")
    assert json.loads((tmp_path / "m" / CONFIG_FILE).read_text())[DIGESTS_KEY][modelcard.CARD_FILE]
    assert ModelCard.load(path).data.language == "en"
    IMRClassifier.from_pretrained(tmp_path / "m")
