"""The window cache (imr_model.window_cache), token-budget batches and the fast window maker: same outputs, less work."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imr_model import familiarity, inference, windows as windows_module
from imr_model.modeling import IMRClassifier
from imr_model.window_cache import WindowCache, model_identity

from inference_helpers import tiny_model

BOILERPLATE = "The request is not medically necessary per the guidelines."
LETTER_A = [f"Patient A reports knee pain after a fall in {y}. {BOILERPLATE}" for y in (2014, 2015)]
LETTER_B = [f"Patient B had lumbar surgery in {y} and asks for more therapy. {BOILERPLATE}" for y in (2012, 2013)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("cache") / "m", seed=3, window_unit="sentences", pooling="mean_last")


@pytest.fixture(scope="module")
def clf(model_dir) -> IMRClassifier:
    return IMRClassifier.from_pretrained(model_dir)


def test_lru_bounded_counts_hits_and_keys_by_model():
    cache = WindowCache(max_entries=2)
    cache.store("m1", [b"a", b"b"], [1, 2])
    assert cache.lookup("m1", [b"a", b"x"]) == [1, None]  # a is now the most recent
    cache.store("m1", [b"c"], [3])  # evicts b, the least recently used
    assert len(cache) == 2 and cache.lookup("m1", [b"b", b"a", b"c"]) == [None, 1, 3]
    assert cache.lookup("m2", [b"a", b"c"]) == [None, None]  # another model never hits
    assert cache.stats() == {"entries": 2, "max_entries": 2, "hits": 3, "misses": 4, "hit_rate": 3 / 7}
    cache.clear()
    assert len(cache) == 0 and cache.stats()["hits"] == 0
    off = WindowCache(max_entries=0)
    off.store("m1", [b"a"], [1])
    assert len(off) == 0 and off.lookup("m1", [b"a"]) == [None]
    with pytest.raises(ValueError, match="max_entries must be >= 0"):
        WindowCache(-1)


def test_repeated_windows_hit_across_chunks_with_identical_outputs(clf):
    cache = WindowCache()
    w_a, w_b = clf.make_windows(LETTER_A), clf.make_windows(LETTER_B)
    first = clf.forward_windows(w_a, cache=cache, cache_key="m")
    assert cache.stats()["hits"] == 0  # the two copies of BOILERPLATE within a chunk are deduplicated, not hits
    second = clf.forward_windows(w_b, cache=cache, cache_key="m")
    assert cache.stats()["hits"] == 1  # chunk 2's BOILERPLATE was run in chunk 1
    for got, w in ((first, w_a), (second, w_b)):
        plain = clf.forward_windows(w)
        for a, b in zip(got, plain):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    again = clf.forward_windows(w_b, cache=cache, cache_key="m")  # all hits: exactly the cached values
    assert all(np.array_equal(a, b) for a, b in zip(again, second))
    before = cache.stats()["hits"]
    clf.forward_windows(w_b, cache=cache, cache_key="another model")
    assert cache.stats()["hits"] == before
    with pytest.raises(ValueError, match="needs a cache_key"):
        clf.forward_windows(w_b, cache=cache)


def test_bounded_cache_still_gives_the_same_outputs(clf):
    cache = WindowCache(max_entries=1)
    for texts in (LETTER_A, LETTER_B, LETTER_A):
        w = clf.make_windows(texts)
        for a, b in zip(clf.forward_windows(w, cache=cache, cache_key="m"), clf.forward_windows(w)):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
        assert len(cache) <= 1


def test_vectors_are_the_guideline_heads_input_and_cached_with_the_logits(clf):
    w = clf.make_windows(LETTER_A + LETTER_B)
    with familiarity.capture_window_vectors(clf) as cap:
        o, g = clf.forward_windows(w)
    cache = WindowCache()
    o2, g2, v = clf.forward_windows(w, vectors=True, cache=cache, cache_key="m")
    np.testing.assert_allclose(v, cap.window_vectors(w), atol=1e-6)
    np.testing.assert_allclose(o2, o, atol=1e-6)
    o3, g3, v3 = clf.forward_windows(w, vectors=True, cache=cache, cache_key="m")
    assert np.array_equal(v3, v) and np.array_equal(o3, o2) and cache.stats()["hits"] > 0
    with pytest.raises(ValueError, match="needs the torch network"):
        clf.forward_windows(w, vectors=True, forward=lambda ids, mask: (None, None))


def test_token_budget_batches_give_the_same_logits(clf):
    texts = LETTER_A + LETTER_B + [" ".join(["A much longer sentence about chronic pain and opioids"] * 5) + "."]
    w = clf.make_windows(texts)
    plain = clf.forward_windows(w, batch_size=2)
    for budget in (1, 40, 100, 10_000):  # 1: one window a pass (at least one always fits)
        for a, b in zip(clf.forward_windows(w, batch_tokens=budget), plain):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_predictor_probabilities_with_cache_on_and_off(model_dir):
    inference.clear_cache()
    predictor = inference.load_model(str(model_dir))
    assert predictor.window_cache is not None and predictor.model_digest
    predictor.window_cache.clear()
    records = [{"letter_id": f"L{i}", "item_index": 1, "rationale": t} for i, t in enumerate(LETTER_A + LETTER_B)]
    chunks = [records[:2], records[2:]]
    on = [p for chunk in chunks for p in predictor.predict_records(chunk)]
    assert predictor.window_cache.stats()["hits"] >= 1
    off = inference.Predictor(classifier=predictor.classifier, uri=predictor.uri, path=predictor.path)
    assert off.window_cache is None
    ref = [p for chunk in chunks for p in off.predict_records(chunk)]
    for a, b in zip(on, ref):
        assert abs(a.p_overturned - b.p_overturned) <= 1e-6
        assert max(abs(a.guidelines[k] - b.guidelines[k]) for k in a.guidelines) <= 1e-6
        assert a.outcome == b.outcome and a.guideline_labels == b.guideline_labels
    inference.clear_cache()


def test_model_identity_tells_models_apart(tmp_path, model_dir):
    other = tiny_model(tmp_path / "other", seed=4, window_unit="sentences", pooling="mean_last")
    assert model_identity(model_dir) == model_identity(model_dir)
    assert model_identity(model_dir) != model_identity(other)
    assert model_identity(model_dir, "onnx") != model_identity(model_dir, "torch")


def test_fast_windows_equal_the_tokenizer_call(clf, monkeypatch):
    """make_windows reads the Rust encodings directly; the windows equal those of transformers' own call."""
    long = " ".join(["word"] * 150) + ". Short one here, ok. " + "Ünïcode café — naïve résumé?! (x4) [MASK] end"
    texts = LETTER_A + [long, "", "   ", "no end mark"]
    fast = clf.make_windows(texts)
    monkeypatch.setattr(windows_module, "_backend", lambda *args: None)  # the tokenizer(...) path
    slow = clf.make_windows(texts)
    for field in ("input_ids", "attention_mask", "item_ids", "offsets"):
        assert torch.equal(getattr(fast, field), getattr(slow, field)), field
    assert int(fast.attention_mask.sum(dim=1).max()) == clf.config.max_length  # the long sentence overflowed
    backend = clf.tokenizer.backend_tokenizer.truncation
    clf.make_windows(texts)  # the tokenizer's own settings are left alone
    assert clf.tokenizer.backend_tokenizer.truncation == backend
