"""The `imr` command line on the paths a user trips over: failed inputs, wrong aliases, unusable outputs, fallbacks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imr_model.cli import app
from imr_model.demo import write_demo_letters
from imr_model.inference import clear_cache
from tests.inference_helpers import tiny_model


@pytest.fixture()
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture()
def model_dir(tmp_path) -> Path:
    return tiny_model(tmp_path / "tiny-model")


@pytest.fixture(autouse=True)
def _fresh_models(monkeypatch):
    monkeypatch.delenv("IMR_MODEL_URI", raising=False)
    clear_cache()
    yield
    clear_cache()
    _forget_mlflow_uris()


def _forget_mlflow_uris() -> None:
    """The CLI points MLflow at $MLFLOW_TRACKING_URI process-wide (`tracking.configure`); later tests set their own."""
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    tracking_utils._tracking_uri = None
    registry_utils._registry_uri = None


def _no_traceback(result) -> None:
    assert "Traceback" not in result.output
    assert "Traceback" not in (result.stderr or "")


def test_parse_exits_nonzero_when_no_input_parses(runner, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.txt").write_bytes(b"")
    (bad / "junk.pdf").write_bytes(b"%PDF-1.4 not really a pdf")
    out = tmp_path / "out.jsonl"
    result = runner.invoke(app, ["parse", str(bad), "-o", str(out), "--workers", "1"])
    assert result.exit_code == 1, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(Path(r["source"]).name for r in rows) == ["empty.txt", "junk.pdf"]
    assert all(r["error"] for r in rows)
    assert "0 letters, 0 items, 2 errors" in result.stderr
    assert "letters/s" not in result.stderr  # no rate of letters that were never parsed
    _no_traceback(result)


def test_parse_mixed_folder_exits_zero(runner, tmp_path):
    folder = tmp_path / "mixed"
    write_demo_letters(folder, 3, seed=1)
    (folder / "empty.txt").write_bytes(b"")
    out = tmp_path / "out.jsonl"
    result = runner.invoke(app, ["parse", str(folder), "-o", str(out)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sum(1 for r in rows if r.get("error")) == 1
    assert {Path(r["source"]).name for r in rows} == {p.name for p in folder.iterdir()}


def test_parse_unwritable_output_is_one_line(runner, tmp_path):
    write_demo_letters(tmp_path / "letters", 1, seed=1)
    (tmp_path / "file").write_text("x")
    result = runner.invoke(app, ["parse", str(tmp_path / "letters"), "-o", str(tmp_path / "file" / "out.jsonl")])
    assert result.exit_code == 2
    assert "cannot write" in result.stderr and "out.jsonl" in result.stderr
    _no_traceback(result)


def test_score_unknown_alias_lists_the_aliases(runner, tmp_path, monkeypatch, model_dir):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("imr-classifier")
    client.create_model_version("imr-classifier", source=str(model_dir))
    client.set_registered_model_alias("imr-classifier", "candidate", "1")
    write_demo_letters(tmp_path / "letters", 1, seed=1)
    result = runner.invoke(
        app, ["score", str(tmp_path / "letters"), "-o", str(tmp_path / "out.jsonl"), "--model", "models:/imr-classifier@nosuch"]
    )
    assert result.exit_code == 2
    assert "alias 'nosuch' not found" in result.stderr and "candidate (v1)" in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 3
    assert not (tmp_path / "out.jsonl").exists()
    _no_traceback(result)


def test_score_says_which_model_and_warns_on_demo_fallback(runner, tmp_path, monkeypatch):
    from imr_model.modeling import IMRClassifier

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = tiny_model(tmp_path / "models" / "demo-run")
    clf = IMRClassifier.from_pretrained(path)
    clf.config = clf.config.model_copy(update={"data_source": "demo:letters=120,seed=0"})
    clf.save_pretrained(path)
    write_demo_letters(tmp_path / "letters", 2, seed=1)
    result = runner.invoke(app, ["score", "letters", "-o", "out.jsonl"])
    assert result.exit_code == 0, result.output
    assert "fallback: newest directory under ./models" in result.stderr
    assert "demo-run" in result.stderr and "trained on demo:letters=120" in result.stderr
    assert "synthetic demo letters" in result.stderr


def test_score_exits_nonzero_when_every_input_fails(runner, tmp_path, model_dir):
    (tmp_path / "empty.txt").write_bytes(b"")
    out = tmp_path / "out.jsonl"
    result = runner.invoke(app, ["score", str(tmp_path / "empty.txt"), str(tmp_path / "no such letter.pdf"),
                                 "-o", str(out), "--model", str(model_dir)])  # fmt: skip
    assert result.exit_code == 1, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(r["error"] for r in rows)
    assert any("no such letter.pdf" in r["source"] for r in rows)
    assert "no input could be scored" in result.stderr
    _no_traceback(result)


def test_score_unusable_output_is_one_line(runner, tmp_path, model_dir):
    write_demo_letters(tmp_path / "letters", 1, seed=1)
    (tmp_path / "file").write_text("x")
    result = runner.invoke(app, ["score", str(tmp_path / "letters"), "-o", str(tmp_path / "file" / "out.jsonl"),
                                 "--model", str(model_dir)])  # fmt: skip
    assert result.exit_code == 2
    assert "OutputWriteError: cannot create the output directory" in result.stderr and "file" in result.stderr
    assert "model:" not in result.stderr  # refused before the model is loaded
    _no_traceback(result)


def test_second_score_run_on_the_same_output_is_refused(runner, tmp_path, model_dir):
    from imr_model.score_output import lock_output

    write_demo_letters(tmp_path / "letters", 1, seed=1)
    out = tmp_path / "out.jsonl"
    lock = lock_output(out)  # another run holds the output
    try:
        result = runner.invoke(app, ["score", str(tmp_path / "letters"), "-o", str(out), "--model", str(model_dir)])
    finally:
        lock.release()
    assert result.exit_code == 2
    assert "being written by another" in result.stderr and "model:" not in result.stderr
    assert not out.exists()
    _no_traceback(result)


def test_missing_model_directory_is_one_line(runner, tmp_path):
    write_demo_letters(tmp_path / "letters", 1, seed=1)
    result = runner.invoke(app, ["score", str(tmp_path / "letters"), "-o", str(tmp_path / "o.jsonl"),
                                 "--model", str(tmp_path / "nope")])  # fmt: skip
    assert result.exit_code == 2
    assert "nope" in result.stderr
    _no_traceback(result)


@pytest.mark.slow
def test_imr_serve_says_which_model_and_answers_health(tmp_path, model_dir):
    """The default `imr serve` path: a real process, loopback only, stopped by the test."""
    import os
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("IMR_API_TOKEN", None)
    proc = subprocess.Popen([sys.executable, "-c", "from imr_model.cli import main; main()", "serve", "--model",
                             str(model_dir), "--port", str(port), "--workers", "1"],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline, health = time.monotonic() + 120, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                if health.status_code == 200 and health.json().get("status") == "ok":
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        assert health is not None and health.status_code == 200, proc.poll()
        r = httpx.post(f"http://127.0.0.1:{port}/predict", json={"text": "Physical therapy: Upheld"}, timeout=60)
        assert r.status_code == 200 and r.json()["items"]
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert f"model: {model_dir} [--model]" in err.decode()


@pytest.mark.slow
def test_readme_main_command_runs_as_written(tmp_path, monkeypatch):
    """The README's first set-up command, without its pip installs, in an empty folder: demo letters, then the
    default config trained on them, a model directory and a registered MLflow version (the default sqlite store)."""
    import os
    import re
    import subprocess
    import sys

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    setup = readme.split("## Set up", 1)[1]
    command = re.search(r"```bash\n(.+?)\n```", setup, re.S).group(1).strip()
    steps = [s.strip() for s in command.split("&&")]
    assert steps[0].startswith("pip install torch==2.13.0") and any(s.startswith("imr train") for s in steps)
    run = [s for s in steps if not s.startswith("pip ")]
    assert run and all(s.startswith("imr ") for s in run), run
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    done = subprocess.run(" && ".join(run), shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=1500)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"^test/majority .*\n.*^test/tfidf .*\n.*^test/model ", done.stdout, re.M | re.S), done.stdout
    assert "registered: models:/imr-classifier/1 (alias candidate)" in done.stdout
    model_dirs = [p for p in (tmp_path / "models").iterdir() if (p / "config.json").is_file()]
    assert len(model_dirs) == 1 and (tmp_path / "mlflow.db").is_file()
    assert json.loads((model_dirs[0] / "config.json").read_text())["data_source"].startswith("demo:")
