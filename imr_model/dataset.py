"""Item records → Hugging Face `DatasetDict` (train / validation / test) with three text views.

Each row keeps every record field plus `label` (1 = Overturned, 0 = Upheld) and one column per view
of `views.py` (``rationale``, ``rationale_masked``, ``forecast``; the masking rule is documented there).

Splits are grouped by ``letter_id`` (no letter in two splits), stratified by outcome as far as the
groups allow, and seeded. `build_dataset` attaches a report (`dd.report`: sizes, overturn rates,
masking counts, near-duplicate texts across splits) and logs counts only, never text.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Value, load_from_disk
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.model_selection import StratifiedGroupKFold

from imr_model.letters import iter_letter_files, parse_many
from imr_model.tabular import (  # noqa: F401 - re-exported: the dataset API is one import
    DEFAULT_DMHC_URL,
    TABLE_SUFFIXES,
    DatasetDownloadError,
    download_dmhc,
    load_dmhc,
    normalize_label,
    read_table,
    records_from_table,
)
from imr_model.types import DECISIONS, OVERTURNED, LetterError
from imr_model.views import (  # noqa: F401 - re-exported
    MASK_TOKEN,
    VIEWS,
    is_verdict,
    mask_conclusions,
    split_sentences,
    text_view,
)

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
LABEL_NAMES = DECISIONS  # label id 0 = Upheld, 1 = Overturned
RECORD_FIELDS = (
    "letter_id", "case_number", "item_index", "request", "decision", "guideline_labels", "odg_chapters",
    "maximus_guideline", "claims_admin_guideline", "rationale", "case_summary", "reviewer_specialty",
    "decision_date", "layout", "source",
)  # fmt: skip
META_FILE = "imr_dataset.json"

# --------------------------------------------------------------------------- splits


def _validated(records: Iterable[Mapping]) -> list[dict]:
    rows = [dict(r) for r in records]
    if not rows:
        raise ValueError("no records: build_dataset needs at least one labelled item record")
    for i, row in enumerate(rows):
        try:
            row["decision"] = normalize_label(row.get("decision"))
        except ValueError as exc:
            raise ValueError(f"record {i} ({row.get('letter_id')!r}): {exc}") from None
        if row["decision"] is None:
            raise ValueError(f"record {i} ({row.get('letter_id')!r}) has no decision; expected Upheld/Overturned")
    return rows


def _groups(rows: Sequence[Mapping]) -> list[str]:
    """Group key per row: the letter id, or a unique key for rows without one."""
    return [str(r["letter_id"]) if r.get("letter_id") not in (None, "") else f"\x00row{i}" for i, r in enumerate(rows)]


def assign_splits(
    labels: Sequence[int], groups: Sequence[str], fractions: Sequence[float], seed: int = 0
) -> np.ndarray:
    """Split index per row: whole groups only, each split's class counts close to `fractions` × totals.

    Greedy: groups in a seeded random order, each sent to the split whose per-class deficit it fills
    most (deficits weighted by class rarity). Random order, not largest-first, so letter sizes stay
    alike across splits. Deterministic for a given seed.
    """
    labels = np.asarray(labels, dtype=np.int64)
    fractions = np.asarray(fractions, dtype=float)
    if len(labels) != len(groups):
        raise ValueError(f"labels has {len(labels)} items but groups has {len(groups)}")
    if not set(np.unique(labels)) <= {0, 1}:
        raise ValueError(f"labels must be 0/1, got values {sorted(set(np.unique(labels).tolist()))}")
    if (fractions < 0).any() or abs(fractions.sum() - 1) > 1e-6:
        raise ValueError(f"fractions must be >= 0 and sum to 1, got {fractions.tolist()}")
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    keys = list(members)
    order = np.random.default_rng(seed).permutation(len(keys))
    keys = [keys[i] for i in order]
    totals = np.bincount(labels, minlength=2).astype(float)
    target = np.outer(fractions, totals)  # (splits, classes)
    current = np.zeros_like(target)
    out = np.zeros(len(labels), dtype=np.int64)
    for g in keys:
        idx = members[g]
        counts = np.bincount(labels[idx], minlength=2)
        gain = ((target - current) * counts / np.maximum(totals, 1)).sum(axis=1)
        gain[fractions <= 0] = -np.inf
        s = int(np.argmax(gain))
        current[s] += counts
        out[idx] = s
    return out


def grouped_kfold(records: Sequence[Mapping], k: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """`k` (train_idx, test_idx) folds, grouped by letter and stratified by outcome (StratifiedGroupKFold)."""
    rows = _validated(records)
    groups = _groups(rows)
    n_groups = len(set(groups))
    if not isinstance(k, int) or not 2 <= k <= n_groups:
        raise ValueError(f"k must be an int in [2, {n_groups}] (the number of letters), got {k!r}")
    labels = np.array([int(r["decision"] == OVERTURNED) for r in rows])
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return [(tr, te) for tr, te in cv.split(np.zeros(len(rows)), labels, groups)]


# --------------------------------------------------------------------------- near duplicates


def find_near_duplicates(
    texts: Sequence[str], groups: Sequence[str] | None = None, *, threshold: float = 0.9, chunk_size: int = 512
) -> list[tuple[int, int, float]]:
    """Pairs (i, j, cosine) with i < j and TF-IDF (word 1-2 gram) cosine >= `threshold`, exactly.

    With `groups` (e.g. split names) only pairs from different groups are compared and returned.
    Common terms make a full pairwise product dense and slow, so pairs are found in two exact steps:
    (a) pairs sharing a rare term become candidates when their rare-term product plus the bound on
    their common-term product (product of the common-term norms) reaches the threshold, then are
    checked; (b) documents whose common-term norm alone reaches the threshold ("heavy", e.g. templated
    text) can match without a rare term, so pairs of them are computed in full. 10k items: ~1-4 s.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if groups is not None and len(groups) != len(texts):
        raise ValueError(f"texts has {len(texts)} items but groups has {len(groups)}")
    keep = np.asarray([i for i, t in enumerate(texts) if t and t.strip()], dtype=np.int64)
    if len(keep) < 2:
        return []
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, dtype=np.float32)
    matrix = vectorizer.fit_transform([texts[i] for i in keep])  # rows are L2-normalised: dot = cosine
    group = np.asarray([str(groups[i]) for i in keep]) if groups is not None else np.zeros(len(keep), dtype=int)
    order = np.argsort(group, kind="stable")  # rows sorted by group: cross-group pairs are contiguous blocks
    i, j, sim = _near_pairs(matrix[order], group[order], groups is not None, threshold - 1e-6, chunk_size)
    a, b = keep[order[i]], keep[order[j]]
    return sorted((int(min(x, y)), int(max(x, y)), float(min(v, 1.0))) for x, y, v in zip(a, b, sim))


def _row_pairs(m, group: np.ndarray, cross: bool, chunk: int):
    """Yield (i, j, dot) arrays with i < j over rows of `m` sorted by `group` (different groups if `cross`)."""
    n = m.shape[0]
    ends = np.searchsorted(group, group, side="right")
    start = 0
    while start < n:
        stop = min(start + chunk, int(ends[start])) if cross else min(start + chunk, n)
        first_col = int(ends[start]) if cross else start  # only later rows: each pair once
        if first_col < n:
            block = (m[start:stop] @ m[first_col:].T).tocoo()
            i, j = block.row + start, block.col + first_col
            upper = i < j
            yield i[upper], j[upper], block.data[upper]
        start = stop


def _near_pairs(x, group: np.ndarray, cross: bool, t: float, chunk: int):
    n = x.shape[0]
    df = np.bincount(x.indices, minlength=x.shape[1])
    common = df > max(32, n // 100)
    common_norm = np.sqrt(np.asarray(x[:, common].power(2).sum(axis=1)).ravel())
    heavy = common_norm >= t
    cand_i, cand_j = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    for i, j, dot in _row_pairs(x[:, ~common].tocsr(), group, cross, chunk):  # (a) share a rare term
        maybe = ~(heavy[i] & heavy[j]) & (dot + common_norm[i] * common_norm[j] >= t)
        cand_i.append(i[maybe])
        cand_j.append(j[maybe])
    ci, cj = np.concatenate(cand_i), np.concatenate(cand_j)
    sims = np.concatenate(
        [
            np.asarray(x[ci[k : k + 65536]].multiply(x[cj[k : k + 65536]]).sum(axis=1)).ravel()
            for k in range(0, len(ci), 65536)
        ]
        or [np.empty(0, np.float32)]
    )
    ok = sims >= t
    out_i, out_j, out_v = [ci[ok]], [cj[ok]], [sims[ok]]
    h = np.flatnonzero(heavy)  # (b) heavy pairs, exact products
    for i, j, dot in _row_pairs(x[h], group[h], cross, chunk):
        ok = dot >= t
        out_i.append(h[i[ok]])
        out_j.append(h[j[ok]])
        out_v.append(dot[ok])
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_v)


# --------------------------------------------------------------------------- datasets


def _features(columns: Mapping[str, list]) -> Any:
    """Explicit types for the record schema; other columns inferred (stringified if mixed)."""
    known = {name: Value("string") for name in (*RECORD_FIELDS, *VIEWS)}
    known.update(item_index=Value("int64"), guideline_labels=List(Value("string")), odg_chapters=List(Value("string")))
    known["label"] = ClassLabel(names=list(LABEL_NAMES))
    feats = {}
    for name, values in columns.items():
        if name in known:
            feats[name] = known[name]
            continue
        try:
            feats[name] = Features.from_arrow_schema(pa.schema([(name, pa.array(values).type)]))[name]
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            columns[name][:] = [None if v is None else str(v) for v in values]  # type: ignore[index]
            feats[name] = Value("string")
    return Features(feats)


def _split_dataset(rows: list[dict], columns: list[str]) -> Any:
    data = {c: [r.get(c) for r in rows] for c in columns}
    for c in ("guideline_labels", "odg_chapters"):
        data[c] = [list(v) if v is not None else [] for v in data[c]]
    data["item_index"] = [int(v) if v is not None else 1 for v in data["item_index"]]
    return Dataset.from_dict(data, features=_features(data))


def build_dataset(
    records: Iterable[Mapping],
    *,
    seed: int = 0,
    val_size: float = 0.15,
    test_size: float = 0.15,
    dedup_view: str = "rationale",
    dedup_threshold: float = 0.9,
) -> Any:
    """Records → `DatasetDict` train/validation/test with `label` and one column per view.

    The report (sizes, overturn rates, masking counts, near-duplicate texts of `dedup_view` across
    splits) is attached as `dd.report` and saved by `save_dataset`.
    """
    for name, value in (("val_size", val_size), ("test_size", test_size)):
        if not 0 <= value < 1:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if val_size + test_size >= 1:
        raise ValueError(f"val_size + test_size must be < 1, got {val_size} + {test_size}")
    if dedup_view not in VIEWS:
        raise ValueError(f"unknown dedup_view {dedup_view!r}; valid views: {list(VIEWS)}")
    rows = _validated(records)
    masked_counts = []
    for row in rows:
        row["label"] = int(row["decision"] == OVERTURNED)
        row["rationale"] = str(row.get("rationale") or "")
        row["rationale_masked"], n_masked = mask_conclusions(row["rationale"])
        masked_counts.append(n_masked)
        row["forecast"] = text_view(row, "forecast")
    fractions = (1 - val_size - test_size, val_size, test_size)
    split_of = assign_splits([r["label"] for r in rows], _groups(rows), fractions, seed)
    extras = sorted({k for r in rows for k in r} - set(RECORD_FIELDS) - set(VIEWS) - {"label"})
    columns = [*RECORD_FIELDS, *extras, "label", *VIEWS]
    dd = DatasetDict(
        {name: _split_dataset([r for r, s in zip(rows, split_of) if s == k], columns) for k, name in enumerate(SPLITS)}
    )
    texts = [r[dedup_view] for r in rows]
    dups = find_near_duplicates(texts, [SPLITS[s] for s in split_of], threshold=dedup_threshold)
    dd.report = _report(rows, split_of, masked_counts, dups, dedup_view, dedup_threshold, seed)
    logger.info("dataset built: %s", {k: dd.report[k] for k in ("sizes", "overturn_rate", "masked_sentences")})
    if dups:
        logger.warning(
            "%d near-duplicate %s pairs across splits (cosine >= %.2f)", len(dups), dedup_view, dedup_threshold
        )
    return dd


def _report(rows, split_of, masked_counts, dups, view, threshold, seed) -> dict:
    labels = np.array([r["label"] for r in rows])
    in_split = {name: np.flatnonzero(split_of == k) for k, name in enumerate(SPLITS)}

    def ref(i: int) -> dict:  # ids only: the report is logged and saved, so it never holds text
        row = rows[i]
        return {"split": SPLITS[split_of[i]], "letter_id": row.get("letter_id"), "item_index": row.get("item_index")}

    return {
        "seed": seed,
        "sizes": {name: len(idx) for name, idx in in_split.items()},
        "letters": {name: len({rows[i].get("letter_id") for i in idx}) for name, idx in in_split.items()},
        "overturn_rate": {n: round(float(labels[idx].mean()), 4) if len(idx) else None for n, idx in in_split.items()},
        "masked_sentences": int(sum(masked_counts)),
        "items_without_masked_sentence": int(sum(1 for n in masked_counts if n == 0)),
        "near_duplicates": {
            "view": view,
            "threshold": threshold,
            "pairs": len(dups),
            "items_involved": len({i for p in dups for i in p[:2]}),
            "examples": [{"a": ref(i), "b": ref(j), "cosine": round(v, 4)} for i, j, v in dups[:20]],
        },
    }


def dataset_digest(data: Any) -> str:
    """Stable sha256 (hex) over the records: a list of record dicts, or a DatasetDict (split names included)."""
    h = hashlib.sha256()
    parts = ((name, data[name]) for name in data) if isinstance(data, DatasetDict) else [(None, data)]
    for split, rows in parts:
        for row in rows:
            payload = {"__split__": split, **row} if split is not None else dict(row)
            h.update(json.dumps(payload, sort_keys=True, default=str, ensure_ascii=False).encode("utf-8"))
            h.update(b"\n")
    return h.hexdigest()


def save_dataset(dd: Any, path: str | Path) -> Path:
    """`save_to_disk` plus `imr_dataset.json` (digest and build report) in the same folder."""
    if not isinstance(dd, DatasetDict):
        raise TypeError(f"save_dataset expects a DatasetDict, got {type(dd).__name__}")
    path = Path(path)
    dd.save_to_disk(str(path))
    meta = {"digest": dataset_digest(dd), "report": getattr(dd, "report", None)}
    (path / META_FILE).write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")
    return path


def load_dataset_dir(path: str | Path) -> Any:
    """Load a folder written by `save_dataset` (`.report` and `.digest` restored when present)."""
    path = Path(path)
    if not (path / "dataset_dict.json").is_file():
        raise FileNotFoundError(f"{path}: not a saved DatasetDict (no dataset_dict.json); build one with save_dataset")
    dd = load_from_disk(str(path))
    if not isinstance(dd, DatasetDict):
        raise ValueError(f"{path}: expected a DatasetDict with splits {list(SPLITS)}, got {type(dd).__name__}")
    meta_path = path / META_FILE
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    dd.report, dd.digest = meta.get("report"), meta.get("digest")
    return dd


# --------------------------------------------------------------------------- loading


def load_records(
    inputs: str | Path | Iterable[str | Path],
    *,
    text_column: str | None = None,
    label_column: str | None = None,
    id_column: str | None = None,
    request_column: str | None = None,
    summary_column: str | None = None,
    workers: int = 1,
) -> tuple[list[dict], list[LetterError]]:
    """Records from letters (PDF/TXT files, folders, globs) and tables (.csv/.jsonl/.parquet).

    Letters that fail to parse come back as `LetterError`s; a bad table (missing file or column,
    unknown label) raises, since that is a usage error rather than one bad document.
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    tables, letters = [], []
    for raw in inputs:
        matches = sorted(glob.glob(str(raw), recursive=True)) if glob.has_magic(str(raw)) else [str(raw)]
        for m in matches or [str(raw)]:  # a pattern matching nothing goes on, so it comes back as an error
            (tables if Path(m).suffix.lower() in TABLE_SUFFIXES and not glob.has_magic(m) else letters).append(m)
    records: list[dict] = []
    errors: list[LetterError] = []
    for table in tables:
        records += records_from_table(
            read_table(table), source=table, text_column=text_column, label_column=label_column,
            id_column=id_column, request_column=request_column, summary_column=summary_column,
        )  # fmt: skip
    paths = iter_letter_files(letters) if letters else []
    for result in parse_many(paths, workers=workers):
        if isinstance(result, LetterError):
            errors.append(result)
        else:
            records.extend(result.item_records())
    return records, errors
