"""Packaging: optional parts are extras with a one-line error naming them, the wheel ships the named configs
and only `imr_model`, and production code takes its sample items from a static synthetic resource."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imr_model.cli import app
from imr_model.extras import MissingExtraError, require
from tests.inference_helpers import tiny_model

REPO = Path(__file__).resolve().parent.parent
# What a core-only install lacks ([serve] also lists fastapi and uvicorn, which mlflow already brings).
OPTIONAL = ("pyspark", "onnx", "onnxruntime", "onnxscript", "fastapi_offline", "python_multipart", "multipart")


def _absent(monkeypatch, *modules: str) -> None:
    """Make `modules` unimportable (an import raises ModuleNotFoundError), and forget modules that import them at
    their top, so they are imported afresh; monkeypatch puts everything back afterwards."""
    for name in modules:
        for loaded in [m for m in sys.modules if m.startswith(name + ".")]:  # submodules an earlier test imported
            monkeypatch.delitem(sys.modules, loaded)
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "imr_model.serving", raising=False)


def _one_line_error(result, extra: str) -> str:
    text = (result.stderr or result.output).strip()
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and len(text.splitlines()) == 1, text
    assert f"pip install 'imr-model[{extra}]'" in text
    return text


# --------------------------------------------------------------------------- missing extras


def test_require_names_the_extra(monkeypatch):
    assert require("json", "serve", "x") is json
    _absent(monkeypatch, "pyspark")
    with pytest.raises(MissingExtraError, match=r"imr score --engine spark needs pyspark: pip install 'imr-model\[spark\]'"):
        require("pyspark.sql", "spark", "imr score --engine spark")
    with pytest.raises(ImportError):  # a subclass: `except ImportError` still catches it
        require("python_multipart_not_installed_anywhere", "serve", "imr serve")


def test_cli_score_engine_spark_without_pyspark(monkeypatch, tmp_path):
    _absent(monkeypatch, "pyspark")
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(app, ["score", str(tmp_path), "-o", str(out), "--engine", "spark"])
    assert _one_line_error(result, "spark") == "imr score --engine spark needs pyspark: pip install 'imr-model[spark]'"
    assert not out.exists()


def test_cli_score_backend_onnx_without_onnxruntime(monkeypatch, tmp_path):
    _absent(monkeypatch, "onnxruntime")
    result = CliRunner().invoke(app, ["score", str(tmp_path), "-o", str(tmp_path / "out.jsonl"), "--backend", "onnx"])
    assert "needs onnxruntime" in _one_line_error(result, "onnx")


@pytest.mark.parametrize("module, name", [("fastapi", "fastapi"), ("uvicorn", "uvicorn"),
                                          ("fastapi_offline", "fastapi-offline"), ("python_multipart", "python-multipart")])  # fmt: skip
def test_cli_serve_without_the_serve_extra(monkeypatch, module, name):
    _absent(monkeypatch, module)
    result = CliRunner().invoke(app, ["serve", "--model", "no-such-model-dir"])  # fails on the extra, before the model
    assert _one_line_error(result, "serve") == f"imr serve needs {name}: pip install 'imr-model[serve]'"


def test_cli_serve_backend_onnx_without_onnx(monkeypatch):
    _absent(monkeypatch, "onnxscript")
    result = CliRunner().invoke(app, ["serve", "--backend", "onnx", "--model", "no-such-model-dir"])
    assert "--backend onnx needs onnxscript" in _one_line_error(result, "onnx")


def test_library_entry_points_without_their_extras(monkeypatch, tmp_path):
    from imr_model import inference

    _absent(monkeypatch, "pyspark", "onnxruntime", "fastapi")
    from imr_model.spark import score_files

    with pytest.raises(MissingExtraError, match=r"imr-model\[spark\]"):
        score_files([tmp_path], tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()
    inference.clear_cache()
    with pytest.raises(MissingExtraError, match=r"imr-model\[onnx\]"):
        inference.load_model(str(tiny_model(tmp_path / "m")), backend="onnx")
    inference.clear_cache()
    with pytest.raises(MissingExtraError, match=r"imr-model\[serve\]"):
        importlib.import_module("imr_model.serving")


def test_core_commands_and_predict_without_any_extra(tmp_path):
    """A fresh interpreter without pyspark, onnx*, fastapi-offline, python-multipart: the CLI imports, parses,
    scores (default engine and backend) and `predict` answers."""
    model = tiny_model(tmp_path / "m")
    (tmp_path / "letters").mkdir()
    from imr_model.demo import write_demo_letters

    write_demo_letters(tmp_path / "letters", 2, seed=1)
    code = f"""
import sys
for name in {OPTIONAL!r}:
    sys.modules[name] = None
from imr_model.cli import main
from imr_model.inference import predict
for argv in (["parse", "letters", "-o", "items.jsonl", "--workers", "1"], ["score", "letters", "-o", "scored.jsonl", "--model", "m"]):
    try:
        main(argv)
    except SystemExit as exc:
        assert not exc.code, (argv, exc.code)
print(predict("Physical therapy x6: Upheld", model="m")[0].outcome)
assert not any(sys.modules.get(name) for name in {OPTIONAL!r})
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] in ("Upheld", "Overturned")
    assert (tmp_path / "items.jsonl").stat().st_size and (tmp_path / "scored.jsonl").stat().st_size
    assert model.is_dir()


# --------------------------------------------------------------------------- the wheel


def _copy_project(dst: Path) -> Path:
    """The files a build reads, without build/ or *.egg-info of the working tree (nothing is written into the repo)."""
    dst.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(REPO / name, dst / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("configs", "imr_model"):
        shutil.copytree(REPO / name, dst / name, ignore=ignore)
    return dst


def _build_wheel(src: Path, out: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(out), str(src)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = out.glob("imr_model-*.whl")
    return wheel


def _check_wheel(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    configs = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
    assert configs and sorted(n.split("/")[-1] for n in names if n.startswith("imr_model/configs/")) == configs
    assert "imr_model/resources/example_items.json" in names
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"imr_model"}, top  # no train/, no configs/
    (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["imr_model"]


@pytest.mark.slow
def test_wheel_ships_named_configs_and_only_imr_model(tmp_path):
    pytest.importorskip("setuptools")
    wheel = _build_wheel(_copy_project(tmp_path / "src"), tmp_path / "wheel")
    _check_wheel(wheel)

    # installed without the repository, named configs resolve from the package
    target = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    code = "from imr_model.config import resolve_config_path, load_config; import imr_model; " \
           "print(imr_model.__file__); print(resolve_config_path('tiny')); load_config('tiny')"  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(target)}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    package_file, tiny = done.stdout.split()
    assert Path(package_file).is_relative_to(target) and Path(tiny) == target / "imr_model" / "configs" / "tiny.yaml"


@pytest.mark.slow
def test_wheel_built_from_the_sdist_ships_named_configs(tmp_path):
    pytest.importorskip("setuptools")
    src = _copy_project(tmp_path / "src")
    code = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "sdist")], cwd=src, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    sdist = tmp_path / "sdist" / done.stdout.split()[-1]
    shutil.unpack_archive(sdist, tmp_path / "unpacked")
    (root,) = (tmp_path / "unpacked").iterdir()
    assert sorted(p.name for p in (root / "configs").glob("*.yaml")) == sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
    _check_wheel(_build_wheel(root, tmp_path / "wheel"))


# --------------------------------------------------------------------------- the synthetic example items


def test_example_items_are_marked_synthetic_and_demo_free():
    from imr_model.examples import example_records

    doc = json.loads((REPO / "imr_model" / "resources" / "example_items.json").read_text(encoding="utf-8"))
    assert doc["synthetic"] is True and "SYNTHETIC" in doc["note"]
    records = example_records()
    assert records == doc["items"] and len(records) >= 8
    assert all(r["letter_id"].startswith("CM99-") for r in records)  # the demo letters' case prefix, never a real one
    assert {r["decision"] for r in records} == {"Upheld", "Overturned"}
    assert all(r["request"] and r["rationale"] and r["case_summary"] for r in records)
    records[0]["request"] = "changed"
    assert example_records()[0]["request"] != "changed"  # callers get copies


def test_input_example_and_int8_check_use_the_resource(monkeypatch, tmp_path):
    """Neither the MLflow input example nor the ONNX int8 check runs the demo generator."""
    from types import SimpleNamespace

    import numpy as np

    import imr_model.demo
    from imr_model import tracking
    from imr_model.examples import example_records
    from imr_model.onnx_backend import int8_check

    def no_demo(*args, **kwargs):
        raise AssertionError("production code called the demo generator")

    monkeypatch.setattr(imr_model.demo, "generate_letters", no_demo)
    records = example_records()
    example = tracking.input_example()
    assert example.to_dict("records") == [{k: r[k] for k in ("request", "rationale", "case_summary")} for r in records[:2]]

    seen: list[list[str]] = []

    def predict_proba(texts, forward=None):
        seen.append(list(texts))
        return np.full(len(texts), 0.5 if forward is None else 0.51), np.full((len(texts), 3), 0.2 if forward is None else 0.23)

    clf = SimpleNamespace(config=SimpleNamespace(text_view="rationale", context_view=None), predict_proba=predict_proba)
    result = int8_check(clf, SimpleNamespace(path=Path("imr_net.int8.onnx")), tmp_path / "check.json")
    assert result["n"] == len(records) and result["max_abs_dp"] == pytest.approx(0.01)
    assert result["max_abs_dp_guidelines"] == pytest.approx(0.03)
    assert seen[0] == [r["rationale"] for r in records]  # the rationale view of each example item
