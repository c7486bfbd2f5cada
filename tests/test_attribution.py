"""Layer integrated gradients: completeness, word merging, window pooling, targets, a planted token."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imr_model.attribution import attribute, merge_words
from imr_model.pooling import POOLINGS, window_weights
from imr_model.modeling import IMRClassifier

from inference_helpers import LABELS, PLANTED, planted_texts, tiny_model, train_planted

TEXTS = [
    "The request for physical therapy is medically necessary per the guidelines.",
    "Acupuncture was tried before without functional improvement, so more sessions are not indicated.",
    "ODG recommends a home exercise program; the records show no objective gains.",
]


@pytest.fixture(scope="module")
def clf(tmp_path_factory) -> IMRClassifier:
    return IMRClassifier.from_pretrained(tiny_model(tmp_path_factory.mktemp("attr") / "m", seed=3))


def _baseline_logits(clf: IMRClassifier, text: str, column: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-window logits of the input and of its [CLS] [PAD]… [SEP] baseline, computed independently."""
    w = clf.make_windows([text])
    special = (w.offsets == 0).all(dim=-1)
    base = torch.where(special, w.input_ids, torch.full_like(w.input_ids, clf.tokenizer.pad_token_id))
    with torch.no_grad():
        outs = [clf.net(ids, w.attention_mask) for ids in (w.input_ids, base)]
    pick = (lambda o: o[0]) if column is None else (lambda o: o[1][:, column])
    return pick(outs[0]).numpy(), pick(outs[1]).numpy()


@pytest.mark.parametrize("text", TEXTS)
def test_completeness_single_window(clf, text):
    a = attribute(clf, text, n_steps=32)
    fx, fb = _baseline_logits(clf, text)
    assert len(fx) == 1
    total = sum(w.score for w in a.words)
    expected = float(fx[0] - fb[0])
    assert abs(expected) > 1e-4  # the check below would be vacuous on a zero difference
    assert total == pytest.approx(expected, abs=2e-3 + 0.02 * abs(expected))
    assert total - expected == pytest.approx(a.delta, abs=1e-4)  # delta is Captum's completeness gap
    # the logit the attribution explains is the one predict() pools
    o, _ = clf.predict_logits([text])
    assert float(o[0]) == pytest.approx(float(fx[0]), abs=1e-4)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_completeness_over_windows(tmp_path, pooling):
    clf = IMRClassifier.from_pretrained(tiny_model(tmp_path / "m", seed=5, pooling=pooling))
    text = " ".join(TEXTS * 3)  # ~110 tokens: 3 overlapping windows of 64
    fx, fb = _baseline_logits(clf, text)
    assert len(fx) >= 2
    a = attribute(clf, text, n_steps=48)
    weights = window_weights(len(fx), pooling)
    expected = float((weights * (fx - fb)).sum())
    assert sum(w.score for w in a.words) == pytest.approx(expected, abs=2e-3 + 0.02 * abs(expected))
    if pooling == "last":  # only the last window is attributed: words before it score exactly 0
        assert any(w.score == 0.0 for w in a.words)


def test_words_are_whitespace_words_with_offsets(clf):
    text = "Decision:  the  request (x4) is  medically-necessary.\nEnd"
    a = attribute(clf, text, n_steps=8)
    assert [w.word for w in a.words] == text.split()
    assert all(text[w.start : w.end] == w.word for w in a.words)
    assert a.text == text and a.n_steps == 8 and a.text_view == clf.config.text_view


def test_merge_words_sums_subwords_and_skips_specials():
    text = "alpha betagamma"
    offsets = np.array([[[0, 0], [0, 5], [6, 10], [10, 15], [0, 0]]])  # [CLS] alpha beta ##gamma [SEP]
    scores = np.array([[9.0, 1.0, 0.25, 0.5, 9.0]])
    words = merge_words(text, scores, offsets)
    assert [(w.word, w.start, w.end, w.score) for w in words] == [("alpha", 0, 5, 1.0), ("betagamma", 6, 15, 0.75)]


def test_window_weights_are_the_poolings_gradient():
    """window_weights (what attributions weight windows by) is d(item)/d(window) of pooling.pool, for every pooling."""
    from imr_model.pooling import pool

    assert window_weights(3, "last").tolist() == [0.0, 0.0, 1.0]
    assert window_weights(3, "mean").tolist() == pytest.approx([1 / 3] * 3)
    assert window_weights(3, "mean_last").tolist() == pytest.approx([1 / 3, 1 / 3, 4 / 3])
    for mode in POOLINGS:
        z = torch.tensor([0.3, -1.0, 2.0, 0.5], dtype=torch.float64, requires_grad=True)
        pool(z, torch.zeros(4, dtype=torch.long), 1, mode).sum().backward()
        assert z.grad.numpy() == pytest.approx(window_weights(4, mode))
    with pytest.raises(ValueError, match="valid: last, mean, mean_last"):
        window_weights(3, "max")


def test_guideline_target_and_invalid_target(clf):
    label = LABELS[1]
    a = attribute(clf, TEXTS[0], target=label)
    fx, fb = _baseline_logits(clf, TEXTS[0], column=1)
    assert a.target == label
    assert sum(w.score for w in a.words) == pytest.approx(float(fx[0] - fb[0]), abs=2e-3 + 0.02 * abs(float(fx[0] - fb[0])))
    with pytest.raises(ValueError, match="valid: 'outcome' or a guideline label"):
        attribute(clf, TEXTS[0], target="not_a_label")
    with pytest.raises(ValueError, match="n_steps must be >= 2"):
        attribute(clf, TEXTS[0], n_steps=1)


def test_parameters_are_restored(clf):
    before = [p.requires_grad for p in clf.net.parameters()]
    attribute(clf, TEXTS[1], n_steps=4)
    assert [p.requires_grad for p in clf.net.parameters()] == before
    assert all(p.grad is None for p in clf.net.parameters())


@pytest.mark.slow
def test_planted_token_ranks_first(tmp_path):
    clf = IMRClassifier.from_pretrained(train_planted(tmp_path / "planted"))
    texts, y = planted_texts(24, seed=123)
    p, _ = clf.predict_proba(texts)
    assert ((p > 0.5) == y).mean() >= 0.95, "the planted model did not learn its rule; the test would be meaningless"
    for text in [t for t, label in zip(texts, y) if label][:6]:
        a = attribute(clf, text)
        top = a.top(1)[0]
        assert top.word == PLANTED, f"top word {top.word!r} (score {top.score:.3f}), expected {PLANTED!r}"
        assert top.score > 0  # it pushes towards Overturned
        assert a.top(1, by="positive")[0].word == PLANTED


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_completeness_with_sentence_windows(tmp_path, pooling):
    """Sentence windows: the pooled window is one sentence; offsets still index the whole text."""
    clf = IMRClassifier.from_pretrained(tiny_model(tmp_path / "m", seed=7, pooling=pooling, window_unit="sentences"))
    text = " ".join(TEXTS)
    fx, fb = _baseline_logits(clf, text)
    assert len(fx) >= 2  # several sentences → several windows
    a = attribute(clf, text, n_steps=48)
    weights = window_weights(len(fx), pooling)
    expected = float((weights * (fx - fb)).sum())
    assert sum(w.score for w in a.words) == pytest.approx(expected, abs=2e-3 + 0.02 * abs(expected))
    scored = [w for w in a.words if w.score != 0.0]
    assert scored and all(text[w.start : w.end] == w.word for w in scored)
    if pooling == "last":  # only the last sentence is attributed
        last_start = text.rindex(TEXTS[-1])
        assert all(w.start >= last_start for w in scored)


def test_attribute_many_equals_one_at_a_time(tmp_path):
    """Batching items into shared passes changes nothing but speed (rows are independent)."""
    from imr_model.attribution import attribute_many

    clf = IMRClassifier.from_pretrained(tiny_model(tmp_path / "m", seed=3, pooling="mean_last", window_unit="sentences"))
    texts = [TEXTS[0], " ".join(TEXTS), TEXTS[2] + " " + TEXTS[1]]
    many = attribute_many(clf, texts, n_steps=16, batch_tokens=600)  # small budget: several groups
    for text, got in zip(texts, many):
        one = attribute(clf, text, n_steps=16)
        assert [w.word for w in got.words] == [w.word for w in one.words]
        assert np.allclose([w.score for w in got.words], [w.score for w in one.words], atol=1e-5)
        assert got.delta == pytest.approx(one.delta, abs=1e-5)
    assert attribute_many(clf, [], n_steps=16) == []


def test_evidence_term_goes_to_the_words_that_made_it(tmp_path):
    """model.outcome_cues: completeness covers pooled windows + v·e(text); a pattern's share lands on its match."""
    from imr_model.cues import evidence_matrix, evidence_names

    path = tiny_model(tmp_path / "m", seed=4, pooling="mean_last", window_unit="sentences", outcome_cues=True)
    clf = IMRClassifier.from_pretrained(path)
    names = evidence_names()
    v = np.zeros(len(names))
    v[names.index("evidence:unclear")], v[names.index("log_words")] = -3.0, 0.2
    with torch.no_grad():
        clf.net.outcome_cues.weight.copy_(torch.as_tensor(v, dtype=torch.float32).view(1, -1))
    text = " ".join(TEXTS) + " The benefit is unclear."
    fx, fb = _baseline_logits(clf, text)
    a = attribute(clf, text, n_steps=48)
    term = float(evidence_matrix([text])[0] @ v)
    assert abs(term) > 0.5  # the check below would not see a missing term
    expected = float((window_weights(len(fx), "mean_last") * (fx - fb)).sum()) + term
    assert sum(w.score for w in a.words) == pytest.approx(expected, abs=2e-3 + 0.02 * abs(expected))
    o, _ = clf.predict_logits([text])  # the logit explained is the one predict() gives
    assert float(o[0]) == pytest.approx(float((window_weights(len(fx), "mean_last") * fx).sum()) + term, abs=1e-4)
    plain = IMRClassifier.from_pretrained(path)  # same windows part, no evidence weights
    gap = {w.start: w.score for w in a.words}
    for w in attribute(plain, text, n_steps=48).words:
        gap[w.start] -= w.score
    unclear = text.rindex("unclear")
    n_words = len(text.split())
    for start, g in gap.items():  # each word: its log_words share, and "unclear." also the pattern's whole share
        share = 0.2 * np.log(n_words) / n_words + (-3.0 * np.log(2) if start == unclear else 0.0)
        assert g == pytest.approx(share, abs=1e-4)


def test_windows_say_which_were_attributed(tmp_path):
    """Every window is listed with its weight; under `last` pooling only the last is attributed and the others
    contribute exactly 0; an attributed window's words add up to its contribution (up to its delta)."""
    clf = IMRClassifier.from_pretrained(tiny_model(tmp_path / "m", seed=7, pooling="last", window_unit="sentences"))
    text = " ".join(TEXTS)
    a = attribute(clf, text, n_steps=32)
    assert len(a.windows) == 3
    assert [w.attributed for w in a.windows] == [False, False, True]
    assert [w.weight for w in a.windows] == [0.0, 0.0, 1.0] and a.windows[0].contribution == 0.0
    assert a.unattributed == 0.0
    last = a.windows[-1]
    assert text[last.start : last.end] == TEXTS[-1]
    fx, fb = _baseline_logits(clf, text)
    assert last.contribution == pytest.approx(float(fx[-1] - fb[-1]), abs=1e-4)
    scored = sum(w.score for w in a.words)
    assert scored == pytest.approx(last.contribution + a.delta, abs=1e-6)
    assert a.to_dict()["windows"][-1]["attributed"] is True


def test_coverage_attributes_only_the_deciding_windows(tmp_path):
    """coverage < 1: the fewest windows carrying that share of Σ|contribution| are integrated; the others are
    flagged, their words score 0, and words + unattributed still add up to the item's logit difference."""
    clf = IMRClassifier.from_pretrained(tiny_model(tmp_path / "m", seed=7, pooling="mean", window_unit="sentences"))
    text = " ".join(TEXTS * 2)
    fx, fb = _baseline_logits(clf, text)
    weights = window_weights(len(fx), "mean")
    contribution = weights * (fx - fb)
    full = attribute(clf, text, n_steps=32)
    assert all(w.attributed for w in full.windows)
    part = attribute(clf, text, n_steps=32, coverage=0.6)
    flags = np.array([w.attributed for w in part.windows])
    assert 0 < flags.sum() < len(flags)
    size = np.abs(contribution)
    assert size[flags].sum() >= 0.6 * size.sum() - 1e-6
    assert size[flags].min() >= size[~flags].max() - 1e-6  # the largest ones were kept
    assert part.unattributed == pytest.approx(float(contribution[~flags].sum()), abs=1e-4)
    for w in part.words:
        if not any(s.start <= w.start < s.end for s, on in zip(part.windows, flags) if on):
            assert w.score == 0.0
    total = sum(w.score for w in part.words) - part.delta + part.unattributed
    assert total == pytest.approx(float(contribution.sum()), abs=1e-4)
    with pytest.raises(ValueError, match="coverage must be in"):
        attribute(clf, text, coverage=0.0)


def test_repeated_windows_are_integrated_once_and_cached(tmp_path):
    """The same sentence in several items is integrated once; a cache carries its scores to later calls."""
    from imr_model.attribution import attribute_many
    from imr_model.window_cache import WindowCache

    clf = IMRClassifier.from_pretrained(tiny_model(tmp_path / "m", seed=3, pooling="last", window_unit="sentences"))
    texts = [TEXTS[0] + " " + TEXTS[2], TEXTS[1] + " " + TEXTS[2]]  # the same last sentence
    cache = WindowCache()
    first = attribute_many(clf, texts, n_steps=16, cache=cache, cache_key="m")
    assert len(cache) == 1 and cache.stats()["misses"] == 1
    one = attribute(clf, texts[1], n_steps=16)
    assert np.allclose([w.score for w in first[1].words], [w.score for w in one.words], atol=1e-5)
    again = attribute_many(clf, texts, n_steps=16, cache=cache, cache_key="m")
    assert cache.stats()["hits"] == 1
    assert [w.score for w in again[0].words] == [w.score for w in first[0].words]
    attribute_many(clf, texts, n_steps=8, cache=cache, cache_key="m")  # other steps: not the same result
    assert cache.stats()["hits"] == 1
