"""Evaluation slices (#21 item 2): the overall metrics, with n and letter-level intervals, per kind of item.

Four dimensions, each a function record → slice value(s):

- `decision_basis`: the decision-basis labels among the item's given `guideline_labels` (an MTUS
  chapter, OUTSIDE_MTUS or NO_CITATION; `decision_basis` in taxonomy.yaml). An item citing two bases
  counts in both slices; an item with none is "unknown".
- `reviewer_specialty`: the first specialty the letter lists (the reviewer's primary board, e.g.
  "Family Practice" of "Family Practice, Sports Medicine"); missing: "unknown".
- `layout`: the letter layout the parser recognised ("2013", "2015", "2016"); tables without it: "unknown".
- `request_category`: the treatment asked for, by the versioned keyword taxonomy
  `resources/request_categories.yaml` (first matching category in file order, else its fallback "other").

Every slice reports `n_items`, `n_letters`, `n_overturned` and the point metrics that are defined on it
(AUROC, AUPRC, balanced accuracy and MCC need both outcomes: null on a single-class slice; F1 is null with no
Overturned item either true or predicted). Intervals are the
letter-level bootstrap of `imr_model.intervals` on the slice's own items (its own resamples, seed 0),
computed only for slices of at least `MIN_SLICE_ITEMS` items from at least two letters; smaller slices
have null intervals.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import yaml

from imr_model.intervals import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, THRESHOLD_FREE, Resampler, add_intervals
from imr_model.metrics import _cell, guideline_metrics, outcome_metrics
from imr_model.taxonomy import load_taxonomy

DIMENSIONS = ("decision_basis", "reviewer_specialty", "layout", "request_category")
UNKNOWN = "unknown"
MIN_SLICE_ITEMS = 5  # fewer items (or a single letter): n and point metrics only, intervals null
OUTCOME_KEYS = ("auroc", "auprc", "f1", "mcc", "brier", "ece", "balanced_accuracy")
GUIDELINE_KEYS = ("micro_f1", "macro_f1")
CATEGORIES_FILE = "resources/request_categories.yaml"
MAX_REQUEST_CHARS = 2000  # requests are a line or two; the patterns never see more
_TOP_KEYS = ("version", "fallback", "categories")
_CATEGORY_KEYS = ("id", "description", "patterns")
_WS = re.compile(r"\s+")


@dataclass(frozen=True)
class RequestCategories:
    version: int
    fallback: str
    categories: tuple[tuple[str, tuple[re.Pattern, ...]], ...]  # (id, patterns) in file order

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(c for c, _ in self.categories) + (self.fallback,)

    def categorize(self, request: str | None) -> str:
        """The first category (file order) with a pattern found in the request; the fallback otherwise."""
        text = _WS.sub(" ", str(request or ""))[:MAX_REQUEST_CHARS]
        for cat, patterns in self.categories:
            if any(p.search(text) for p in patterns):
                return cat
        return self.fallback


def _unknown_keys(where: str, given: Mapping, valid: Sequence[str]) -> None:
    unknown = sorted(set(given) - set(valid), key=str)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys are {list(valid)}")


@lru_cache(maxsize=8)
def load_request_categories(path: str | Path | None = None) -> RequestCategories:
    """The request taxonomy (default: the shipped `resources/request_categories.yaml`), validated and compiled."""
    where = str(path) if path is not None else f"imr_model/{CATEGORIES_FILE}"
    text = Path(path).read_text("utf-8") if path is not None else \
        resources.files("imr_model").joinpath(CATEGORIES_FILE).read_text("utf-8")  # fmt: skip
    raw = yaml.safe_load(text)
    _unknown_keys(where, raw if isinstance(raw, dict) else {"<not a mapping>": 0}, _TOP_KEYS)
    version, fallback, entries = raw.get("version"), raw.get("fallback", "other"), raw.get("categories")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{where}: version must be an integer >= 1, got {version!r}")
    if not isinstance(fallback, str) or not fallback:
        raise ValueError(f"{where}: fallback must be a category id, got {fallback!r}")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{where}: categories must be a non-empty list")
    compiled, seen = [], {fallback}
    for k, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            raise ValueError(f"{where}: category {k} must be a mapping with a string id")
        cid = entry["id"]
        _unknown_keys(f"{where}: category {cid!r}", entry, _CATEGORY_KEYS)
        if cid in seen:
            raise ValueError(f"{where}: category id {cid!r} appears twice (or is the fallback)")
        seen.add(cid)
        patterns = entry.get("patterns")
        if not isinstance(patterns, list) or not patterns or not all(isinstance(p, str) for p in patterns):
            raise ValueError(f"{where}: category {cid!r} needs a non-empty list of pattern strings")
        try:
            compiled.append((cid, tuple(re.compile(p, re.I) for p in patterns)))
        except re.error as exc:
            raise ValueError(f"{where}: category {cid!r}: invalid pattern {exc.pattern!r}: {exc}") from None
    return RequestCategories(version, fallback, tuple(compiled))


# ------------------------------------------------------------------------------ slice assignment
def decision_basis(record: Mapping) -> tuple[str, ...]:
    basis = set(load_taxonomy().decision_basis)
    return tuple(sorted({str(x) for x in record.get("guideline_labels") or () if x in basis})) or (UNKNOWN,)


def reviewer_specialty(record: Mapping) -> tuple[str, ...]:
    primary = re.split(r"[,;]", _WS.sub(" ", str(record.get("reviewer_specialty") or "")), maxsplit=1)[0].strip()
    return (primary or UNKNOWN,)


def layout(record: Mapping) -> tuple[str, ...]:
    return (str(record.get("layout") or UNKNOWN),)


def request_category(record: Mapping) -> tuple[str, ...]:
    return (load_request_categories().categorize(record.get("request")),)


ASSIGN = {"decision_basis": decision_basis, "reviewer_specialty": reviewer_specialty, "layout": layout,
          "request_category": request_category}  # fmt: skip


def slice_members(records: Sequence[Mapping], dimension: str) -> dict[str, np.ndarray]:
    """{value: item indices} for one dimension, largest slice first (ties by name)."""
    if dimension not in ASSIGN:
        raise ValueError(f"unknown slice dimension {dimension!r}; valid: {list(ASSIGN)}")
    members: dict[str, list[int]] = {}
    for i, rec in enumerate(records):
        for value in ASSIGN[dimension](rec):
            members.setdefault(value, []).append(i)
    return {v: np.asarray(ix) for v, ix in sorted(members.items(), key=lambda kv: (-len(kv[1]), kv[0]))}


# ------------------------------------------------------------------------------ metrics
def _num(value):
    return None if value is None or (isinstance(value, float) and not math.isfinite(value)) else float(value)


def _pick(src: Mapping, keys: Sequence[str]) -> dict:
    ci = {k: src.get(f"{k}_ci95") for k in keys}
    ci = {k: None if c is None or any(_num(v) is None for v in c) else [float(v) for v in c] for k, c in ci.items()}
    return {name: value for k in keys for name, value in ((k, _num(src.get(k))), (f"{k}_ci95", ci[k]))}


def _undefined(out: dict, c: Mapping) -> dict:
    """MCC is 0/0 on a single-class slice, F1 with no Overturned item either true or predicted: null, not 0."""
    for key, undefined in (("mcc", c["tp"] + c["fn"] == 0 or c["tn"] + c["fp"] == 0), ("f1", c["tp"] + c["fp"] + c["fn"] == 0)):
        if undefined:
            out[key] = out[f"{key}_ci95"] = None
    return out


def _outcome_point(y: np.ndarray, p: np.ndarray, thr) -> dict:
    if np.ndim(thr) == 0:
        return outcome_metrics(y, p, float(thr))
    decided = outcome_metrics(y, np.clip(p - thr + 0.5, 0, 1), 0.5)  # per-item (fold) thresholds
    free = outcome_metrics(y, p, 0.5)
    return {k: (free[k] if k in THRESHOLD_FREE else v) for k, v in decided.items()}


def slice_metrics(records: Sequence[Mapping], y, p, threshold=0.5, Y=None, guideline_decisions=None, groups=None, *,
                  dimensions: Sequence[str] = DIMENSIONS, n: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                  min_items: int = MIN_SLICE_ITEMS) -> dict:  # fmt: skip
    """{dimension: {value: {"n_items", "n_letters", "n_overturned", "outcome": {metric, metric_ci95}, "guideline"}}}.

    `y`, `p` (P(Overturned)), `threshold` (one, or one per item), `Y` / `guideline_decisions` ((N, L) 0/1) and
    `groups` (letter of each item; default the records' letter_id) are aligned with `records`. Undefined
    values are None. "guideline" is None without Y and decisions. "n_dropped" counts the slice's resamples
    holding one outcome class (left out of the AUROC, AUPRC and balanced-accuracy intervals; None: no intervals).
    """
    y, p = np.asarray(y).astype(int), np.asarray(p, dtype=float)
    if not len(records) == y.size == p.size:
        raise ValueError(f"{len(records)} records, {y.size} outcome labels and {p.size} probabilities")
    thr = np.asarray(threshold, dtype=float)
    g = np.asarray([str(r.get("letter_id") or i) for i, r in enumerate(records)] if groups is None else groups).astype(str)
    has_gl = Y is not None and guideline_decisions is not None
    Y = np.asarray(Y).astype(int) if has_gl else None
    D = np.asarray(guideline_decisions).astype(int) if has_gl else None
    out: dict = {}
    for dim in dimensions:
        out[dim] = {}
        for value, ix in slice_members(records, dim).items():
            t = thr if thr.ndim == 0 else thr[ix]
            row = {"outcome": _outcome_point(y[ix], p[ix], t),
                   "guidelines": guideline_metrics(Y[ix], D[ix], [str(j) for j in range(Y.shape[1])]) if has_gl else None}  # fmt: skip
            n_letters, dropped = len(set(g[ix].tolist())), None
            if len(ix) >= min_items and n_letters >= 2:
                rs = Resampler(y[ix], g[ix], n=n, seed=seed)
                add_intervals(row, rs, p[ix], t, Y[ix] if has_gl else None, D[ix] if has_gl else None)
                dropped = rs.info()["n_dropped"]
            out[dim][value] = {
                "n_items": len(ix), "n_letters": n_letters, "n_overturned": int(y[ix].sum()),
                "n_dropped": dropped,  # resamples with one outcome class, left out of AUROC/AUPRC/balanced accuracy
                "outcome": _undefined(_pick(row["outcome"], OUTCOME_KEYS), row["outcome"]["confusion"]),
                "guideline": _pick(row["guidelines"], GUIDELINE_KEYS) if has_gl else None,
            }  # fmt: skip
    return out


def slice_info(n: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict:
    """What the slices were computed with (kept beside them in the JSON)."""
    return {"dimensions": list(DIMENSIONS), "request_categories_version": load_request_categories().version,
            "min_items": MIN_SLICE_ITEMS, "n_resamples": n, "seed": seed, "unit": "letter"}  # fmt: skip


# ------------------------------------------------------------------------------ reporting
def sanitize(value: str) -> str:
    """A slice value as part of an MLflow metric name: [a-z0-9_] only."""
    return re.sub(r"[^a-z0-9]+", "_", str(value).lower()).strip("_") or UNKNOWN


def mlflow_metrics(slices: Mapping, prefix: str = "test_slice") -> dict[str, float]:
    """`<prefix>_<dimension>_<value>_{auroc,auprc,n}` for the slices holding both outcomes."""
    out = {}
    for dim, values in slices.items():
        for value, s in values.items():
            if not 0 < s["n_overturned"] < s["n_items"]:
                continue
            key = f"{prefix}_{dim}_{sanitize(value)}"
            out[f"{key}_n"] = float(s["n_items"])
            for metric in ("auroc", "auprc"):
                if (v := s["outcome"].get(metric)) is not None:
                    out[f"{key}_{metric}"] = float(v)
    return out


def format_slices(slices: Mapping) -> str:
    """One text table per dimension: n, letters, overturned, AUROC [CI], AUPRC [CI], F1, guideline micro-F1."""
    nan = float("nan")
    header = ("slice", "n", "letters", "overt.", "AUROC [95% CI]", "AUPRC [95% CI]", "F1", "gl_microF1")
    blocks = []
    for dim, values in slices.items():
        rows = [header]
        for value, s in values.items():
            o, gl = s["outcome"], s.get("guideline") or {}
            val = {k: nan if o.get(k) is None else o[k] for k in ("auroc", "auprc", "f1")}
            rows.append((str(value), str(s["n_items"]), str(s["n_letters"]), str(s["n_overturned"]),
                         _cell(val["auroc"], o.get("auroc_ci95")), _cell(val["auprc"], o.get("auprc_ci95")),
                         _cell(val["f1"]), _cell(nan if gl.get("micro_f1") is None else gl["micro_f1"])))  # fmt: skip
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = [f"Slices by {dim}"] + ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                                                  enumerate(zip(r, widths))) for r in rows]  # fmt: skip
        blocks.append("\n".join(lines))
    blocks.append(f"[low, high]: 95% letter-level bootstrap interval within the slice (slices of >= {MIN_SLICE_ITEMS} "
                  "items from >= 2 letters); —: undefined (a single outcome class)")  # fmt: skip
    return "\n\n".join(blocks)
