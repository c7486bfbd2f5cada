"""HTTP service (`imr serve`): a FastAPI app in front of a pool of model worker processes.

Endpoints: ``POST /predict`` (JSON with a letter's ``text`` or a PDF as ``pdf_base64``, or multipart
with a ``file``), ``POST /predict/batch``, ``GET /health``, ``GET /model``; OpenAPI docs at ``/docs``
(Swagger UI) and ``/redoc``, served with their JavaScript and CSS from the installed
`fastapi-offline` package, so they work without internet access.

Where the work runs: this process only reads, validates and answers HTTP. Parsing (base64, PDF,
letter text) and prediction run in `workers` separate processes (`serving_pool`), each with its own
copy of the model, so a slow or pathological request never holds this process's GIL: ``/health``
answers while every worker is busy.

Limits:
- bodies over `max_body_bytes` get 413 before any parsing (read through a counting ASGI middleware,
  so a missing or false Content-Length does not bypass it); a body not fully received within
  `body_timeout_s` of the request's arrival gets 408 and the connection is closed (slow clients);
  `serve` also closes connections whose request headers do not arrive within `header_timeout_s`;
- a prediction not finished `timeout_s` after the request arrived gets 504 — time spent waiting for
  a free worker counts — and its worker is killed and replaced, so the capacity comes back;
- more than `workers + max_queue` requests in flight get 503 (Retry-After) at once.

With a token (``$IMR_API_TOKEN``) every endpoint except /health and the docs' static assets needs
``Authorization: Bearer <token>`` (401 otherwise), including /docs, /redoc and /openapi.json (the
docs pages carry the spec inline, so one authorised page load shows it). Bad input gets 422 with
the offending field; validation errors never echo the submitted text back; lone surrogates
(``"\\ud800"`` escapes) in any text are replaced with U+FFFD; nothing logs letter text; no
filesystem path is ever built from request data.

fastapi, fastapi-offline, uvicorn and python-multipart are the `[serve]` extra: importing this module
without them raises `extras.MissingExtraError` (``pip install 'imr-model[serve]'``).
"""

from __future__ import annotations

import asyncio
import base64
import html
import json
import os
import secrets
import time
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import PurePath
from typing import Any, Literal

from imr_model.extras import require

FEATURE = "imr serve"
for _module in ("fastapi", "fastapi_offline", "uvicorn", "python_multipart"):  # before the imports below
    require(_module, "serve", FEATURE)
del _module

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from imr_model import __version__
from imr_model.attribution import DEFAULT_STEPS, OUTCOME
from imr_model.inference import BACKENDS, Predictor, backend_device, resolve_model_uri
from imr_model.serving_pool import JobFailed, JobTimeout, PoolBusy, WorkerCrashed, WorkerPool, default_workers
from imr_model.types import clean_text

TOKEN_ENV = "IMR_API_TOKEN"
DEFAULT_MAX_BODY = 5 * 1024 * 1024
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_BODY_TIMEOUT_S = 30.0  # a 5 MB body at ~1.5 Mbit/s; a slowloris client holds a connection no longer
DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_MAX_QUEUE = 16
MAX_BATCH = 64
MAX_ID_CHARS = 200
ARRIVAL = "imr.arrival"  # ASGI scope key: time.monotonic() when the request reached the app
DOCS_ASSETS = {  # URL name → (file in fastapi_offline/static, media type); a fixed table, never a request path
    "swagger-ui-bundle.js": ("swagger-ui-bundle.js", "text/javascript; charset=utf-8"),
    "swagger-ui.css": ("swagger-ui.css", "text/css; charset=utf-8"),
    "redoc.standalone.js": ("redoc.standalone.js", "text/javascript; charset=utf-8"),
    "favicon.png": ("favicon.png", "image/png"),
}
ASSET_PREFIX = "/docs/assets"
# The docs pages may load nothing from elsewhere (ReDoc would fetch its logo from a CDN; offline that fails
# quietly, but it would still tell a third party that someone opened the docs).
DOCS_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'")


class LetterInput(BaseModel):
    """One letter: its text (or a bare item text), or a PDF file as base64."""

    model_config = ConfigDict(extra="forbid")
    text: str | None = Field(None, description="A letter's text, or the text of a single item.")
    pdf_base64: str | None = Field(None, description="A letter PDF, base64-encoded.")
    letter_id: str | None = Field(None, max_length=MAX_ID_CHARS, description="Id echoed in the response (data only).")

    @field_validator("text", "pdf_base64", "letter_id", mode="before")
    @classmethod
    def _clean_letter_fields(cls, value):
        return clean_text(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_source(self) -> "LetterInput":
        given = [name for name in ("text", "pdf_base64") if getattr(self, name) not in (None, "")]
        if len(given) != 1:
            raise ValueError(f"give exactly one of 'text' or 'pdf_base64' (got {given or 'neither'})")
        return self


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    attributions: bool = False
    target: str = Field(OUTCOME, max_length=200, description="'outcome' or a guideline label id (attribution target).")
    n_steps: int = Field(DEFAULT_STEPS, ge=2, le=256, description="Integration steps for attributions.")

    @field_validator("target", mode="before")
    @classmethod
    def _clean_target(cls, value):
        return clean_text(value) if isinstance(value, str) else value


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
    warnings: list[str] = Field(default_factory=list, description="Why the input may not be an IMR item, if it may not.")


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


class SafeJSONResponse(JSONResponse):
    """JSON whose strings can always be encoded: a lone surrogate anywhere becomes U+FFFD, never a 500."""

    def render(self, content: Any) -> bytes:
        text = json.dumps(content, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":"))
        return clean_text(text).encode("utf-8")


class BodyLimitMiddleware:
    """Pure ASGI: read the whole body before the app sees it — at most `limit` bytes (413) and within
    `timeout_s` of the request's arrival (408, slow clients) — and stamp the arrival time in the scope."""

    def __init__(self, app, limit: int, timeout_s: float = DEFAULT_BODY_TIMEOUT_S):
        self.app, self.limit, self.timeout_s = app, limit, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        arrival = scope[ARRIVAL] = time.monotonic()
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._reject(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            remaining = arrival + self.timeout_s - time.monotonic()
            try:
                if remaining <= 0:
                    raise asyncio.TimeoutError
                message = await asyncio.wait_for(receive(), timeout=remaining)
            except asyncio.TimeoutError:
                detail = f"request body not received within {self.timeout_s:g} s"
                return await _close_with(scope, receive, send, 408, detail)
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
        await _close_with(scope, receive, send, 413, f"request body exceeds the {self.limit:,}-byte limit")


async def _close_with(scope, receive, send, status: int, detail: str) -> None:
    """An error response that also closes the connection (the rest of the body is never read)."""
    await SafeJSONResponse({"detail": detail}, status_code=status, headers={"Connection": "close"})(scope, receive, send)


def create_app(
    model: str | os.PathLike | Predictor | None = None,
    *,
    backend: str = "torch",
    token: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    workers: int | None = None,
    max_queue: int = DEFAULT_MAX_QUEUE,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
    device: str | None = None,
) -> FastAPI:
    """The service app. The worker processes start and load the model now (a bad URI fails here).

    `model` is a directory or MLflow URI (or a loaded `Predictor`, whose URI and backend the workers
    load again, on its device). `workers` defaults to `serving_pool.default_workers()` (2 on a 2-core machine).
    `device`: where the workers run the model (`imr_model.devices`; None = auto: CUDA, else MPS, else the CPU;
    every worker loads its own copy there). A device this machine does not have fails here, before any worker.
    `token` defaults to ``$IMR_API_TOKEN``; an empty value disables authentication. Close the
    workers with the app's shutdown (lifespan; a ``with TestClient(app)`` block does it) or
    ``app.state.pool.close()``.
    """
    if max_body_bytes < 1 or timeout_s <= 0 or body_timeout_s <= 0:
        raise ValueError(f"max_body_bytes ({max_body_bytes}), timeout_s ({timeout_s}) and body_timeout_s "
                         f"({body_timeout_s}) must be positive")  # fmt: skip
    workers = default_workers() if workers is None else workers
    if workers < 1 or max_queue < 0:
        raise ValueError(f"workers ({workers}) must be >= 1 and max_queue ({max_queue}) >= 0")
    if isinstance(model, Predictor):
        uri, backend, device = model.info.get("resolved_uri") or model.uri, model.backend, device or model.device
    else:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
        uri = resolve_model_uri(model)
    device = str(backend_device(backend, device))  # the workers load there
    pool = WorkerPool(uri, backend=backend, workers=workers, max_queue=max_queue, device=device)
    token = os.environ.get(TOKEN_ENV, "") if token is None else token

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        try:
            yield
        finally:
            pool.close()

    app = FastAPI(title="IMR model", version=__version__, description=__doc__, docs_url=None, redoc_url=None,
                  openapi_url=None, default_response_class=SafeJSONResponse, lifespan=lifespan)  # fmt: skip
    app.add_middleware(BodyLimitMiddleware, limit=max_body_bytes, timeout_s=body_timeout_s)
    app.state.pool = pool
    info = pool.info
    authorize = _bearer_check(token)
    secured = [Depends(authorize)]

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return SafeJSONResponse({"detail": [_safe_error(e) for e in exc.errors()]}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return SafeJSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    async def dispatch(request: Request, kind: str, payload: dict) -> dict:
        deadline = request.scope.get(ARRIVAL, time.monotonic()) + timeout_s
        try:
            pool.admit()
        except PoolBusy:
            raise HTTPException(503, "too many requests are waiting for the model; retry later",
                                headers={"Retry-After": "5"}) from None  # fmt: skip

        def job():
            try:
                return pool.run(kind, payload, deadline)
            finally:
                pool.release()

        try:
            return await asyncio.get_running_loop().run_in_executor(pool.executor, job)
        except JobTimeout:
            raise HTTPException(504, f"prediction did not finish within the {timeout_s:g} s request timeout") from None
        except JobFailed as exc:
            raise HTTPException(exc.status, exc.detail) from None
        except WorkerCrashed:
            raise HTTPException(500, "the model worker died while handling this request; it has been replaced") from None
        except RuntimeError:  # the executor was shut down: the app is stopping
            raise HTTPException(503, "the service is shutting down") from None

    @app.get("/health")
    async def health() -> JSONResponse:
        stats = pool.stats()
        status = "ok" if stats["alive"] else "restarting" if stats["starting"] else "unavailable"
        body = {"status": status, "model_loaded": stats["alive"] > 0, "backend": info.get("backend", backend),
                "device": info.get("metadata", {}).get("device", device), "version": __version__,
                "workers": stats}  # fmt: skip
        return SafeJSONResponse(body, status_code=503 if status == "unavailable" else 200)

    @app.get("/model", dependencies=secured)
    async def model_info() -> dict:
        return {**info["metadata"], "identity": info["identity"]}

    @app.post("/predict", response_model=PredictResponse, dependencies=secured, openapi_extra=_predict_body_doc())
    async def predict(request: Request) -> dict:
        req = await _read_predict_request(request)
        return await dispatch(request, "predict", req.model_dump())  # parsing and prediction share one deadline

    @app.post("/predict/batch", response_model=BatchResponse, dependencies=secured)
    async def predict_batch(request: Request, req: BatchRequest) -> dict:
        return await dispatch(request, "batch", req.model_dump())

    _add_docs(app, secured)
    return app


def _bearer_check(token: str):
    """A dependency: 401 unless `Authorization: Bearer <token>` (constant-time compare); no-op without a token.

    Declared through `HTTPBearer`, so the OpenAPI spec has the scheme and Swagger UI an Authorize button.
    """
    if not token:

        async def open_access() -> None:
            return None

        return open_access

    bearer = HTTPBearer(auto_error=False, description="The service token ($IMR_API_TOKEN).")
    expected = token.encode("utf-8", "surrogateescape")  # an environment value may hold undecodable bytes

    async def authorize(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        given = (creds.credentials.strip() if creds and creds.scheme.lower() == "bearer" else "").encode("utf-8", "replace")
        if not secrets.compare_digest(given, expected):
            raise HTTPException(401, "missing or invalid bearer token", headers={"WWW-Authenticate": "Bearer"})

    return authorize


# --------------------------------------------------------------------------- docs (offline)


def _add_docs(app: FastAPI, secured: list) -> None:
    """/openapi.json, /docs and /redoc behind `secured`; their JS/CSS from fastapi-offline, open."""
    static = resources.files("fastapi_offline") / "static"

    @app.get("/openapi.json", include_in_schema=False, dependencies=secured)
    async def openapi() -> JSONResponse:
        return SafeJSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=secured)
    async def swagger(request: Request) -> HTMLResponse:
        return HTMLResponse(_swagger_html(app, _prefix(request)), headers={"Content-Security-Policy": DOCS_CSP})

    @app.get("/redoc", include_in_schema=False, dependencies=secured)
    async def redoc(request: Request) -> HTMLResponse:
        return HTMLResponse(_redoc_html(app, _prefix(request)), headers={"Content-Security-Policy": DOCS_CSP})

    cache: dict[str, bytes] = {}

    @app.get(ASSET_PREFIX + "/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        if name not in DOCS_ASSETS:  # a lookup in a fixed table: the request names no file
            raise HTTPException(404, "not found")
        filename, media_type = DOCS_ASSETS[name]
        if name not in cache:
            cache[name] = (static / filename).read_bytes()  # a file of the installed package (≤ 1.5 MB)
        return Response(cache[name], media_type=media_type, headers={"Cache-Control": "public, max-age=86400"})


def _prefix(request: Request) -> str:
    return html.escape(str(request.scope.get("root_path") or "").rstrip("/"), quote=True) + ASSET_PREFIX


def _inline_spec(app: FastAPI) -> str:
    """The OpenAPI spec as JSON safe inside a <script> element (no '<', so no '</script>')."""
    return clean_text(json.dumps(app.openapi(), ensure_ascii=False)).replace("<", "\\u003c")


def _swagger_html(app: FastAPI, assets: str) -> str:
    title = html.escape(f"{app.title} - Swagger UI")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<link rel="icon" type="image/png" href="{assets}/favicon.png">
<link rel="stylesheet" type="text/css" href="{assets}/swagger-ui.css">
</head><body><div id="swagger-ui"></div>
<script id="openapi-spec" type="application/json">{_inline_spec(app)}</script>
<script src="{assets}/swagger-ui-bundle.js"></script>
<script>
window.ui = SwaggerUIBundle({{
  spec: JSON.parse(document.getElementById("openapi-spec").textContent),
  dom_id: "#swagger-ui", layout: "BaseLayout", deepLinking: true, validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
}});
</script></body></html>"""


def _redoc_html(app: FastAPI, assets: str) -> str:
    title = html.escape(f"{app.title} - ReDoc")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" type="image/png" href="{assets}/favicon.png">
<style>body {{ margin: 0; padding: 0; }}</style>
</head><body><div id="redoc"></div>
<script id="openapi-spec" type="application/json">{_inline_spec(app)}</script>
<script src="{assets}/redoc.standalone.js"></script>
<script>
Redoc.init(JSON.parse(document.getElementById("openapi-spec").textContent), {{}}, document.getElementById("redoc"));
</script></body></html>"""


# --------------------------------------------------------------------------- request handling


def _safe_error(error: dict) -> dict:
    """A validation error without the submitted value (`input` may be a whole letter), JSON-ready.

    Location parts (JSON keys the client chose) are cleaned and cut to 64 characters."""
    out = {k: v for k, v in error.items() if k not in ("input", "url", "ctx")}
    if error.get("ctx"):
        out["ctx"] = {k: clean_text(str(v)) for k, v in error["ctx"].items()}
    out["loc"] = [clean_text(p)[:64] if isinstance(p, str) else p for p in out.get("loc", ())]
    out["msg"] = clean_text(str(out.get("msg", "")))
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
            filename = clean_text(upload.filename or "")
            # The file name only ever becomes the echoed id (a string); it names no file here.
            fields["letter_id"] = fields.get("letter_id") or PurePath(filename.replace("\\", "/")).stem[:MAX_ID_CHARS] or "upload"
            key = "pdf_base64" if data[:5] == b"%PDF-" or filename.lower().endswith(".pdf") else "text"
            fields[key] = base64.b64encode(data).decode() if key == "pdf_base64" else _utf8(data)
            return PredictRequest.model_validate(fields)
        body = await request.body()
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError):  # JSONDecodeError, bad UTF-8, over-long ints, deep nesting
            raise RequestValidationError([{"type": "json_invalid", "loc": ("body",), "msg": "body is not valid JSON (send application/json or multipart/form-data)"}]) from None
        return PredictRequest.model_validate(payload)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


def _utf8(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise RequestValidationError([{"type": "value_error", "loc": ("body", "file"), "msg": "file is neither a PDF nor UTF-8 text"}]) from None


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


# --------------------------------------------------------------------------- uvicorn


def header_timeout_protocol(timeout_s: float):
    """uvicorn's h11 protocol, plus: close a connection whose request line and headers are not complete
    `timeout_s` after it opened or after its previous response (uvicorn has no such timeout)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11Protocol(H11Protocol):
        _imr_timer = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._imr_arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._imr_arm()

        def connection_lost(self, exc) -> None:
            if self._imr_timer is not None:
                self._imr_timer.cancel()
            super().connection_lost(exc)

        def _imr_arm(self) -> None:
            if self._imr_timer is not None:
                self._imr_timer.cancel()
            self._imr_timer = self.loop.call_later(timeout_s, self._imr_expire)

        def _imr_expire(self) -> None:
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self.transport.close()

    return HeaderTimeoutH11Protocol


def serve(
    model=None,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    backend: str = "torch",
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
    **kwargs,
) -> None:
    """Run the service with uvicorn (blocking). `kwargs` go to `create_app` (workers, timeout_s, device, ...)."""
    import uvicorn

    if header_timeout_s <= 0:
        raise ValueError(f"header_timeout_s ({header_timeout_s}) must be positive")
    app = create_app(model, backend=backend, **kwargs)
    uvicorn.run(app, host=host, port=port, log_level="info", http=header_timeout_protocol(header_timeout_s))
