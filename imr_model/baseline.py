"""TF-IDF + logistic regression for both heads: the baseline every table shows beside the transformer.

Outcome: one logistic regression (class weights "balanced" by default, for the ~11% Overturned).
Guidelines: one-vs-rest, one logistic regression per taxonomy label; a label that is always absent
(or always present) in training gets a constant score at its training rate. Saved as JSON
(`baseline.json`: settings, vocabulary, label names, calibration) + safetensors (`baseline.safetensors`:
idf, coefficients, intercepts); no pickle. Features are computed here (sublinear tf × idf, L2 norm),
so a loaded model needs only the vocabulary and the arrays.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from safetensors.numpy import load_file, save_file
from scipy import sparse
from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from imr_model.calibration import bounded_sigmoid, fit_temperature
from imr_model.config import BaselineSection

JSON_FILE = "baseline.json"
ARRAYS_FILE = "baseline.safetensors"
_TOKEN_PATTERN = r"(?u)\b\w\w+\b"


@dataclass
class BaselineModel:
    """A fitted TF-IDF + LogReg model. Build with `BaselineModel.fit`, or `load` a saved one."""

    settings: BaselineSection
    text_view: str
    vocabulary: list[str]
    idf: np.ndarray  # (V,)
    outcome_coef: np.ndarray  # (V,)
    outcome_intercept: float
    guideline_coef: np.ndarray  # (L, V)
    guideline_intercept: np.ndarray  # (L,)
    label_names: list[str]
    temperature: float = 1.0
    outcome_threshold: float = 0.5
    guideline_thresholds: np.ndarray = field(default_factory=lambda: np.zeros(0))
    _tfidf: "TfidfFeatures | None" = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.guideline_thresholds.size == 0:
            self.guideline_thresholds = np.full(len(self.label_names), 0.5)

    # --------------------------------------------------------------------------- fitting
    @classmethod
    def fit(
        cls,
        texts: Sequence[str],
        y: Sequence[int],
        Y: np.ndarray,
        label_names: Sequence[str],
        settings: BaselineSection | None = None,
        *,
        text_view: str = "rationale",
        seed: int = 0,
    ) -> "BaselineModel":
        """Fit on texts, outcome labels y (N,) (1 = Overturned) and guideline matrix Y (N, L)."""
        settings = settings or BaselineSection()
        texts = list(texts)
        y_arr, Y_arr = np.asarray(y).astype(int), np.asarray(Y).astype(int)
        if len(texts) != len(y_arr) or Y_arr.shape != (len(texts), len(label_names)):
            raise ValueError(
                f"{len(texts)} texts, {len(y_arr)} outcome labels and a guideline matrix of shape "
                f"{Y_arr.shape} (expected ({len(texts)}, {len(label_names)}))"
            )
        tfidf = TfidfFeatures.fit(texts, max_features=settings.max_features, min_df=min(settings.min_df, len(texts)),
                                  ngram_max=settings.ngram_max)  # fmt: skip
        model = cls(
            settings=settings,
            text_view=text_view,
            vocabulary=tfidf.vocabulary,
            idf=tfidf.idf,
            outcome_coef=np.zeros(len(tfidf)),
            outcome_intercept=0.0,
            guideline_coef=np.zeros((len(label_names), len(tfidf))),
            guideline_intercept=np.zeros(len(label_names)),
            label_names=list(label_names),
        )
        X = model.features(texts)
        model.outcome_coef, model.outcome_intercept = _fit_binary(X, y_arr, settings, seed)
        for j in range(len(label_names)):
            model.guideline_coef[j], model.guideline_intercept[j] = _fit_binary(X, Y_arr[:, j], settings, seed)
        return model

    # --------------------------------------------------------------------------- inference
    def features(self, texts: Sequence[str]) -> sparse.csr_matrix:
        """Sublinear-tf × idf, L2-normalised rows (what TfidfVectorizer(sublinear_tf=True) computes)."""
        if self._tfidf is None:
            self._tfidf = TfidfFeatures(self.vocabulary, self.idf, self.settings.ngram_max)
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings; wrap a single text in a list")
        return self._tfidf.transform(list(texts))

    def decision_function(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Logits: outcome (N,) and guidelines (N, L)."""
        X = self.features(texts)
        return X @ self.outcome_coef + self.outcome_intercept, X @ self.guideline_coef.T + self.guideline_intercept

    def predict_proba(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated P(Overturned) (N,) and guideline probabilities (N, L)."""
        o, g = self.decision_function(texts)
        # Bounded like the classifier's: no 0.0 / 1.0 / 8.8e-27 beside the model in comparison tables.
        return bounded_sigmoid(o / self.temperature), bounded_sigmoid(g)

    def fit_calibration(self, texts: Sequence[str], y: Sequence[int]) -> None:
        """Temperature of the outcome logit on held-out items; decisions stay at 0.5 (scikit-learn's `predict`).

        Balanced class weights move the baseline's 0.5 to the balanced decision point, and they inflate
        rare-class probabilities, so the F1*/2 rule does not apply; the empirical argmax on ~40
        validation items overfits (on the shared letters it cost the guideline micro-F1 ~0.25 on test).
        """
        o, _ = self.decision_function(texts)
        self.temperature = fit_temperature(o, y)
        self.outcome_threshold = 0.5
        self.guideline_thresholds = np.full(len(self.label_names), 0.5)

    def decide_guidelines(self, guideline_probs: np.ndarray) -> np.ndarray:
        """0/1 guideline decisions (N, L): each label independently at its threshold (one-vs-rest)."""
        return (np.asarray(guideline_probs) >= self.guideline_thresholds[None, :]).astype(int)

    def save(self, path: str | Path) -> None:
        """Write `baseline.json` + `baseline.safetensors` into a directory."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {
            "kind": "tfidf-logreg",
            "settings": self.settings.model_dump(),
            "text_view": self.text_view,
            "label_names": self.label_names,
            "vocabulary": self.vocabulary,
            "outcome_intercept": float(self.outcome_intercept),
            "temperature": float(self.temperature),
            "outcome_threshold": float(self.outcome_threshold),
            "guideline_thresholds": [float(x) for x in self.guideline_thresholds],
        }
        (path / JSON_FILE).write_text(json.dumps(meta), encoding="utf-8")
        arrays = {
            "idf": self.idf, "outcome_coef": self.outcome_coef,
            "guideline_coef": self.guideline_coef, "guideline_intercept": self.guideline_intercept,
        }  # fmt: skip
        save_file({k: np.ascontiguousarray(v, dtype=np.float64) for k, v in arrays.items()}, str(path / ARRAYS_FILE))

    @classmethod
    def load(cls, path: str | Path) -> "BaselineModel":
        path = Path(path)
        if not (path / JSON_FILE).is_file() or not (path / ARRAYS_FILE).is_file():
            raise FileNotFoundError(f"{path} holds no baseline model ({JSON_FILE} + {ARRAYS_FILE})")
        meta = json.loads((path / JSON_FILE).read_text(encoding="utf-8"))
        arrays = load_file(str(path / ARRAYS_FILE))
        return cls(
            settings=BaselineSection.model_validate(meta["settings"]),
            text_view=meta["text_view"],
            vocabulary=list(meta["vocabulary"]),
            idf=arrays["idf"],
            outcome_coef=arrays["outcome_coef"],
            outcome_intercept=float(meta["outcome_intercept"]),
            guideline_coef=arrays["guideline_coef"],
            guideline_intercept=arrays["guideline_intercept"],
            label_names=list(meta["label_names"]),
            temperature=float(meta.get("temperature", 1.0)),
            outcome_threshold=float(meta.get("outcome_threshold", 0.5)),
            guideline_thresholds=np.asarray(meta.get("guideline_thresholds", []), dtype=float),
        )


def _analyzer_kwargs(ngram_max: int) -> dict:
    return {
        "lowercase": True,
        "strip_accents": "unicode",
        "token_pattern": _TOKEN_PATTERN,
        "ngram_range": (1, ngram_max),
        "dtype": np.float64,
    }


def word_analyzer():
    """The TF-IDF vocabulary's tokenizer for single words: text → lower-cased, accent-stripped word tokens."""
    return CountVectorizer(**{**_analyzer_kwargs(1), "ngram_range": (1, 1)}).build_analyzer()


@dataclass
class TfidfFeatures:
    """A fitted TF-IDF vocabulary: texts → sublinear-tf × idf rows, L2-normalised (sparse, (N, V)).

    Shared by the baseline and the transformer's guideline term (`ModelConfig.guideline_tfidf`);
    stored as a vocabulary list + an idf array, so loading needs no pickle.
    """

    vocabulary: list[str]
    idf: np.ndarray  # (V,)
    ngram_max: int = 2
    _counter: CountVectorizer | None = field(default=None, init=False, repr=False)

    @classmethod
    def fit(cls, texts: Sequence[str], *, max_features: int | None = 20000, min_df: int = 1,
            ngram_max: int = 2) -> "TfidfFeatures":  # fmt: skip
        vec = TfidfVectorizer(**_analyzer_kwargs(ngram_max), max_features=max_features, min_df=min_df, sublinear_tf=True)
        try:
            vec.fit(["" if t is None else t for t in texts])
        except ValueError as exc:  # scikit-learn: "empty vocabulary; perhaps the documents only contain stop words"
            raise ValueError(f"cannot fit a TF-IDF vocabulary on {len(texts)} texts: {exc}") from None
        vocab = [t for t, _ in sorted(vec.vocabulary_.items(), key=lambda kv: kv[1])]
        return cls(vocab, vec.idf_.astype(np.float64), ngram_max)

    def __len__(self) -> int:
        return len(self.vocabulary)

    def transform(self, texts: Sequence[str]) -> sparse.csr_matrix:
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings; wrap a single text in a list")
        if self._counter is None:
            self._counter = CountVectorizer(**_analyzer_kwargs(self.ngram_max),
                                            vocabulary={t: i for i, t in enumerate(self.vocabulary)})  # fmt: skip
        counts = self._counter.transform(["" if t is None else t for t in texts]).astype(np.float64).tocsr()
        counts.data = 1.0 + np.log(counts.data)
        X = counts.multiply(np.asarray(self.idf, dtype=np.float64)[None, :]).tocsr()
        norms = np.sqrt(np.asarray(X.multiply(X).sum(axis=1)).ravel())
        norms[norms == 0] = 1.0
        return (sparse.diags(1.0 / norms) @ X).tocsr()


def _fit_binary(X: sparse.csr_matrix, y: np.ndarray, settings: BaselineSection, seed: int) -> tuple[np.ndarray, float]:
    return fit_binary_logistic(X, y, C=settings.C, balanced=True, seed=seed)


def fit_binary_logistic(X, y: np.ndarray, *, C: float, balanced: bool = True, seed: int = 0) -> tuple[np.ndarray, float]:
    """Coefficients (F,) and intercept of one L2 logistic regression; a constant scorer when y has one class."""
    y = np.asarray(y).astype(int)
    if y.min() == y.max():
        rate = np.clip(y.mean(), 1e-3, 1 - 1e-3)
        return np.zeros(X.shape[1]), float(np.log(rate / (1 - rate)))
    clf = LogisticRegression(C=C, class_weight="balanced" if balanced else None, max_iter=2000, random_state=seed)
    clf.fit(X, y)
    return clf.coef_[0].astype(np.float64), float(clf.intercept_[0])
