"""HTTP service (`imr serve`): FastAPI app around one loaded `Predictor`.

Endpoints: ``POST /predict`` (JSON with a letter's ``text`` or a PDF as ``pdf_base64``, or multipart
with a ``file``), ``POST /predict/batch``, ``GET /health``, ``GET /model``; OpenAPI docs at ``/docs``.

Limits: request bodies over `max_body_bytes` get 413 before any parsing (the body is read through a
counting ASGI middleware, so a missing or false Content-Length does not bypass it); predictions that
take longer than `timeout_s` get 504 (the worker thread finishes in the background, a semaphore caps
how many run at once); with a token (``$IMR_API_TOKEN``) every endpoint except /health and the docs
needs ``Authorization: Bearer <token>`` (401 otherwise). Bad input gets 422 with the offending field;
validation errors never echo the submitted text back, and nothing logs letter text.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
import secrets
import tempfile
import threading
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.concurrency import run_in_threadpool

from imr_model import __version__
from imr_model.attribution import DEFAULT_STEPS, OUTCOME
from imr_model.inference import Predictor, load_model, text_records
from imr_model.letters import parse_file
from imr_model.types import LetterError

TOKEN_ENV = "IMR_API_TOKEN"
DEFAULT_MAX_BODY = 5 * 1024 * 1024
DEFAULT_TIMEOUT_S = 60.0
MAX_BATCH = 64


class LetterInput(BaseModel):
    """One letter: its text (or a bare item text), or a PDF file as base64."""

    model_config = ConfigDict(extra="forbid")
    text: str | None = Field(None, description="A letter's text, or the text of a single item.")
    pdf_base64: str | None = Field(None, description="A letter PDF, base64-encoded.")
    letter_id: str | None = Field(None, max_length=200, description="Id echoed in the response.")

    @model_validator(mode="after")
    def _one_source(self) -> "LetterInput":
        given = [name for name in ("text", "pdf_base64") if getattr(self, name) not in (None, "")]
        if len(given) != 1:
            raise ValueError(f"give exactly one of 'text' or 'pdf_base64' (got {given or 'neither'})")
        return self


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    attributions: bool = False
    target: str = Field(OUTCOME, description="'outcome' or a guideline label id (attribution target).")
    n_steps: int = Field(DEFAULT_STEPS, ge=2, le=256, description="Integration steps for attributions.")


class PredictRequest(LetterInput, Options):
    pass


class BatchRequest(Options):
    letters: list[LetterInput] = Field(..., min_length=1, max_length=MAX_BATCH)


class ItemOut(BaseModel):
    letter_id: str
    item_index: int
    request: str
    outcome: Literal["Upheld", "Overturned"]
    p_overturned: float
    guidelines: dict[str, float]
    guideline_labels: list[str]
    attributions: dict[str, Any] | None = None
    letter_decision: str | None = None


class PredictResponse(BaseModel):
    letter_id: str
    model: str
    items: list[ItemOut]


class BatchResult(BaseModel):
    letter_id: str
    items: list[ItemOut] = []
    error: str | None = None


class BatchResponse(BaseModel):
    model: str
    results: list[BatchResult]


class BodyLimitMiddleware:
    """Pure ASGI: read the whole body (at most `limit` bytes) before the app sees it; larger → 413."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._reject(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await self._reject(scope, receive, send)
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope, receive, send) -> None:
        response = JSONResponse({"detail": f"request body exceeds the {self.limit:,}-byte limit"}, status_code=413)
        await response(scope, receive, send)


def create_app(
    model: str | Path | Predictor | None = None,
    *,
    backend: str = "torch",
    token: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_concurrency: int = 2,
) -> FastAPI:
    """The service app. The model is loaded now, so a bad URI fails at start-up, not on the first request.

    `token` defaults to ``$IMR_API_TOKEN``; an empty value disables authentication.
    """
    if max_body_bytes < 1 or timeout_s <= 0 or max_concurrency < 1:
        raise ValueError(
            f"max_body_bytes ({max_body_bytes}), timeout_s ({timeout_s}) and max_concurrency ({max_concurrency}) must be positive"
        )
    predictor = load_model(model, backend=backend)
    token = os.environ.get(TOKEN_ENV, "") if token is None else token
    gate = threading.BoundedSemaphore(max_concurrency)
    app = FastAPI(title="IMR model", version=__version__, description=__doc__)
    app.add_middleware(BodyLimitMiddleware, limit=max_body_bytes)
    app.state.predictor = predictor

    authorize = _bearer_check(token)
    run = _runner(timeout_s, gate)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": [_safe_error(e) for e in exc.errors()]}, status_code=422)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model_loaded": True, "backend": predictor.backend, "version": __version__}

    @app.get("/model", dependencies=[Depends(authorize)])
    def model_info() -> dict:
        return {**predictor.metadata(), "identity": predictor.identity()}

    @app.post("/predict", response_model=PredictResponse, dependencies=[Depends(authorize)], openapi_extra=_predict_body_doc())
    async def predict(request: Request) -> PredictResponse:
        req = await _read_predict_request(request)
        return await run(_single, predictor, req)  # parsing and prediction share one timeout

    @app.post("/predict/batch", response_model=BatchResponse, dependencies=[Depends(authorize)])
    async def predict_batch(req: BatchRequest) -> BatchResponse:
        return await run(_batch, predictor, req)

    return app


def _bearer_check(token: str):
    """A dependency: 401 unless `Authorization: Bearer <token>` (constant-time compare); no-op without a token."""

    def authorize(request: Request) -> None:
        if not token:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), token.encode()):
            raise HTTPException(401, "missing or invalid bearer token", headers={"WWW-Authenticate": "Bearer"})

    return authorize


def _runner(timeout_s: float, gate: threading.BoundedSemaphore):
    """Run blocking model work in the thread pool, at most `gate` at once; 504 after `timeout_s`."""

    async def run(fn, *args):
        def guarded():
            with gate:
                return fn(*args)

        try:
            return await asyncio.wait_for(run_in_threadpool(guarded), timeout=timeout_s)
        except asyncio.TimeoutError:
            raise HTTPException(504, f"prediction did not finish within the {timeout_s:g} s request timeout") from None

    return run


# --------------------------------------------------------------------------- request handling


def _safe_error(error: dict) -> dict:
    """A validation error without the submitted value (`input` may be a whole letter), JSON-ready."""
    out = {k: v for k, v in error.items() if k not in ("input", "url", "ctx")}
    if error.get("ctx"):
        out["ctx"] = {k: str(v) for k, v in error["ctx"].items()}
    out["loc"] = list(out.get("loc", ()))
    return out


async def _read_predict_request(request: Request) -> PredictRequest:
    """JSON or multipart (`file` + form fields) → a validated `PredictRequest` (422 otherwise)."""
    ctype = request.headers.get("content-type", "")
    try:
        if ctype.startswith("multipart/form-data"):
            form = await request.form()
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise RequestValidationError([{"type": "missing", "loc": ("body", "file"), "msg": "multipart field 'file' (a PDF or text letter) is required"}])
            data = await upload.read()
            fields = {k: v for k, v in form.items() if k != "file"}
            fields["letter_id"] = fields.get("letter_id") or Path(upload.filename or "upload").stem
            key = "pdf_base64" if data[:5] == b"%PDF-" or (upload.filename or "").lower().endswith(".pdf") else "text"
            fields[key] = base64.b64encode(data).decode() if key == "pdf_base64" else _utf8(data)
            return PredictRequest.model_validate(fields)
        try:
            payload = await request.json()
        except ValueError:
            raise RequestValidationError([{"type": "json_invalid", "loc": ("body",), "msg": "body is not valid JSON (send application/json or multipart/form-data)"}]) from None
        return PredictRequest.model_validate(payload)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


def _utf8(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise RequestValidationError([{"type": "value_error", "loc": ("body", "file"), "msg": "file is neither a PDF nor UTF-8 text"}]) from None


def _records(letter: LetterInput) -> list[dict]:
    """Item records of one input; bad input → 422 naming the problem (never quoting the text)."""
    try:
        if letter.text not in (None, ""):
            return text_records(letter.text, letter_id=letter.letter_id)
        return _pdf_records(letter.pdf_base64 or "", letter.letter_id)
    except (LetterError, ValueError) as exc:
        reason = exc.reason if isinstance(exc, LetterError) else str(exc)
        raise HTTPException(422, f"cannot read the letter: {reason}") from None


def _pdf_records(b64: str, letter_id: str | None) -> list[dict]:
    try:
        data = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("pdf_base64 is not valid base64") from None
    if not data.startswith(b"%PDF-"):
        raise ValueError("pdf_base64 does not decode to a PDF (no %PDF- header)")
    with tempfile.TemporaryDirectory(prefix="imr-upload-") as tmp:
        path = Path(tmp) / f"{letter_id or 'upload'}.pdf"
        path.write_bytes(data)
        try:
            records = parse_file(path).item_records()
        except LetterError as exc:
            raise LetterError(letter_id or "upload.pdf", exc.reason) from None
    for r in records:
        r["source"] = "<upload>"
    return records


def _predict(predictor: Predictor, records: list[dict], opts: Options) -> list[dict]:
    if not records:
        return []
    try:
        preds = predictor.predict_records(records, attributions=opts.attributions, target=opts.target, n_steps=opts.n_steps)
    except ValueError as exc:  # e.g. an unknown attribution target; the message lists valid ones
        raise HTTPException(422, str(exc)) from None
    return [p.to_dict(include_text=opts.attributions) for p in preds]


def _single(predictor: Predictor, req: PredictRequest) -> PredictResponse:
    records = _records(req)
    preds = _predict(predictor, records, req)
    return PredictResponse(letter_id=records[0]["letter_id"], model=predictor.identity(), items=preds)


def _batch(predictor: Predictor, req: BatchRequest) -> BatchResponse:
    results: list[BatchResult] = []
    groups: list[list[dict]] = []
    for i, letter in enumerate(req.letters):
        try:
            groups.append(_records(letter))
            results.append(BatchResult(letter_id=groups[-1][0]["letter_id"]))
        except HTTPException as exc:
            groups.append([])
            results.append(BatchResult(letter_id=letter.letter_id or f"#{i}", error=str(exc.detail)))
    preds = _predict(predictor, [r for g in groups for r in g], req)
    pos = 0
    for result, group in zip(results, groups):
        result.items = [ItemOut(**p) for p in preds[pos : pos + len(group)]]
        pos += len(group)
    return BatchResponse(model=predictor.identity(), results=results)


def _predict_body_doc() -> dict:
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": PredictRequest.model_json_schema()},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {
                            "file": {"type": "string", "format": "binary", "description": "PDF or UTF-8 text letter"},
                            "attributions": {"type": "boolean", "default": False},
                            "target": {"type": "string", "default": OUTCOME},
                            "n_steps": {"type": "integer", "default": DEFAULT_STEPS},
                            "letter_id": {"type": "string"},
                        },
                    }
                },
            },
        }
    }


def serve(model=None, *, host: str = "127.0.0.1", port: int = 8080, backend: str = "torch", **kwargs) -> None:
    """Run the service with uvicorn (blocking)."""
    import uvicorn

    uvicorn.run(create_app(model, backend=backend, **kwargs), host=host, port=port, log_level="info")
