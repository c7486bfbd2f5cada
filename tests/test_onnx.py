"""ONNX Runtime backend: dynamic axes, fp32 exactness, int8 agreement (max |Δp|, ΔAUROC), caching, scoring."""

from __future__ import annotations

import numpy as np
import pytest

from imr_model import inference, onnx_backend
from imr_model.modeling import IMRClassifier
from imr_model.onnx_backend import FP32_FILE, INT8_FILE, OnnxForward, cache_dir, compare, ensure_onnx

from inference_helpers import planted_texts, train_planted

pytestmark = pytest.mark.slow  # training a tiny model and exporting it take ~20 s


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A trained tiny model (so probabilities spread out) and a private export cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("IMR_CACHE_DIR", str(tmp_path_factory.mktemp("onnx-cache")))
    model_dir = train_planted(tmp_path_factory.mktemp("onnx") / "model", steps=150, seed=4)
    clf = IMRClassifier.from_pretrained(model_dir)
    yield model_dir, clf, OnnxForward(ensure_onnx(clf, model_dir, int8=False)), OnnxForward(ensure_onnx(clf, model_dir))
    mp.undo()


def test_fp32_export_matches_torch_for_any_batch_and_length(setup):
    _, clf, fp32, _ = setup
    texts = ["short one", " ".join(["a longer text with many more tokens"] * 8), "middle sized text here and there"]
    for subset in ([texts[0]], texts, texts[1:]):
        w = clf.make_windows(subset)
        o_t, g_t = clf.forward_windows(w)
        o_x, g_x = clf.forward_windows(w, forward=fp32)
        np.testing.assert_allclose(o_x, o_t, atol=1e-4)
        np.testing.assert_allclose(g_x, g_t, atol=1e-4)


def test_export_uses_eager_attention_and_leaves_the_network_alone(setup, tmp_path):
    """The exported graph has no SDPA NaN guard (IsNaN/Where after each softmax); the classifier keeps its attention
    implementation; the session runs without the fused SkipLayerNormalization kernel."""
    import onnx
    import onnxruntime as ort

    _, clf, fp32, _ = setup
    before = clf.net.encoder.config._attn_implementation
    path = onnx_backend.export_onnx(clf, tmp_path / "net.onnx")
    assert clf.net.encoder.config._attn_implementation == before
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "Softmax" in ops and "IsNaN" not in ops

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(fp32.path), options, providers=["CPUExecutionProvider"])
    assert "SkipLayerNormalization" in [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    options.optimized_model_filepath = str(tmp_path / "ours.onnx")  # the same graph as OnnxForward opens it
    ort.InferenceSession(str(fp32.path), options, providers=["CPUExecutionProvider"],
                         disabled_optimizers=list(onnx_backend.DISABLED_OPTIMIZERS))  # fmt: skip
    ours = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    assert "SkipLayerNormalization" not in ours and "LayerNormalization" in ours


def test_int8_agreement(setup):
    _, clf, _, int8 = setup
    texts, y = planted_texts(120, seed=77)
    report = compare(clf, int8, texts, y)
    assert report["auroc_torch"] > 0.9  # a real signal to agree on
    assert abs(report["delta_auroc"]) <= 0.005
    assert report["max_abs_dp_outcome"] < 0.05 and report["max_abs_dp_guidelines"] < 0.05
    assert report["outcome_agreement"] >= 0.97
    assert report["max_abs_dp_outcome"] > 0  # int8 really changed the arithmetic


def test_export_is_cached_per_model(setup):
    model_dir, clf, _, _ = setup
    folder = cache_dir(model_dir)
    stamps = {name: (folder / name).stat().st_mtime_ns for name in (FP32_FILE, INT8_FILE)}
    ensure_onnx(clf, model_dir)
    assert {name: (folder / name).stat().st_mtime_ns for name in stamps} == stamps


def test_onnx_backend_through_predict_and_score(setup, tmp_path):
    model_dir, _, _, _ = setup
    inference.clear_cache()
    texts, _ = planted_texts(6, seed=5)
    torch_p = [inference.predict(t, model=str(model_dir))[0].p_overturned for t in texts]
    onnx_model = inference.load_model(str(model_dir), backend="onnx")
    assert onnx_model.backend == "onnx" and onnx_model.identity().endswith("|onnx")
    onnx_p = [inference.predict(t, model=onnx_model)[0].p_overturned for t in texts]
    np.testing.assert_allclose(onnx_p, torch_p, atol=0.05)

    from imr_model.scoring import score

    table = tmp_path / "items.csv"
    table.write_text("text\n" + "\n".join(texts) + "\n", encoding="utf-8")
    summary = score([table], tmp_path / "out.jsonl", model=str(model_dir), backend="onnx", progress=False)
    assert summary.items == 6 and summary.errors == 0
    inference.clear_cache()


def test_int8_guard_falls_back_to_fp32_when_int8_moves_probabilities(setup):
    """load_model(backend="onnx") checks int8 against PyTorch once per model and keeps fp32 if it drifts."""
    import json

    from imr_model.onnx_backend import CHECK_FILE, onnx_forward

    model_dir, clf, _, _ = setup
    strict = onnx_forward(clf, model_dir, max_dp=0.0)  # any int8 change is too much
    lax = onnx_forward(clf, model_dir, max_dp=1.0)
    check = json.loads((cache_dir(model_dir) / CHECK_FILE).read_text())
    assert check["n"] > 0 and check["max_abs_dp"] > 0 and check["onnx_file"] == INT8_FILE
    assert strict.path.name == FP32_FILE and lax.path.name == INT8_FILE
    assert 0 < check["max_abs_dp_guidelines"] <= onnx_backend.INT8_MAX_DP_GUIDELINES


def test_int8_guard_watches_the_guideline_head_too(setup, monkeypatch):
    """An int8 model within the outcome limit whose guideline probabilities drift is replaced by fp32."""
    model_dir, clf, _, _ = setup
    monkeypatch.setattr(onnx_backend, "INT8_MAX_DP_GUIDELINES", 0.0)
    assert onnx_backend.onnx_forward(clf, model_dir, max_dp=1.0).path.name == FP32_FILE
