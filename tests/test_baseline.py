"""TF-IDF + LogReg baseline: features equal scikit-learn's, it learns, and it round-trips without pickle."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer

from imr_model.baseline import ARRAYS_FILE, JSON_FILE, BaselineModel
from imr_model.config import BaselineSection

TEXTS = [
    "the requested therapy is medically necessary per odg",
    "the request is not medically necessary per mtus chronic pain",
    "acupuncture is not supported; not medically necessary",
    "opioid continuation is medically necessary and appropriate per odg",
    "imaging of the knee is not medically necessary",
    "the medication is not medically necessary per mtus",
] * 3
Y_OUT = np.array([1, 0, 0, 1, 0, 0] * 3)
LABELS = ["ODG", "MTUS_CHRONIC_PAIN", "ACOEM_KNEE", "NEVER"]
Y_GL = np.array([[("odg" in t), ("chronic" in t), ("knee" in t), 0] for t in TEXTS], dtype=int)


@pytest.fixture(scope="module")
def model():
    return BaselineModel.fit(TEXTS, Y_OUT, Y_GL, LABELS, BaselineSection(max_features=500, C=10.0), seed=0)


def test_features_equal_sklearn_tfidf(model):
    s = model.settings
    ref = TfidfVectorizer(lowercase=True, strip_accents="unicode", ngram_range=(1, s.ngram_max),
                          max_features=s.max_features, sublinear_tf=True, token_pattern=r"(?u)\b\w\w+\b")
    expected = ref.fit_transform(TEXTS)
    order = [ref.vocabulary_[t] for t in model.vocabulary]
    assert np.allclose(model.features(TEXTS).toarray(), expected.toarray()[:, order])


def test_learns_both_heads(model):
    p, P = model.predict_proba(TEXTS)
    assert p[Y_OUT == 1].min() > p[Y_OUT == 0].max()
    assert (P[:, :3] >= 0.5).astype(int).tolist() == Y_GL[:, :3].tolist()
    # a label never seen in training scores its (clipped) training rate, i.e. ~0
    assert P[:, 3].max() < 0.01


def test_save_load_roundtrip_is_json_and_safetensors(model, tmp_path):
    model.temperature, model.outcome_threshold = 1.7, 0.4
    model.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([JSON_FILE, ARRAYS_FILE])
    loaded = BaselineModel.load(tmp_path)
    for a, b in zip(model.predict_proba(TEXTS), loaded.predict_proba(TEXTS)):
        assert np.allclose(a, b)
    assert loaded.temperature == 1.7 and loaded.outcome_threshold == 0.4 and loaded.label_names == LABELS


def test_bad_inputs(model, tmp_path):
    with pytest.raises(ValueError, match="guideline matrix"):
        BaselineModel.fit(TEXTS, Y_OUT, Y_GL[:, :2], LABELS)
    with pytest.raises(TypeError, match="list of strings"):
        model.predict_proba("one text")
    with pytest.raises(FileNotFoundError, match="no baseline model"):
        BaselineModel.load(tmp_path)
