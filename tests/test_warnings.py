"""Input warnings (imr_model.familiarity): structure, distance and length checks, the reference profile, every output.

The tiny random model's embeddings mean nothing, so the structure and length checks are tested
on their rules, and the distance check with constructed vectors and profiles; the end-to-end tests
fit a profile on synthetic demo items with the tiny model and only rely on what holds for any encoder
(an item of the training set is within the 99.5th percentile times the margin).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from imr_model import familiarity as fam
from imr_model import inference
from imr_model.demo import generate_letters, write_demo_letters
from imr_model.inference import load_model, predict, predict_batch

from inference_helpers import tiny_model

JUNK = {
    "weather": "The weather is nice today",
    "grocery": "Shopping list: 2 lbs apples, milk, eggs, bread, butter, coffee, bananas, rice, olive oil and a bag of onions.",
    "lorem": "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore et "
             "dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation ullamco laboris.",
    "code": "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(add(i, i * 2))\n",
    "random": "harbor violet quantum saddle nimble orbit thimble canyon lantern frost pickle meadow",
    "news": "The city council voted on Tuesday to approve a new budget for road repairs, after months of debate over "
            "funding for public transit. The mayor said construction would begin in the spring.",
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("warn") / "model", seed=1)


@pytest.fixture(scope="module")
def demo_items() -> list[dict]:
    return [r for letter in generate_letters(12, seed=3) for r in letter.item_records()]


@pytest.fixture(scope="module")
def profiled(model_dir, demo_items, tmp_path_factory) -> Path:
    """The tiny model with a reference profile fitted on demo items (as training would fit it)."""
    import shutil

    target = tmp_path_factory.mktemp("warn") / "profiled"
    shutil.copytree(model_dir, target)
    predictor = inference.Predictor(classifier=load_model(str(model_dir)).classifier, uri="", path=target)
    fam.save_profile(fam.fit_classifier_profile(predictor.classifier, predictor.item_texts(demo_items)), target)
    inference.clear_cache()
    return target


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    for var in ("IMR_MODEL_URI", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(var, raising=False)
    inference.clear_cache()
    yield
    inference.clear_cache()


def _checks(warnings) -> set[str]:
    return {w.split(":", 1)[0] for w in warnings}


# --------------------------------------------------------------------------- (a) structure


@pytest.mark.parametrize("name", sorted(JUNK))
def test_junk_has_no_imr_structure(name):
    assert not fam.has_imr_structure(JUNK[name])


def test_imr_item_texts_have_structure(demo_items):
    for text in ["Physical therapy is supported by the guidelines for this condition.",
                 "The request for 12 sessions of acupuncture is not medically necessary.",
                 "Tramadol 50mg #60 is not recommended for this patient.",
                 "Per ODG, an MRI of the lumbar spine is indicated after 6 weeks of conservative care."]:  # fmt: skip
        assert fam.has_imr_structure(text), text
    assert all(fam.has_imr_structure(fam.record_text(r)) for r in demo_items)
    # a clinical word alone, or necessity wording without one, is not enough
    assert not fam.has_imr_structure("A bare item text about acupuncture.")
    assert not fam.has_imr_structure("The committee said the new stadium is not recommended.")


def test_structure_check_skips_parsed_letters(demo_items):
    letter = {**demo_items[0], "rationale": "The weather is nice today", "request": "", "case_summary": ""}
    assert fam.is_letter_record(letter)
    assert fam.check([letter], ["The weather is nice today"], None) == [()]
    (bare,) = fam.check([inference.bare_item_record("The weather is nice today")], ["The weather is nice today"], None)
    assert _checks(bare) == {fam.STRUCTURE, fam.PROFILE}


# --------------------------------------------------------------------------- (b, c) the profile


def _profile(dim: int = 8, threshold: float = 0.2, min_words: int = 6) -> fam.ReferenceProfile:
    """Training items in the plane of the first two axes (mean 0): distance = the norm outside that plane."""
    return fam.ReferenceProfile(mean=np.zeros(dim), components=np.eye(dim)[:2], distance_threshold=threshold,
                                min_words=min_words, n_items=10)  # fmt: skip


def test_distance_and_length_checks_with_a_constructed_profile():
    profile = _profile()
    near, far = np.eye(8)[0] + 0.1 * np.eye(8)[1], np.eye(8)[3]  # distances 0 (in the plane) and 1
    record = {"rationale": "The request for physical therapy is not medically necessary per the MTUS guidelines."}
    long_text, short_text = record["rationale"], "Not medically necessary per MTUS."
    got = fam.check([record, record, record], [long_text, long_text, short_text], profile, np.stack([near, far, near]))
    assert got[0] == ()
    assert _checks(got[1]) == {fam.DISTANCE} and "1.000" in got[1][0] and "0.200" in got[1][0]
    assert _checks(got[2]) == {fam.LENGTH} and got[2][0].startswith("length: 5 words")
    # no embeddings (e.g. the ONNX backend with onnx_distance off), or a NaN row: the distance check is skipped
    assert fam.check([record], [short_text], profile, None) == [got[2]]
    assert fam.check([record], [long_text], profile, np.full((1, 8), np.nan)) == [()]


def test_fit_profile_threshold_is_the_out_of_fold_quantile_times_the_margin():
    rng = np.random.default_rng(0)
    basis = np.eye(64)[:3]  # training items vary in 3 directions, plus a little noise
    X = np.eye(64)[5] + rng.normal(size=(200, 3)) @ basis + 0.05 * rng.normal(size=(200, 64))
    groups = [f"L{i // 2}" for i in range(200)]  # two items per letter
    profile = fam.fit_profile(X, list(range(20, 220)), groups)
    assert profile.components.shape == (fam.n_components(200), 64) == (16, 64)
    np.testing.assert_allclose(profile.components @ profile.components.T, np.eye(16), atol=1e-8)
    oof = profile.distance_quantiles
    assert profile.distance_threshold == pytest.approx(oof["p99.5"] * fam.DISTANCE_MARGIN)
    assert profile.min_words == 20 and profile.n_items == 200 and profile.word_quantiles["p100"] == 219
    held_out = np.eye(64)[5] + rng.normal(size=(500, 3)) @ basis + 0.05 * rng.normal(size=(500, 64))
    assert np.mean(profile.distances(held_out) > profile.distance_threshold) < 0.01
    assert np.mean(profile.distances(X) > profile.distance_threshold) == 0.0
    assert (profile.distances(np.eye(64)[40:50]) > profile.distance_threshold).all()  # directions never seen
    assert fam.fold_of(groups, 5)[0] == fam.fold_of(groups, 5)[1]  # a letter's items share a fold
    with pytest.raises(ValueError, match="item vectors"):
        fam.fit_profile(X, [1, 2])


def test_profile_round_trip_holds_statistics_only(model_dir, demo_items, tmp_path):
    clf = load_model(str(model_dir)).classifier
    texts = [r["rationale"] for r in demo_items]
    a = fam.fit_classifier_profile(clf, texts[:15])
    b = fam.fit_classifier_profile(clf, texts[15:])
    path = fam.save_profile(a, tmp_path)
    loaded = fam.load_profile(tmp_path)
    assert path.name == fam.PROFILE_FILE and loaded is not None
    np.testing.assert_allclose(loaded.mean, a.mean, atol=1e-6)
    np.testing.assert_allclose(loaded.components, a.components, atol=1e-6)
    assert (loaded.distance_threshold, loaded.min_words, loaded.n_items) == (a.distance_threshold, a.min_words, 15)
    assert loaded.distance_quantiles == a.distance_quantiles and loaded.word_quantiles == a.word_quantiles

    def strings(obj) -> set[str]:
        if isinstance(obj, dict):
            return set(obj) | {s for v in obj.values() for s in strings(v)}
        if isinstance(obj, list):
            return {s for v in obj for s in strings(v)}
        return {obj} if isinstance(obj, str) else set()

    raw = path.read_text(encoding="utf-8")
    # every string in the file is schema (the same for profiles of different texts); numbers are statistics
    assert strings(json.loads(raw)) == strings(b.to_dict())
    schema = {w.lower() for s in strings(b.to_dict()) for w in re.findall(r"[A-Za-z]+", s)}
    words = {w for t in texts[:15] for w in re.findall(r"[A-Za-z]{4,}", t) if w.lower() not in schema}
    assert words and not words & set(re.findall(r"[A-Za-z]+", raw))
    token_ids = {str(i) for t in texts[:15] for i in clf.tokenizer(t)["input_ids"] if i > 999}
    assert not any(f'"{i}"' in raw for i in token_ids)  # no token ids as strings either
    assert fam.load_profile(tmp_path / "nowhere") is None
    with pytest.raises(ValueError, match="reference-profile"):
        fam.ReferenceProfile.from_dict({"format": "other"})


def test_captured_vectors_are_the_encoders_mean_vectors(model_dir, demo_items):
    """The hooks read the vectors off the prediction's own forward pass: the same as a separate encoder pass."""
    clf = load_model(str(model_dir)).classifier
    texts = [r["rationale"] for r in demo_items[:8]] + [demo_items[0]["rationale"]]  # a repeated text: deduplicated
    windows = clf.make_windows(texts)
    with fam.capture_window_vectors(clf) as cap:
        o, g = clf.window_item_logits(windows, texts, batch_size=3)
    np.testing.assert_allclose(cap.window_vectors(windows), fam.window_vectors(clf, windows, batch_size=5), atol=1e-5)
    p, g_p = clf.probabilities(o, g)
    p0, g_p0 = clf.predict_proba(texts, batch_size=3)
    np.testing.assert_array_equal(p, p0)
    np.testing.assert_array_equal(g_p, g_p0)
    assert not clf.net._forward_pre_hooks and not clf.net.guideline_head._forward_pre_hooks  # removed afterwards


# --------------------------------------------------------------------------- predictions


def test_predictions_without_a_profile(model_dir):
    """An old model: letters get no warning, a bare text says the profile is missing; junk also fails (a)."""
    letter = write_demo_letters(Path(model_dir).parent / "letters-old", 1, seed=5)[0]
    assert all(p.warnings == () for p in predict(letter, model=str(model_dir)))
    (item,) = predict("The request for physical therapy is not medically necessary per the MTUS.", model=str(model_dir))
    assert _checks(item.warnings) == {fam.PROFILE}
    (junk,) = predict(JUNK["weather"], model=str(model_dir))
    assert _checks(junk.warnings) == {fam.STRUCTURE, fam.PROFILE}
    info = load_model(str(model_dir)).metadata()["familiarity"]
    assert info == {"profile": False, "checks": [fam.STRUCTURE]}


def test_profile_digest_is_recorded_and_checked(profiled, tmp_path):
    import shutil

    from imr_model.modeling import DIGESTS_KEY, IMRClassifier, ModelDirectoryError

    assert fam.PROFILE_FILE in json.loads((profiled / "config.json").read_text())[DIGESTS_KEY]
    tampered = tmp_path / "tampered"
    shutil.copytree(profiled, tampered)
    record = json.loads((tampered / fam.PROFILE_FILE).read_text())
    record["distance"]["threshold"] = 2.0  # would silence the distance check
    (tampered / fam.PROFILE_FILE).write_text(json.dumps(record))
    with pytest.raises(ModelDirectoryError, match=fam.PROFILE_FILE):
        IMRClassifier.from_pretrained(tampered)


def test_predictions_with_a_profile(profiled, demo_items, tmp_path):
    predictor = load_model(str(profiled))
    assert predictor.profile is not None and predictor.metadata()["familiarity"]["checks"] == list(fam.CHECKS)
    # the items the profile was fitted on, as letters and as bare items
    assert all(p.warnings == () for p in predictor.predict_records(demo_items))
    bare = [{"rationale": r["rationale"], "request": r["request"]} for r in demo_items]
    assert all(p.warnings == () for p in predictor.predict_records(bare))
    letter = write_demo_letters(tmp_path, 1, seed=3)[0]  # the first training letter, from its file
    assert all(p.warnings == () for p in predict(letter, model=predictor))
    for name, text in JUNK.items():
        (p,) = predict(text, model=predictor)
        assert fam.STRUCTURE in _checks(p.warnings), name
        assert all(w.split(":", 1)[0] in fam.CHECKS for w in p.warnings)
    (weather,) = predict(JUNK["weather"], model=predictor)
    assert fam.LENGTH in _checks(weather.warnings)  # 5 words; every demo rationale is longer


def test_to_dict_and_batch_carry_warnings(profiled):
    groups = predict_batch([JUNK["grocery"], JUNK["weather"]], model=str(profiled))
    for (p,) in groups:
        d = json.loads(json.dumps(p.to_dict()))
        assert isinstance(p.warnings, tuple) and d["warnings"] == list(p.warnings) and d["warnings"]


def test_distance_on_a_non_torch_forward(profiled, demo_items):
    """A backend whose forward returns logits only (ONNX): the embeddings come from the torch encoder, or are skipped."""
    base = load_model(str(profiled))
    calls = []

    def forward(ids, mask):  # stands in for the ONNX session: numpy in, logits out
        import torch

        calls.append(len(ids))
        with torch.inference_mode():
            o, g = base.classifier.net(torch.as_tensor(ids), torch.as_tensor(mask))
        return o.numpy(), g.numpy()

    profile = dataclasses.replace(base.profile, distance_threshold=0.0, min_words=0)
    records = [{"rationale": demo_items[0]["rationale"]}, demo_items[0]]  # a bare item, then a parsed letter's
    onnx = inference.Predictor(classifier=base.classifier, uri="x", path=base.path, backend="onnx", forward=forward,
                               profile=profile)  # fmt: skip
    bare, letter = onnx.predict_records(records)  # default "bare": the torch encoder runs for the bare item only
    assert calls and _checks(bare.warnings) == {fam.DISTANCE} and letter.warnings == ()  # threshold 0: any distance fires
    assert bare.p_overturned == pytest.approx(base.predict_records(records[:1])[0].p_overturned, abs=1e-5)
    assert onnx.metadata()["familiarity"]["distance_items"] == "not parsed from a letter"
    onnx.onnx_distance = "all"
    assert [_checks(p.warnings) for p in onnx.predict_records(records)] == [{fam.DISTANCE}, {fam.DISTANCE}]
    onnx.onnx_distance = "off"
    assert [p.warnings for p in onnx.predict_records(records)] == [(), ()]
    assert onnx.metadata()["familiarity"]["checks"] == [fam.STRUCTURE, fam.LENGTH]
    onnx.onnx_distance = "sometimes"
    with pytest.raises(ValueError, match="valid: bare, all, off"):
        onnx.predict_records(records)


def test_pyfunc_output_has_a_warnings_column(profiled, demo_items):
    from imr_model.pyfunc_model import OUTPUT_COLUMNS, IMRPyfuncModel

    class Context:
        def __init__(self):
            self.artifacts = {"model_dir": str(profiled)}

    model = IMRPyfuncModel()
    model.load_context(Context())
    frame = pd.DataFrame({"request": [demo_items[0]["request"], ""],
                          "rationale": [demo_items[0]["rationale"], JUNK["news"]]})  # fmt: skip
    out = model.predict(None, frame)
    assert list(out.columns) == list(OUTPUT_COLUMNS) and "warnings" in out.columns
    assert out["warnings"][0] == []
    assert fam.STRUCTURE in _checks(out["warnings"][1])
    clf = model.classifier
    p, _ = clf.predict_proba([demo_items[0]["rationale"], JUNK["news"]])
    np.testing.assert_allclose(out["p_overturned"], p, rtol=1e-6)


@pytest.mark.slow
def test_training_fits_and_saves_a_profile(tiny_config, demo_records, label_names, tmp_path):
    from imr_model.splits import records_to_split
    from imr_model.training import train_classifier

    train = records_to_split(demo_records[:60], "rationale", label_names)
    val = records_to_split(demo_records[60:], "rationale", label_names)
    cfg = tiny_config.model_copy(update={"train": tiny_config.train.model_copy(update={"epochs": 1})})
    clf, _ = train_classifier(cfg, train, val, label_names, quiet=True)
    profile = getattr(clf, fam.PROFILE_ATTRIBUTE)
    assert profile.n_items == 60 and profile.min_words == min(fam.word_count(t) for t in train.texts)
    again = fam.fit_classifier_profile(clf, train.texts)  # the same statistics from a separate encoder pass
    np.testing.assert_allclose(profile.mean, again.mean, atol=1e-5)
    assert again.n_items == 60  # (its folds are per item: no groups given)
    clf.save_pretrained(tmp_path / "m")
    fam.save_classifier_profile(clf, tmp_path / "m")
    predictor = load_model(str(tmp_path / "m"))
    assert predictor.profile is not None
    assert all(p.warnings == () for p in predictor.predict_records(demo_records[:60]))


@pytest.mark.shared
def test_every_real_item_has_imr_structure(shared_letters_dir):
    """The structure check never fires on the real letters' items, even sent as bare texts (no text is kept)."""
    from imr_model.letters import parse_many

    letters = [x for x in parse_many(sorted(shared_letters_dir.glob("*.pdf"))) if not isinstance(x, Exception)]
    records = [r for letter in letters for r in letter.item_records()]
    assert len(records) > 200
    assert all(fam.is_letter_record(r) for r in records)
    missing = [i for i, r in enumerate(records) if not fam.has_imr_structure(r["rationale"])]
    assert missing == [], f"{len(missing)} real rationales without IMR cues (item positions {missing[:10]})"
