"""Devices (#22): one spec for every stage, resolved by `devices.resolve_device`; CPU runs unchanged; CUDA where present.

The CUDA test skips without a GPU (this project's CI and development machines have none): it trains and predicts a
tiny model on cuda and compares it with the same run on the CPU.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from imr_model import devices
from imr_model.cli import app
from imr_model.config import ConfigError, ModelConfig, TrainConfig, load_config
from imr_model.demo import write_demo_letters
from imr_model.devices import DeviceError, resolve_device
from imr_model.inference import clear_cache, load_model, predict
from tests.inference_helpers import tiny_model

CUDA = torch.cuda.is_available()
MPS = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


@pytest.fixture(autouse=True)
def _fresh_models(monkeypatch):
    monkeypatch.delenv("IMR_MODEL_URI", raising=False)
    clear_cache()
    yield
    clear_cache()


@pytest.fixture()
def model_dir(tmp_path) -> Path:
    return tiny_model(tmp_path / "tiny-model")


# --------------------------------------------------------------------------- resolve_device


@pytest.mark.skipif(CUDA or MPS, reason="auto picks the GPU on this machine")
def test_auto_is_the_cpu_without_a_gpu():
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu") and resolve_device() == torch.device("cpu")


def test_cpu_and_spellings():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:x", "cuda:-1", "cpu:0", "tpu", "", "cuda 0", "auto,cpu"])
def test_malformed_specs_fail_naming_the_spec(spec):
    with pytest.raises(DeviceError) as err:
        resolve_device(spec)
    assert repr(spec) in str(err.value) and "auto, cpu, cuda, cuda:N or mps" in str(err.value)
    assert isinstance(err.value, ValueError)  # the CLI reports it on one line like any expected error


@pytest.mark.skipif(CUDA, reason="this machine has a GPU")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_a_gpu_fails_clearly(spec):
    with pytest.raises(DeviceError, match="no CUDA GPU is available"):
        resolve_device(spec)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_a_cuda_index_beyond_the_device_count_fails_clearly():
    count = torch.cuda.device_count()
    with pytest.raises(DeviceError, match=f"has {count} CUDA device"):
        resolve_device(f"cuda:{count}")
    assert resolve_device(f"cuda:{count - 1}") == torch.device("cuda", count - 1)


@pytest.mark.skipif(MPS, reason="this machine has MPS")
def test_mps_off_apple_silicon_fails_clearly():
    with pytest.raises(DeviceError, match="'mps' is not available"):
        resolve_device("mps")


def test_the_cpu_runs_fp32_without_autocast_or_scaler():
    cpu = torch.device("cpu")
    assert devices.precision(cpu) == "fp32"
    assert isinstance(devices.autocast(cpu), nullcontext) and devices.grad_scaler(cpu) is None
    assert devices.describe(cpu) == {"device": "cpu", "precision": "fp32", "name": "cpu"}
    with devices.autocast(cpu):
        assert (torch.ones(2, 3) @ torch.ones(3, 2)).dtype == torch.float32


# --------------------------------------------------------------------------- config


def test_config_device_field_round_trips(tmp_path):
    assert TrainConfig().train.device == "auto" == load_config("default").train.device
    cfg = load_config("tiny", ["train.device=CUDA:1"])
    assert cfg.train.device == "cuda:1"  # syntax only: a config is valid on a machine that will not run it
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(exclude={"model": {"label_names", "encoder_config", "cue_names",
                                                                     "cue_version", "outcome_cue_names",
                                                                     "outcome_cue_version"}})))  # fmt: skip
    again = load_config(path)
    assert again == cfg and again.train.device == "cuda:1"
    assert cfg.flat()["train.device"] == "cuda:1"  # an MLflow param like every config value
    assert "device" not in ModelConfig.model_fields  # the model config (config.json) must reproduce on any device


@pytest.mark.parametrize("value", ["gpu", "cuda:one", "0"])
def test_a_bad_config_device_names_key_and_value(value):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [f"train.device={value}"])
    message = str(err.value)
    assert "train.device" in message and "auto, cpu, cuda, cuda:N or mps" in message
    assert repr(yaml.safe_load(value)) in message


# --------------------------------------------------------------------------- inference and the CLI


def test_predict_and_load_model_take_a_device(model_dir):
    predictor = load_model(str(model_dir), device="cpu")
    assert predictor.device == "cpu" and predictor.classifier.device == torch.device("cpu")
    assert predictor.metadata()["device"] == "cpu" and predictor.metadata()["precision"] == "fp32"
    assert not predictor.identity().endswith("fp32")  # CPU identities are what they were (resumed outputs match)
    if not (CUDA or MPS):
        assert load_model(str(model_dir)) is predictor  # auto = cpu here: one cached copy
    preds = predict("The request for physical therapy is medically necessary.", model=str(model_dir), device="cpu")
    assert len(preds) == 1 and 0 < preds[0].p_overturned < 1
    with pytest.raises(DeviceError):
        load_model(str(model_dir), device="tpu")


def test_the_onnx_backend_refuses_a_gpu_device(model_dir):
    with pytest.raises(DeviceError, match="onnx backend runs on the CPU"):
        load_model(str(model_dir), backend="onnx", device="cuda")


def test_imr_score_device_cpu(tmp_path, model_dir):
    write_demo_letters(tmp_path / "letters", 2, seed=5)
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(app, ["score", str(tmp_path / "letters"), "-o", str(out), "--model", str(model_dir),
                                      "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all(r["error"] is None and 0 < r["p_overturned"] < 1 for r in rows)
    assert "torch backend on cpu" in result.stderr
    # the same rows as without --device (auto = cpu here), bit for bit
    if not (CUDA or MPS):
        clear_cache()
        again = tmp_path / "again.jsonl"
        CliRunner().invoke(app, ["score", str(tmp_path / "letters"), "-o", str(again), "--model", str(model_dir)])
        assert [r["p_overturned"] for r in map(json.loads, again.read_text().splitlines())] == [r["p_overturned"] for r in rows]


@pytest.mark.parametrize("args", [["score", "letters", "-o", "out.jsonl"], ["train", "--config", "tiny", "--data", "letters"]])
def test_a_bad_device_is_one_line_on_the_cli(tmp_path, model_dir, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    write_demo_letters(tmp_path / "letters", 1, seed=5)
    extra = ["--model", str(model_dir)] if args[0] == "score" else ["--set", "mlflow.enabled=false"]
    result = CliRunner().invoke(app, [*args, *extra, "--device", "tpu"])
    assert result.exit_code == 2
    assert "tpu" in result.stderr and "Traceback" not in result.stderr + result.output


def test_serving_refuses_a_missing_device_before_starting_workers(model_dir):
    from imr_model.serving import create_app

    with pytest.raises(DeviceError):
        create_app(str(model_dir), device="tpu", workers=1)


# --------------------------------------------------------------------------- training records its device


def test_training_records_the_device_it_ran_on(tiny_config, demo_records, tmp_path):
    """metrics.json and the MLflow params say where the run ran; config.json (the model's config) does not."""
    import mlflow

    cfg = load_config("tiny", [f"output_dir={tmp_path / 'models'}", f"mlflow.tracking_uri={tiny_config.mlflow.tracking_uri}",
                               "mlflow.log_model=false", "train.epochs=1", "train.device=cpu"])  # fmt: skip
    from imr_model.experiment import run_training

    result = run_training(cfg, records=demo_records, quiet=True)
    assert result.metrics["device"] == {"device": "cpu", "precision": "fp32", "name": "cpu"}
    saved = json.loads((result.model_dir / "metrics.json").read_text())
    assert saved["device"]["device"] == "cpu"
    assert "device" not in json.loads((result.model_dir / "config.json").read_text())
    run = mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri).get_run(result.run_id)
    assert run.data.params["device"] == "cpu" and run.data.params["device_precision"] == "fp32"
    assert run.data.params["train.device"] == "cpu"


def test_pretraining_records_its_device(demo_records, tmp_path, monkeypatch):
    from imr_model import pretrain

    monkeypatch.setattr(pretrain, "HEAD_WARMUP_STEPS", 2)
    cfg = load_config("tiny", ["pretrain.epochs=1", "pretrain.max_length=32", "train.device=cpu"])
    report = pretrain.run_pretrain(cfg, demo_records[:12], tmp_path / "backbone", quiet=True)
    assert report["device"]["device"] == "cpu"


# --------------------------------------------------------------------------- CUDA (skipped without a GPU)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_tiny_train_and_predict_on_cuda_match_the_cpu(demo_records, tmp_path, label_names):
    """The same tiny fine-tuning on cuda (bf16/fp16 autocast) and on the CPU: close predictions; the model saved from
    the GPU loads on the CPU and predicts there what it predicted on the GPU (up to autocast rounding)."""
    from imr_model.dataset import build_dataset
    from imr_model.modeling import IMRClassifier
    from imr_model.splits import records_to_split
    from imr_model.training import train_classifier

    dd = build_dataset(demo_records, seed=7, val_size=0.2, test_size=0.2)
    train, val, test = (records_to_split(list(dd[s]), "rationale", label_names) for s in ("train", "validation", "test"))
    fitted = {}
    for device in ("cpu", "cuda"):
        cfg = load_config("tiny", ["train.epochs=2", f"train.device={device}", "mlflow.enabled=false"])
        clf, history = train_classifier(cfg, train, val, label_names, quiet=True)
        assert clf.device.type == device and clf.metrics["device"]["device"].startswith(device)
        assert all(np.isfinite(h["train_loss"]) for h in history)
        fitted[device] = clf
    p_cpu, g_cpu = fitted["cpu"].predict_proba(test.texts)
    p_gpu, g_gpu = fitted["cuda"].predict_proba(test.texts)
    assert np.max(np.abs(p_cpu - p_gpu)) < 0.1 and np.max(np.abs(g_cpu - g_gpu)) < 0.1  # autocast + 2 epochs apart
    path = tmp_path / "from-gpu"
    fitted["cuda"].save_pretrained(path)
    on_cpu = IMRClassifier.from_pretrained(path, device="cpu")
    assert on_cpu.device == torch.device("cpu") and all(p.device.type == "cpu" for p in on_cpu.net.parameters())
    p_loaded, _ = on_cpu.predict_proba(test.texts)
    assert np.max(np.abs(p_loaded - p_gpu)) < 0.02  # the same weights, fp32 on the CPU vs autocast on the GPU
    # prediction and attributions with a CPU-trained model on the GPU
    gpu = IMRClassifier.from_pretrained(path, device="cuda")
    p_again, _ = gpu.predict_proba(test.texts)
    assert np.max(np.abs(p_again - p_gpu)) < 1e-6
    from imr_model.attribution import attribute

    attr = attribute(gpu, test.texts[0], n_steps=8)
    assert np.isfinite(attr.delta) and len(attr.words) > 0
