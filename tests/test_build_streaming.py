"""`imr data build` streams (#22 item 2): tables are read in chunks, records go through a spool into Arrow files, and
near-duplicate pairs are counted, not listed; every result equals the whole-in-memory computation it replaced."""

from __future__ import annotations

import gc
import json

import numpy as np
import pandas as pd
import pytest

from imr_model import dataset
from imr_model.dataset import (
    build_dataset,
    dataset_digest,
    find_near_duplicates,
    iter_records,
    load_dataset_dir,
    load_records,
    near_duplicate_summary,
    save_dataset,
)
from imr_model.demo import generate_letters
from imr_model.tabular import iter_table_records, read_table, records_from_table


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return [r for letter in generate_letters(60, seed=11) for r in letter.item_records()]


def _write(tmp_path, records, suffix):
    path = tmp_path / f"items{suffix}"
    rows = [dict(r, extra=i if i % 3 else None) for i, r in enumerate(records)]
    if suffix == ".jsonl":
        for r in rows[::4]:  # keys missing from some rows (and from whole chunks): still columns of the file
            r.pop("reviewer_specialty")
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif suffix == ".csv":
        pd.DataFrame(rows).assign(guideline_labels=lambda f: f.guideline_labels.map(";".join)).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_a_streamed_table_gives_the_records_of_the_whole_table(tmp_path, records, suffix):
    path = _write(tmp_path, records, suffix)
    whole = records_from_table(read_table(path), source=str(path))
    assert list(iter_table_records(path, chunk_rows=7)) == whole  # rows numbered as in the file, all columns
    assert load_records([path])[0] == whole


def test_build_from_a_stream_equals_build_from_a_list(tmp_path, records):
    path = _write(tmp_path, records, ".jsonl")
    listed = build_dataset(load_records([path])[0], seed=4)
    errors: list = []
    streamed = build_dataset(iter_records([path], errors=errors), seed=4)
    assert not errors and dataset_digest(streamed) == dataset_digest(listed)
    assert streamed.report == listed.report
    assert {k: v.features for k, v in streamed.items()} == {k: v.features for k, v in listed.items()}


def test_extra_columns_are_typed_per_split_as_before(records):
    rows = [dict(r, n=i, mixed=i if i % 2 else "x", empty=None) for i, r in enumerate(records)]
    dd = build_dataset(rows, seed=1)
    for split in dd.values():
        assert split.features["n"].dtype == "int64" and split.features["mixed"].dtype == "string"
        assert all(isinstance(v, str) for v in split["mixed"])
    assert sorted(i for split in dd.values() for i in split["n"]) == list(range(len(rows)))


def test_a_split_outlives_its_dataset_dict(records):
    train = build_dataset(records, seed=2)["train"]
    gc.collect()
    assert len(list(train)) == len(train) > 0 and train[0]["rationale_masked"] is not None


def test_the_near_duplicate_summary_counts_what_the_list_holds(records, monkeypatch):
    texts = [r["rationale"] for r in records] + [records[0]["rationale"], "", records[1]["rationale"] + " Again."]
    groups = [i % 3 for i in range(len(texts))]
    pairs = find_near_duplicates(texts, groups)
    summary = near_duplicate_summary(iter(texts), groups, examples=5)
    assert summary["pairs"] == len(pairs) > 0 and summary["examples"] == pairs[:5]
    assert summary["items_involved"] == len({i for p in pairs for i in p[:2]})
    monkeypatch.setattr(dataset, "BLOCK_ENTRIES", 50)  # tiny blocks: the same pairs
    assert find_near_duplicates(texts, groups) == pairs
    assert near_duplicate_summary(texts[:1]) == {"pairs": 0, "items_involved": 0, "examples": []}
    with pytest.raises(ValueError, match="groups has"):
        near_duplicate_summary(texts, groups[:-1])


def _plain_row_pairs(m, group, cross, chunk):
    """The block products as `_row_pairs` computed them before it was made to copy less: (rows i) @ (rows j).T."""
    n, ends, start = m.shape[0], np.searchsorted(group, group, side="right"), 0
    while start < n:
        stop = min(start + chunk, int(ends[start])) if cross else min(start + chunk, n)
        first_col = int(ends[start]) if cross else start
        if first_col < n:
            block = (m[start:stop] @ m[first_col:].T).tocoo()
            i, j = block.row + start, block.col + first_col
            yield i[i < j], j[i < j], block.data[i < j]
        start = stop


@pytest.mark.parametrize("cross", [False, True])
def test_the_block_products_are_those_of_the_plain_product_bit_for_bit(records, cross):
    """`_row_pairs` multiplies (later rows) @ (block rows).T over row views: the same dots, to the last bit, as the
    plain (block rows) @ (later rows).T, on the TF-IDF matrix of templated letters (each row sums its shared terms
    in the same order); with `min_dot`, exactly the pairs at or above it. The near-duplicate pairs rest on this."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    texts = [r["rationale"] for r in records]
    m = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, dtype=np.float32).fit_transform(texts)
    group = np.sort(np.asarray([("test", "train", "validation")[i % 3] for i in range(len(texts))]))
    m = m[np.random.default_rng(0).permutation(len(texts))]  # rows as a group sort leaves them: any order

    def bits(chunks):
        out = {}
        for i, j, v in chunks:
            out.update(zip(zip(i.tolist(), j.tolist()), v.view(np.uint32).tolist()))
        return out

    plain = bits(_plain_row_pairs(m, group, cross, 13))
    assert len(plain) > 1000 and bits(dataset._row_pairs(m, group, cross, 13)) == plain
    values = {p: float(np.uint32(b).view(np.float32)) for p, b in plain.items()}
    t = float(np.median(list(values.values())))
    above = {p: plain[p] for p, v in values.items() if v >= t}
    assert 0 < len(above) < len(plain) and bits(dataset._row_pairs(m, group, cross, 13, min_dot=t)) == above


def test_the_near_duplicate_check_can_be_skipped(records):
    dd = build_dataset(records, seed=0, dedup_threshold=None)
    assert dd.report["near_duplicates"]["skipped"] is True and dd.report["near_duplicates"]["pairs"] is None
    assert dataset_digest(dd) == dataset_digest(build_dataset(records, seed=0))  # the rows do not change


def test_build_reads_a_generator_once(records):
    """The record stream is consumed once, as it comes: nothing asks for its length or reads it twice."""
    seen = []

    def stream():
        for r in records:
            seen.append(1)
            yield r

    dd = build_dataset(stream(), seed=0)
    assert len(seen) == len(records) == sum(len(s) for s in dd.values())


def test_saving_split_by_split_writes_what_save_to_disk_writes(tmp_path, records):
    """`save_dataset` saves and digests each built split from a map of its own (memory: one split's pages at a
    time): the same files, byte for byte, and the same digest as `dd.save_to_disk` + `dataset_digest`; a split that
    was transformed since the build goes the plain way."""
    dd = build_dataset(records, seed=0)
    assert all(dataset._reopened(ds) is not None for ds in dd.values())
    save_dataset(dd, tmp_path / "split_by_split")
    dd.save_to_disk(str(tmp_path / "plain"))
    files = sorted(p.relative_to(tmp_path / "plain") for p in (tmp_path / "plain").rglob("*") if p.is_file())
    assert len(files) == 1 + 3 * 3
    assert all((tmp_path / "split_by_split" / f).read_bytes() == (tmp_path / "plain" / f).read_bytes() for f in files)
    assert load_dataset_dir(tmp_path / "split_by_split").digest == dataset_digest(dd)

    dd["test"] = dd["test"].select(range(3))
    dd["validation"] = dd["validation"].with_format("numpy")
    assert dataset._reopened(dd["test"]) is None and dataset._reopened(dd["validation"]) is None
    loaded = load_dataset_dir(save_dataset(dd, tmp_path / "transformed"))
    assert len(loaded["test"]) == 3 and loaded.digest == dataset_digest(dd)
