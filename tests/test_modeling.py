"""The IMRClassifier contract: windows, pooling, save/load, probabilities, the ONNX-style forward hook."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from imr_model.modeling import (
    CALIBRATION_FILE,
    CONFIG_FILE,
    FORMAT_VERSION,
    GUIDELINE_POOLING,
    WEIGHTS_FILE,
    IMRClassifier,
    IMRNet,
)
from imr_model.pooling import POOLINGS, bias_multiplicity, pool, window_weights

LONG = " ".join(f"word{i}" for i in range(400))
TEXTS = ["The request is medically necessary.", "", LONG, "Not medically necessary per MTUS."]


def test_windows_cover_long_text_with_stride(tiny_classifier):
    cfg = tiny_classifier.config
    w = tiny_classifier.make_windows(TEXTS)
    counts = np.bincount(w.item_ids.numpy(), minlength=len(TEXTS))
    assert counts[0] == 1 and counts[1] == 1 and counts[3] == 1 and counts[2] > 1
    assert counts[2] <= cfg.max_windows
    assert w.input_ids.shape == w.attention_mask.shape and w.offsets.shape == (*w.input_ids.shape, 2)
    assert w.input_ids.shape[1] <= cfg.max_length
    # offsets point back into the source text; special tokens and padding are (0, 0)
    long_rows = torch.nonzero(w.item_ids == 2).squeeze(1)
    first = long_rows[0]
    start, end = w.offsets[first, 1].tolist()
    assert LONG[start:end] == "word"
    assert w.offsets[first, 0].tolist() == [0, 0]
    assert (w.offsets[1, w.attention_mask[1] == 0] == 0).all()


def test_consecutive_windows_overlap_by_stride(tiny_classifier):
    cfg = tiny_classifier.config.model_copy(update={"max_windows": 100})
    clf = IMRClassifier(cfg, tiny_classifier.net, tiny_classifier.tokenizer)
    w = clf.make_windows([LONG])
    a = w.input_ids[0][w.attention_mask[0] == 1][1:-1]  # strip [CLS]/[SEP]
    b = w.input_ids[1][w.attention_mask[1] == 1][1:-1]
    assert torch.equal(a[-cfg.stride :], b[: cfg.stride])


def test_pooling_modes():
    assert POOLINGS == ("last", "mean", "mean_last") and GUIDELINE_POOLING == "mean"
    logits = torch.tensor([1.0, 3.0, -2.0, 0.5])
    items = torch.tensor([0, 0, 1, 2])
    assert pool(logits, items, 3, "mean").tolist() == [2.0, -2.0, 0.5]
    assert pool(logits, items, 3, "last").tolist() == [3.0, -2.0, 0.5]
    assert pool(logits, items, 3, "mean_last").tolist() == [5.0, -4.0, 1.0]
    two_d = torch.tensor([[1.0, 0.0], [0.0, 2.0], [4.0, 4.0]])
    assert pool(two_d, torch.tensor([0, 0, 1]), 2, "last").tolist() == [[0.0, 2.0], [4.0, 4.0]]
    assert pool(two_d, torch.tensor([0, 0, 1]), 2, "mean").tolist() == [[0.5, 1.0], [4.0, 4.0]]
    assert [bias_multiplicity(m) for m in POOLINGS] == [1, 1, 2]
    for retired in ("max", "logsumexp", "median"):
        with pytest.raises(ValueError, match="valid: last, mean, mean_last"):
            pool(logits, items, 3, retired)
        with pytest.raises(ValueError, match="valid: last, mean, mean_last"):
            bias_multiplicity(retired)


@pytest.mark.parametrize("mode", POOLINGS)
def test_pooling_window_logits_is_the_linear_head_on_pooled_vectors(mode):
    """Every pooling is linear: pooling a linear head's window logits = the head on pooled window vectors, its bias
    counted `bias_multiplicity` times (what the logistic head fits rely on)."""
    gen = torch.Generator().manual_seed(1)
    vectors = torch.randn(9, 5, generator=gen, dtype=torch.float64)
    items = torch.tensor([0, 0, 0, 1, 2, 2, 3, 3, 3])  # windows in text order, 1 to 3 per item
    head = torch.nn.Linear(5, 3).double()
    with torch.no_grad():
        window_logits = head(vectors)  # (W, 3)
        pooled = pool(vectors, items, 4, mode) @ head.weight.T + bias_multiplicity(mode) * head.bias
        assert torch.allclose(pool(window_logits, items, 4, mode), pooled, atol=1e-12)
        single = pool(window_logits[:, 0], items, 4, mode)  # 1-D rows pool like a column of the 2-D ones
        assert torch.allclose(single, pooled[:, 0], atol=1e-12)
    if mode != "mean":  # the last window matters: moving it changes the item (a check that could see `mean`)
        shuffled = torch.tensor([1, 0, 2, 3, 4, 5, 6, 8, 7])
        assert not torch.allclose(pool(window_logits[shuffled], items, 4, mode), pool(window_logits, items, 4, mode))


@pytest.mark.parametrize("mode", POOLINGS)
def test_window_weights_are_the_gradient_of_pool(mode):
    """window_weights(n, mode) = d(item)/d(window) by autograd, for each item of a batch of uneven items; an item's
    windows never move another item's pooled value."""
    counts = [1, 3, 2, 4]
    items = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    z = torch.randn(len(items), dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    pooled = pool(z, items, len(counts), mode)
    for i, n in enumerate(counts):
        (grad,) = torch.autograd.grad(pooled[i], z, retain_graph=True)
        own = (items == i).numpy()
        assert grad.numpy()[own] == pytest.approx(window_weights(n, mode), abs=1e-12)
        assert not grad.numpy()[~own].any()
        assert window_weights(n, mode).sum() == pytest.approx(bias_multiplicity(mode))  # a constant shifts it that often
    assert window_weights(3, "last").tolist() == [0.0, 0.0, 1.0]
    assert window_weights(2, "mean_last").tolist() == pytest.approx([0.5, 1.5])


def test_pooled_prediction_equals_per_text_prediction(tiny_classifier):
    """Batching, length sorting and padding must not change any item's logits."""
    o_all, g_all = tiny_classifier.predict_logits(TEXTS, batch_size=2)
    for i, text in enumerate(TEXTS):
        o, g = tiny_classifier.predict_logits([text])
        assert o[0] == pytest.approx(o_all[i], abs=1e-4)
        assert np.allclose(g[0], g_all[i], atol=1e-4)


def test_predict_proba_shapes_and_calibration(tiny_classifier):
    p, P = tiny_classifier.predict_proba(TEXTS)
    assert p.shape == (4,) and P.shape == (4, len(tiny_classifier.label_names))
    assert ((p >= 0.001) & (p <= 0.999)).all() and ((P >= 0.001) & (P <= 0.999)).all()
    o, _ = tiny_classifier.predict_logits(TEXTS)
    clf = IMRClassifier(tiny_classifier.config, tiny_classifier.net, tiny_classifier.tokenizer, temperature=2.0)
    assert np.allclose(clf.predict_proba(TEXTS)[0], 0.001 + 0.998 / (1 + np.exp(-o / 2.0)), atol=1e-6)
    outcomes, labels = clf.decide(np.array([0.2, 0.9]), np.full((2, len(clf.label_names)), 0.6))
    assert outcomes == ["Upheld", "Overturned"] and labels[0] == clf.label_names


def test_forward_hook_replaces_torch_forward(tiny_classifier):
    calls = []

    def forward(ids: np.ndarray, mask: np.ndarray):
        calls.append(ids.shape)
        with torch.inference_mode():
            o, g = tiny_classifier.net(torch.from_numpy(ids), torch.from_numpy(mask))
        return o.numpy(), g.numpy()

    ref = tiny_classifier.predict_proba(TEXTS)
    got = tiny_classifier.predict_proba(TEXTS, batch_size=3, forward=forward)
    assert calls and all(isinstance(c, tuple) for c in calls)
    assert np.allclose(ref[0], got[0], atol=1e-6) and np.allclose(ref[1], got[1], atol=1e-6)


def test_repeated_windows_run_once_and_keep_their_logits(tiny_classifier):
    """A sentence shared by several items is forwarded once; every item still gets its own logits."""
    shared = "The request for physical therapy is not medically necessary per the cited guideline."
    texts = [f"Patient one has chronic low back pain since last year. {shared}",
             f"{shared} Patient two reports neck pain after a fall at work.", shared]  # fmt: skip
    unit, tiny_classifier.config.window_unit = tiny_classifier.config.window_unit, "sentences"
    try:
        windows = tiny_classifier.make_windows(texts)
        seen = []

        def forward(ids: np.ndarray, mask: np.ndarray):
            seen.extend(tuple(row[m > 0].tolist()) for row, m in zip(ids, mask))
            with torch.inference_mode():
                o, g = tiny_classifier.net(torch.from_numpy(ids), torch.from_numpy(mask))
            return o.numpy(), g.numpy()

        o, g = tiny_classifier.forward_windows(windows, batch_size=2, forward=forward)
        assert len(windows) == 5 and len(seen) == 3 == len(set(seen))  # 5 windows, 3 distinct sentences
        with torch.inference_mode():
            ref_o, ref_g = tiny_classifier.net(windows.input_ids, windows.attention_mask)
        assert np.allclose(o, ref_o.numpy(), atol=1e-4) and np.allclose(g, ref_g.numpy(), atol=1e-4)
    finally:
        tiny_classifier.config.window_unit = unit


def test_save_and_load_roundtrip(tiny_classifier, tmp_path):
    clf = IMRClassifier(tiny_classifier.config, tiny_classifier.net, tiny_classifier.tokenizer,
                        temperature=1.5, outcome_threshold=0.3,
                        guideline_thresholds=np.linspace(0.1, 0.9, len(tiny_classifier.label_names)),
                        metrics={"test": {"auroc": 0.5}})  # fmt: skip
    clf.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.pkl")) and not list(tmp_path.glob("*.bin"))
    cfg = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert cfg["label_names"] == clf.label_names and cfg["encoder_config"]["hidden_size"] == 32
    assert json.loads((tmp_path / CALIBRATION_FILE).read_text())["temperature"] == 1.5
    assert (tmp_path / WEIGHTS_FILE).stat().st_size > 0
    loaded = IMRClassifier.from_pretrained(tmp_path)
    assert loaded.temperature == 1.5 and loaded.outcome_threshold == 0.3
    assert np.allclose(loaded.guideline_thresholds, clf.guideline_thresholds)
    assert loaded.metrics == {"test": {"auroc": 0.5}}
    for a, b in zip(clf.predict_proba(TEXTS), loaded.predict_proba(TEXTS)):
        assert np.allclose(a, b, atol=1e-6)
    assert isinstance(loaded.net, IMRNet)
    assert loaded.net.get_input_embeddings() is loaded.net.encoder.get_input_embeddings()


def test_one_basis_decoding_is_saved_and_old_directories_decide_independently(tiny_classifier, tmp_path):
    names = tiny_classifier.label_names
    basis = [n for n in names if n.startswith("ACOEM_") and n != "ACOEM_3RD"]
    clf = IMRClassifier(tiny_classifier.config, tiny_classifier.net, tiny_classifier.tokenizer,
                        guideline_basis=basis, guideline_basis_extra=0.97)  # fmt: skip
    P = np.full((2, len(names)), 0.6)
    P[0, names.index(basis[2])] = 0.8
    _, labels = clf.decide(np.array([0.1, 0.9]), P)
    assert [x for x in labels[0] if x in basis] == [basis[2]]  # one basis label, the most probable
    assert [x for x in labels[0] if x not in basis] == [n for n in names if n not in basis]  # the rest at 0.5
    clf.save_pretrained(tmp_path)
    loaded = IMRClassifier.from_pretrained(tmp_path)
    assert loaded.guideline_basis == tuple(basis) and loaded.guideline_basis_extra == 0.97
    assert loaded.decide(np.array([0.1, 0.9]), P) == clf.decide(np.array([0.1, 0.9]), P)
    record = json.loads((tmp_path / CALIBRATION_FILE).read_text())
    assert record["guideline_basis"]["extra_threshold"] == 0.97  # the rule's value, on the calibrated scale
    independent = IMRClassifier(tiny_classifier.config, tiny_classifier.net, tiny_classifier.tokenizer)
    assert independent.guideline_basis == () and independent.decide_guidelines(P).sum() == P.size  # every label at 0.5
    with pytest.raises(ValueError, match="guideline_basis names \\['NOT_A_LABEL'\\]"):
        IMRClassifier(tiny_classifier.config, tiny_classifier.net, tiny_classifier.tokenizer,
                      guideline_basis=["NOT_A_LABEL"])  # fmt: skip


def test_input_validation(tiny_classifier, tmp_path):
    with pytest.raises(TypeError, match="wrap a single text"):
        tiny_classifier.predict_proba("a single text")
    with pytest.raises(TypeError, match=r"texts\[1\] is int"):
        tiny_classifier.make_windows(["ok", 3])
    with pytest.raises(FileNotFoundError, match="missing config.json"):
        IMRClassifier.from_pretrained(tmp_path)
    p, P = tiny_classifier.predict_proba([])
    assert p.shape == (0,) and P.shape == (0, len(tiny_classifier.label_names))


def test_old_directory_format_fails_clearly(tiny_classifier, tmp_path):

    tiny_classifier.save_pretrained(tmp_path)
    record = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert record["format_version"] == FORMAT_VERSION == 4
    del record["format_version"]  # what directories written before the format was versioned look like
    (tmp_path / CONFIG_FILE).write_text(json.dumps(record))
    with pytest.raises(ValueError, match=rf"directory format 1; this imr-model reads format {FORMAT_VERSION}.*Retrain"):
        IMRClassifier.from_pretrained(tmp_path)


def test_a_format_3_directory_says_to_retrain(tiny_classifier, tmp_path):
    """A directory written before #20 (format 3: its config.json may still hold retired keys such as
    guideline_pooling, context_view or dropout) fails with the version and `imr train`, not a key error."""
    from imr_model.modeling import ModelDirectoryError

    tiny_classifier.save_pretrained(tmp_path)
    record = json.loads((tmp_path / CONFIG_FILE).read_text())
    record.update({"format_version": 3, "guideline_pooling": "mean", "context_view": None, "dropout": 0.1,
                   "outcome_labels": ["Upheld", "Overturned"]})  # fmt: skip
    (tmp_path / CONFIG_FILE).write_text(json.dumps(record))
    with pytest.raises(ModelDirectoryError) as err:
        IMRClassifier.from_pretrained(tmp_path)
    message = str(err.value)
    assert "directory format 3" in message and f"reads format {FORMAT_VERSION}" in message
    assert "Retrain it with `imr train`" in message
    record["format_version"] = FORMAT_VERSION  # the same directory as format 4: now the retired keys are the problem
    (tmp_path / CONFIG_FILE).write_text(json.dumps(record))
    with pytest.raises(ModelDirectoryError, match="does not describe an IMR model"):
        IMRClassifier.from_pretrained(tmp_path)


def test_sentence_windows_keep_offsets_into_the_text(tiny_classifier):
    from imr_model.windows import make_windows, sentence_spans

    text = "The request is for therapy sessions. Guidelines support it here. Ok. It is medically necessary."
    spans = sentence_spans(text)
    assert [text[a:b].strip() for a, b in spans] == [
        "The request is for therapy sessions.", "Guidelines support it here.", "Ok. It is medically necessary."
    ]  # "Ok." is shorter than MIN_SENTENCE_CHARS, so it joins the next sentence
    w = make_windows(tiny_classifier.tokenizer, [text, "short"], max_length=64, stride=8, max_windows=32, unit="sentences")
    assert w.item_ids.tolist() == [0, 0, 0, 1]
    checked = 0
    for row in range(len(w)):
        source = text if w.item_ids[row] == 0 else "short"
        tokens = tiny_classifier.tokenizer.convert_ids_to_tokens(w.input_ids[row].tolist())
        for token, (s, e), keep in zip(tokens, w.offsets[row].tolist(), w.attention_mask[row].tolist()):
            if keep and e > s:  # every real token's offsets point at its own spelling in the source text
                assert source[s:e].lower() == token.removeprefix("##"), (token, source[s:e])
                checked += 1
    assert checked >= len(text.split())
    last = w.offsets[2][w.attention_mask[2].bool()]
    assert int(last[last[:, 1] > 0][:, 0].min()) == text.index("Ok. It is medically")


def test_citation_cue_term_is_added_saved_and_checked(tiny_classifier, tmp_path):
    """guideline_cues: item logits gain cues @ W.T (both backends share it); W survives a save; other cues refuse to load."""
    from imr_model.cues import cue_matrix, cue_names

    assert tiny_classifier.config.guideline_cues and tiny_classifier.config.cue_names == cue_names()
    texts = ["Per ACOEM, an MRI of the lumbar spine is not indicated.", "ODG recommends against this drug."]
    before = tiny_classifier.predict_logits(texts)[1]
    head = tiny_classifier.net.guideline_cues
    saved = head.weight.detach().clone()
    try:
        with torch.no_grad():
            head.weight.copy_(torch.linspace(-1, 1, head.weight.numel()).view_as(head.weight))
        after = tiny_classifier.predict_logits(texts)[1]
        assert np.allclose(after - before, cue_matrix(texts) @ head.weight.detach().numpy().T, atol=1e-5)
        tiny_classifier.save_pretrained(tmp_path)
        loaded = IMRClassifier.from_pretrained(tmp_path)
        assert np.allclose(loaded.predict_logits(texts)[1], after, atol=1e-5)
    finally:
        with torch.no_grad():
            head.weight.copy_(saved)
    record = json.loads((tmp_path / CONFIG_FILE).read_text())
    record["cue_names"] = record["cue_names"][:-1] + ["mention:something_else"]
    (tmp_path / CONFIG_FILE).write_text(json.dumps(record))
    with pytest.raises(ValueError, match="citation cues that differ.*Retrain"):
        IMRClassifier.from_pretrained(tmp_path)


def test_evidence_cue_term_is_added_saved_and_checked(label_names, tmp_path):
    """outcome_cues: outcome logits gain evidence @ v (both backends share it); v survives a save; other cues refuse."""
    from imr_model.config import load_config
    from imr_model.cues import evidence_matrix, evidence_names

    torch.manual_seed(0)
    clf = IMRClassifier.build(load_config("tiny", ["model.outcome_cues=true", "train.recipe=probe", "model.pooling=mean"]).model,
                              label_names)  # fmt: skip
    assert clf.config.outcome_cue_names == evidence_names() and clf.net.outcome_cues.in_features == len(evidence_names())
    texts = ["There is no documentation of functional improvement.", "Pain relief was documented. It is [MASK]"]
    before_o, before_g = clf.predict_logits(texts)
    assert np.allclose(clf.item_term_logits(texts)[0], 0.0)  # zero at the start
    with torch.no_grad():
        clf.net.outcome_cues.weight.copy_(torch.linspace(-1, 1, len(evidence_names())).view(1, -1))
    after_o, after_g = clf.predict_logits(texts)
    assert np.allclose(after_o - before_o, evidence_matrix(texts) @ clf.net.outcome_cues.weight.detach().numpy()[0],
                       atol=1e-5)  # fmt: skip
    assert not np.allclose(after_o, before_o) and np.array_equal(after_g, before_g)
    clf.save_pretrained(tmp_path)
    assert np.allclose(IMRClassifier.from_pretrained(tmp_path).predict_logits(texts)[0], after_o, atol=1e-5)
    record = json.loads((tmp_path / CONFIG_FILE).read_text())
    record["outcome_cue_version"] += 1
    (tmp_path / CONFIG_FILE).write_text(json.dumps(record))
    with pytest.raises(ValueError, match="evidence cues that differ.*Retrain"):
        IMRClassifier.from_pretrained(tmp_path)


def test_evidence_features_count_what_they_name():
    from imr_model.cues import evidence_matrix, evidence_names

    names = evidence_names()
    text = "There is no documentation of functional improvement. There is no evidence of failed therapy. However, ok."
    rows = evidence_matrix([text, ""])
    got = dict(zip(names, rows[0]))
    assert got["evidence:there_is_no"] == pytest.approx(np.log1p(2))  # log(1 + matches)
    assert got["evidence:lacking"] == pytest.approx(np.log1p(2)) and got["evidence:failed"] == pytest.approx(np.log(2))
    assert got["evidence:functional_improvement"] > 0 and got["evidence:contrast"] > 0
    assert got["evidence:exceeds"] == 0 and got["evidence:unclear"] == 0
    assert got["log_words"] == pytest.approx(np.log(len(text.split())))
    assert not rows[1].any() and names[-1] == "log_words" and len(set(names)) == rows.shape[1]


def test_cue_features_fire_on_what_they_name():
    from imr_model.cues import cue_matrix, cue_names

    names = cue_names()
    rows = cue_matrix(["Per ACOEM, an MRI of the lumbar spine is not indicated.",
                       "The Official Disability Guidelines do not support it for the knee.", ""])  # fmt: skip
    on = [{names[j] for j in np.flatnonzero(r)} for r in rows]
    assert {"mention:acoem", "body:low_back", "acoem_x:low_back"} <= on[0] and "mention:odg" not in on[0]
    assert {"mention:odg", "body:knee", "odg_not_mtus", "mention:guideline"} <= on[1] and "acoem_x:knee" not in on[1]
    assert on[2] == {"no_source", "short_text"}
    assert len(names) == len(set(names)) == rows.shape[1]


# ----------------------------------------------------------------------------- no false certainty
def _old_fit_temperature(z, y, bounds=(0.05, 20.0)):
    """The hard-target fit this package used before Platt's targets (kept here to measure the change)."""
    import math

    from scipy.optimize import minimize_scalar

    from imr_model.calibration import binary_nll

    def nll(log_t):
        return binary_nll(z / math.exp(log_t), y)

    res = minimize_scalar(nll, bounds=(math.log(bounds[0]), math.log(bounds[1])), method="bounded")
    best = math.exp(res.x)
    return best if nll(math.log(best)) <= nll(0.0) else 1.0


def _separable(seed=0):
    """40 validation items, 6 Overturned, every Overturned logit above every Upheld one (a small validation split)."""
    rng = np.random.default_rng(seed)
    z = np.r_[rng.normal(4.0, 1.5, 6), rng.normal(-4.0, 1.5, 34)]
    z[:6] = np.maximum(z[:6], z[6:].max() + 0.5)
    return z, np.r_[np.ones(6), np.zeros(34)].astype(int)


def test_separable_validation_items_give_a_finite_temperature():
    from imr_model.calibration import bounded_sigmoid, fit_temperature

    z, y = _separable()
    assert _old_fit_temperature(z, y) == pytest.approx(0.05, rel=1e-3)  # the old fit ran to its lower bound
    t = fit_temperature(z, y)
    assert 0.5 < t < 10.0  # well inside (0.05, 20)
    p = bounded_sigmoid(z / t)
    assert 0.001 < p.min() < 0.05 and 0.8 < p.max() < 0.999  # not 0 and 1


def test_temperature_on_non_separable_items_is_close_to_the_hard_target_fit():
    from imr_model.calibration import fit_temperature

    rng = np.random.default_rng(1)
    # smoothing pulls the targets 1/(N+2) towards 0.5: a slightly softer T, by less the more items there are
    # (median new/old over 50 draws of 3x-overconfident logits: 1.17 at 40 items, 1.03 at 200, 1.006 at 1000)
    for n, scale, rel in ((1000, 2.0, 0.02), (200, 3.0, 0.06), (60, 0.5, 0.25)):
        true = rng.normal(-1.5, 1.5, n)
        y = (rng.random(n) < 1 / (1 + np.exp(-true))).astype(int)
        old, new = _old_fit_temperature(scale * true, y), fit_temperature(scale * true, y)
        assert new == pytest.approx(old, rel=rel) and new >= old, (n, scale, old, new)
    with pytest.raises(ValueError, match="not finite"):
        fit_temperature([0.0, np.nan, 1.0], [0, 1, 1])


def test_probabilities_stay_within_bounds_on_extreme_logits(tiny_classifier):
    from imr_model.calibration import PROB_MAX, PROB_MIN

    clf = IMRClassifier(tiny_classifier.config, tiny_classifier.net, tiny_classifier.tokenizer, temperature=0.05)
    n_labels = len(clf.label_names)
    z = np.array([-1e4, -800.0, -60.0, -1.0, 0.0, 1.0, 60.0, 800.0, 1e4, np.inf, -np.inf], dtype=np.float32)
    p, P = clf.probabilities(z, np.tile(z[:, None], (1, n_labels)))
    for probs in (p, P):
        assert probs.dtype == np.float64 and np.all((probs >= PROB_MIN) & (probs <= PROB_MAX))
    assert p[4] == 0.5 and p[0] == PROB_MIN and p[8] == PROB_MAX and 8.8e-27 not in p
    with pytest.raises(ValueError, match="1 of 3 logits are NaN"):
        clf.probabilities(np.array([0.0, np.nan, 1.0]), np.zeros((3, n_labels)))
    with pytest.raises(ValueError, match="guideline logits are NaN"):
        clf.probabilities(np.zeros(1), np.full((1, n_labels), np.nan), bounded=False)
    with pytest.raises(ValueError, match="outcome probabilities are NaN"):
        clf.decide(np.array([np.nan]), np.full((1, n_labels), 0.5))  # NaN is not "Upheld"
    clf.temperature = float("nan")
    with pytest.raises(ValueError, match="temperature is nan; it must be finite and > 0"):
        clf.probabilities(np.zeros(1), np.zeros((1, n_labels)))
    for bad in (float("nan"), 0.0, -2.0, float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            IMRClassifier(tiny_classifier.config, tiny_classifier.net, tiny_classifier.tokenizer, temperature=bad)
    with pytest.raises(ValueError, match="outcome_threshold"):
        IMRClassifier(tiny_classifier.config, tiny_classifier.net, tiny_classifier.tokenizer, outcome_threshold=np.nan)


def test_the_bound_keeps_the_ranking():
    from sklearn.metrics import average_precision_score, roc_auc_score

    from imr_model.calibration import bounded_sigmoid

    rng = np.random.default_rng(2)
    z = rng.normal(0, 8.0, 5000)
    y = (rng.random(5000) < 1 / (1 + np.exp(-z / 4))).astype(int)
    p = bounded_sigmoid(z)
    assert roc_auc_score(y, p) == roc_auc_score(y, z) and average_precision_score(y, p) == average_precision_score(y, z)
    inside = np.sort(z[np.abs(z) < 25])
    assert np.all(np.diff(bounded_sigmoid(inside)) > 0)  # strictly increasing: no ties where float64 can tell
    grid = np.linspace(-35.0, 25.0, 6001)  # logits 0.01 apart stay apart (float64 spacing: 2e-19 at 0.001, 1e-16 at 0.999)
    assert np.all(np.diff(bounded_sigmoid(grid)) > 0)
    assert np.all(np.diff(bounded_sigmoid(np.linspace(-3.0, 3.0, 10001).astype(np.float32))) > 0)  # float32 logits too


def test_decisions_are_those_of_the_unbounded_probabilities(tiny_classifier):
    """Thresholds are fitted on calibrated probabilities and mapped like them: every decision is unchanged."""
    from scipy.special import expit

    from imr_model.calibration import (
        bound_probability,
        decide_labels,
        fit_temperature,
        half_max_f1_threshold,
    )

    rng = np.random.default_rng(3)
    z = rng.normal(-1.0, 3.0, 400)
    y = (rng.random(400) < expit(z / 2)).astype(int)
    clf = IMRClassifier(tiny_classifier.config, tiny_classifier.net, tiny_classifier.tokenizer)
    clf.fit_calibration(z, y, on="400 synthetic items")
    assert clf.temperature == fit_temperature(z, y) and 1.2 < clf.temperature < 3.0  # the logits are 2x overconfident
    assert clf.metrics["calibrated_on"] == "400 synthetic items"
    raw_p = expit(z / clf.temperature)
    raw_threshold = half_max_f1_threshold(y, raw_p)
    assert clf.outcome_threshold == bound_probability(raw_threshold) and 0.05 < raw_threshold < 0.5
    p, _ = clf.probabilities(z, np.zeros((len(z), 0)))
    assert np.array_equal(p >= clf.outcome_threshold, raw_p >= raw_threshold)
    assert clf.decide(p, np.zeros((len(z), len(clf.label_names))))[0] == ["Overturned" if v else "Upheld"
                                                                          for v in raw_p >= raw_threshold]  # fmt: skip
    with pytest.raises(ValueError, match="1 of 3 held-out outcome logits are NaN"):
        clf.fit_calibration(np.array([0.0, np.nan, 1.0]), np.array([0, 1, 1]), on="x")
    names = tiny_classifier.label_names
    basis = [j for j, n in enumerate(names) if n.startswith("ACOEM_") and n != "ACOEM_3RD"]
    g = rng.normal(0, 4.0, (300, len(names)))
    raw_thr = rng.uniform(0.2, 0.8, len(names))
    clf = IMRClassifier(tiny_classifier.config, tiny_classifier.net, tiny_classifier.tokenizer,
                        guideline_thresholds=bound_probability(raw_thr))  # fmt: skip
    clf.set_guideline_decoding(basis, 0.97)
    _, P = clf.probabilities(np.zeros(len(g)), g)
    assert np.array_equal(clf.decide_guidelines(P), decide_labels(expit(g), raw_thr, basis, 0.97))


def test_cpu_streams_run_batches_concurrently_and_give_the_serial_logits(tiny_classifier, monkeypatch):
    """On the CPU batches run `devices.cpu_streams` at a time on one torch thread each; the logits are those of
    one batch at a time, torch's thread count is back afterwards, and a failing batch raises in the caller."""
    from imr_model import devices

    windows = tiny_classifier.make_windows(TEXTS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: one stream
    try:
        assert devices.cpu_streams("cpu") == 1
        serial = tiny_classifier.forward_windows(windows, batch_size=2, vectors=True)
    finally:
        torch.set_num_threads(threads)
    seen: list[tuple[str, int]] = []
    encode = tiny_classifier.net.encode

    def spy(ids, mask):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return encode(ids, mask)

    monkeypatch.setattr(tiny_classifier.net, "encode", spy)
    monkeypatch.setattr(devices, "cpu_streams", lambda device: 3)
    streamed = tiny_classifier.forward_windows(windows, batch_size=2, vectors=True)
    assert len(seen) == -(-len({w.tobytes() for w in windows.input_ids.numpy()}) // 2) >= 2
    assert all(name.startswith("imr-forward") and n == 1 for name, n in seen)  # pool threads, one torch thread each
    assert torch.get_num_threads() == threads
    for a, b in zip(serial, streamed):
        assert a.shape == b.shape and np.allclose(a, b, atol=1e-5)

    def broken(ids, mask):
        raise RuntimeError("batch failed")

    monkeypatch.setattr(tiny_classifier.net, "encode", broken)
    with pytest.raises(RuntimeError, match="batch failed"):
        tiny_classifier.forward_windows(windows, batch_size=2, vectors=True)
    assert torch.get_num_threads() == threads


def test_run_streams_leaves_the_callers_and_new_threads_torch_thread_count_alone():
    from imr_model import devices

    threads = torch.get_num_threads()
    seen: list[int] = []

    def work(job):
        seen.append(torch.get_num_threads())
        if job == 3:
            raise ValueError("job 3")

    with pytest.raises(ValueError, match="job 3"):
        devices.run_streams(work, range(6), 2)
    assert sorted(seen) == [1] * 6 and torch.get_num_threads() == threads
    later: list[int] = []
    thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert later == [threads]  # a thread started afterwards gets the default again, not the pool's 1


def test_window_vectors_in_streams_equal_one_batch_at_a_time(tiny_classifier, monkeypatch):
    from imr_model import devices

    windows = tiny_classifier.make_windows(TEXTS)
    monkeypatch.setattr(devices, "cpu_streams", lambda device: 1)
    serial = tiny_classifier.window_vectors(windows, batch_size=2)
    monkeypatch.setattr(devices, "cpu_streams", lambda device: 3)
    streamed = tiny_classifier.window_vectors(windows, batch_size=2)
    assert len(windows) > 2 and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(serial, streamed))
    assert all(bool((a.abs().sum(dim=1) > 0).all()) for a in streamed)  # every row was computed
