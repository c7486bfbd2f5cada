"""Item records → Hugging Face `DatasetDict` (train / validation / test) with three text views.

Each row keeps every record field plus `label` (1 = Overturned, 0 = Upheld) and one column per view
of `views.py` (``rationale``, ``rationale_masked``, ``forecast``; the masking rule is documented there).

Splits are grouped by ``letter_id`` (no letter in two splits), stratified by outcome as far as the
groups allow, and seeded. `build_dataset` attaches a report (`dd.report`: sizes, overturn rates,
masking counts, near-duplicate texts across splits) and logs counts only, never text.

Memory: `build_dataset` streams. Records are read once (from any iterable, e.g. `iter_records`, which
streams letters and tables) into a temporary spool file; what stays in memory per item is its label,
letter, index, the extra (non-schema) fields and the near-duplicate view's TF-IDF row. The splits are
then written row by row into Arrow files that the returned `DatasetDict` memory-maps (deleted with it).
Near-duplicate pairs are counted as they are found, never held as a list (`near_duplicate_summary`).
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import heapq
import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Value, load_from_disk
from datasets.arrow_writer import ArrowWriter
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
    iter_table_records,
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
    rows = [_validated_row(r, i) for i, r in enumerate(records)]
    if not rows:
        raise ValueError("no records: build_dataset needs at least one labelled item record")
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
    The list holds every pair; `near_duplicate_summary` counts them in constant memory instead.
    """
    pairs = [p for a, b, v in _pair_chunks(texts, groups, threshold, chunk_size) for p in zip(a.tolist(), b.tolist(), v.tolist())]
    return sorted((a, b, min(v, 1.0)) for a, b, v in pairs)


def near_duplicate_summary(
    texts: Iterable[str], groups: Sequence[str] | None = None, *, threshold: float = 0.9, chunk_size: int = 512,
    examples: int = 20,
) -> dict:  # fmt: skip
    """What `find_near_duplicates` finds, without holding the pairs: {"pairs": count, "items_involved": count,
    "examples": the `examples` first pairs (i, j, cosine) in (i, j) order}. `texts` may be any iterable (it is read
    once), so a caller can stream them. On templated text the number of pairs grows with the square of the items
    (the demo letters: 1,308 pairs among 2,515 items, 200,628 among 25,229); memory here grows with the items only."""
    count, involved, best = 0, set(), []
    for a, b, v in _pair_chunks(texts, groups, threshold, chunk_size):
        if not len(a):
            continue
        count += len(a)
        involved.update(a.tolist())
        involved.update(b.tolist())
        first = np.lexsort((b, a))[:examples]
        best = heapq.nsmallest(examples, best + list(zip(a[first].tolist(), b[first].tolist(), v[first].tolist())))
    return {"pairs": count, "items_involved": len(involved), "examples": [(a, b, min(v, 1.0)) for a, b, v in best]}


#: Bound on the entries of one block of pairwise products (rows x columns); the chunk shrinks as the corpus grows,
#: so a block's memory stays bounded (a 512-row block of a 25k-item templated corpus was ~13M entries).
BLOCK_ENTRIES = 2_000_000


def _pair_chunks(texts: Iterable[str], groups: Sequence[str] | None, threshold: float, chunk_size: int):
    """Yield (i, j, cosine) arrays of the near-duplicate pairs (original indices, i < j), a block at a time."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    keep: list[int] = []
    n_texts = 0

    def non_empty() -> Iterator[str]:
        nonlocal n_texts
        for i, t in enumerate(texts):
            n_texts = i + 1
            if t and t.strip():
                keep.append(i)
                yield t

    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, dtype=np.float32)
    docs = non_empty()
    first = [t for _, t in zip(range(2), docs)]  # TfidfVectorizer fails on fewer than 2 non-empty texts
    if len(first) < 2:
        for _ in docs:
            pass
        if groups is not None and len(groups) != n_texts:
            raise ValueError(f"texts has {n_texts} items but groups has {len(groups)}")
        return
    matrix = vectorizer.fit_transform(_chain(first, docs))  # rows are L2-normalised: dot = cosine
    del vectorizer, first  # its vocabulary (every 1-2 gram) is not needed for the products
    if groups is not None and len(groups) != n_texts:
        raise ValueError(f"texts has {n_texts} items but groups has {len(groups)}")
    keep_a = np.asarray(keep, dtype=np.int64)
    keep.clear()  # the list of ints (~36 bytes each); keep_a holds them now
    group = np.asarray([str(groups[i]) for i in keep_a]) if groups is not None else np.zeros(len(keep_a), dtype=int)
    order = np.argsort(group, kind="stable")  # rows sorted by group: cross-group pairs are contiguous blocks
    chunk = max(16, min(chunk_size, BLOCK_ENTRIES // max(1, len(keep_a))))
    matrix = matrix[order]  # one copy of the matrix at a time: the unsorted one is freed here
    pairs = _near_pairs(matrix, group[order], groups is not None, threshold - 1e-6, chunk)
    del matrix  # the generator holds the only reference, so it can free the matrix when it no longer needs it
    for i, j, sim in pairs:
        a, b = keep_a[order[i]], keep_a[order[j]]
        yield np.minimum(a, b), np.maximum(a, b), sim


def _chain(head: list[str], tail: Iterator[str]) -> Iterator[str]:
    yield from head
    yield from tail


def _rows(m, start: int, stop: int):
    """Rows start:stop of CSR `m` as a CSR matrix sharing `m`'s data and indices (scipy's slicing copies them)."""
    lo, hi = int(m.indptr[start]), int(m.indptr[stop])
    return type(m)((m.data[lo:hi], m.indices[lo:hi], m.indptr[start : stop + 1] - lo), shape=(stop - start, m.shape[1]))


def _row_pairs(m, group: np.ndarray, cross: bool, chunk: int, min_dot: float | None = None):
    """Yield (i, j, dot) arrays with i < j over rows of `m` sorted by `group` (different groups if `cross`);
    with `min_dot`, only the pairs with dot >= min_dot.

    A block is the products of `chunk` rows i with all later rows j (of later groups if `cross`), computed as
    rows j @ (rows i).T: the small side is the one scipy converts to CSR, and rows j are a view, so a block costs
    its products only (not a copy of the later rows, plus the transposed copy scipy made of them per block).
    Each dot is summed over the shared terms in the same order as (rows i) @ (rows j).T would: every row of the
    TF-IDF matrix stores its terms in one global order (CountVectorizer sorts each row by first-seen term index,
    then renumbers the terms), so the values are bit-identical, only the pairs come out in another order."""
    n = m.shape[0]
    ends = np.searchsorted(group, group, side="right")
    start = 0
    while start < n:
        stop = min(start + chunk, int(ends[start])) if cross else min(start + chunk, n)
        first_col = int(ends[start]) if cross else start  # only later rows: each pair once
        if first_col < n:
            block = (_rows(m, first_col, n) @ _rows(m, start, stop).T).tocsr()  # (later rows) x (block rows)
            if min_dot is None:
                block = block.tocoo()
                j, i, dot = block.row, block.col, block.data
            else:  # keep the few pairs above the bound before making coordinates for all of them
                pos = np.flatnonzero(block.data >= min_dot)
                j, i, dot = np.searchsorted(block.indptr, pos, side="right") - 1, block.indices[pos], block.data[pos]
            del block
            i, j = i + start, j + first_col
            upper = i < j
            yield i[upper], j[upper], dot[upper]
        start = stop


#: Candidate pairs whose exact cosine is computed at once (two row copies of this many rows each).
EXACT_BATCH = 8192


def _near_pairs(x, group: np.ndarray, cross: bool, t: float, chunk: int):
    """Yield (i, j, cosine) arrays of the pairs with cosine >= t (row indices of `x`), block by block.

    Memory: `x` is dropped once step (a) is done (the caller passes the only reference), so step (b) holds the
    heavy rows only; per-row values are computed a slice of rows at a time (each row's own sum, so the values do
    not depend on the slicing)."""
    n = x.shape[0]
    df = np.zeros(x.shape[1], dtype=np.int64)
    for k in range(0, x.nnz, 1 << 20):  # np.bincount casts its input to int64: a slice at a time
        df += np.bincount(x.indices[k : k + (1 << 20)], minlength=x.shape[1])
    common = df > max(32, n // 100)
    common_norm = np.sqrt(np.concatenate([np.asarray(_rows(x, k, min(k + 4096, n))[:, common].power(2).sum(axis=1))
                                          .ravel() for k in range(0, n, 4096)]))  # fmt: skip
    heavy = common_norm >= t
    for i, j, dot in _row_pairs(x[:, ~common].tocsr(), group, cross, chunk):  # (a) share a rare term
        maybe = ~(heavy[i] & heavy[j]) & (dot + common_norm[i] * common_norm[j] >= t)
        ci, cj = i[maybe], j[maybe]
        for k in range(0, len(ci), EXACT_BATCH):
            a, b = ci[k : k + EXACT_BATCH], cj[k : k + EXACT_BATCH]
            sims = np.asarray(x[a].multiply(x[b]).sum(axis=1)).ravel()
            ok = sims >= t
            yield a[ok], b[ok], sims[ok]
    h = np.flatnonzero(heavy)  # (b) heavy pairs, exact products
    x, group = x[h], group[h]  # the full matrix goes here (when the caller holds no reference)
    for i, j, dot in _row_pairs(x, group, cross, chunk, min_dot=t):
        yield h[i], h[j], dot


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


def _validated_row(record: Mapping, i: int) -> dict:
    """One record as a row dict with its decision normalised; ValueError naming the record otherwise."""
    row = dict(record)
    try:
        row["decision"] = normalize_label(row.get("decision"))
    except ValueError as exc:
        raise ValueError(f"record {i} ({row.get('letter_id')!r}): {exc}") from None
    if row["decision"] is None:
        raise ValueError(f"record {i} ({row.get('letter_id')!r}) has no decision; expected Upheld/Overturned")
    return row


_SPOOL_FIELDS = (*RECORD_FIELDS, "label", *VIEWS)  # what the spool file holds per row (extras stay in memory)


def build_dataset(
    records: Iterable[Mapping],
    *,
    seed: int = 0,
    val_size: float = 0.15,
    test_size: float = 0.15,
    dedup_view: str = "rationale",
    dedup_threshold: float | None = 0.9,
) -> Any:
    """Records → `DatasetDict` train/validation/test with `label` and one column per view.

    The report (sizes, overturn rates, masking counts, near-duplicate texts of `dedup_view` across
    splits) is attached as `dd.report` and saved by `save_dataset`. `dedup_threshold=None` skips the
    near-duplicate check (`imr data build --no-near-duplicates`): it is exact, and on templated text its time
    grows faster than the number of items (docs/experiments.md, "Scale"); the report then says `"skipped": true`. `records` is read once, as a stream
    (module docstring: memory); the splits are Arrow files in a temporary directory that lives as long as
    the returned `DatasetDict` or any of its `Dataset`s.
    """
    for name, value in (("val_size", val_size), ("test_size", test_size)):
        if not 0 <= value < 1:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if val_size + test_size >= 1:
        raise ValueError(f"val_size + test_size must be < 1, got {val_size} + {test_size}")
    if dedup_view not in VIEWS:
        raise ValueError(f"unknown dedup_view {dedup_view!r}; valid views: {list(VIEWS)}")
    spool_dir = tempfile.TemporaryDirectory(prefix="imr-dataset-", ignore_cleanup_errors=True)
    spool = Path(spool_dir.name) / "rows.jsonl"
    labels, groups, refs, masked_counts = [], [], [], []  # per row: small values only
    extras: dict[str, dict[int, Any]] = {}  # fields beyond the schema (tables, DMHC): {field: {row: value}}
    with spool.open("w", encoding="utf-8") as out:
        for i, record in enumerate(records):
            row = _validated_row(record, i)
            row["label"] = int(row["decision"] == OVERTURNED)
            row["rationale"] = str(row.get("rationale") or "")
            row["rationale_masked"], n_masked = mask_conclusions(row["rationale"])
            row["forecast"] = text_view(row, "forecast")
            labels.append(row["label"])
            groups.append(str(row["letter_id"]) if row.get("letter_id") not in (None, "") else f"\x00row{i}")
            refs.append((row.get("letter_id"), row.get("item_index")))
            masked_counts.append(n_masked)
            for key in row.keys() - set(_SPOOL_FIELDS):
                extras.setdefault(key, {})[i] = row[key]
            out.write(json.dumps({k: row.get(k) for k in _SPOOL_FIELDS}, ensure_ascii=False, default=str) + "\n")
    if not labels:
        raise ValueError("no records: build_dataset needs at least one labelled item record")
    _trim_heap()  # what reading the records (table chunks, parsed letters) left freed
    fractions = (1 - val_size - test_size, val_size, test_size)
    split_of = assign_splits(labels, groups, fractions, seed)
    dups = (near_duplicate_summary((row[dedup_view] for row in _spooled(spool)), [SPLITS[s] for s in split_of],
                                   threshold=dedup_threshold) if dedup_threshold is not None else None)  # fmt: skip
    _trim_heap()  # the TF-IDF matrix and the product blocks are freed: give their pages back before the writes
    columns = [*RECORD_FIELDS, *sorted(extras), "label", *VIEWS]
    dd = DatasetDict(_write_splits(spool, split_of, columns, extras, Path(spool_dir.name)))
    spool.unlink()
    for ds in (dd, *dd.values()):  # the Arrow files go when the last of these goes
        ds._imr_files = spool_dir
    dd.report = _report(labels, refs, split_of, masked_counts, dups, dedup_view, dedup_threshold, seed)
    logger.info("dataset built: %s", {k: dd.report[k] for k in ("sizes", "overturn_rate", "masked_sentences")})
    if dups is not None and dups["pairs"]:
        logger.warning(
            "%d near-duplicate %s pairs across splits (cosine >= %.2f)", dups["pairs"], dedup_view, dedup_threshold
        )
    return dd


def _trim_heap() -> None:
    """Return freed heap memory to the OS (glibc `malloc_trim`; a no-op elsewhere).

    glibc keeps freed chunks of its heap resident unless they sit at its top, and after the first large array is
    freed it serves arrays up to that size from the heap instead of separate mappings, so without this the freed
    TF-IDF matrix and product blocks (tens of MB at 25k items) stay in the RSS for the rest of the build."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # no glibc (macOS, musl) or no CDLL(None) (Windows)
        pass


def _spooled(spool: Path) -> Iterator[dict]:
    with spool.open(encoding="utf-8") as fh:
        for line in fh:
            yield json.loads(line)


def _write_splits(spool: Path, split_of: np.ndarray, columns: list[str], extras: dict[str, dict[int, Any]],
                  folder: Path) -> dict[str, Any]:  # fmt: skip
    """Each split's rows, streamed from the spool into an Arrow file, memory-mapped as a `Dataset`.

    A split's features are those `Dataset.from_dict` gave its columns: the schema's types, extra columns typed from
    that split's values (stringified where they mix types)."""
    members = [np.flatnonzero(split_of == k) for k in range(len(SPLITS))]
    features, extra_values, writers = [], [], []
    for k, name in enumerate(SPLITS):
        values = {c: [extras[c].get(int(i)) for i in members[k]] for c in extras}
        features.append(_features({c: values.get(c, []) for c in columns}))
        extra_values.append(values)
        writers.append(ArrowWriter(features=features[k], path=str(folder / f"{name}.arrow")))
    position = np.zeros(len(split_of), dtype=np.int64)  # a row's index within its split
    for k in range(len(SPLITS)):
        position[members[k]] = np.arange(len(members[k]))
    for i, row in enumerate(_spooled(spool)):
        k, p = int(split_of[i]), int(position[i])
        example = {c: row[c] if c in row else extra_values[k][c][p] for c in columns}
        for c in ("guideline_labels", "odg_chapters"):
            example[c] = list(example[c]) if example[c] is not None else []
        example["item_index"] = int(example["item_index"]) if example["item_index"] is not None else 1
        writers[k].write(features[k].encode_example(example))
    out = {}
    for k, name in enumerate(SPLITS):
        writers[k].finalize()
        writers[k].close()
        out[name] = Dataset.from_file(str(folder / f"{name}.arrow"), info=_info(features[k]))
    return out


def _info(features: Features):
    from datasets import DatasetInfo

    return DatasetInfo(features=features)


def _report(labels, refs, split_of, masked_counts, dups, view, threshold, seed) -> dict:
    labels = np.asarray(labels)
    in_split = {name: np.flatnonzero(split_of == k) for k, name in enumerate(SPLITS)}

    def ref(i: int) -> dict:  # ids only: the report is logged and saved, so it never holds text
        letter_id, item_index = refs[i]
        return {"split": SPLITS[split_of[i]], "letter_id": letter_id, "item_index": item_index}

    return {
        "seed": seed,
        "sizes": {name: len(idx) for name, idx in in_split.items()},
        "letters": {name: len({refs[i][0] for i in idx}) for name, idx in in_split.items()},
        "overturn_rate": {n: round(float(labels[idx].mean()), 4) if len(idx) else None for n, idx in in_split.items()},
        "masked_sentences": int(sum(masked_counts)),
        "items_without_masked_sentence": int(sum(1 for n in masked_counts if n == 0)),
        "near_duplicates": {
            "view": view,
            "threshold": threshold,
            "pairs": dups["pairs"],
            "items_involved": dups["items_involved"],
            "examples": [{"a": ref(i), "b": ref(j), "cosine": round(v, 4)} for i, j, v in dups["examples"]],
        } if dups is not None else {"view": view, "threshold": None, "skipped": True, "pairs": None,
                                    "items_involved": None, "examples": []},
    }


def dataset_digest(data: Any) -> str:
    """Stable sha256 (hex) over the records: a list of record dicts, or a DatasetDict (split names included)."""
    h = hashlib.sha256()
    parts = ((name, data[name]) for name in data) if isinstance(data, DatasetDict) else [(None, data)]
    for split, rows in parts:
        _digest_rows(h, split, rows)
    return h.hexdigest()


def _digest_rows(h: Any, split: str | None, rows: Iterable[Mapping]) -> None:
    for row in rows:
        payload = {"__split__": split, **row} if split is not None else dict(row)
        h.update(json.dumps(payload, sort_keys=True, default=str, ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")


def save_dataset(dd: Any, path: str | Path) -> Path:
    """`save_to_disk` plus `imr_dataset.json` (digest and build report) in the same folder.

    Memory: the pages of a memory-mapped split that are read (all of them, to copy and digest it) stay in the RSS
    as long as its map is open, i.e. through `dd`'s own maps the whole dataset until `dd` goes. So when every split
    is one Arrow file as `Dataset.from_file` opened it (the splits of `build_dataset`), each split is saved and
    digested from a map of its own, closed before the next split: one split's pages at a time. The folder and the
    digest are those of `dd.save_to_disk` + `dataset_digest(dd)` (which any other `dd` goes through)."""
    if not isinstance(dd, DatasetDict):
        raise TypeError(f"save_dataset expects a DatasetDict, got {type(dd).__name__}")
    path = Path(path)
    if all(_reopened(ds) is not None for ds in dd.values()):
        path.mkdir(parents=True, exist_ok=True)
        (path / "dataset_dict.json").write_text(json.dumps({"splits": list(dd)}), encoding="utf-8")  # as datasets does
        h = hashlib.sha256()
        for name, ds in dd.items():
            split = _reopened(ds)
            split.save_to_disk(str(path / name))
            _digest_rows(h, name, split)
            del split  # its map (and the pages read through it) goes here
        digest = h.hexdigest()
    else:
        dd.save_to_disk(str(path))
        digest = dataset_digest(dd)
    meta = {"digest": digest, "report": getattr(dd, "report", None)}
    (path / META_FILE).write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")
    return path


def _reopened(ds: Any) -> Any:
    """`ds` on a memory map of its own, or None unless `ds` is one Arrow file as `Dataset.from_file` gave it, untouched
    since (every transform, `select` to `with_format`, changes the fingerprint that from_file derived)."""
    files = ds.cache_files
    if len(files) != 1 or getattr(ds, "_indices", None) is not None:
        return None
    fresh = Dataset.from_file(files[0]["filename"], info=ds.info, split=ds.split)
    return fresh if fresh._fingerprint == ds._fingerprint else None


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
    errors: list[LetterError] = []
    records = list(iter_records(inputs, errors=errors, text_column=text_column, label_column=label_column,
                                id_column=id_column, request_column=request_column, summary_column=summary_column,
                                workers=workers, stream_tables=False))  # fmt: skip
    return records, errors


def iter_records(
    inputs: str | Path | Iterable[str | Path],
    *,
    errors: list,
    text_column: str | None = None,
    label_column: str | None = None,
    id_column: str | None = None,
    request_column: str | None = None,
    summary_column: str | None = None,
    workers: int = 1,
    stream_tables: bool = True,
) -> Iterator[dict]:
    """`load_records` as a stream (tables first, then letters as they are parsed); letter failures are appended to
    `errors`. With `stream_tables`, tables are read a chunk at a time (`tabular.iter_table_records`), so memory
    stays bounded however large the inputs (`imr data build`)."""
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    tables, letters = [], []
    for raw in inputs:
        matches = sorted(glob.glob(str(raw), recursive=True)) if glob.has_magic(str(raw)) else [str(raw)]
        for m in matches or [str(raw)]:  # a pattern matching nothing goes on, so it comes back as an error
            (tables if Path(m).suffix.lower() in TABLE_SUFFIXES and not glob.has_magic(m) else letters).append(m)
    columns = dict(text_column=text_column, label_column=label_column, id_column=id_column,
                   request_column=request_column, summary_column=summary_column)  # fmt: skip
    for table in tables:
        if stream_tables:
            yield from iter_table_records(table, source=table, **columns)
        else:
            yield from records_from_table(read_table(table), source=table, **columns)
    paths = iter_letter_files(letters) if letters else []
    for result in parse_many(paths, workers=workers):
        if isinstance(result, LetterError):
            errors.append(result)
        else:
            yield from result.item_records()
