"""REST service: predictions, limits (413/408/504/503), bearer auth (401), 422s, hostile input (paths in ids,
lone surrogates, slow clients, requests that time out), offline docs, a real uvicorn, and the pyfunc."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
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
    with TestClient(create_app(str(model_dir), token=TOKEN, max_body_bytes=200_000, workers=1)) as c:
        yield c  # leaving the block runs the app's shutdown, which kills its worker processes


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


def test_a_pdf_bomb_upload_is_one_422_and_the_worker_lives_on(model_dir, letters):
    """A ~1 MB PDF whose content stream inflates to 1 GB is parsed under the parse budget (RLIMIT_AS), not
    in the model worker: the request gets 422 naming the memory limit, and the next request works."""
    from tests.hostile_files import flate_bomb, raw_pdf

    bomb = raw_pdf(flate_bomb(1024))
    assert len(bomb) < 2 * 2**20  # within the default 5 MB body limit as base64
    with TestClient(create_app(str(model_dir), workers=1)) as c:  # the default body limit
        r = c.post("/predict", json={"pdf_base64": base64.b64encode(bomb).decode()})
        assert r.status_code == 422 and "memory limit" in r.text, r.text
        ok = c.post("/predict", files={"file": ("l.txt", letters["txt"].read_bytes(), "text/plain")})
        assert ok.status_code == 200 and ok.json()["items"]


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
    with TestClient(create_app(str(model_dir), token="", timeout_s=0.05, workers=1)) as slow:
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
    spec = client.get("/openapi.json", headers=AUTH).json()
    content = spec["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(content)
    assert "/predict/batch" in spec["paths"] and client.get("/docs", headers=AUTH).status_code == 200
    assert spec["components"]["securitySchemes"]  # Swagger UI gets an Authorize button


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


# --------------------------------------------------------------------------- hostile input


def _pool_files(app) -> list[Path]:
    """Files left in the pool's private temporary directory (uploads are deleted after parsing)."""
    return [p for p in Path(app.state.pool._root).rglob("*") if p.is_file()]


def test_letter_id_never_becomes_a_path(client, letters, tmp_path):
    """An id that looks like a path is data: echoed back, and no file is created at or near it."""
    pdf = letters["pdf"].read_bytes()
    b64 = base64.b64encode(pdf).decode()
    tag = f"imr-evil-{os.getpid()}-{time.monotonic_ns()}"
    absolute = str(tmp_path / "abs" / tag)
    (tmp_path / "abs").mkdir()
    ids = [absolute, f"../../{tag}", f"../../../../../../tmp/{tag}", f"/tmp/{tag}"]
    expected = None
    for letter_id in ids:
        r = client.post("/predict", json={"pdf_base64": b64, "letter_id": letter_id}, headers=AUTH)
        assert r.status_code == 200, r.text
        assert r.json()["letter_id"] == letter_id and all(i["letter_id"] == letter_id for i in r.json()["items"])
        expected = expected or [i["p_overturned"] for i in r.json()["items"]]
        assert [i["p_overturned"] for i in r.json()["items"]] == expected
    for letter_id in (f"../../{tag}", absolute):  # the multipart letter_id field, and a path-like file name
        m = client.post("/predict", files={"file": ("letter.pdf", pdf, "application/pdf")}, data={"letter_id": letter_id},
                        headers=AUTH)  # fmt: skip
        assert m.status_code == 200 and m.json()["letter_id"] == letter_id
    m = client.post("/predict", files={"file": (f"../../{tag}.pdf", pdf, "application/pdf")}, headers=AUTH)
    assert m.status_code == 200 and m.json()["letter_id"] == tag
    r = client.post("/predict/batch", json={"letters": [{"pdf_base64": b64, "letter_id": f"/tmp/{tag}"}]}, headers=AUTH)
    assert r.status_code == 200 and r.json()["results"][0]["letter_id"] == f"/tmp/{tag}"
    pool_root = Path(client.app.state.pool._root)
    candidates = [Path(absolute + ".pdf"), Path(f"/tmp/{tag}.pdf"), Path.cwd().parent.parent / f"{tag}.pdf",
                  pool_root.parent / f"{tag}.pdf", pool_root / f"{tag}.pdf", Path("/") / f"{tag}.pdf"]  # fmt: skip
    assert not [p for p in candidates if p.exists()]
    assert not list((tmp_path / "abs").iterdir()) and not list(Path("/tmp").glob(f"{tag}*"))
    assert _pool_files(client.app) == []  # the uploads' temporary files were removed too


def _json_bytes(raw: str) -> dict:
    return {"content": raw.encode("ascii"), "headers": {**AUTH, "Content-Type": "application/json"}}


def _no_surrogates(r) -> dict:
    body = json.loads(r.content.decode("utf-8"))  # strict UTF-8: a surrogate could not have been encoded
    assert not re.search("[\ud800-\udfff]", json.dumps(body, ensure_ascii=False))
    return body


@pytest.mark.parametrize(
    "raw, status",
    [
        (r'{"text": "The request for physical therapy is not medically necessary.\ud800", "letter_id": "a\udfffb"}', 200),
        (r'{"text": "\ud800\udbff\udc00 x", "letter_id": "\ud800"}', 200),
        (r'{"text": "Some item.", "attributions": true, "target": "\ud800", "n_steps": 2}', 422),
        (r'{"text": "Some item.", "\ud800": 1}', 422),
        (r'{"pdf_base64": "JVBERi0\ud800"}', 422),
        ('{"text": ' + "[" * 50_000 + "]" * 50_000 + "}", 422),
    ],
)
def test_lone_surrogates_and_odd_json_never_500(client, raw, status):
    r = client.post("/predict", **_json_bytes(raw))
    assert r.status_code == status, r.text
    body = _no_surrogates(r)
    if status == 200:
        assert "\ufffd" in body["letter_id"] and body["items"]
    else:
        assert "Some item" not in r.text


def test_lone_surrogates_in_batch(client):
    raw = r'{"letters": [{"text": "Chiropractic care \ud800 is requested.", "letter_id": "x\udc00"}, {"pdf_base64": "\udfff"}]}'
    r = client.post("/predict/batch", **_json_bytes(raw))
    assert r.status_code == 200, r.text
    a, b = _no_surrogates(r)["results"]
    assert a["letter_id"] == "x\ufffd" and a["items"] and "not valid base64" in b["error"]
    deep = client.post("/predict/batch", **_json_bytes('{"letters": ' + "[" * 50_000 + "]" * 50_000 + "}"))
    assert 400 <= deep.status_code < 500


def _multipart(fields: list[tuple[str, str | None, bytes]], charset: str) -> dict:
    """A hand-built multipart body (so header bytes can be anything) with `charset` in its Content-Type."""
    boundary = "imrboundary42"
    parts = []
    for name, filename, data in fields:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        parts.append(f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode("ascii") + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode("ascii")
    return {"content": body, "headers": {**AUTH, "Content-Type": f"multipart/form-data; charset={charset}; boundary={boundary}"}}


def test_lone_surrogates_in_multipart_fields_and_file_names(client, letters):
    """Starlette decodes part headers and fields with the request's charset: `unicode_escape` turns the
    ASCII bytes \\ud800 into a lone surrogate, in the file name and in the letter_id field."""
    text = letters["txt"].read_bytes()
    r = client.post("/predict", **_multipart([("file", r"letter\ud800.txt", text)], "unicode_escape"))
    assert r.status_code == 200, r.text
    assert _no_surrogates(r)["letter_id"] == "letter\ufffd"
    r = client.post("/predict", **_multipart([("file", "l.txt", text), ("letter_id", None, rb"id\udfff")], "unicode_escape"))
    assert r.status_code == 200, r.text
    assert _no_surrogates(r)["letter_id"] == "id\ufffd"
    r = client.post("/predict", **_multipart([("file", "l.txt", text), ("target", None, rb"\ud800"), ("attributions", None, b"true")],
                                             "unicode_escape"))  # fmt: skip
    assert r.status_code == 422 and _no_surrogates(r)
    r = client.post("/predict", **_multipart([("file", "l.txt", b"\xed\xa0\x80 CESU-8 surrogate bytes")], "utf-8"))
    assert r.status_code == 422 and "neither a PDF nor UTF-8" in r.text


# --------------------------------------------------------------------------- timeouts free their workers


# ~380 KB: attributions over it take ~5 s on one core (an unloaded 2-core machine), 3x that for the batch.
HEAVY_TEXT = "The patient reports pain in the lower back and requests further treatment. " * 5000
HEAVY_TIMEOUT = 1.5


def test_timed_out_requests_free_their_workers(model_dir):
    """Requests that pass their deadline get 504 and their worker is killed and replaced, so light requests
    succeed right after; /health answers within a second throughout; past `workers + max_queue` → 503."""
    app = create_app(str(model_dir), token="", workers=1, max_queue=2, timeout_s=HEAVY_TIMEOUT)
    heavy = {"text": HEAVY_TEXT, "attributions": True, "n_steps": 256}
    with TestClient(app) as c:
        first_pids = app.state.pool.pids()
        results: list[tuple[int, float]] = []

        def send(path, body):
            t = time.monotonic()
            r = c.post(path, json=body)
            results.append((r.status_code, time.monotonic() - t))

        start = time.monotonic()
        batch = {"letters": [{"text": HEAVY_TEXT}] * 3, "attributions": True, "n_steps": 256}
        threads = [threading.Thread(target=send, args=("/predict/batch", batch))]  # runs first, then is killed
        threads += [threading.Thread(target=send, args=("/predict", heavy)) for _ in range(3)]
        health: list[tuple[int, float]] = []
        try:
            for th in threads:
                th.start()
                time.sleep(0.05)
            while any(th.is_alive() for th in threads) and time.monotonic() - start < 60:
                t = time.monotonic()
                code = c.get("/health").status_code
                health.append((code, time.monotonic() - t))
                time.sleep(0.05)
        finally:  # never leave the client's block with requests in flight
            for th in threads:
                th.join(timeout=30)
        assert health and {code for code, _ in health} == {200}, health
        assert max(t for _, t in health) < 1.0, health
        codes = sorted(code for code, _ in results)
        assert codes == [503, 504, 504, 504], results  # 1 running + 2 queued, the 4th refused at once
        assert all(elapsed < HEAVY_TIMEOUT + 2 for code, elapsed in results if code == 504)  # deadline from arrival
        t = time.monotonic()
        for _ in range(200):  # bounded: the replacement worker needs about a model load
            light = c.post("/predict", json={"text": "The request for physical therapy is not medically necessary."})
            if light.status_code == 200 or time.monotonic() - t > 30:
                break
            time.sleep(0.1)
        recovery = time.monotonic() - t
        assert light.status_code == 200, light.text
        assert recovery < 15, recovery
        stats = app.state.pool.stats()
        assert stats["restarts"] >= 1 and stats["timeouts"] >= 1 and stats["alive"] == 1
        assert set(app.state.pool.pids()).isdisjoint(first_pids)  # the timed-out worker is gone...
        assert not any(Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()
                       for pid in first_pids)  # fmt: skip
        # the replacement serves at once (a generous bound: CI machines are loaded; the deadline is the point)
        assert c.post("/predict", json={"text": "Acupuncture is requested."}).status_code == 200
    assert app.state.pool.pids() == [] and not Path(app.state.pool._root).exists()  # shutdown cleaned up


# --------------------------------------------------------------------------- docs, auth on docs


def test_docs_need_the_token_when_one_is_set(client, letters):
    for path in ("/docs", "/redoc", "/openapi.json", "/model"):
        assert client.get(path).status_code == 401, path
        assert client.get(path, headers={"Authorization": "Bearer nope"}).status_code == 401, path
        assert client.get(path, headers=AUTH).status_code == 200, path
    assert client.get("/health").status_code == 200  # open: load balancers probe it without a token
    assert client.get("/docs/assets/swagger-ui.css").status_code == 200  # library assets stay public
    assert client.get("/docs/assets/..%2F..%2Fserving.py").status_code == 404
    assert client.get("/docs/assets/nope.js").status_code == 404


def _asset_urls(page: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]+)"', page)


def test_docs_are_served_offline(open_server):
    base, _ = open_server
    for path, needs in (("/docs", {"swagger-ui-bundle.js", "swagger-ui.css"}), ("/redoc", {"redoc.standalone.js"})):
        r = httpx.get(base + path, timeout=10)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        urls = _asset_urls(r.text)
        assert urls and all(u.startswith("/docs/assets/") for u in urls), urls  # no CDN, no external URL
        assert needs <= {u.rsplit("/", 1)[1] for u in urls}
        assert '"/predict/batch"' in r.text  # the spec is inline: no second (unauthenticated) fetch
        for url in urls:
            a = httpx.get(base + url, timeout=10)
            kind = url.rsplit(".", 1)[1]
            assert a.status_code == 200 and len(a.content) > 1000, url
            assert {"js": "javascript", "css": "text/css", "png": "image/png"}[kind] in a.headers["content-type"]
    assert httpx.get(base + "/openapi.json", timeout=10).json()["info"]["title"] == "IMR model"


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def test_docs_render_in_headless_chromium_without_network(open_server):
    found = _chromium()
    if found is None:
        pytest.skip("chromium and chromedriver are not installed (apt-get install -y chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    base, _ = open_server
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    profile = tempfile.mkdtemp(prefix="imr-chromium-")
    # Every host except the test server resolves nowhere: a CDN reference would leave the page blank.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--window-size=1200,1600"):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(found[1]), options=options)
    try:
        driver.get(base + "/docs")
        WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".swagger-ui .opblock"))
        ops = driver.find_elements(By.CSS_SELECTOR, ".swagger-ui .opblock-summary-path")
        assert {"/predict", "/predict/batch", "/health", "/model"} <= {o.text.replace("\u200b", "") for o in ops}
        driver.get(base + "/redoc")
        WebDriverWait(driver, 30).until(lambda d: "/predict/batch" in d.find_element(By.TAG_NAME, "body").text)
        events = [json.loads(e["message"])["message"] for e in driver.get_log("performance")]
        sent = {e["params"]["requestId"]: e["params"]["request"]["url"] for e in events
                if e.get("method") == "Network.requestWillBeSent"}  # fmt: skip
        csp_blocked = {e["params"]["requestId"] for e in events
                       if e.get("method") == "Network.loadingFailed" and e["params"].get("blockedReason") == "csp"}  # fmt: skip
        web = {rid: u for rid, u in sent.items() if u.startswith(("http:", "https:", "ws:", "wss:"))}
        elsewhere = {u for rid, u in web.items() if not u.startswith(base + "/") and rid not in csp_blocked}
        assert web and elsewhere == set(), elsewhere  # nothing left the machine (ReDoc's CDN logo is CSP-blocked)
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


# --------------------------------------------------------------------------- slow clients against a real uvicorn


class _ThreadServer:
    """uvicorn on 127.0.0.1 in a thread, with the header-timeout protocol `serve` uses."""

    def __init__(self, app, header_timeout_s: float):
        import uvicorn

        from imr_model.serving import header_timeout_protocol

        self.port = _free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                http=header_timeout_protocol(header_timeout_s), timeout_keep_alive=2)  # fmt: skip
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


BODY_TIMEOUT = 1.5
HEADER_TIMEOUT = 1.5


@pytest.fixture(scope="module")
def open_server(model_dir):
    """A real server without a token (what a browser can open), short body and header timeouts."""
    app = create_app(str(model_dir), token="", workers=1, body_timeout_s=BODY_TIMEOUT)
    with _ThreadServer(app, HEADER_TIMEOUT) as base:
        yield base, app


def _trickle(port: int, head: bytes, trickle: bytes, interval: float, limit_s: float) -> tuple[bytes, float]:
    """Send `head`, then `trickle` one byte per `interval`; return (what the server sent, seconds until it
    answered or closed). Bounded by `limit_s` and by len(trickle)."""
    start = time.monotonic()
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=limit_s) as sock:
        sock.sendall(head)
        sock.settimeout(interval)
        for i in range(len(trickle)):
            if time.monotonic() - start > limit_s:
                break
            try:
                sock.sendall(trickle[i : i + 1])
            except (BrokenPipeError, ConnectionResetError):
                break
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                break
            received += chunk
            if not chunk or b"\r\n\r\n" in received:
                break
        if b"\r\n\r\n" in received or not received:
            sock.settimeout(max(0.1, limit_s - (time.monotonic() - start)))
            try:
                while chunk := sock.recv(65536):
                    received += chunk
            except (TimeoutError, ConnectionResetError, OSError):
                pass
    return received, time.monotonic() - start


def test_slow_body_gets_408_and_a_closed_connection(open_server):
    base, _ = open_server
    port = int(base.rsplit(":", 1)[1])
    body = json.dumps({"text": "The request for physical therapy is not medically necessary."}).encode()
    head = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
    received, elapsed = _trickle(port, head, body, interval=0.5, limit_s=BODY_TIMEOUT + 10)
    assert received.startswith(b"HTTP/1.1 408"), received[:200]
    assert b"connection: close" in received.lower()
    assert elapsed < BODY_TIMEOUT + 3, elapsed
    ok = httpx.post(base + "/predict", content=body, headers={"Content-Type": "application/json"}, timeout=30)
    assert ok.status_code == 200  # a normal client right after is unaffected


def test_slow_headers_get_the_connection_closed(open_server):
    base, _ = open_server
    port = int(base.rsplit(":", 1)[1])
    head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200 + b"\r\n\r\n"
    received, elapsed = _trickle(port, b"", head, interval=0.2, limit_s=HEADER_TIMEOUT + 10)
    assert received == b"" and elapsed < HEADER_TIMEOUT + 3, (received[:200], elapsed)
    idle_start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=HEADER_TIMEOUT + 10) as sock:
        assert sock.recv(1024) == b""  # a connection that never sends anything is closed too
    assert time.monotonic() - idle_start < HEADER_TIMEOUT + 3
    assert httpx.get(base + "/health", timeout=10).status_code == 200


def test_bad_model_fails_at_start_up_and_leaves_no_worker(tmp_path):
    from imr_model.inference import ModelNotFoundError
    from imr_model.serving_pool import default_workers

    before = set(Path(tempfile.gettempdir()).glob("imr-serve-*"))
    with pytest.raises(ModelNotFoundError):
        create_app(str(tmp_path / "no-such-model"), token="", workers=1)
    assert set(Path(tempfile.gettempdir()).glob("imr-serve-*")) <= before  # its temporary directory is gone too
    assert [default_workers(n) for n in (1, 2, 3, 4, 8, 16)] == [1, 2, 2, 2, 4, 4]
