"""`imr score`: formats, error rows, tables, resume, torn writes, and a real kill -9 mid-run."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from imr_model.demo import write_demo_letters
from imr_model.inference import predict
from imr_model import score_output
from imr_model.score_output import OutputError, OutputLockedError, OutputWriteError, columns
from imr_model.scoring import score

from inference_helpers import tiny_model

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("score") / "model", seed=7)


@pytest.fixture(scope="module")
def letters_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("letters")
    write_demo_letters(d, 8, seed=21)
    (d / "zz-not-a-letter.txt").write_text("Grocery list: apples, flour, eggs.\n", encoding="utf-8")
    return d


def _read(path: Path) -> pd.DataFrame:
    if path.suffix == ".jsonl":
        return pd.read_json(path, lines=True, dtype=False)
    if path.suffix == ".csv":
        df = pd.read_csv(path, dtype={"letter_id": str})
        for col in ("guidelines", "guideline_labels", "warnings"):
            df[col] = df[col].map(lambda v: json.loads(v) if isinstance(v, str) else None)
        return df
    df = pq.read_table(path).to_pandas()
    df["guidelines"] = df["guidelines"].map(lambda v: dict(v) if v is not None else None)
    return df


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_formats_rows_and_error_rows(model_dir, letters_dir, tmp_path, fmt):
    out = tmp_path / f"scores.{fmt}"
    summary = score([letters_dir], out, model=str(model_dir), batch_size=5, progress=False)
    assert (summary.letters, summary.errors, summary.skipped) == (8, 1, 0)
    df = _read(out)
    assert list(df.columns) == columns(False)
    assert len(df) == summary.items + 1
    assert df["warnings"].map(lambda w: hasattr(w, "__len__") and not isinstance(w, str)).tolist() == df["error"].isna().tolist()
    bad = df[df["letter_id"] == "zz-not-a-letter"]
    assert len(bad) == 1 and "not an IMR" in bad["error"].iloc[0] and pd.isna(bad["p_overturned"].iloc[0])
    good = df[df["error"].isna()]
    first = sorted(letters_dir.glob("CM99-*.txt"))[0]
    expected = predict(first, model=str(model_dir))
    rows = good[good["letter_id"] == first.stem]
    assert rows["item_index"].astype(int).tolist() == [p.item_index for p in expected]
    assert rows["request"].tolist() == [p.request for p in expected]
    assert rows["p_overturned"].tolist() == pytest.approx([p.p_overturned for p in expected], abs=1e-6)
    assert rows["guidelines"].iloc[0] == pytest.approx(expected[0].guidelines, abs=1e-6)
    assert list(rows["guideline_labels"].iloc[0]) == list(expected[0].guideline_labels)
    assert not list(tmp_path.glob("*.parts"))  # parquet parts merged and removed

    again = score([letters_dir], out, model=str(model_dir), batch_size=5, progress=False)
    assert (again.letters, again.items, again.skipped) == (0, 0, 9)
    assert len(_read(out)) == len(df)


def test_attributions_column(model_dir, letters_dir, tmp_path):
    out = tmp_path / "attr.parquet"
    score([sorted(letters_dir.glob("CM99-*.txt"))[0]], out, model=str(model_dir), attributions=True, n_steps=4, progress=False)
    rec = pq.read_table(out).to_pylist()[0]
    attr = rec["attributions"]
    assert attr["target"] == "outcome" and attr["n_steps"] == 4 and attr["words"]
    assert {"word", "start", "end", "score"} == set(attr["words"][0])


def test_item_table_inputs(model_dir, letters_dir, tmp_path):
    from imr_model.letters import iter_letter_files, parse_many

    items = tmp_path / "items.jsonl"
    with items.open("w", encoding="utf-8") as fh:
        for res in parse_many(iter_letter_files([letters_dir])):
            rows = [{"source": res.source, "error": res.reason}] if isinstance(res, Exception) else res.item_records()
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    from_table = _read(_scored(model_dir, [items], tmp_path / "t.jsonl"))
    from_letters = _read(_scored(model_dir, [letters_dir], tmp_path / "l.jsonl"))
    assert from_table["p_overturned"].tolist() == pytest.approx(from_letters["p_overturned"].tolist(), nan_ok=True)
    assert from_table["letter_id"].tolist() == from_letters["letter_id"].tolist()
    assert (from_table["source"] == str(items)).all()

    csv_in = tmp_path / "bare.csv"  # no ids, one text column: every row is its own letter
    pd.DataFrame({"text": ["Therapy is indicated.", "Not supported by ODG."]}).to_csv(csv_in, index=False)
    bare = _read(_scored(model_dir, [csv_in], tmp_path / "b.csv"))
    assert bare["letter_id"].tolist() == ["bare:1", "bare:2"]
    assert bare["p_overturned"].tolist() == pytest.approx([predict(t, model=str(model_dir))[0].p_overturned
                                                           for t in ["Therapy is indicated.", "Not supported by ODG."]], abs=1e-6)  # fmt: skip

    split = tmp_path / "split.jsonl"  # a letter's rows must be contiguous: a split letter is one error row
    split.write_text("".join(json.dumps({"letter_id": i, "rationale": "x"}) + "\n" for i in ["a", "b", "a", "c"]))
    errs = _read(_scored(model_dir, [split], tmp_path / "s.jsonl"))
    assert errs["letter_id"].tolist() == ["a", "b", "c"]
    assert errs["error"].isna().tolist() == [False, True, True]
    assert "not contiguous" in errs["error"].iloc[0]
    again = score([split], tmp_path / "s.jsonl", model=str(model_dir), progress=False)  # each letter once: resumable
    assert (again.letters, again.errors, again.skipped) == (0, 0, 3)


def _scored(model_dir: Path, inputs, out: Path) -> Path:
    score(inputs, out, model=str(model_dir), batch_size=4, progress=False)
    return out


def test_torn_writes_are_repaired(model_dir, letters_dir, tmp_path):
    """The on-disk states a crash can leave: rows without a journal entry, half a journal line."""
    reference = _read(_scored(model_dir, [letters_dir], tmp_path / "ref.jsonl"))
    out = tmp_path / "torn.jsonl"
    paths = sorted(letters_dir.iterdir())
    score(paths[:3], out, model=str(model_dir), batch_size=2, progress=False)
    with out.open("ab") as fh:  # a chunk cut mid-row whose journal entry never landed
        fh.write(b'{"letter_id": "CM99-99", "item_ind')
    with (tmp_path / "torn.jsonl.progress").open("ab") as fh:
        fh.write(b'{"keys": ["half')
    score([letters_dir], out, model=str(model_dir), batch_size=4, progress=False)
    _assert_same_rows(_read(out), reference)


def _assert_same_rows(got: pd.DataFrame, expected: pd.DataFrame) -> None:
    """Same rows in the same order; probabilities equal up to float noise (batches were cut differently)."""
    assert len(got) == len(expected)
    exact = ["letter_id", "item_index", "request", "outcome", "source", "error", "guideline_labels"]
    assert got[exact].astype(str).values.tolist() == expected[exact].astype(str).values.tolist()
    assert got["p_overturned"].tolist() == pytest.approx(expected["p_overturned"].tolist(), abs=1e-6, nan_ok=True)


def test_parquet_crash_states(model_dir, letters_dir, tmp_path):
    reference = _read(_scored(model_dir, [letters_dir], tmp_path / "ref.parquet"))
    out = tmp_path / "p.parquet"
    paths = sorted(letters_dir.iterdir())
    score(paths[:4], out, model=str(model_dir), batch_size=4, progress=False)  # merged output
    parts = tmp_path / "p.parquet.parts"
    parts.mkdir()
    (parts / "part-000099.parquet.tmp").write_bytes(b"PAR1 half written")  # crash while writing a part
    merged = json.loads(pq.read_schema(out).metadata[b"imr_parts"])
    (parts / merged[0]).write_bytes(out.read_bytes())  # crash after the merge, before clean-up
    score([letters_dir], out, model=str(model_dir), batch_size=4, progress=False)
    _assert_same_rows(_read(out), reference)
    assert not parts.exists()


def test_resume_refuses_other_settings(model_dir, letters_dir, tmp_path):
    out = tmp_path / "o.jsonl"
    score([letters_dir], out, model=str(model_dir), progress=False)
    with pytest.raises(OutputError, match="columns"):
        score([letters_dir], out, model=str(model_dir), attributions=True, progress=False)
    other = tiny_model(tmp_path / "other", seed=8)
    with pytest.raises(OutputError, match="model"):
        score([letters_dir], out, model=str(other), progress=False)
    foreign = tmp_path / "foreign.csv"
    foreign.write_text("a,b\n1,2\n")
    with pytest.raises(OutputError, match="no progress journal"):
        score([letters_dir], foreign, model=str(model_dir), progress=False)
    with pytest.raises(OutputError, match="use one of .jsonl, .csv, .parquet"):
        score([letters_dir], tmp_path / "o.xlsx", model=str(model_dir), progress=False)


def _run(args: list[str], env: dict, *, code: str = "import sys; from imr_model.cli import main; main(sys.argv[1:])") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


# Parquet checkpoints every `checkpoint_rows` rows, which the CLI leaves at its default; use the library.
_PARQUET_RUN = (
    "import sys; from imr_model.scoring import score; "
    "score([sys.argv[2]], sys.argv[sys.argv.index('-o') + 1], model=sys.argv[4], batch_size=2, attributions=True, "
    "n_steps=16, checkpoint_rows=4, progress=False)"
)


def _progress(out: Path) -> int:
    """Chunks made durable so far (journal entries, or Parquet parts)."""
    journal, parts = Path(str(out) + ".progress"), Path(str(out) + ".parts")
    if out.suffix == ".parquet":
        return len(list(parts.glob("part-*.parquet"))) if parts.exists() else 0
    return max(0, journal.read_text().count("\n") - 2) if journal.exists() else 0


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_kill_9_then_resume_equals_uninterrupted(model_dir, tmp_path, fmt):
    letters = tmp_path / "letters"
    write_demo_letters(letters, 30, seed=5)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # attributions make each chunk slow enough to be killed in the middle of the run
    args = ["score", str(letters), "--model", str(model_dir), "--batch-size", "2", "--attributions", "--n-steps", "16"]
    run = (lambda a: _run(a, env, code=_PARQUET_RUN)) if fmt == "parquet" else (lambda a: _run(a, env))
    ref = tmp_path / f"ref.{fmt}"
    first = run([*args, "-o", str(ref)])
    assert first.wait(timeout=600) == 0, first.stderr.read().decode()[-2000:]

    out = tmp_path / f"killed.{fmt}"
    proc = run([*args, "-o", str(out)])
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and _progress(out) < 3:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    with pytest.raises(OutputLockedError, match=rf"being written by another `imr score` run \(pid {proc.pid}\)"):
        score([letters], out, model=str(model_dir), batch_size=2, attributions=True, n_steps=16, progress=False)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert not out.exists() or out.stat().st_size < ref.stat().st_size  # killed mid-run: the output is partial

    rerun = run([*args, "-o", str(out)])
    assert rerun.wait(timeout=600) == 0, rerun.stderr.read().decode()[-2000:]
    # No lost rows, no duplicates, same order and fields, same values: the window cache carries a sentence's result
    # over from an earlier letter, so the resumed run (which did not see the letters before the kill) may compute it
    # in another batch, which differs in the last float bits (window_cache.py); numbers are compared to 1e-6.
    got, want = _rows(out, fmt), _rows(ref, fmt)
    assert [r["letter_id"] for r in got] == [r["letter_id"] for r in want] and len(want) >= 30
    _assert_close(got, want)


def _rows(path: Path, fmt: str) -> list[dict]:
    if fmt == "parquet":
        return pq.read_table(path).to_pylist()
    if fmt == "csv":
        return pd.read_csv(path, dtype=str, keep_default_na=False).to_dict("records")
    return [json.loads(line) for line in path.read_text().splitlines()]


def _assert_close(a, b, where: str = "") -> None:
    """Equal, except numbers (also numbers and JSON held in strings, as CSV cells hold them) to 1e-6."""
    if isinstance(a, str) and isinstance(b, str) and a != b:
        try:
            a, b = float(a), float(b)
        except ValueError:
            if a[:1] in "[{" and b[:1] in "[{":
                a, b = json.loads(a), json.loads(b)
    if isinstance(a, dict) and isinstance(b, dict):
        assert list(a) == list(b), where
        for key in a:
            _assert_close(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float) and not (a == b):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6), where
    else:
        assert a == b, where


# --------------------------------------------------------------------------- messy and hostile input


def _item_table(path: Path, n: int, hostile: dict[int, dict]) -> None:
    """`n` one-item letters as JSON lines; row i's fields are overridden by hostile[i] (raw JSON text)."""
    from inference_helpers import planted_texts

    texts, _ = planted_texts(n, seed=3)
    with path.open("w", encoding="utf-8") as fh:
        for i, text in enumerate(texts):
            fields = {"letter_id": json.dumps(f"L{i:03d}"), "request": json.dumps(f"Request {i}"), "rationale": json.dumps(text)}
            fields.update(hostile.get(i, {}))
            fh.write("{" + ", ".join(f'"{k}": {v}' for k, v in fields.items()) + "}\n")


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_a_lone_surrogate_costs_nothing_but_itself(model_dir, tmp_path, fmt):
    """One `\\ud800` escape in one row of a 258-row table: every row is scored (as if the character were
    U+FFFD; a surrogateescape code point as its byte's escape), nothing becomes an error row, the outputs are valid UTF-8, and the run resumes."""
    hostile = {100: {"rationale": '"knee pain \\ud800 persists"'},
               200: {"request": '"Brace \\udc80"', "letter_id": '"L\\udfff200"'}}  # fmt: skip
    table = tmp_path / "hostile" / "items.jsonl"
    table.parent.mkdir()
    _item_table(table, 258, hostile)
    assert "\\ud800" in table.read_text()
    clean = tmp_path / "clean" / "items.jsonl"  # the same table with U+FFFD written in
    clean.parent.mkdir()
    _item_table(clean, 258, {i: {k: v.replace("\\ud800", "\\ufffd").replace("\\udc80", "\\\\x80").replace("\\udfff", "\\ufffd")
                                 for k, v in row.items()} for i, row in hostile.items()})  # fmt: skip
    out = tmp_path / f"scores.{fmt}"
    summary = score([table], out, model=str(model_dir), batch_size=16, progress=False)
    assert (summary.letters, summary.items, summary.errors) == (258, 258, 0)
    if fmt != "parquet":
        out.read_bytes().decode("utf-8")  # strict: no surrogate reached the writer
    df = _read(out)
    assert len(df) == 258 and df["error"].isna().all() and df["p_overturned"].notna().all()
    assert df["request"].iloc[200] == "Brace \\x80" and df["letter_id"].iloc[200] == "L\ufffd200"
    want = _read(_scored(model_dir, [clean], tmp_path / f"clean.{fmt}"))
    exact = ["letter_id", "item_index", "request", "outcome", "guideline_labels", "warnings", "error"]
    assert df[exact].astype(str).values.tolist() == want[exact].astype(str).values.tolist()
    assert df["p_overturned"].tolist() == pytest.approx(want["p_overturned"].tolist(), abs=1e-6)
    again = score([table], out, model=str(model_dir), batch_size=16, progress=False)  # cleaned keys resume
    assert (again.letters, again.skipped) == (0, 258)


def test_undecodable_bytes_and_surrogate_file_names(model_dir, tmp_path):
    """Invalid UTF-8 inside a JSONL table and a letter file whose name is not UTF-8 (surrogateescape)."""
    letters = tmp_path / "in"
    write_demo_letters(letters, 2, seed=4)
    first = sorted(letters.glob("*.txt"))[0]
    odd = first.with_name(os.fsdecode(b"odd-\xff-name.txt"))  # str(path) holds '\udcff'
    first.rename(odd)
    table = tmp_path / "bytes.jsonl"
    table.write_bytes(b'{"letter_id": "a", "rationale": "pain \xff\xfe here"}\n{"letter_id": "b", "rationale": "ok"}\n')
    out = tmp_path / "o.jsonl"
    summary = score([letters, table], out, model=str(model_dir), progress=False)
    assert summary.errors == 0 and summary.letters == 4
    text = out.read_bytes().decode("utf-8")
    assert "odd-\\\\xff-name" in text  # the byte's escape (JSON-escaped here): distinct names stay distinct
    again = score([letters, table], out, model=str(model_dir), progress=False)
    assert (again.letters, again.skipped) == (0, 4)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_disk_full_mid_run_then_rerun_equals_uninterrupted(model_dir, letters_dir, tmp_path, monkeypatch, fmt):
    """ENOSPC in the middle of a real run: `OutputWriteError` naming the output; the rerun gives the uninterrupted rows."""
    ref = tmp_path / f"ref.{fmt}"
    kwargs = dict(model=str(model_dir), batch_size=2, chunk_items=2, progress=False, checkpoint_rows=4)
    score([letters_dir], ref, **kwargs)
    journal = Path(f"{ref}.progress")
    budget = (ref.stat().st_size + (journal.stat().st_size if journal.exists() else 0)) * 2 // 3
    written = [0]
    real = os.write

    def full_disk(fd, data):
        if written[0] + len(data) > budget:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written[0] += len(data)
        return real(fd, data)

    out = tmp_path / f"o.{fmt}"
    monkeypatch.setattr(score_output, "_write", full_disk)
    with pytest.raises(OutputWriteError, match=rf"cannot write .*o\.{fmt}.*: disk full"):
        score([letters_dir], out, **kwargs)
    monkeypatch.undo()
    assert written[0] > 0
    again = score([letters_dir], out, **kwargs)
    assert again.skipped > 0 or fmt == "parquet"
    if fmt == "parquet":
        assert pq.read_table(out).to_pylist() == pq.read_table(ref).to_pylist()
    else:
        assert out.read_bytes() == ref.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("o.")) == (
        [out.name] if fmt == "parquet" else [out.name, out.name + ".progress"])  # fmt: skip


def test_a_lock_taken_by_the_caller(model_dir, letters_dir, tmp_path):
    """The CLI loads the model itself: it locks first and hands the lock to `score`, which keeps it held."""
    from imr_model.score_output import lock_output

    out = tmp_path / "o.jsonl"
    first = sorted(letters_dir.glob("CM99-*.txt"))[0]
    with lock_output(out) as lock:
        assert score([first], out, model=str(model_dir), progress=False, lock=lock).letters == 1
        assert lock.held
        with pytest.raises(OutputLockedError, match=f"pid {os.getpid()}"):
            score([first], out, model=str(model_dir), progress=False)
    assert not Path(f"{out}.lock").exists()
    assert score([first], out, model=str(model_dir), progress=False).skipped == 1


def test_file_names_differing_only_in_undecodable_bytes_are_two_letters(model_dir, tmp_path):
    letters = tmp_path / "in"
    write_demo_letters(letters, 2, seed=4)
    a, b = sorted(letters.glob("*.txt"))
    a.rename(a.with_name(os.fsdecode(b"x\xff.txt")))
    b.rename(b.with_name(os.fsdecode(b"x\xfe.txt")))
    out = tmp_path / "o.jsonl"
    summary = score([letters], out, model=str(model_dir), progress=False)
    assert (summary.letters, summary.errors) == (2, 0)
    sources = {json.loads(line)["source"] for line in out.read_text(encoding="utf-8").splitlines()}
    assert len(sources) == 2
    again = score([letters], out, model=str(model_dir), progress=False)
    assert (again.letters, again.skipped) == (0, 2)


def test_a_table_broken_part_way_is_one_error_row_and_nothing_half_scored(model_dir, tmp_path):
    """A bad line after 1,499 good rows: no letter is scored from a table that cannot be read to its end
    (a half-scored letter would stay half-done for every rerun), and the error names no cell value."""
    table = tmp_path / "items.jsonl"
    lines = [json.dumps({"letter_id": f"L{i // 11}", "item_index": i % 11 + 1, "rationale": "Physical therapy x6."})
             for i in range(1499)]  # fmt: skip
    table.write_text("\n".join(lines + ["{not json", json.dumps({"letter_id": "Z", "rationale": "x"})]) + "\n")
    out = tmp_path / "o.jsonl"
    summary = score([table], out, model=str(model_dir), progress=False)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert (summary.letters, summary.errors, len(rows)) == (0, 1, 1)
    assert "line 1500 is not JSON" in rows[0]["error"] and "nothing from this table was scored" in rows[0]["error"]
    bad_cell = tmp_path / "cells.csv"
    bad_cell.write_text("letter_id,item_index,rationale\nA,1,ok\nB,Patient John Doe 1234,ok\n")
    summary = score([bad_cell], tmp_path / "o2.jsonl", model=str(model_dir), progress=False)
    (row,) = [json.loads(line) for line in (tmp_path / "o2.jsonl").read_text().splitlines()]
    assert summary.errors == 1 and "John" not in row["error"] and "rows 1-2" in row["error"]


@pytest.mark.parametrize("content", ["", "letter_id,rationale\n", "\n\n"])
def test_an_empty_table_is_one_error_row(model_dir, tmp_path, content):
    table = tmp_path / ("t.jsonl" if content.startswith("\n") else "t.csv")
    table.write_text(content)
    out = tmp_path / "o.jsonl"
    summary = score([table], out, model=str(model_dir), progress=False)
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary.errors == 1 and "table has no rows" in row["error"]


def test_a_letter_whose_prediction_fails_is_one_error_row_and_the_batch_goes_on(model_dir, tmp_path, monkeypatch):
    from imr_model.inference import Predictor, load_model

    letters = tmp_path / "in"
    write_demo_letters(letters, 6, seed=8)
    victim = sorted(letters.glob("*.txt"))[2]
    real = Predictor.predict_records

    def flaky(self, records, **kwargs):
        if any(str(r.get("source")) == str(victim) for r in records):
            raise RuntimeError("tokenizer blew up on: <letter text>")
        return real(self, records, **kwargs)

    monkeypatch.setattr(Predictor, "predict_records", flaky)
    out = tmp_path / "o.jsonl"
    summary = score([letters], out, model=load_model(str(model_dir)), progress=False)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert (summary.letters, summary.errors) == (5, 1)
    (bad,) = [r for r in rows if r["error"]]
    assert bad["source"] == str(victim) and bad["error"] == "prediction failed (RuntimeError)"
    assert {r["source"] for r in rows} == {str(p) for p in letters.glob("*.txt")}


def test_the_first_chunk_is_small_and_every_letter_lands_in_exactly_one_chunk():
    from imr_model.scoring import Unit, chunked

    sizes = [1, 3, 0, 2, 5, 1, 1, 4, 2, 2, 1]  # items per letter (0: an error row)
    units = [Unit(f"l{i}.txt", f"l{i}", [{}] * n, None if n else "unreadable") for i, n in enumerate(sizes)]
    chunks = list(chunked(iter(units), chunk_items=6, first_items=2))
    assert [u.letter_id for c in chunks for u in c] == [u.letter_id for u in units]  # all, once, in order
    items = [sum(len(u.records) for u in c) for c in chunks]
    assert items[0] >= 2 and sum(len(u.records) for u in chunks[0][:-1]) < 2  # closed at the first letter reaching 2
    assert all(n >= 6 for n in items[1:-1]) and items[1] >= 6
    assert all(sum(len(u.records) for u in c[:-1]) < 6 for c in chunks[1:])  # each closed as soon as it could
    assert [len(c) for c in chunked(iter(units), 6)] == [len(c) for c in chunked(iter(units), 6, first_items=99)]
