"""Batch drift: does a batch of incoming items, as a whole, differ from the items the model was trained on?

The input warnings (`imr_model.familiarity`) judge one item; this module judges a batch (`imr score`'s
summary, `imr drift`). Training stores a *drift reference* in the reference profile (`reference_profile.json`
version 2, key ``drift``; `fit_reference`): numbers only, never a text, a token or a per-item vector.

Features, each a distribution over the batch's items compared with its training counterpart:

* ``distance`` — the item's distance from the training items' principal subspace (familiarity's distance);
  reference: the training items' *out-of-fold* distances (a held-out item is as far as an out-of-fold one);
* ``embedding_mean`` — where the batch sits inside that subspace: the mean of its coordinates on the top
  principal directions; reference: the training coordinates' mean (0) and per-direction variances;
* ``words`` — the main-view word count; reference: the training items';
* ``oov`` — the share of an item's words outside the TF-IDF vocabulary (the model's guideline TF-IDF
  term, else the baseline's); reference: out-of-fold rates (each fold against a vocabulary fit, with the
  same settings, on the other folds: in-sample rates would be optimistic);
* ``p_overturned`` — the calibrated probability; reference: held-out probabilities of training (the grouped
  out-of-fold ones for recipe ``probe``, the validation items' for ``finetune``).

Tests (scipy.stats): the four scalar features by the two-sample Kolmogorov-Smirnov test (`ks_2samp`; effect:
the statistic D, the largest gap between the two cumulative distributions) against a pseudo-sample of the
reference's size read off its stored quantile sketch (`QUANTILE_LEVELS` quantiles); ``embedding_mean`` by the
two-sample Hotelling T² (F distribution, `scipy.stats.f`) with the reference's diagonal covariance; effect:
the Mahalanobis distance between the two means in pooled standard deviations, less its expectation under no
shift (sqrt(max(0, d² - k (1/n_batch + 1/n_reference))), k directions), so small batches do not read as shifted.

Rule: a feature drifted when its p-value is below `ALPHA` / (features tested) (Bonferroni) *and* its effect
reaches `MIN_EFFECT` (so a large batch does not flag a trivial shift); the batch drifted when any feature did.
A batch of fewer than `MIN_ITEMS` items gets the statistics and the verdict "too few items to judge". A
profile without a drift reference (version 1, saved before drift) gets "no drift reference in this model;
retrain". The thresholds were chosen on the shared letters (docs/model.md, "Batch drift").
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from scipy import stats

from imr_model import familiarity
from imr_model.baseline import JSON_FILE as BASELINE_JSON
from imr_model.baseline import TfidfFeatures, word_analyzer

REFERENCE_VERSION = 1
QUANTILE_LEVELS = 101  # quantiles stored per scalar feature (p0, p1, ..., p100)
ALPHA = 0.01  # family-wise, Bonferroni over the features tested
MIN_LETTERS = 20  # fewer letters: statistics, but no verdict
OOV_FOLDS = 10  # the OOV reference: each fold's items against a vocabulary fit on the others
SCALARS = ("distance", "words", "oov", "p_overturned")
FEATURES = ("distance", "embedding_mean", "words", "oov", "p_overturned")
MIN_EFFECT = {"distance": 0.2, "embedding_mean": 0.5, "words": 0.2, "oov": 0.2, "p_overturned": 0.2}
# One-sided where only one direction is drift: farther from the subspace, more unknown words.
ALTERNATIVE = {"distance": "less", "oov": "less", "words": "two-sided", "p_overturned": "two-sided"}
EFFECT = {**{f: "Kolmogorov-Smirnov D" for f in SCALARS},
          "embedding_mean": "Mahalanobis distance of the means beyond sampling noise"}
DESCRIPTION = {
    "distance": "distance from the training items' principal subspace (familiarity)",
    "embedding_mean": "batch mean of the coordinates on the top principal directions",
    "words": "main-view word count",
    "oov": "share of words outside the TF-IDF vocabulary",
    "p_overturned": "calibrated P(Overturned)",
}
BASELINE_DIR = "baseline"  # the TF-IDF baseline's folder in a model directory (evaluation.BASELINE_DIR)
NO_REFERENCE = "no drift reference in this model (its reference profile predates drift statistics); retrain"


# --------------------------------------------------------------------------- the reference (at training)


def fit_reference(profile: familiarity.ReferenceProfile, item_vectors: np.ndarray, texts: Sequence[str],
                  groups: Sequence | None, probabilities: Sequence[float], probability_groups: Sequence | None, *,
                  probability_source: str, tfidf: Mapping, y: Sequence[int] | None = None) -> dict:  # fmt: skip
    """The drift reference of training items: their embeddings (N, H) and main-view `texts` (as the profile was
    fit on), letters (`groups`; None = one letter per item), held-out calibrated `probabilities` and their
    letters, the TF-IDF settings (`max_features`, `min_df`, `ngram_max`) and outcome labels `y` (context)."""
    texts = list(texts)
    groups = list(range(len(texts))) if groups is None else list(groups)
    oof = familiarity.out_of_fold_distances(item_vectors, groups, len(profile.components))
    coords = letter_means(profile.coordinates(item_vectors), groups)
    p_groups = list(range(len(probabilities))) if probability_groups is None else list(probability_groups)
    ref = {
        "version": REFERENCE_VERSION,
        "unit": "letter (the mean over its items)",
        "distance": _sketch(letter_means(oof, groups), "out-of-fold distances of the training items"),
        "words": _sketch(letter_means([familiarity.word_count(t) for t in texts], groups), "training items"),
        "oov": {**_sketch(letter_means(_out_of_fold_oov(texts, groups, tfidf), groups),
                          f"{OOV_FOLDS}-fold out-of-fold rates of the training items"),
                "vocabulary": {k: tfidf[k] for k in ("max_features", "min_df", "ngram_max")}},  # fmt: skip
        "p_overturned": _sketch(letter_means(probabilities, p_groups), probability_source),
        "embedding_mean": {"n": len(coords), "mean": _floats(coords.mean(axis=0)),
                           "covariance": [_floats(row) for row in np.cov(coords, rowvar=False, ddof=1).reshape(
                               coords.shape[1], coords.shape[1])]},  # fmt: skip
    }
    if y is not None:
        ref["labels"] = {"items": len(y), "overturned_rate": float(np.mean(y))}
    return ref


def with_reference(profile: familiarity.ReferenceProfile, *args, **kwargs) -> familiarity.ReferenceProfile:
    """`profile` with its drift reference (`fit_reference`'s arguments after the profile)."""
    return dataclasses.replace(profile, drift=fit_reference(profile, *args, **kwargs))


def letter_means(values, groups: Sequence) -> np.ndarray:
    """Per letter (first appearance order) the mean of its items' `values` ((N,) or (N, k)); NaN items skipped."""
    x = np.asarray(values, dtype=np.float64)
    _, first, inverse = np.unique(np.asarray([str(g) for g in groups]), return_index=True, return_inverse=True)
    inverse = np.argsort(np.argsort(first))[inverse]  # letters numbered in order of first appearance
    flat = x.reshape(len(x), -1)
    ok = ~np.isnan(flat).any(axis=1)
    n = np.bincount(inverse[ok], minlength=len(first)).astype(np.float64)
    sums = np.zeros((len(first), flat.shape[1]))
    np.add.at(sums, inverse[ok], flat[ok])
    means = sums[n > 0] / n[n > 0, None]
    return means if x.ndim > 1 else means[:, 0]


def _sketch(values, source: str) -> dict:
    x = np.asarray(values, dtype=np.float64)
    return {"n": len(x), "source": source, "quantiles": _floats(np.quantile(x, np.linspace(0, 1, QUANTILE_LEVELS)))}


def _floats(values) -> list[float]:
    return [float(v) for v in np.asarray(values, dtype=np.float64)]


def _out_of_fold_oov(texts: list[str], groups: list, tfidf: Mapping) -> np.ndarray:
    """Each item's OOV rate against a vocabulary fit on the other folds' letters (`OOV_FOLDS`)."""
    fold = familiarity.fold_of(groups, OOV_FOLDS)
    rates = np.zeros(len(texts))
    for f in np.unique(fold):
        test = fold == f
        fit_on = [t for t, held in zip(texts, test) if not held] or texts  # one letter only: in-sample
        vocab = TfidfFeatures.fit(fit_on, max_features=tfidf["max_features"], min_df=min(tfidf["min_df"], len(fit_on)),
                                  ngram_max=tfidf["ngram_max"]).vocabulary  # fmt: skip
        rates[test] = oov_rates([t for t, held in zip(texts, test) if held], unigrams(vocab))
    return rates


def unigrams(vocabulary: Sequence[str]) -> frozenset:
    return frozenset(t for t in vocabulary if " " not in t)


def oov_rates(texts: Sequence[str], known: frozenset) -> np.ndarray:
    """Share of each text's words (`baseline.word_analyzer`) not in `known`; 1 for a text without words."""
    analyze = word_analyzer()
    out = []
    for t in texts:
        words = analyze(t or "")
        out.append(sum(w not in known for w in words) / len(words) if words else 1.0)
    return np.asarray(out, dtype=np.float64)


def model_vocabulary(predictor) -> frozenset | None:
    """The words of a loaded model's TF-IDF vocabulary: its guideline term's, else its baseline's, else None."""
    tfidf = getattr(predictor.classifier, "tfidf", None)
    if tfidf is not None:
        return unigrams(tfidf.vocabulary)
    path = Path(predictor.path) / BASELINE_DIR / BASELINE_JSON
    return unigrams(json.loads(path.read_text(encoding="utf-8"))["vocabulary"]) if path.is_file() else None


# --------------------------------------------------------------------------- a batch (while scoring)


def letter_key(record: Mapping) -> str:
    """The letter an item record belongs to (its source and letter id; a table row without one is its own)."""
    return f"{record.get('source', '')}\x00{record.get('letter_id', '')}"


class DriftAccumulator:
    """The numbers a batch's drift report needs, gathered chunk by chunk: per letter the means of its items'
    distance, word count, OOV rate and probability, and the sums of the letters' principal coordinates and
    their outer products (never a text or a vector of a text). A letter is the items of one `observe` call with
    one `letter_key` (scoring's chunks hold whole letters).

    `observe` is `inference.Predictor.predict_records`' ``observe`` callback; `mark` / `rollback` drop what a
    failed attempt observed (scoring retries a failed chunk letter by letter)."""

    def __init__(self, profile: familiarity.ReferenceProfile | None, vocabulary: frozenset | None = None):
        self.profile, self.vocabulary = profile, vocabulary
        self.reference = profile.drift if profile is not None else None
        self._parts: list[dict] = []

    @classmethod
    def for_predictor(cls, predictor) -> "DriftAccumulator":
        profile = getattr(predictor, "profile", None)
        has_ref = profile is not None and profile.drift is not None
        return cls(profile, model_vocabulary(predictor) if has_ref else None)

    def observe(self, records: Sequence[Mapping], texts: Sequence[str], p: np.ndarray, vectors: np.ndarray | None) -> None:
        records = list(records)
        part: dict = {"items": len(records)}
        if self.reference is None or not records:
            self._parts.append(part)
            return
        keys = [letter_key(r) for r in records]
        part["words"] = letter_means([familiarity.word_count(t) for t in texts], keys)
        part["p_overturned"] = letter_means(np.asarray(p, dtype=np.float64).reshape(len(records)), keys)
        if self.vocabulary is not None:
            part["oov"] = letter_means(oov_rates(texts, self.vocabulary), keys)
        if vectors is not None:
            v = np.asarray(vectors, dtype=np.float64)
            ok = ~np.isnan(v).any(axis=1)  # the ONNX backend computes embeddings only for some items
            if ok.any():
                sub = [k for k, good in zip(keys, ok) if good]
                part["distance"] = letter_means(self.profile.distances(v[ok]), sub)
                c = letter_means(self.profile.coordinates(v[ok]), sub)
                part["coords"] = (len(c), c.sum(axis=0), c.T @ c)
        self._parts.append(part)

    def mark(self) -> int:
        return len(self._parts)

    def rollback(self, mark: int) -> None:
        del self._parts[mark:]

    @property
    def n_items(self) -> int:
        return int(sum(part["items"] for part in self._parts))

    def report(self, **context) -> dict:
        """The drift report (`compare`) of everything observed; `context` (e.g. model, scope) is added to it."""
        if self.reference is None:
            return {**context, "verdict": "no reference", "drifted": None, "n_items": self.n_items, "message": NO_REFERENCE}
        values = {f: np.concatenate([q[f] for q in self._parts if f in q] or [np.zeros(0)]) for f in SCALARS}
        coords = [q["coords"] for q in self._parts if "coords" in q]
        moments = tuple(sum(c[i] for c in coords) for i in range(3)) if coords else None
        return {**context, **compare(self.reference, values, moments, self.n_items)}


# --------------------------------------------------------------------------- the tests and the verdict


def compare(reference: Mapping, values: Mapping[str, np.ndarray], moments: tuple | None, n_items: int) -> dict:
    """Test each feature of a batch against the reference and apply the rule (module docstring).

    `values`: per scalar feature the batch's per-letter values; `moments`: (letters, Σ coordinates, Σ outer
    products) of the letters' mean principal coordinates, or None."""
    features = {}
    for f in SCALARS:
        ref, x = reference.get(f), np.asarray(values.get(f, ()), dtype=np.float64)
        features[f] = _ks(x, ref, ALTERNATIVE[f]) if ref is not None and len(x) >= 2 else _missing(f, ref, len(x))
    ref = reference.get("embedding_mean")
    features["embedding_mean"] = (_hotelling(moments, ref) if ref is not None and moments is not None and moments[0] >= 2
                                  else _missing("embedding_mean", ref, 0 if moments is None else moments[0]))  # fmt: skip
    tested = [f for f in FEATURES if features[f]["p_value"] is not None]
    alpha = ALPHA / max(len(tested), 1)
    for f in FEATURES:
        r = features[f]
        r.update(feature=DESCRIPTION[f], effect_measure=EFFECT[f], min_effect=MIN_EFFECT[f], alpha=alpha)
        r["drifted"] = None if r["p_value"] is None else bool(r["p_value"] < alpha and r["effect"] >= MIN_EFFECT[f])
    drifted = [f for f in tested if features[f]["drifted"]]
    n_letters = len(values.get("words", ()))
    counts = f"{n_items} items in {n_letters} letters"
    if n_letters < MIN_LETTERS:
        verdict, flag, message = "too few items", None, f"too few items to judge ({counts}; a verdict needs {MIN_LETTERS} letters)"
    elif not tested:
        verdict, flag, message = "too few items", None, f"no feature could be tested ({counts})"
    else:
        verdict, flag = ("drift" if drifted else "no drift"), bool(drifted)
        message = (f"DRIFT on {', '.join(drifted)}" if drifted else "no drift") + f" ({counts}, {len(tested)} features)"
    rule = (f"per letter (the mean over its items); a feature drifted when p < {ALPHA:g}/{len(tested)} (Bonferroni) "
            f"and its effect >= its minimum; the batch drifted when any feature did; no verdict below {MIN_LETTERS} letters")
    return {"verdict": verdict, "drifted": flag, "drifted_features": drifted, "n_items": n_items, "n_letters": n_letters,
            "message": message, "rule": {"alpha": ALPHA, "features_tested": len(tested), "alpha_per_feature": alpha,
                                         "min_letters": MIN_LETTERS, "min_effect": dict(MIN_EFFECT), "text": rule},
            "features": features}  # fmt: skip


def _pseudo_sample(ref: Mapping) -> np.ndarray:
    """`ref["n"]` values with the reference's quantile function (interpolated between its stored quantiles)."""
    q = np.asarray(ref["quantiles"], dtype=np.float64)
    n = int(ref["n"])
    return np.interp((np.arange(n) + 0.5) / n, np.linspace(0, 1, len(q)), q)


def _ks(x: np.ndarray, ref: Mapping, alternative: str) -> dict:
    sample = _pseudo_sample(ref)
    res = stats.ks_2samp(x, sample, alternative=alternative)
    side = "" if alternative == "two-sided" else ", one-sided: batch larger"
    return {"test": f"two-sample Kolmogorov-Smirnov (scipy.stats.ks_2samp{side})", "statistic": float(res.statistic),
            "p_value": float(res.pvalue), "effect": float(res.statistic), "n_batch": len(x), "n_reference": int(ref["n"]),
            "batch_median": float(np.median(x)), "reference_median": float(np.median(sample)),
            "reference_source": ref.get("source", "")}  # fmt: skip


def _hotelling(moments: tuple, ref: Mapping) -> dict:
    n_b, s, Q = moments
    mean_r, cov_r = np.asarray(ref["mean"], dtype=np.float64), np.asarray(ref["covariance"], dtype=np.float64)
    n_r, k = int(ref["n"]), len(mean_r)
    mean_b = np.asarray(s, dtype=np.float64) / n_b
    cov_b = (np.asarray(Q, dtype=np.float64) - n_b * np.outer(mean_b, mean_b)) / max(n_b - 1, 1)
    pooled = ((n_b - 1) * cov_b + (n_r - 1) * cov_r) / (n_b + n_r - 2)
    d = mean_b - mean_r
    d2 = float(d @ np.linalg.lstsq(pooled, d, rcond=None)[0])
    t2 = n_b * n_r / (n_b + n_r) * d2
    df2 = n_b + n_r - k - 1
    p = float(stats.f.sf(t2 * df2 / (k * (n_b + n_r - 2)), k, df2)) if df2 > 0 else None
    noise = k * (1 / n_b + 1 / n_r)  # E[d2] when both samples come from one distribution: the effect is beyond it
    return {"test": f"two-sample Hotelling T^2 on {k} principal coordinates (F distribution, scipy.stats.f)",
            "statistic": t2, "p_value": p, "effect": math.sqrt(max(d2 - noise, 0.0)), "n_batch": int(n_b), "n_reference": n_r,
            "reference_source": "the training letters' mean principal coordinates (mean and covariance)"}  # fmt: skip


def _missing(feature: str, ref, n: int) -> dict:
    if ref is None:
        why = "the model's drift reference has no statistics for it"
    elif feature == "oov" and n == 0:
        why = "the model directory has no TF-IDF vocabulary"
    elif feature in ("distance", "embedding_mean") and n == 0:
        why = "no item embeddings (the ONNX backend computes them only for texts not parsed from a letter)"
    else:
        why = f"fewer than 2 letters ({n})"
    return {"test": None, "statistic": None, "p_value": None, "effect": None, "n_batch": n, "not_tested": why}


# --------------------------------------------------------------------------- output


def summary_line(report: Mapping) -> str:
    """One line for `imr score`'s and `imr drift`'s summary."""
    if report["verdict"] == "no reference":
        return f"drift: {report['message']}"
    tested = [(f, r) for f, r in report["features"].items() if r["p_value"] is not None]
    shown = sorted(tested, key=lambda fr: fr[1]["p_value"])[:3] if report["verdict"] != "drift" else \
        [(f, report["features"][f]) for f in report["drifted_features"]]  # fmt: skip
    parts = [f"{f} p={r['p_value']:.2g} effect={r['effect']:.2f}" for f, r in shown]
    rule = f"p < {report['rule']['alpha_per_feature']:.2g} and effect >= its minimum"
    return f"drift: {report['message']}; {'; '.join(parts)} [{rule}]"


def report_lines(report: Mapping) -> list[str]:
    """The summary line, then one line per feature (`imr drift`)."""
    lines = [summary_line(report)]
    for f, r in report.get("features", {}).items():
        if r["p_value"] is None:
            lines.append(f"  {f:<15} not tested: {r.get('not_tested', '')}")
            continue
        mark = "DRIFT" if r["drifted"] else "ok"
        lines.append(f"  {f:<15} {mark:<5} {r['effect_measure']} {r['effect']:.3f} (min {r['min_effect']:g}), "
                     f"p {r['p_value']:.3g} (alpha {r['alpha']:.3g}); n {r['n_batch']} vs {r['n_reference']}")  # fmt: skip
    return lines


def write_report(report: Mapping, path: str | Path) -> Path:
    """Write the report as JSON (``.json``) or a self-contained HTML page (``.html``/``.htm``)."""
    path = Path(path)
    if path.suffix.lower() not in (".json", ".html", ".htm"):
        raise ValueError(f"drift report {path}: use a .json or .html name")
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2) if path.suffix.lower() == ".json" else render_html(report)
    path.write_text(text, encoding="utf-8")
    return path


def _num(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    return f"{float(v):.3g}"


def render_html(report: Mapping) -> str:
    """The report as one page: no scripts, inline CSS, every value escaped."""
    e = lambda v: html.escape(str(v), quote=True)  # noqa: E731
    rows = []
    for f, r in report.get("features", {}).items():
        cls = "bad" if r.get("drifted") else ""
        cells = [r.get(k) for k in ("statistic", "p_value", "alpha", "effect", "min_effect", "n_batch", "n_reference")]
        rows.append(f'<tr class="{cls}"><td>{e(f)}</td><td>{e(r.get("feature", ""))}</td>'
                    + "".join(f'<td class="num">{e(_num(c))}</td>' for c in cells)
                    + f"<td>{e(_num(r.get('drifted')) if r.get('p_value') is not None else r.get('not_tested', ''))}</td>"
                    f"<td>{e(r.get('test') or '')}</td></tr>")  # fmt: skip
    context = "".join(f"<li>{e(k)}: {e(report[k])}</li>" for k in ("model", "scope") if k in report)
    rule = report.get("rule", {}).get("text", "")
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>IMR batch drift</title><style>"
            "body{font-family:system-ui,sans-serif;margin:24px;color:#1d2330}table{border-collapse:collapse;font-size:13px}"
            "th,td{border-bottom:1px solid #e3e6ec;padding:4px 8px;text-align:left}td.num{text-align:right;"
            "font-variant-numeric:tabular-nums}tr.bad td{background:#fdecea}.verdict{font-size:18px;font-weight:600}"
            f"</style></head><body><h1>Batch drift</h1><p class=\"verdict\">{e(report.get('message', ''))}</p>"
            f"<ul>{context}<li>items: {e(report.get('n_items'))}</li><li>rule: {e(rule)}</li></ul>"
            "<table><tr><th>feature</th><th>what</th><th>statistic</th><th>p</th><th>α per feature</th><th>effect</th>"
            f"<th>min effect</th><th>batch n</th><th>reference n</th><th>drifted</th><th>test</th></tr>{''.join(rows)}"
            "</table></body></html>\n")  # fmt: skip
