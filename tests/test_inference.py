"""predict(): inputs (path, letter text, item text, dict), text views, model resolution and caching, threads."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import imr_model
from imr_model import inference
from imr_model.demo import write_demo_letters
from imr_model.inference import ItemPrediction, ModelNotFoundError, load_model, predict, predict_batch
from imr_model.letters import parse_file
from imr_model.types import LetterError
from imr_model.views import text_view

from inference_helpers import LABELS, tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("inf") / "model", seed=1)


@pytest.fixture(scope="module")
def letters(tmp_path_factory) -> list[Path]:
    return write_demo_letters(tmp_path_factory.mktemp("letters"), 4, seed=11)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    for var in ("IMR_MODEL_URI", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(var, raising=False)
    inference.clear_cache()
    yield
    inference.clear_cache()


def test_public_api_reexported():
    assert imr_model.predict is predict and imr_model.load_model is load_model
    assert imr_model.predict_batch is predict_batch and imr_model.ItemPrediction is ItemPrediction


def test_predict_letter_path(model_dir, letters):
    letter = parse_file(letters[0])
    preds = predict(letters[0], model=str(model_dir))
    assert [p.item_index for p in preds] == [it.index for it in letter.items]
    assert [p.request for p in preds] == [it.request for it in letter.items]
    clf = load_model(str(model_dir)).classifier
    for p in preds:
        assert p.letter_id == letter.letter_id and p.source == str(letters[0])
        assert 0.0 <= p.p_overturned <= 1.0
        assert list(p.guidelines) == LABELS
        assert p.outcome == ("Overturned" if p.p_overturned >= clf.outcome_threshold else "Upheld")
        assert set(p.guideline_labels) == {n for n, v in p.guidelines.items() if v >= 0.5}
        assert p.letter_decision in ("Upheld", "Overturned")
        assert json.loads(json.dumps(p.to_dict()))["p_overturned"] == p.p_overturned
        assert p.warnings == () and p.to_dict()["warnings"] == []  # a parsed letter: no input warning


def test_path_text_and_pdf_agree(model_dir, letters, tmp_path):
    by_path = predict(letters[1], model=str(model_dir))
    by_text = predict(letters[1].read_text(encoding="utf-8"), model=str(model_dir))
    by_pathlike = predict(Path(letters[1]), model=str(model_dir))
    pdf = write_demo_letters(tmp_path, 2, seed=11, fmt="pdf")[1]
    by_pdf = predict(pdf, model=str(model_dir))
    for other in (by_text, by_pathlike, by_pdf):
        assert [p.request for p in other] == [p.request for p in by_path]
        np.testing.assert_allclose([p.p_overturned for p in other], [p.p_overturned for p in by_path], atol=1e-5)


def test_probabilities_match_the_classifier_on_the_text_view(model_dir, letters):
    predictor = load_model(str(model_dir))
    records = parse_file(letters[2]).item_records()
    p, g = predictor.classifier.predict_proba([text_view(r, predictor.text_view) for r in records])
    preds = predict(letters[2], model=predictor)
    np.testing.assert_allclose([x.p_overturned for x in preds], p, rtol=1e-6)
    np.testing.assert_allclose([list(x.guidelines.values()) for x in preds], g, rtol=1e-6)


def test_forecast_view_is_applied(tmp_path, letters):
    predictor = load_model(str(tiny_model(tmp_path / "fc", seed=2, text_view="forecast")))
    records = parse_file(letters[0]).item_records()
    texts = predictor.item_texts(records)
    assert texts == [text_view(r, "forecast") for r in records]
    assert all(t.startswith("Request: ") and r["rationale"] not in t for t, r in zip(texts, records))


def test_bare_item_text_and_dict(model_dir):
    text = "Physical therapy is supported by the guidelines for this condition."
    (pred,) = predict(text, model=str(model_dir))
    assert pred.letter_id == "text" and pred.item_index == 1 and pred.request == "" and pred.letter_decision is None
    (from_dict,) = predict({"rationale": text, "request": "Physical therapy x6"}, model=str(model_dir))
    (from_text_col,) = predict({"text": text}, model=str(model_dir))
    assert from_dict.request == "Physical therapy x6"
    assert from_dict.p_overturned == pytest.approx(pred.p_overturned, abs=1e-6)
    assert from_text_col.p_overturned == pytest.approx(pred.p_overturned, abs=1e-6)
    # the tiny model has no reference profile: bare items say so (imr_model.familiarity); the text has IMR cues
    assert [w.split(":")[0] for w in pred.warnings] == ["profile"] and from_dict.warnings == pred.warnings
    (junk,) = predict("The weather is nice today", model=str(model_dir))
    assert [w.split(":")[0] for w in junk.warnings] == ["structure", "profile"]
    assert load_model(str(model_dir)).metadata()["familiarity"] == {"profile": False, "checks": ["structure"]}


def test_bad_inputs(model_dir, tmp_path):
    with pytest.raises(LetterError, match="missing-letter.pdf"):
        predict(str(tmp_path / "missing-letter.pdf"), model=str(model_dir))
    with pytest.raises(TypeError, match="got int"):
        predict(42, model=str(model_dir))
    with pytest.raises(ValueError, match="item dict needs one of"):
        predict({"foo": "bar"}, model=str(model_dir))
    with pytest.raises(ValueError, match="valid: torch, onnx"):
        load_model(str(model_dir), backend="tensorrt")
    with pytest.raises(ValueError, match="unknown attribution target"):
        predict("some item text", model=str(model_dir), attributions=True, target="nope")


def test_attributions_in_predictions(model_dir, letters):
    preds = predict(letters[0], model=str(model_dir), attributions=True, n_steps=8)
    for p in preds:
        assert p.attributions is not None and p.attributions.n_steps == 8 and p.attributions.target == "outcome"
        assert p.attributions.words
        d = p.to_dict()
        assert "text" not in d["attributions"] and "text" in p.to_dict(include_text=True)["attributions"]


def test_predict_batch_groups_and_matches(model_dir, letters):
    inputs = [letters[0], "A bare item text about acupuncture.", letters[3]]
    groups = predict_batch(inputs, model=str(model_dir), batch_size=4)
    assert [len(g) for g in groups] == [len(predict(x, model=str(model_dir))) for x in inputs]
    for x, group in zip(inputs, groups):
        single = predict(x, model=str(model_dir))
        np.testing.assert_allclose([p.p_overturned for p in group], [p.p_overturned for p in single], atol=1e-5)


def test_resolution_order(model_dir, tmp_path, monkeypatch):
    assert inference.resolve_model_uri(model_dir) == str(model_dir)
    monkeypatch.setenv("IMR_MODEL_URI", str(model_dir))
    assert inference.resolve_model_uri() == str(model_dir)
    monkeypatch.delenv("IMR_MODEL_URI")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError, match="tried: .*IMR_MODEL_URI.*champion.*no model directory"):
        inference.resolve_model_uri()
    old, new = tiny_model(tmp_path / "models" / "a", seed=4), tiny_model(tmp_path / "models" / "b", seed=5)
    now = time.time()
    os.utime(old / "model.safetensors", (now, now))
    os.utime(new / "model.safetensors", (now - 100, now - 100))
    assert Path(inference.resolve_model_uri()).resolve() == old.resolve()  # newest by weights mtime
    assert load_model().classifier.config.version == "tiny-4"


def test_mlflow_runs_uri(model_dir, tmp_path, monkeypatch):
    import mlflow

    from imr_model import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracking.configure()  # an earlier test's mlflow.set_tracking_uri would otherwise win over the variable
    mlflow.set_experiment("inference-test")
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(model_dir), artifact_path="model_dir")
    predictor = load_model(f"runs:/{run.info.run_id}/model_dir")
    assert predictor.classifier.config.version == "tiny-1"
    local = predict("Some item text.", model=str(model_dir))[0].p_overturned
    assert predict("Some item text.", model=predictor)[0].p_overturned == pytest.approx(local, abs=1e-6)


def test_loaded_once_and_thread_safe(model_dir, letters):
    first = load_model(str(model_dir))
    assert load_model(str(model_dir)) is first
    expected = {str(p): [x.p_overturned for x in predict(p, model=first)] for p in letters}
    expected_attr = [w.score for w in predict(letters[0], model=first, attributions=True, n_steps=4)[0].attributions.words]
    results, errors = {}, []

    def work(i: int) -> None:
        try:
            path = letters[i % len(letters)]
            if i % 3 == 0:  # attributions (backward passes) beside plain predictions from other threads
                got = predict(path, model=str(model_dir), attributions=True, n_steps=4)
                if path == letters[0]:
                    results[f"attr{i}"] = [w.score for w in got[0].attributions.words]
            else:
                got = predict(path, model=str(model_dir))
            results[i] = (str(path), [x.p_overturned for x in got])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for key, value in results.items():
        if isinstance(key, str):
            np.testing.assert_allclose(value, expected_attr, atol=1e-5)
        else:
            np.testing.assert_allclose(value[1], expected[value[0]], atol=1e-5)


def test_a_missing_path_with_spaces_is_a_missing_file_not_letter_text(tmp_path):
    from imr_model.inference import as_records
    from imr_model.types import LetterError

    missing = str(tmp_path / "my letters" / "CM16 0001.pdf")
    with pytest.raises(LetterError, match="file not found"):
        as_records(missing)
    folder = tmp_path / "my letters"
    folder.mkdir()
    from imr_model.demo import generate_letters

    (folder / "a letter.txt").write_text(next(iter(generate_letters(1, seed=5))).text, encoding="utf-8")
    records = as_records(str(folder / "a letter.txt"))
    assert records and all(r["letter_id"] == "a letter" for r in records)


def test_file_inputs_are_parsed_in_an_isolated_worker(tmp_path, monkeypatch):
    """A parser crash on one file becomes a LetterError for the caller, not a dead process."""
    from imr_model import inference
    from imr_model.types import LetterError

    calls = []

    def fake_parse_many(paths, **kwargs):
        calls.append((list(paths), kwargs))
        return [LetterError(str(p), "parser process crashed (signal 11, SIGSEGV)") for p in paths]

    monkeypatch.setattr(inference, "parse_many", fake_parse_many)
    with pytest.raises(LetterError, match="SIGSEGV"):
        inference.as_records(str(tmp_path / "x.pdf"))
    assert calls and calls[0][1] == {}  # the default (isolated) parse_many path
