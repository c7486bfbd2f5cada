"""`predict()`: letters (path, text) or a bare item text → typed per-item predictions.

The model is resolved once and cached per process (see `resolve_model_uri`): the argument, else
``$IMR_MODEL_URI``, else the registry alias ``models:/imr-classifier@champion``, else the newest model
directory under ``./models``. A `Predictor` serialises work on its model with a lock, so it can be
shared by threads (the HTTP service does): one call at a time uses the CPUs (`devices.cpu_streams`) and the
window cache.

The text view the model was trained on (``config.text_view``) is applied to every item record with
`views.text_view`, so callers pass letters, never pre-processed text.

Every prediction carries `warnings` (empty for an input that looks like the IMR items the model was
trained on; see `imr_model.familiarity` for the three checks and the model's reference profile).
"""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from imr_model import devices, familiarity
from imr_model.attribution import DEFAULT_STEPS, OUTCOME, Attribution, attribute_many, check_target
from imr_model.letters import LETTER_SUFFIXES, parse_many, parse_text
from imr_model.modeling import GUIDELINE_POOLING, IMRClassifier
from imr_model.onnx_backend import onnx_forward
from imr_model.tracking import configure, resolve_model_dir
from imr_model.types import DECISIONS, Letter, LetterError
from imr_model.views import text_view
from imr_model.window_cache import WindowCache, model_identity, shared_cache

MODEL_ENV = "IMR_MODEL_URI"
REGISTERED_MODEL = "imr-classifier"
CHAMPION_URI = f"models:/{REGISTERED_MODEL}@champion"
MODELS_DIR = Path("models")
BACKENDS = ("torch", "onnx")
BARE_TEXT_ID = "text"
ONNX_DISTANCE = ("bare", "all", "off")
#: `batch_size` (windows per forward pass) → padded tokens per pass: batch_size × this, by where the network runs.
#: Batches are cut by tokens, many short sentences or a few long ones. On the CPU, passes of 512 tokens (at the
#: default batch_size 32) run `devices.cpu_streams` at a time on one thread each (measured there); the int8
#: session quantizes activations per pass, so its logits depend a little on which windows share a pass.
#: GPU: 4,096 (not measured).
TOKENS_PER_WINDOW = {"cpu": 16, "gpu": 128}
_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")  # models:/, runs:/, s3://, file:///...
logger = logging.getLogger(__name__)
MAX_TEXT_CHARS = 5_000_000  # a letter is 5-50 KB of text; the service caps bodies well below this


class ModelNotFoundError(LookupError):
    """No model could be resolved; the message lists every place that was tried."""


@dataclass(frozen=True)
class ItemPrediction:
    """The prediction for one disputed item."""

    letter_id: str
    item_index: int  # 1-based, letter order
    request: str
    outcome: str  # "Upheld" | "Overturned" (calibrated threshold)
    p_overturned: float  # calibrated probability
    guidelines: dict[str, float]  # guideline label id → probability, in the model's label order
    guideline_labels: tuple[str, ...]  # labels whose probability passes their threshold
    attributions: Attribution | None = None
    letter_decision: str | None = None  # the decision the letter states, when the input was a letter
    source: str = "<text>"
    # why the input may not be an IMR item like the training items, one "check: reason" per check that fired
    # (imr_model.familiarity); empty when it looks like one
    warnings: tuple[str, ...] = ()

    def to_dict(self, *, include_text: bool = False) -> dict:
        """JSON-ready dict; `include_text` adds the attributed text (for reports)."""
        return {
            "letter_id": self.letter_id,
            "item_index": self.item_index,
            "request": self.request,
            "outcome": self.outcome,
            "p_overturned": self.p_overturned,
            "guidelines": dict(self.guidelines),
            "guideline_labels": list(self.guideline_labels),
            "attributions": self.attributions.to_dict(include_text=include_text) if self.attributions else None,
            "letter_decision": self.letter_decision,
            "source": self.source,
            "warnings": list(self.warnings),
        }


@dataclass
class Predictor:
    """A loaded model plus how to run it; create with `load_model`.

    With `backend="onnx"` probabilities come from the int8 ONNX session; attributions always use the
    PyTorch network (gradients), so they explain the float model those probabilities approximate.

    `profile` is the model's reference profile (`familiarity.load_profile`; None for models saved
    before profiles). The distance check needs the item embeddings: with the torch backend they are
    captured from the prediction's own forward pass (no extra cost). The ONNX session returns logits
    only, so the torch encoder has to run again for them; `onnx_distance` says for which items:
    ``"bare"`` (default) those not parsed from a letter (bare texts, dicts, rows: where an input that is
    no IMR item comes from; parsed letters have the letter's structure), ``"all"``, or ``"off"``. On the
    shared letters' 79 held-out items, ONNX took 0.8 s without the extra pass and 6.3 s with it.
    `metadata()["familiarity"]` says which checks run.

    `device`: where the torch network runs (`imr_model.devices`: a spec such as ``"cuda:1"`` moves the classifier
    there; empty: where it already is). After construction it holds the resolved device, e.g. ``"cpu"``. The ONNX
    backend runs on the CPU (ONNX Runtime), so its classifier stays there.

    `window_cache` (`imr_model.window_cache`; `load_model` gives the process-wide one) keeps the results of
    windows already run, for this model, backend and device (`cache_key`), so a sentence that earlier letters or
    requests held is not run again; with attributions, their window scores too. It needs `model_digest`
    (`window_cache.model_identity` of the model directory), which `load_model` sets; without one nothing is cached.
    """

    classifier: Any  # modeling.IMRClassifier
    uri: str  # as resolved (a local directory or an MLflow URI)
    path: Path  # local model directory
    backend: str = "torch"
    forward: Any = None  # modeling.ForwardFn for non-torch backends
    info: dict = field(default_factory=dict)  # registry version etc.
    profile: familiarity.ReferenceProfile | None = None
    onnx_distance: str = "bare"  # "bare" | "all" | "off": which items the ONNX backend runs the torch encoder for
    device: str = ""  # a devices.resolve_device spec to move the classifier to; "" = leave it where it is
    window_cache: WindowCache | None = None  # results of windows already run; None: no cache
    model_digest: str = ""  # window_cache.model_identity(path): what `cache_key` is built from
    attribution_coverage: float = 1.0  # attribution.attribute_many's coverage: 1 attributes every pooled window
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    def __post_init__(self) -> None:
        if self.device:
            target = backend_device(self.backend, self.device)
            if torch_device(self.classifier) != target:
                self.classifier.to(target)
        self.device = str(torch_device(self.classifier))

    @property
    def text_view(self) -> str:
        return self.classifier.config.text_view

    def item_texts(self, records: Sequence[dict]) -> list[str]:
        """The model input of each item record, in the model's text view."""
        return [text_view(_with_text_fields(r), self.text_view) for r in records]

    def predict_records(
        self,
        records: Sequence[dict],
        *,
        attributions: bool = False,
        target: str = OUTCOME,
        n_steps: int = DEFAULT_STEPS,
        batch_size: int = 32,
        observe: Callable[[list[dict], list[str], np.ndarray, np.ndarray | None], None] | None = None,
    ) -> list[ItemPrediction]:
        """Predict item records (the schema of `Letter.item_records()`; request/rationale/case_summary).

        `observe(records, texts, p_overturned, embeddings)` is called once the predictions are made, with the
        records, their model inputs, the probabilities and the item embeddings (None, or NaN rows, where not
        computed): batch drift (`drift.DriftAccumulator.observe`) reads them."""
        records = list(records)
        if attributions:
            check_target(target, self.classifier.label_names)
        texts = self.item_texts(records)
        with self._lock:
            windows = self.classifier.make_windows(texts)
            p, g, vectors = self._probabilities(records, texts, batch_size, windows)
            outcomes, label_sets = self.classifier.decide(p, g)
            attrs = (attribute_many(self.classifier, texts, target=target, n_steps=n_steps, text_view=self.text_view,
                                    windows=windows, coverage=self.attribution_coverage,
                                    **self._cache_args("attribution"))
                     if attributions else [None] * len(texts))  # fmt: skip
        warnings = familiarity.check(records, texts, self.profile, vectors)
        names = self.classifier.label_names
        predictions = [
            ItemPrediction(
                letter_id=str(r.get("letter_id") or BARE_TEXT_ID),
                item_index=int(r.get("item_index") or 1),
                request=str(r.get("request") or ""),
                outcome=outcomes[i],
                p_overturned=float(p[i]),
                guidelines={n: float(v) for n, v in zip(names, np.asarray(g[i]))},
                guideline_labels=tuple(label_sets[i]),
                attributions=attrs[i],
                letter_decision=r.get("decision"),
                source=str(r.get("source") or "<text>"),
                warnings=warnings[i],
            )
            for i, r in enumerate(records)
        ]
        if observe is not None:
            observe(records, texts, p, vectors)
        return predictions

    def _probabilities(self, records: Sequence[dict], texts: list[str], batch_size: int,
                       windows) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:  # fmt: skip
        """`classifier.predict_proba` on `texts`' `windows`, plus the item embeddings the distance check reads
        (None when not needed; NaN rows for items whose embedding was not computed)."""
        if self.onnx_distance not in ONNX_DISTANCE:
            raise ValueError(f"onnx_distance is {self.onnx_distance!r}; valid: {', '.join(ONNX_DISTANCE)}")
        clf = self.classifier
        own = self.profile is not None and self.forward is None  # the torch pass gives the embeddings too
        o, g, *window_means = clf.window_item_logits(windows, texts, forward=self.forward, vectors=own,
                                                     batch_size=batch_size, batch_tokens=self._batch_tokens(batch_size),
                                                     **self._cache_args("windows"))  # fmt: skip
        p, g = clf.probabilities(o, g)
        if own:
            return p, g, familiarity.item_vectors(windows, window_means[0], len(texts))
        if self.profile is None or self.onnx_distance == "off":
            return p, g, None
        items = [i for i, r in enumerate(records) if self.onnx_distance == "all" or not familiarity.is_letter_record(r)]
        vectors = np.full((len(texts), self.profile.hidden_size), np.nan)
        if items:
            sub = windows.select(items)
            vectors[items] = familiarity.item_vectors(sub, familiarity.window_vectors(clf, sub, batch_size), len(items))
        return p, g, vectors

    def _batch_tokens(self, batch_size: int) -> int:
        return batch_size * TOKENS_PER_WINDOW["cpu" if torch_device(self.classifier).type == "cpu" else "gpu"]

    def _cache_args(self, kind: str) -> dict:
        """The `cache` / `cache_key` arguments for `kind` of results ("windows", "attribution"); {} without a cache."""
        if self.window_cache is None or not self.model_digest:
            return {}
        onnx = getattr(self.forward, "path", None) if kind == "windows" else None  # attributions: always torch
        mode = devices.precision(self.device) if onnx is None else "onnx"
        key = "|".join((kind, self.model_digest, Path(onnx).name if onnx is not None else "torch", self.device, mode))
        return {"cache": self.window_cache, "cache_key": key}

    def metadata(self) -> dict:
        """What is loaded: URI, backend, labels, windows, calibration, stored metrics (no weights)."""
        cfg = self.classifier.config
        return {
            "uri": self.uri,
            "path": str(self.path),
            "backend": self.backend,
            "device": self.device,
            "precision": devices.precision(self.device) if self.backend == "torch" else "fp32",
            **self.info,
            "version": cfg.version,
            "backbone": cfg.backbone,
            "text_view": cfg.text_view,
            "pooling": cfg.pooling,
            "guideline_pooling": GUIDELINE_POOLING,
            "window_unit": cfg.window_unit,
            "citation_cues": len(cfg.cue_names),  # 0 = the guideline head has no cue term
            "evidence_cues": len(cfg.outcome_cue_names),  # 0 = the outcome head has no cue term
            "guideline_tfidf_terms": len(self.classifier.tfidf) if self.classifier.tfidf is not None else 0,
            "max_length": cfg.max_length,
            "stride": cfg.stride,
            "outcome_labels": list(DECISIONS),
            "guideline_labels": self.classifier.label_names,
            "calibration": self.classifier.calibration_dict(),
            "familiarity": self.familiarity_info(),
            "metrics": self.classifier.metrics,
        }

    def familiarity_info(self) -> dict:
        """Which input checks run (`imr_model.familiarity`) and their thresholds."""
        prof = self.profile
        checks = [familiarity.STRUCTURE]
        if prof is not None:
            checks += ([familiarity.DISTANCE] if self.forward is None or self.onnx_distance != "off" else []) + [familiarity.LENGTH]
        info = {"profile": prof is not None, "checks": checks}
        if prof is not None:
            info.update(distance_threshold=prof.distance_threshold, min_words=prof.min_words, n_items=prof.n_items)
            if self.forward is not None and self.onnx_distance != "off":
                info["distance_items"] = "all" if self.onnx_distance == "all" else "not parsed from a letter"
        return info

    def identity(self) -> str:
        """A short string that changes when the model or backend changes (used to guard resumed outputs)."""
        cfg = self.classifier.config
        identity = f"{self.info.get('resolved_uri', self.uri)}|{cfg.version}|{cfg.data_digest}|{self.backend}"
        mode = devices.precision(self.device) if self.backend == "torch" else "fp32"
        return identity if mode == "fp32" else f"{identity}|{mode}"  # half-precision outputs differ slightly


def torch_device(classifier) -> torch.device:
    """The device a classifier's network is on (the CPU for objects without one)."""
    return torch.device(getattr(classifier, "device", "cpu"))


def backend_device(backend: str, spec: str | None):
    """The torch device for `spec` (None = auto) with `backend`: ONNX Runtime sessions run on the CPU."""
    if backend != "onnx":
        return devices.resolve_device(spec)
    if spec is not None and devices.check_device_spec(spec) not in ("auto", "cpu"):
        raise devices.DeviceError(f"the onnx backend runs on the CPU (ONNX Runtime), not on {spec!r}; use "
                                  "--backend torch for a GPU, or --device cpu")  # fmt: skip
    return torch.device("cpu")


# --------------------------------------------------------------------------- model resolution / cache

_CACHE: dict[tuple[str, str, str], Predictor] = {}
_CACHE_LOCK = threading.Lock()


def resolve_model_uri(model: str | os.PathLike | None = None) -> str:
    """The model to use: `model`, else $IMR_MODEL_URI, else the champion alias, else the newest ./models dir."""
    if model is not None and str(model).strip():
        return str(model)
    if os.environ.get(MODEL_ENV, "").strip():
        return os.environ[MODEL_ENV].strip()
    tried = ["argument model=None", f"${MODEL_ENV} unset"]
    if _registry_configured():
        try:
            _registry_version(CHAMPION_URI)
            return CHAMPION_URI
        except Exception as exc:  # noqa: BLE001 - any registry failure means "not there", try the next place
            tried.append(f"{CHAMPION_URI}: {type(exc).__name__}")
    else:
        tried.append(f"{CHAMPION_URI}: no MLflow tracking URI configured")
    newest = _newest_model_dir(MODELS_DIR)
    if newest is not None:
        return str(newest)
    tried.append(f"no model directory under {MODELS_DIR.resolve()}")
    raise ModelNotFoundError("no model found; tried: " + "; ".join(tried) + ". Pass model=PATH_OR_URI or train one.")


def load_model(model: str | os.PathLike | Predictor | None = None, *, backend: str = "torch",
               device: str | None = None) -> Predictor:  # fmt: skip
    """Resolve, load and cache a model (once per process, backend and device); thread-safe.

    `device`: a `devices.resolve_device` spec (None = ``auto``: CUDA, else MPS, else the CPU; the ONNX backend
    always runs on the CPU). A `Predictor` passed as `model` is returned as it is, on its own device.
    """
    if isinstance(model, Predictor):
        return model
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    target = backend_device(backend, device)  # an unavailable device fails before the model is resolved
    uri = resolve_model_uri(model)
    key = (uri, backend, str(target))
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = _load(uri, backend, target)
        return _CACHE[key]


def clear_cache() -> None:
    """Forget loaded models (tests; or to pick up a newly promoted champion)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _load(uri: str, backend: str, device=None) -> Predictor:
    info: dict = {}
    if not Path(uri).exists() and not _URI_SCHEME.match(uri):
        raise ModelNotFoundError(f"model {uri!r} is neither an existing directory nor an MLflow URI (models:/, runs:/, ...)")
    if uri.startswith("models:/"):
        configure()
        info["resolved_uri"] = _registry_version(uri)
    try:
        path = resolve_model_dir(uri)
    except FileNotFoundError as exc:
        raise ModelNotFoundError(str(exc)) from None
    classifier = IMRClassifier.from_pretrained(path, device=device if device is not None else "cpu")
    profile = familiarity.load_profile(path)
    if profile is None:
        logger.warning("model %s has no %s: predictions skip the distance and length input checks",
                       uri, familiarity.PROFILE_FILE)  # fmt: skip
    elif profile.hidden_size != int(classifier.net.encoder.config.hidden_size):
        raise ValueError(f"{path / familiarity.PROFILE_FILE} has {profile.hidden_size} dimensions but the encoder "
                         f"{classifier.net.encoder.config.hidden_size}")  # fmt: skip
    forward = None
    if backend == "onnx":
        forward = onnx_forward(classifier, path)
    return Predictor(classifier=classifier, uri=uri, path=path, backend=backend, forward=forward, info=info, profile=profile,
                     window_cache=shared_cache(), model_digest=model_identity(path))  # fmt: skip


def _newest_model_dir(base: Path) -> Path | None:
    if not base.is_dir():
        return None
    dirs = [p.parent for p in base.glob("*/model.safetensors")]
    return max(dirs, key=lambda p: (p / "model.safetensors").stat().st_mtime) if dirs else None


def _registry_configured() -> bool:
    # Only consult the registry when one is configured: probing would otherwise create ./mlflow.db.
    return any(os.environ.get(v) for v in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")) or Path("mlflow.db").exists()


def _registry_version(uri: str) -> str:
    """'models:/name@alias' → 'models:/name/<version>' (raises when the alias does not exist)."""
    from mlflow import MlflowClient  # deferred: ~1 s to import; only models:/ URIs need it (as in tracking)

    configure()
    body = uri[len("models:/") :]
    if "@" not in body:
        return uri
    name, alias = body.split("@", 1)
    version = MlflowClient().get_model_version_by_alias(name, alias).version
    return f"models:/{name}/{version}"


# --------------------------------------------------------------------------- inputs → item records


def as_records(x: Letter | str | os.PathLike | dict) -> list[dict]:
    """Item records for a `Letter`, a letter file path, a letter's text, a bare item text or an item dict.

    Files are parsed in a worker process under the parse budget (`letters.parse_many`), so a
    decompression bomb or a hang raises a `LetterError` instead of taking the caller down.
    """
    return _records_many([x])[0]


def _records_many(inputs: Sequence) -> list[list[dict]]:
    """`as_records` for each input; the files among them are parsed together, in isolated workers."""
    paths = {i: Path(x.strip() if isinstance(x, str) else x) for i, x in enumerate(inputs) if _is_path_input(x)}
    parsed = dict(zip(paths, parse_many(list(paths.values())))) if paths else {}
    out = []
    for i, x in enumerate(inputs):
        if i in parsed:
            if isinstance(parsed[i], LetterError):
                raise parsed[i]
            out.append(parsed[i].item_records())
        else:
            out.append(_non_file_records(x))
    return out


def _is_path_input(x) -> bool:
    if isinstance(x, os.PathLike):
        return True
    return isinstance(x, str) and len(x) <= MAX_TEXT_CHARS and _looks_like_path(x)


def _non_file_records(x) -> list[dict]:
    if isinstance(x, Letter):
        return x.item_records()
    if isinstance(x, dict):
        if not any(x.get(k) for k in ("request", "rationale", "case_summary", "text")):
            raise ValueError(f"item dict needs one of request, rationale, case_summary, text; got keys {sorted(x)}")
        return [{"letter_id": BARE_TEXT_ID, "item_index": 1, **x}]
    if not isinstance(x, str):
        raise TypeError(f"predict() takes a letter path, a letter's text, an item text, a dict or a Letter; got {type(x).__name__}")
    if len(x) > MAX_TEXT_CHARS:
        raise ValueError(f"text has {len(x):,} characters (> {MAX_TEXT_CHARS:,}); not a letter")
    return text_records(x)


def text_records(text: str, *, letter_id: str | None = None, source: str = "<text>") -> list[dict]:
    """Item records of a letter's text, or one bare item when the text is not a letter.

    Never reads files: this is the entry point for untrusted text (the HTTP service).
    """
    if not text.strip():
        raise ValueError("text is empty")
    try:
        return parse_text(text, source=source, letter_id=letter_id).item_records()
    except LetterError:
        return [bare_item_record(text, letter_id=letter_id or BARE_TEXT_ID, source=source)]


def bare_item_record(text: str, *, letter_id: str = BARE_TEXT_ID, source: str = "<text>") -> dict:
    """A one-item record for text that is not a whole letter.

    The text is all there is about the item, so every text view sees it: the rationale views as
    the rationale, the forecast view as the case summary.
    """
    return {"letter_id": letter_id, "item_index": 1, "request": "", "rationale": text, "case_summary": text,
            "text": text, "source": source}


def _with_text_fields(record: dict) -> dict:
    """A record that only has `text` (an item dict, a table) gets the bare-item fields."""
    if any(record.get(k) for k in ("request", "rationale", "case_summary")) or not record.get("text"):
        return record
    return {**record, **{k: v for k, v in bare_item_record(str(record["text"])).items() if k in ("rationale", "case_summary")}}


def _looks_like_path(x: str) -> bool:
    """A one-line string that names an existing file, or ends in .pdf/.txt (spaces allowed: "my letters/a.pdf").

    Meant as a file even when it is missing, so the caller gets "file not found" naming it rather than
    a prediction for the path's characters.
    """
    if "\n" in x or len(x) > 1024 or not x.strip():
        return False
    if Path(x.strip()).suffix.lower() in LETTER_SUFFIXES:
        return True
    try:
        return Path(x).is_file()
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------- public API


def predict(
    x: Letter | str | os.PathLike | dict,
    model: str | os.PathLike | Predictor | None = None,
    attributions: bool = False,
    *,
    target: str = OUTCOME,
    n_steps: int = DEFAULT_STEPS,
    backend: str = "torch",
    device: str | None = None,
) -> list[ItemPrediction]:
    """Predict every item of one letter (path or text), or one bare item text.

    `device`: where the model runs (`load_model`; None = auto). Raises `LetterError` (naming the file) for
    unreadable files, `ModelNotFoundError` when no model resolves, `devices.DeviceError` for a device not here.
    """
    predictor = load_model(model, backend=backend, device=device)
    return predictor.predict_records(as_records(x), attributions=attributions, target=target, n_steps=n_steps)


def predict_batch(
    inputs: Iterable[Letter | str | os.PathLike | dict],
    model: str | os.PathLike | Predictor | None = None,
    attributions: bool = False,
    *,
    target: str = OUTCOME,
    n_steps: int = DEFAULT_STEPS,
    batch_size: int = 32,
    backend: str = "torch",
    device: str | None = None,
) -> list[list[ItemPrediction]]:
    """`predict` for many inputs with shared batches; one list of item predictions per input, in order."""
    predictor = load_model(model, backend=backend, device=device)
    groups = _records_many(list(inputs))
    flat = [r for g in groups for r in g]
    preds = predictor.predict_records(flat, attributions=attributions, target=target, n_steps=n_steps, batch_size=batch_size)
    out, pos = [], 0
    for g in groups:
        out.append(preds[pos : pos + len(g)])
        pos += len(g)
    return out
