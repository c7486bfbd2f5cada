"""`imr score`: formats, error rows, tables, resume, torn writes, and a real kill -9 mid-run."""

from __future__ import annotations

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
from imr_model.score_output import OutputError, columns
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
        for col in ("guidelines", "guideline_labels"):
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

    split = tmp_path / "split.jsonl"  # a letter's rows must be contiguous
    split.write_text("".join(json.dumps({"letter_id": i, "rationale": "x"}) + "\n" for i in ["a", "b", "a"]))
    errs = _read(_scored(model_dir, [split], tmp_path / "s.jsonl"))
    assert errs["error"].isna().tolist() == [True, True, False]
    assert "not contiguous" in errs["error"].iloc[2]


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
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert not out.exists() or out.stat().st_size < ref.stat().st_size  # killed mid-run: the output is partial

    rerun = run([*args, "-o", str(out)])
    assert rerun.wait(timeout=600) == 0, rerun.stderr.read().decode()[-2000:]
    if fmt == "parquet":
        assert pq.read_table(out).to_pylist() == pq.read_table(ref).to_pylist()
    else:
        assert out.read_bytes() == ref.read_bytes()  # no lost rows, no duplicates, same values
