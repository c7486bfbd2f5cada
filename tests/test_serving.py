"""REST service: predictions, limits (413/504), bearer auth (401), 422s, a real uvicorn, and the pyfunc."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from imr_model import inference
from imr_model.demo import write_demo_letters
from imr_model.inference import load_model, predict
from imr_model.serving import create_app

from inference_helpers import LABELS, tiny_model

REPO = Path(__file__).resolve().parent.parent
TOKEN = "s3cret-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("serve") / "model", seed=9)


@pytest.fixture(scope="module")
def letters(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("letters")
    return {"txt": write_demo_letters(d, 2, seed=31)[0], "pdf": write_demo_letters(d, 2, seed=31, fmt="pdf")[1]}


@pytest.fixture(scope="module")
def client(model_dir) -> TestClient:
    return TestClient(create_app(str(model_dir), token=TOKEN, max_body_bytes=200_000))


def test_health_is_open_and_model_needs_token(client):
    assert client.get("/health").json()["status"] == "ok"
    assert client.get("/model").status_code == 401
    bad = client.get("/model", headers={"Authorization": "Bearer wrong"})
    assert bad.status_code == 401 and bad.headers["www-authenticate"] == "Bearer"
    meta = client.get("/model", headers=AUTH).json()
    assert meta["guideline_labels"] == LABELS and meta["version"] == "tiny-9" and "calibration" in meta


def test_predict_text_matches_python_api(client, model_dir, letters):
    text = letters["txt"].read_text(encoding="utf-8")
    r = client.post("/predict", json={"text": text, "letter_id": "L1"}, headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    expected = predict(text, model=str(model_dir))
    assert body["letter_id"] == "L1" and len(body["items"]) == len(expected)
    np.testing.assert_allclose([i["p_overturned"] for i in body["items"]], [p.p_overturned for p in expected], atol=1e-6)
    assert [i["request"] for i in body["items"]] == [p.request for p in expected]
    assert all(i["attributions"] is None for i in body["items"])
    assert client.post("/predict", json={"text": text}).status_code == 401


def test_predict_pdf_base64_and_multipart(client, model_dir, letters):
    pdf = letters["pdf"].read_bytes()
    expected = [p.p_overturned for p in predict(letters["pdf"], model=str(model_dir))]
    r = client.post("/predict", json={"pdf_base64": base64.b64encode(pdf).decode()}, headers=AUTH)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose([i["p_overturned"] for i in r.json()["items"]], expected, atol=1e-6)
    m = client.post("/predict", files={"file": ("letter.pdf", pdf, "application/pdf")},
                    data={"attributions": "true", "n_steps": "4"}, headers=AUTH)  # fmt: skip
    assert m.status_code == 200, m.text
    items = m.json()["items"]
    assert m.json()["letter_id"] == "letter"
    np.testing.assert_allclose([i["p_overturned"] for i in items], expected, atol=1e-6)
    attr = items[0]["attributions"]
    assert attr["n_steps"] == 4 and attr["words"] and attr["text"]
    t = client.post("/predict", files={"file": ("l.txt", letters["txt"].read_bytes(), "text/plain")}, headers=AUTH)
    assert t.status_code == 200 and len(t.json()["items"]) >= 1


@pytest.mark.parametrize(
    "payload, fragment",
    [
        ({"text": "x", "pdf_base64": "JVBERi0="}, "exactly one of"),
        ({}, "exactly one of"),
        ({"text": "   "}, "text is empty"),
        ({"pdf_base64": "%%%not base64%%%"}, "not valid base64"),
        ({"pdf_base64": base64.b64encode(b"hello, not a pdf").decode()}, "does not decode to a PDF"),
        ({"pdf_base64": base64.b64encode(b"%PDF-1.4 broken").decode()}, "cannot read the letter"),
        ({"text": "Some item.", "attributions": True, "target": "bogus"}, "unknown attribution target"),
        ({"text": "Some item.", "n_steps": 1}, "greater than or equal to 2"),
        ({"text": "Some item.", "surprise": 1}, "Extra inputs are not permitted"),
    ],
)
def test_bad_input_is_422(client, payload, fragment):
    r = client.post("/predict", json=payload, headers=AUTH)
    assert r.status_code == 422, r.text
    assert fragment in r.text
    if payload.get("text", "").strip():
        assert "Some item" not in r.text  # validation errors never echo the submitted text


def test_invalid_json_and_missing_file_are_422(client):
    r = client.post("/predict", content=b"{not json", headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 422 and "not valid JSON" in r.text
    r = client.post("/predict", data={"attributions": "true"}, files={"other": ("a.txt", b"x")}, headers=AUTH)
    assert r.status_code == 422 and "'file'" in r.text


def test_body_limit_413(client):
    big = {"text": "word " * 60_000}  # ~300 KB > 200 KB limit
    r = client.post("/predict", json=big, headers=AUTH)
    assert r.status_code == 413 and "limit" in r.json()["detail"]

    def chunks():  # no Content-Length: the limit must still hold while streaming
        for _ in range(50):
            yield b"x" * 10_000

    r = client.post("/predict", content=chunks(), headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413


def test_timeout_504(model_dir):
    slow = TestClient(create_app(str(model_dir), token="", timeout_s=0.05))
    r = slow.post("/predict", json={"text": "A fairly long item text. " * 40, "attributions": True, "n_steps": 256})
    assert r.status_code == 504 and "timeout" in r.json()["detail"]


def test_batch(client, model_dir, letters):
    text = letters["txt"].read_text(encoding="utf-8")
    r = client.post("/predict/batch", headers=AUTH, json={"letters": [
        {"text": text, "letter_id": "a"},
        {"pdf_base64": base64.b64encode(b"%PDF-1.4 broken").decode(), "letter_id": "b"},
        {"text": "A bare item about chiropractic care."},
    ]})  # fmt: skip
    assert r.status_code == 200, r.text
    a, b, c = r.json()["results"]
    assert a["letter_id"] == "a" and len(a["items"]) == len(predict(text, model=str(model_dir)))
    assert b["error"] and "cannot read the letter" in b["error"] and b["items"] == []
    assert c["letter_id"] == "text" and len(c["items"]) == 1
    too_many = {"letters": [{"text": "x"}] * 65}
    assert client.post("/predict/batch", headers=AUTH, json=too_many).status_code == 422


def test_openapi_documents_both_body_types(client):
    spec = client.get("/openapi.json").json()
    content = spec["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(content)
    assert "/predict/batch" in spec["paths"] and client.get("/docs").status_code == 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_real_uvicorn_on_loopback(model_dir, letters):
    port = _free_port()
    env = {**os.environ, "IMR_API_TOKEN": TOKEN, "HF_HUB_OFFLINE": "1"}
    code = "import sys; from imr_model.cli import main; main(sys.argv[1:])"
    proc = subprocess.Popen([sys.executable, "-c", code, "serve", "--model", str(model_dir), "--port", str(port),
                             "--max-body-mb", "0.5"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()[-2000:]
            time.sleep(0.3)
        text = letters["txt"].read_text(encoding="utf-8")
        ok = httpx.post(f"{base}/predict", json={"text": text}, headers=AUTH, timeout=60)
        assert ok.status_code == 200 and ok.json()["items"]
        assert httpx.post(f"{base}/predict", json={"text": text}, timeout=60).status_code == 401
        big = httpx.post(f"{base}/predict", content=b"{" + b" " * 600_000 + b"}", headers={**AUTH, "Content-Type": "application/json"}, timeout=60)
        assert big.status_code == 413
        assert httpx.post(f"{base}/predict", json={"nope": 1}, headers=AUTH, timeout=60).status_code == 422
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    log = proc.stdout.read().decode()
    assert "SYNTHETIC DEMO LETTER" not in log and "Decision rationale" not in log  # no letter text in the log


def test_pyfunc_predict_in_process(model_dir, tmp_path, monkeypatch, letters):
    """The logged models-from-code pyfunc (what `mlflow models serve` runs) gives the same predictions."""
    import mlflow

    from imr_model.letters import parse_file
    from imr_model.tracking import configure, log_model

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    configure()
    mlflow.set_experiment("pyfunc-test")
    with mlflow.start_run():
        uri, _ = log_model(model_dir, registered_model=None)
    pyfunc = mlflow.pyfunc.load_model(uri)
    records = parse_file(letters["txt"]).item_records()
    import pandas as pd

    frame = pd.DataFrame([{k: r[k] for k in ("request", "rationale", "case_summary")} for r in records])
    out = pyfunc.predict(frame)
    expected = predict(letters["txt"], model=str(model_dir))
    np.testing.assert_allclose(out["p_overturned"].to_numpy(), [p.p_overturned for p in expected], atol=1e-6)
    assert out["outcome"].tolist() == [p.outcome for p in expected]
    assert [json.loads(g) for g in out["guidelines"]][0] == pytest.approx(expected[0].guidelines, abs=1e-6)
    inference.clear_cache()
    assert load_model(uri).classifier.config.version == "tiny-9"  # the same URI works for predict()
