"""ONNX Runtime backend (`--backend onnx`): the `IMRNet` forward exported to ONNX, int8-quantized.

`export_onnx` exports the network (inputs ``input_ids``/``attention_mask`` with dynamic batch and
sequence axes; outputs the window outcome logit and guideline logits) with the dynamo exporter,
then `quantize` applies dynamic int8 quantization (int8 weights with one scale per output channel,
activations quantized per batch at run time: the VNNI instructions of these CPUs do the int8 dot
products). Tokenization, windowing,
pooling and calibration stay in Python (`IMRClassifier`), so both backends share everything but the
matrix arithmetic. `compare` reports how far the int8 path moves the probabilities.

Exported files are cached per model content (``$IMR_CACHE_DIR`` or ``~/.cache/imr_model/onnx/<digest>``):
an MLflow model is downloaded to a new temporary folder each time, so its own folder is no cache.

onnx, onnxruntime and onnxscript (the exporter's) are the `[onnx]` extra: without them the entry points
raise `extras.MissingExtraError` (``pip install 'imr-model[onnx]'``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from imr_model.examples import example_records
from imr_model.extras import require
from imr_model.modeling import CONFIG_FILE, WEIGHTS_FILE
from imr_model.views import text_view

FEATURE = "--backend onnx"
EXTRA_MODULES = ("onnx", "onnxruntime", "onnxscript")
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAMES = ("outcome_logits", "guideline_logits")
# The names change with the export and quantization settings, so exports made with older settings are not reused.
FP32_FILE = "imr_net.eager.onnx"
INT8_FILE = "imr_net.eager.int8-per-channel-7bit.onnx"
#: ONNX Runtime graph fusions left out: its fused SkipLayerNormalization kernel was the slowest part of the int8 graph
#: after the matrix products (19% of kernel time on the shared letters' windows, Intel Xeon with AVX-512 VNNI);
#: without it (Add + LayerNormalization) the 1,566 windows ran in 1.19 s against 1.43 s (docs/experiments.md, "Session 19").
DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)
_EXPORT_LOCK = threading.Lock()
logger = logging.getLogger(__name__)


def require_onnx() -> None:
    """Raise `MissingExtraError` (naming ``imr-model[onnx]``) unless the `[onnx]` extra is installed."""
    for module in EXTRA_MODULES:
        require(module, "onnx", FEATURE)


def cache_dir(model_dir: Path) -> Path:
    """Per-model cache folder, keyed by a digest of the weights and config."""
    h = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        with (model_dir / name).open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    base = Path(os.environ.get("IMR_CACHE_DIR") or Path.home() / ".cache" / "imr_model")
    return base / "onnx" / h.hexdigest()[:16]


def export_onnx(classifier, path: str | Path) -> Path:
    """Export `classifier.net` to `path` (fp32) with dynamic (batch, sequence) axes.

    A copy of the network is exported with transformers' eager attention (the classifier's own network is left as it
    is): SDPA exports add a NaN guard (IsNaN + Where) after every attention softmax. In the session `OnnxForward`
    opens, the eager int8 graph ran the shared letters' windows in 1.19 s against 1.25 s for the SDPA one (same
    weights; fp32 logits equal to the torch network's to 4 decimals; docs/experiments.md, "Session 19")."""
    require_onnx()  # torch's dynamo exporter builds the graph with onnxscript and onnx
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    net = copy.deepcopy(classifier.net).eval()
    if callable(getattr(net.encoder, "set_attn_implementation", None)):
        net.encoder.set_attn_implementation("eager")
    enc = classifier.tokenizer(["synthetic export sample text", "a second, somewhat longer synthetic sample text"],
                               padding=True, return_tensors="pt")  # fmt: skip
    args = (enc["input_ids"].long(), enc["attention_mask"].long())
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("seq", min=2, max=int(classifier.config.max_length))
    tmp = path.with_name(path.name + ".tmp")
    with torch.no_grad():
        program = torch.onnx.export(
            net,
            args,
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
            dynamo=True,
            external_data=False,
        )
    program.save(str(tmp), external_data=False)
    os.replace(tmp, path)  # a crash never leaves a half-written model under the final name
    return path


def quantize(fp32_path: str | Path, int8_path: str | Path) -> Path:
    """Dynamic int8 quantization of the MatMul/Gemm weights (activations quantized at run time)."""
    require_onnx()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    import onnx

    int8_path = Path(int8_path)
    tmp = int8_path.with_name(int8_path.name + ".tmp")
    stripped = int8_path.with_name(int8_path.name + ".noshapes.tmp")
    model = onnx.load(str(fp32_path))
    # The exporter records intermediate shapes from the sample batch; ONNX shape inference (run by the
    # quantizer) then rejects them against the dynamic axes. Dropping them lets it infer afresh.
    del model.graph.value_info[:]
    onnx.save(model, str(stripped))
    try:
        # Per-channel scales: on the shared letters' test split this cut max |Δp| from 0.016 to 0.005 and
        # ΔAUROC from -0.012 to 0.000 versus one scale per tensor, at the same speed.
        # reduce_range (7-bit weights): on x86 CPUs without VNNI (AVX2 only, e.g. the AMD EPYC this project's CI
        # ran on in session 17) ORT's u8 x s8 kernel sums pairs of products in int16 and saturates; there the
        # full-range weights moved the guideline probabilities of tests/test_onnx.py's model by up to 0.126 and
        # the outcome by 0.019, the 7-bit ones by 0.003 and 0.0001 (ORT's documented remedy; docs/experiments.md).
        quantize_dynamic(str(stripped), str(tmp), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
                         op_types_to_quantize=["MatMul", "Gemm"])  # fmt: skip
    finally:
        stripped.unlink(missing_ok=True)
    os.replace(tmp, int8_path)
    return int8_path


def ensure_onnx(classifier, model_dir: str | Path, *, int8: bool = True) -> Path:
    """The cached ONNX file for this model, exporting (and quantizing) it on first use."""
    require_onnx()
    folder = cache_dir(Path(model_dir))
    fp32, int8_file = folder / FP32_FILE, folder / INT8_FILE
    with _EXPORT_LOCK:
        if not fp32.exists():
            export_onnx(classifier, fp32)
        if int8 and not int8_file.exists():
            quantize(fp32, int8_file)
    return int8_file if int8 else fp32


class OnnxForward:
    """`modeling.ForwardFn` backed by an ONNX Runtime session (thread-safe: `run` may be called concurrently).

    The session runs each call on one thread and `streams` (default: torch's thread count) calls at once
    (`IMRClassifier.forward_windows` runs that many batches concurrently; measured in `devices.cpu_streams`)."""

    def __init__(self, onnx_path: str | Path, streams: int | None = None):
        ort = require("onnxruntime", "onnx", FEATURE)

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.streams = max(1, int(streams or torch.get_num_threads()))
        self.path = Path(onnx_path)
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"],
                                            disabled_optimizers=list(DISABLED_OPTIMIZERS))  # fmt: skip

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        feeds = {"input_ids": np.asarray(input_ids, dtype=np.int64), "attention_mask": np.asarray(attention_mask, dtype=np.int64)}
        outcome, guidelines = self.session.run(list(OUTPUT_NAMES), feeds)
        return outcome, guidelines


INT8_MAX_DP = 0.01  # largest |Δ P(Overturned)| the int8 model may show against PyTorch on the check texts
INT8_MAX_DP_GUIDELINES = 0.05  # largest |Δ P(label)| of the guideline head (its labels are thresholded at 0.5)
CHECK_FILE = "int8_check.json"


def onnx_forward(classifier, model_dir: str | Path, *, int8: bool = True, max_dp: float = INT8_MAX_DP) -> OnnxForward:
    """Export/quantize if needed and open a session: what `load_model(..., backend="onnx")` uses.

    The int8 model is first checked against PyTorch on the packaged synthetic example items
    (`examples.example_records`, in the model's view):
    if it moves P(Overturned) by more than `max_dp`, or a guideline probability by more than
    `INT8_MAX_DP_GUIDELINES`, the fp32 export is used instead, with a warning.
    Models whose head leans on small differences of the encoder's vectors (the logistic outcome head
    on a frozen encoder: int8 moved P by up to 0.05 on the shared letters' test split) need that.
    The check runs once per model; its result is cached beside the ONNX files.
    """
    require_onnx()  # before any export work
    forward = OnnxForward(ensure_onnx(classifier, model_dir, int8=int8))
    if not int8:
        return forward
    check = int8_check(classifier, forward, cache_dir(Path(model_dir)) / CHECK_FILE)
    if check["max_abs_dp"] <= max_dp and check["max_abs_dp_guidelines"] <= INT8_MAX_DP_GUIDELINES:
        return forward
    logger.warning("int8 ONNX moves P(Overturned) by up to %.3f (limit %.3f) and the guideline probabilities by up to "
                   "%.3f (limit %.3f) on %d check items: using the fp32 ONNX export", check["max_abs_dp"], max_dp,
                   check["max_abs_dp_guidelines"], INT8_MAX_DP_GUIDELINES, check["n"])  # fmt: skip
    return OnnxForward(ensure_onnx(classifier, model_dir, int8=False))


def int8_check(classifier, forward: OnnxForward, path: Path) -> dict:
    """max |Δp| of `forward` against PyTorch on the packaged synthetic example items; cached in `path` (JSON)."""
    if path.is_file():
        cached = json.loads(path.read_text(encoding="utf-8"))
        if cached.get("onnx_file") == forward.path.name:
            return cached
    records = example_records()
    texts = [text_view(r, classifier.config.text_view) for r in records]
    p_torch, g_torch = classifier.predict_proba(texts)
    p_onnx, g_onnx = classifier.predict_proba(texts, forward=forward)
    result = {"onnx_file": forward.path.name, "n": len(texts), "max_abs_dp": float(np.max(np.abs(p_torch - p_onnx))),
              "max_abs_dp_guidelines": float(np.max(np.abs(g_torch - g_onnx)))}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result), encoding="utf-8")
    os.replace(tmp, path)
    return result


def compare(classifier, forward: OnnxForward, texts: Sequence[str], y: Sequence[int] | None = None, batch_size: int = 32) -> dict:
    """Agreement of the ONNX path with PyTorch on `texts`: max |Δp| (outcome and guidelines), ΔAUROC."""
    p_t, g_t = classifier.predict_proba(texts, batch_size=batch_size)
    p_o, g_o = classifier.predict_proba(texts, batch_size=batch_size, forward=forward)
    report = {
        "n": len(texts),
        "max_abs_dp_outcome": float(np.max(np.abs(p_t - p_o))) if len(texts) else 0.0,
        "max_abs_dp_guidelines": float(np.max(np.abs(g_t - g_o))) if len(texts) else 0.0,
        "outcome_agreement": float(np.mean((p_t >= classifier.outcome_threshold) == (p_o >= classifier.outcome_threshold))),
    }
    if y is not None and len(set(int(v) for v in y)) == 2:
        from sklearn.metrics import roc_auc_score

        report["auroc_torch"] = float(roc_auc_score(y, p_t))
        report["auroc_onnx"] = float(roc_auc_score(y, p_o))
        report["delta_auroc"] = report["auroc_onnx"] - report["auroc_torch"]
    return report
