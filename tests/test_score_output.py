"""`score_output` without a model: the output lock (real second processes), full / read-only disks at every
byte of a run (rerun == uninterrupted), duplicate-row outputs refused, surrogates never reaching the files."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from imr_model import score_output
from imr_model.score_output import (
    DuplicateRowsError,
    LineWriter,
    OutputLockedError,
    OutputWriteError,
    ParquetWriter,
    columns,
    lock_output,
    open_writer,
    sidecars,
)

REPO = Path(__file__).resolve().parent.parent
FORMATS = ["jsonl", "csv", "parquet"]
RUN = {"model": "fake"}


def _row(source: str, letter_id: str, i: int, request: str | None = None) -> dict:
    return {"letter_id": letter_id, "item_index": i, "request": request or f"request {letter_id}/{i}", "outcome": "Upheld",
            "p_overturned": 0.25 + i / 100, "guidelines": {"odg_pain": 0.5}, "guideline_labels": ["odg_pain"],
            "warnings": [], "source": source, "error": None}  # fmt: skip


def _chunks(n_letters: int = 12, per_chunk: int = 3) -> list[tuple[list[str], list[dict]]]:
    """Deterministic chunks of whole letters (1-3 items each), like `scoring.chunked` produces."""
    chunks, keys, rows = [], [], []
    for n in range(n_letters):
        lid = f"L{n:03d}"
        keys.append(f"in.jsonl::{lid}")
        rows += [_row("in.jsonl", lid, i) for i in range(1, 2 + n % 3)]
        if len(keys) == per_chunk:
            chunks.append((keys, rows))
            keys, rows = [], []
    if keys:
        chunks.append((keys, rows))
    return chunks


def _run_writer(out: Path, chunks, *, rows_per_part: int = 4) -> None:
    """What `scoring.score` does: open (resume), write the chunks not done yet, close."""
    w = open_writer(out, with_attributions=False, run_info=RUN, parquet_rows_per_part=rows_per_part)
    try:
        for keys, rows in chunks:
            if not set(keys) & w.done:
                w.write(keys, rows)
        w.close()
    finally:
        w.abort()


def _content(out: Path):
    return pq.read_table(out).to_pylist() if out.suffix == ".parquet" else out.read_bytes()


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


# --------------------------------------------------------------------------- lock


def _lock_holder(out: Path) -> subprocess.Popen:
    code = "import sys; from imr_model.score_output import lock_output; l = lock_output(sys.argv[1]); print('locked', flush=True); sys.stdin.read()"
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout.readline() == b"locked\n"
    return proc


@pytest.mark.parametrize("fmt", FORMATS)
def test_second_process_is_refused_and_changes_nothing(tmp_path, fmt, monkeypatch):
    from imr_model import scoring
    from imr_model.scoring import score

    out = tmp_path / f"o.{fmt}"
    chunks = _chunks()
    w = open_writer(out, with_attributions=False, run_info=RUN, parquet_rows_per_part=4)
    for keys, rows in chunks[:2]:
        w.write(keys, rows)
    w.abort()  # an unfinished run (Parquet: parts, no merged file yet)
    holder = _lock_holder(out)
    try:
        before = _snapshot(tmp_path)
        with pytest.raises(OutputLockedError, match=rf"o\.{fmt} is being written by another `imr score` run "
                                                    rf"\(pid {holder.pid}\); wait for it or choose another output"):  # fmt: skip
            open_writer(out, with_attributions=False, run_info=RUN)
        monkeypatch.setattr(scoring, "load_model", lambda *a, **k: pytest.fail("the model loaded before the lock"))
        with pytest.raises(OutputLockedError, match=f"pid {holder.pid}"):
            score([tmp_path / "letters"], out, model="unused", progress=False)
        assert _snapshot(tmp_path) == before
    finally:
        holder.stdin.close()
        assert holder.wait(timeout=30) == 0
    monkeypatch.undo()
    _run_writer(out, chunks)  # the holder is gone: the run resumes
    ref = tmp_path / f"ref.{fmt}"
    _run_writer(ref, chunks)
    assert _content(out) == _content(ref)
    assert not sidecars(out)["lock"].exists() and not sidecars(out)["parts"].exists()


def test_lock_is_per_open_and_dies_with_its_process(tmp_path):
    out = tmp_path / "o.jsonl"
    lock = lock_output(out)
    with pytest.raises(OutputLockedError, match=f"pid {os.getpid()}"):
        lock_output(out)  # flock is per open file: the same process cannot take it twice either
    lock.release()
    assert not sidecars(out)["lock"].exists()
    with lock_output(out):
        pass

    holder = _lock_holder(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert sidecars(out)["lock"].read_text().strip() == str(holder.pid)  # stale file, but no lock any more
    with lock_output(out):
        assert sidecars(out)["lock"].read_text().strip() == str(os.getpid())


def test_writer_refuses_a_letter_twice(tmp_path):
    w = open_writer(tmp_path / "o.jsonl", with_attributions=False, run_info=RUN)
    keys, rows = _chunks()[0]
    w.write(keys, rows)
    with pytest.raises(ValueError, match="twice"):
        w.write(keys[:1], rows[:1])
    w.close()


# --------------------------------------------------------------------------- full / read-only disks


class _Disk:
    """Replacement for `score_output._write` / `_fsync`: fails with `err` once `budget` bytes were written
    (the write that crosses it is partial first), or at fsync number `fail_fsync`."""

    def __init__(self, budget: int | None = None, fail_fsync: int | None = None, err: int = errno.ENOSPC):
        self.budget, self.fail_fsync, self.err = budget, fail_fsync, err
        self.written = self.fsyncs = 0

    def write(self, fd, data) -> int:
        data = memoryview(data)
        if self.budget is not None and self.written + len(data) > self.budget:
            room = self.budget - self.written
            if room > 0:
                self.written += os.write(fd, data[:room])
                return room
            raise OSError(self.err, os.strerror(self.err))
        self.written += len(data)
        return os.write(fd, data)

    def fsync(self, fd) -> None:
        self.fsyncs += 1
        if self.fsyncs == self.fail_fsync:
            raise OSError(self.err, os.strerror(self.err))
        os.fsync(fd)


def _measure(tmp_path: Path, fmt: str, chunks) -> tuple[int, int, object]:
    """(bytes written, fsyncs) of an uninterrupted run, and its content."""
    disk = _Disk()
    ref = tmp_path / f"ref.{fmt}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(score_output, "_write", disk.write)
        mp.setattr(score_output, "_fsync", disk.fsync)
        _run_writer(ref, chunks)
    return disk.written, disk.fsyncs, _content(ref)


@pytest.mark.parametrize("fmt", FORMATS)
def test_disk_full_at_any_byte_then_rerun_equals_uninterrupted(tmp_path, fmt):
    """ENOSPC at every point of a run (a byte budget sweeping the whole run, and each fsync): a clear
    error naming the path, and the rerun on a disk with space gives the uninterrupted output exactly."""
    chunks = _chunks()
    total, fsyncs, expected = _measure(tmp_path, fmt, chunks)
    step = max(1, total // 60)
    cases = [dict(budget=b) for b in range(0, total, step)] + [dict(fail_fsync=k) for k in range(1, fsyncs + 1)]
    for n, case in enumerate(cases):
        out = tmp_path / f"case{n}" / f"o.{fmt}"
        disk = _Disk(**case)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(score_output, "_write", disk.write)
            mp.setattr(score_output, "_fsync", disk.fsync)
            with pytest.raises(OutputWriteError, match=r"cannot write .*: disk full \(no space left on device\)"):
                _run_writer(out, chunks)
        assert not sidecars(out)["lock"].exists(), case  # released on the error
        if fmt != "parquet" and out.exists() and sidecars(out)["progress"].exists():
            # cut back at once: no row past the journal's last offset (readers never see a partial chunk)
            raw = sidecars(out)["progress"].read_bytes()
            last = json.loads(raw[: raw.rfind(b"\n")].rsplit(b"\n", 1)[-1]) if raw.count(b"\n") > 1 else None
            if last is not None and last.get("keys"):  # (a failure inside the first open is simply redone)
                assert out.stat().st_size == last["offset"], case
        _run_writer(out, chunks)
        assert _content(out) == expected, case
        assert sorted(p.name for p in out.parent.iterdir()) == sorted(
            [out.name] + ([] if fmt == "parquet" else [out.name + ".progress"])
        ), case


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_disk_full_when_even_the_rollback_fails(tmp_path, fmt, monkeypatch):
    """A read-only remount mid-write: nothing can be cut back, the rerun's journal replay repairs it."""
    chunks = _chunks()
    total, _, expected = _measure(tmp_path, fmt, chunks)
    for n, budget in enumerate(range(total // 3, total, max(1, total // 25))):
        out = tmp_path / f"case{n}" / f"o.{fmt}"
        disk = _Disk(budget=budget, err=errno.EROFS)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(score_output, "_write", disk.write)
            mp.setattr(os, "truncate", lambda *a: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only file system")))
            with pytest.raises(OutputWriteError, match="read-only file system"):
                _run_writer(out, chunks)
        _run_writer(out, chunks)
        assert _content(out) == expected, budget


def _refuse_writes_under(folder: Path, err: int, monkeypatch) -> None:
    real_open = os.open

    def fake_open(path, flags, *args, **kwargs):
        if str(path).startswith(str(folder)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(err, os.strerror(err), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)


@pytest.mark.parametrize(("err", "reason"), [(errno.EROFS, "read-only file system"), (errno.EACCES, "permission denied")])
@pytest.mark.parametrize("fmt", FORMATS)
def test_unwritable_output_fails_before_the_model_loads(tmp_path, monkeypatch, err, reason, fmt):
    from imr_model import scoring
    from imr_model.scoring import score

    out = tmp_path / "ro" / f"o.{fmt}"
    out.parent.mkdir()
    monkeypatch.setattr(scoring, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    _refuse_writes_under(out.parent, err, monkeypatch)
    with pytest.raises(OutputWriteError, match=rf"cannot write .*o\.{fmt}: {reason}") as info:
        score([tmp_path], out, model="unused", progress=False)
    assert info.value.errno == err and info.value.path == out
    assert list(out.parent.iterdir()) == []


def test_existing_read_only_output_fails_up_front(tmp_path, monkeypatch):
    """A finished output whose file became read-only (the directory is still writable)."""
    out = tmp_path / "o.jsonl"
    chunks = _chunks()
    _run_writer(out, chunks[:2])
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, flags, *a, **k: (_ for _ in ()).throw(OSError(errno.EACCES, "Permission denied"))
                        if str(p) == str(out) and flags & os.O_WRONLY else real_open(p, flags, *a, **k))  # fmt: skip
    with pytest.raises(OutputWriteError, match=r"o\.jsonl: permission denied"):
        lock_output(out)
    assert not sidecars(out)["lock"].exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file modes")
def test_read_only_directory_for_real(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(OutputWriteError, match="permission denied"):
            lock_output(ro / "o.jsonl")
    finally:
        ro.chmod(0o755)


def test_full_disk_fails_up_front(tmp_path, monkeypatch):
    real = os.statvfs

    class Full:
        def __init__(self, st):
            self.f_bavail, self.f_frsize = 0, st.f_frsize

    monkeypatch.setattr(os, "statvfs", lambda p: Full(real(p)))
    with pytest.raises(OutputWriteError, match=r"o\.csv: disk full"):
        lock_output(tmp_path / "o.csv")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- duplicates (old concurrent runs)


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_journal_with_keys_twice_is_refused(tmp_path, fmt):
    """Two unlocked writers appending to one output (what two runs did before the lock) is detected on open."""
    out = tmp_path / f"o.{fmt}"
    header = {"imr_progress": 1, "format": fmt, "columns": columns(False), "run": RUN}
    a = LineWriter(out, fmt, header)  # the classes themselves do not lock: open_writer does
    b = LineWriter(out, fmt, header)
    for keys, rows in _chunks()[:3]:
        a.write(keys, rows)
        b.write(keys, rows)
    with pytest.raises(DuplicateRowsError, match=rf"holds the rows of \d+ letter\(s\) more than once.*Remove o\.{fmt} and "
                                                 rf"o\.{fmt}\.progress and rerun"):  # fmt: skip
        open_writer(out, with_attributions=False, run_info=RUN)
    out.unlink()
    sidecars(out)["progress"].unlink()
    _run_writer(out, _chunks())  # the fix the message gives works
    assert _content(out) == _content(_ref(tmp_path, fmt))


def _ref(tmp_path: Path, fmt: str) -> Path:
    ref = tmp_path / f"reference.{fmt}"
    _run_writer(ref, _chunks())
    return ref


def test_parquet_with_rows_twice_is_refused(tmp_path):
    out = tmp_path / "o.parquet"
    _run_writer(out, _chunks())
    header = {"imr_progress": 1, "format": "parquet", "columns": columns(False), "run": RUN}
    parts = sidecars(out)["parts"]
    parts.mkdir()
    pq.write_table(pq.read_table(out).slice(0, 5), parts / "part-000100.parquet")  # a late part of a second run
    with pytest.raises(DuplicateRowsError, match=r"Remove o\.parquet and o\.parquet\.parts and rerun"):
        ParquetWriter(out, header)
    (parts / "part-000100.parquet").unlink()

    table = pq.read_table(out)
    doubled = out.with_name("d.parquet")  # one merged file holding a letter in two places
    pq.write_table(pa_concat([table, table.slice(0, 1)]).replace_schema_metadata(table.schema.metadata), doubled)
    with pytest.raises(DuplicateRowsError):
        ParquetWriter(doubled, header)


def pa_concat(tables):
    import pyarrow as pa

    return pa.concat_tables(tables)


def test_parquet_old_concurrent_interleaving_is_an_output_error(tmp_path):
    """The interleaving that raised FileNotFoundError before the lock (one run's merge deleting the parts
    the other was about to merge) now only happens with unlocked writers, and still is no raw OSError."""
    out = tmp_path / "o.parquet"
    header = {"imr_progress": 1, "format": "parquet", "columns": columns(False), "run": RUN}
    chunks = _chunks()
    a = ParquetWriter(out, header, rows_per_part=1)
    a.write(*chunks[0])
    b = ParquetWriter(out, header, rows_per_part=1)
    a.write(*chunks[1])
    b.write(*chunks[1])
    a.close()
    with pytest.raises(OutputWriteError):
        b.close()
    with pytest.raises(OutputLockedError):  # through open_writer a second writer cannot exist at all
        w = open_writer(out, with_attributions=False, run_info=RUN)
        open_writer(out, with_attributions=False, run_info=RUN)
    w.abort()


# --------------------------------------------------------------------------- surrogates and columns


@pytest.mark.parametrize("fmt", FORMATS)
def test_surrogates_never_reach_the_files(tmp_path, fmt):
    out = tmp_path / f"o.{fmt}"
    rows = [_row("in\udcff.jsonl", "L\ud800", 1, request="knee \ud800 brace"), _row("in.jsonl", "M", 1)]
    rows[1]["warnings"] = ["odd \udfff text"]
    w = open_writer(out, with_attributions=False, run_info=RUN)
    w.write(["a", "b"], rows)
    w.close()
    if fmt == "parquet":
        got = pq.read_table(out).to_pylist()
        assert got[0]["request"] == "knee \ufffd brace" and got[1]["warnings"] == ["odd \ufffd text"]
    else:
        text = out.read_bytes().decode("utf-8")  # strict: valid UTF-8
        assert "knee \ufffd brace" in text and "L\ufffd" in text and ("in\\\\xff.jsonl" in text or "in\\xff.jsonl" in text)  # JSON / CSV spelling of the escape


def test_warnings_column(tmp_path):
    assert columns(False)[-3:] == ["warnings", "source", "error"]
    assert columns(True)[-4:] == ["warnings", "attributions", "source", "error"]
    out = tmp_path / "o.csv"
    row = _row("in.jsonl", "L", 1)
    row["warnings"] = ["does not look like an IMR item"]
    err = {"letter_id": "E", "source": "x", "error": "cannot read"}  # no warnings key at all
    w = open_writer(out, with_attributions=False, run_info=RUN)
    w.write(["a", "b"], [row, err])
    w.close()
    import csv

    got = list(csv.DictReader(out.open(encoding="utf-8")))
    assert json.loads(got[0]["warnings"]) == ["does not look like an IMR item"] and got[1]["warnings"] == ""
    pout = tmp_path / "o.parquet"
    w = open_writer(pout, with_attributions=False, run_info=RUN)
    w.write(["a", "b"], [row, err])
    w.close()
    assert [r["warnings"] for r in pq.read_table(pout).to_pylist()] == [["does not look like an IMR item"], None]


def test_resuming_an_output_from_before_the_warnings_column_says_so(tmp_path):
    out = tmp_path / "o.jsonl"
    _run_writer(out, _chunks()[:1])
    journal = sidecars(out)["progress"]
    lines = journal.read_text().splitlines()
    head = json.loads(lines[0])
    head["columns"].remove("warnings")
    journal.write_text("\n".join([json.dumps(head), *lines[1:]]) + "\n")
    with pytest.raises(score_output.OutputError, match="older imr-model without the `warnings` column"):
        open_writer(out, with_attributions=False, run_info=RUN)


def test_a_forked_child_neither_keeps_nor_removes_the_lock(tmp_path):
    """Parser workers may be forked from a run holding the lock: they must not hold it on, or remove it."""
    import time

    out = tmp_path / "o.jsonl"
    lock = lock_output(out)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(w)
        lock.release()  # what a finalizer in the child would do: must not touch the parent's lock
        os.read(r, 1)  # stay alive until the parent is done checking
        os._exit(0 if not lock.held else 1)
    os.close(r)
    try:
        time.sleep(0.2)
        assert lock.held and sidecars(out)["lock"].exists()
        with pytest.raises(OutputLockedError):
            lock_output(out)
        lock.release()
        with lock_output(out):  # the child (still alive) does not keep the lock on
            pass
    finally:
        os.write(w, b"x")
        os.close(w)
        assert os.waitpid(pid, 0)[1] == 0
