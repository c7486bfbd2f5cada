"""Resumable, crash-safe, exclusively locked writers for `imr score` output: JSON Lines, CSV and Parquet.

The unit of writing is a *chunk of whole letters*: either every row of a letter is in the output or
none is, so a `kill -9` (or a full disk) at any instant followed by a rerun yields exactly the rows
of an uninterrupted run.

* One run at a time: `lock_output` takes a non-blocking `fcntl.flock` on ``OUT.lock`` (which holds
  the owner's pid) for the whole run, before the model is loaded; a second run on the same output
  fails at once with `OutputLockedError` and changes nothing. The kernel drops the lock when the
  process dies, so a crashed run never blocks its rerun; a clean run removes the lock file.
* JSONL / CSV are appended in place (readers can follow the file while it grows). After each chunk
  the data is fsync'ed, then one line ``{"keys": [...], "offset": N}`` is appended to the journal
  ``OUT.progress``. On open the journal is replayed: rows past the last recorded offset (a chunk cut
  off by a crash or a failed write) are truncated away and a half-written journal line is dropped.
  The journal stays next to the output so a later rerun still knows which letters are done.
* Parquet cannot be appended to, so chunks go to ``OUT.parquet.parts/part-NNNNNN.parquet`` (each
  written to a temporary name, then renamed, so a part exists whole or not at all). `close()` merges
  the previous output and the parts into ``OUT.parquet`` atomically (temporary file, fsync, rename);
  the merged file's metadata names the parts it contains, so parts left behind by a crash during
  clean-up are recognised as merged.

A *key* identifies one input letter: `row_key(row)` = source + letter_id, present in every row (error
rows too). `done` holds the keys already in the output. Every key owns exactly one contiguous block
of rows, so an output holding a key twice (left by two concurrent runs before outputs were locked) is
refused on open (`DuplicateRowsError`) with instructions, rather than resumed into a worse state.

Every `OSError` while preparing or writing the output becomes an `OutputWriteError` naming the path
and the reason ("disk full", "read-only file system", "permission denied"), after the output has
been left in a state the rerun repairs.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import io
import json
import os
import re
import weakref
from pathlib import Path
from typing import Callable, Iterator, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from imr_model.types import clean_text

FORMATS = {".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}
BASE_COLUMNS = (
    "letter_id",
    "item_index",
    "request",
    "outcome",
    "p_overturned",
    "guidelines",
    "guideline_labels",
    "warnings",
    "source",
    "error",
)
ATTRIBUTION_COLUMN = "attributions"
_JSON_COLUMNS = ("guidelines", "guideline_labels", "warnings", ATTRIBUTION_COLUMN)  # nested; JSON text in CSV
_PARTS_META = b"imr_parts"
_PART_NAME = re.compile(r"part-(\d{6})\.parquet")
MAX_BUFFERED_WORDS = 200_000  # attribution words held in memory before a Parquet part is written
_WORD = pa.struct([("word", pa.string()), ("start", pa.int32()), ("end", pa.int32()), ("score", pa.float64())])
_WINDOW = pa.struct([("start", pa.int32()), ("end", pa.int32()), ("weight", pa.float64()), ("attributed", pa.bool_()),
                     ("contribution", pa.float64())])  # fmt: skip
_ATTRIBUTION = pa.struct(
    [
        ("target", pa.string()),
        ("text_view", pa.string()),
        ("delta", pa.float64()),
        ("n_steps", pa.int32()),
        ("words", pa.list_(_WORD)),
        ("windows", pa.list_(_WINDOW)),  # attribution.WindowSpan: which windows were attributed
    ]
)
_REASONS = {
    errno.ENOSPC: "disk full (no space left on device)",
    errno.EDQUOT: "disk full (quota exceeded)",
    errno.EFBIG: "disk full (file too large)",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}

# The low-level calls every byte of output goes through (tests replace them to simulate a full disk).
_write = os.write
_fsync = os.fsync


class OutputError(ValueError):
    """The output path cannot be used (unknown format, locked, corrupt, another run's settings, unwritable)."""


class OutputLockedError(OutputError):
    """Another `imr score` run holds the output's lock."""

    def __init__(self, path: Path, pid: int | None):
        self.path, self.pid = path, pid
        who = f"pid {pid}" if pid else "pid unknown"
        super().__init__(f"{path} is being written by another `imr score` run ({who}); wait for it or choose another output")


class OutputWriteError(OutputError):
    """An `OSError` while preparing or writing the output (disk full, read-only, permission denied, ...)."""

    def __init__(self, path: Path, exc: OSError, doing: str = "write"):
        self.path, self.errno = path, exc.errno
        self.reason = _REASONS.get(exc.errno) or exc.strerror or type(exc).__name__
        hint = "; rerun to resume once it is fixed" if doing == "write" else ""
        super().__init__(f"cannot {doing} {path}: {self.reason}{hint}")


class DuplicateRowsError(OutputError):
    """The output holds rows of some letters more than once, so it cannot be resumed."""


class ScoreWriter(Protocol):
    path: Path
    done: set[str]

    def write(self, keys: list[str], rows: list[dict]) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


def columns(with_attributions: bool) -> list[str]:
    """Output columns in order; `attributions` only when requested."""
    cols = list(BASE_COLUMNS)
    if with_attributions:
        cols.insert(cols.index("source"), ATTRIBUTION_COLUMN)
    return cols


def output_format(path: str | Path) -> str:
    """'jsonl' | 'csv' | 'parquet' from the file suffix; anything else is an `OutputError`."""
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise OutputError(f"unsupported output {str(path)!r}: use one of {', '.join(FORMATS)}")
    return fmt


def sidecars(path: str | Path) -> dict[str, Path]:
    """The files next to an output that belong to it: lock, journal (JSONL/CSV), parts dir (Parquet)."""
    path = Path(path)
    return {name: path.with_name(path.name + "." + name) for name in ("lock", "progress", "parts", "tmp")}


@contextlib.contextmanager
def _os_errors(path: Path, doing: str = "write") -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise OutputWriteError(path, exc, doing) from exc


# --------------------------------------------------------------------------- lock


class OutputLock:
    """The exclusive lock of one output, held until `release()` (or process exit, or garbage collection).

    Forked children (e.g. parser worker processes) close their copy of the descriptor at once, so the
    lock never outlives the run's own process and a child can never remove the lock file.
    """

    def __init__(self, output: Path, lock_path: Path, fd: int):
        self.output, self.lock_path, self._fd = output, lock_path, fd
        _HELD.add(self)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Remove the lock file (if it is still ours) and drop the lock; idempotent."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if _same_file(fd, self.lock_path):
                self.lock_path.unlink()
        except OSError:
            pass  # a read-only or vanished lock file: the lock itself goes with the descriptor
        os.close(fd)

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release()


_HELD: weakref.WeakSet[OutputLock] = weakref.WeakSet()


def _drop_inherited_locks() -> None:
    for lock in list(_HELD):
        fd, lock._fd = lock._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)  # only this copy: the parent's descriptor keeps the lock


os.register_at_fork(after_in_child=_drop_inherited_locks)


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def lock_output(path: str | Path) -> OutputLock:
    """Lock `path` for this process (non-blocking) and check it can be written, before any model is loaded.

    Raises `OutputLockedError` if another run holds it (nothing is changed), `OutputWriteError` if the
    directory or an existing output file is read-only / not permitted, or the disk is full.
    """
    path = Path(path)
    output_format(path)
    lock_path = sidecars(path)["lock"]
    with _os_errors(path.parent, "create the output directory"):
        path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise OutputWriteError(path, exc, "write") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise OutputLockedError(path, pid) from None
        except OSError as exc:
            os.close(fd)
            raise OutputWriteError(path, exc, "lock") from exc
        if _same_file(fd, lock_path):
            break
        os.close(fd)  # the previous holder removed the file between our open and our lock: take the new one
    lock = OutputLock(path, lock_path, fd)
    try:
        with _os_errors(lock_path):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _preflight(path)
    except BaseException:
        lock.release()
        raise
    return lock


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        return None


def _preflight(path: Path) -> None:
    """Fail now, not after the model has loaded, on a full disk or an existing file we may not write."""
    with _os_errors(path.parent, "check free space in"):
        st = os.statvfs(path.parent)
    if st.f_bavail == 0:
        raise OutputWriteError(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    side = sidecars(path)
    for existing in (path, side["progress"]):
        if existing.is_file():
            with _os_errors(existing):
                os.close(os.open(existing, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC))


# --------------------------------------------------------------------------- writers


def open_writer(
    path: str | Path,
    *,
    with_attributions: bool,
    run_info: dict,
    parquet_rows_per_part: int = 2048,
    lock: OutputLock | None = None,
) -> ScoreWriter:
    """Open (or resume) the output at `path`.

    `run_info` (model, backend, ...) is recorded with the output; resuming with a different value is
    an `OutputError`, because mixing two models' rows in one file would silently corrupt it.
    `parquet_rows_per_part` is the Parquet checkpoint size: a crash loses at most that many rows of work.
    `lock` is the caller's `lock_output(path)`; without one the writer takes the lock itself and
    releases it on `close()` / `abort()`.
    """
    path = Path(path)
    fmt = output_format(path)
    owned = lock is None
    lock = lock_output(path) if owned else lock
    if not lock.held or lock.output != path:
        raise ValueError(f"open_writer: the lock given is not a held lock of {path}")
    header = {"imr_progress": 1, "format": fmt, "columns": columns(with_attributions), "run": run_info}
    try:
        if fmt == "parquet":
            return ParquetWriter(path, header, parquet_rows_per_part, lock=lock if owned else None)
        return LineWriter(path, fmt, header, lock=lock if owned else None)
    except BaseException:
        if owned:
            lock.release()
        raise


def row_key(row: dict) -> str:
    """The letter a row belongs to: its source (file, or table) and letter id."""
    return f"{row['source']}::{row['letter_id']}"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[_write(fd, view) :]


def _append(path: Path, data: bytes) -> None:
    """Append `data` to `path` and fsync; an `OSError` becomes an `OutputWriteError` naming `path`."""
    _write_synced(path, data, os.O_APPEND)


def _create(path: Path, data: bytes) -> None:
    """Create or truncate `path` with `data`, fsync'ed."""
    _write_synced(path, data, os.O_TRUNC)


def _write_synced(path: Path, data: bytes, mode: int) -> None:
    with _os_errors(path):
        fd = os.open(path, os.O_WRONLY | mode | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            _write_all(fd, data)
            _fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make a rename / creation in directory `path` durable (best effort where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories; the data files are already durable
    finally:
        os.close(fd)


def _check_header(path: Path, found: dict, expected: dict) -> None:
    for field in ("format", "columns", "run"):
        if found.get(field) != expected[field]:
            old = field == "columns" and "warnings" not in (found.get(field) or []) and "warnings" in expected[field]
            why = " (it was written by an older imr-model without the `warnings` column)" if old else ""
            raise OutputError(
                f"{path} was started by a run with {field}={found.get(field)!r}, this run has "
                f"{field}={expected[field]!r}{why}. Rerun with the same options to resume, or write to a new output."
            )


def _duplicates_error(path: Path, n: int, remove: list[Path]) -> DuplicateRowsError:
    names = " and ".join(p.name for p in remove)
    return DuplicateRowsError(
        f"{path} holds the rows of {n} letter(s) more than once (left by two `imr score` runs writing it at the "
        f"same time, before outputs were locked), so it cannot be resumed safely. Remove {names} and rerun to "
        "score everything again, or write to a new output."
    )


def _clean(value):
    """`value` with lone surrogates replaced in every string (nested lists / dicts too)."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _encode_clean(encode: Callable[[list[dict]], object], rows: list[dict]):
    """`encode(rows)`; rows holding lone surrogates (never expected: inputs are cleaned) are cleaned first."""
    try:
        return encode(rows)
    except UnicodeEncodeError:
        return encode([_clean(r) for r in rows])


def _check_new_keys(done: set[str], keys: list[str]) -> None:
    if len(set(keys)) != len(keys) or not done.isdisjoint(keys):
        raise ValueError("a letter was written to the output twice (internal error: keys must be unique per output)")


class LineWriter:
    """JSONL or CSV appended in place, with a journal of finished letters (see module docstring)."""

    def __init__(self, path: Path, fmt: str, header: dict, lock: OutputLock | None = None):
        self.path, self.fmt, self.header, self._lock = path, fmt, header, lock
        self.journal = sidecars(path)["progress"]
        self.columns: list[str] = header["columns"]
        self.done: set[str] = set()
        if self.journal.exists():
            with _os_errors(self.journal, "read"):
                raw = self.journal.read_bytes()
            self._resume(raw)
        elif path.exists() and path.stat().st_size > 0:
            raise OutputError(
                f"{path} exists but has no progress journal ({self.journal.name}), so it was not written by "
                "`imr score` or its journal was deleted; choose a new output or remove the file"
            )
        else:
            self._start()

    def _start(self) -> None:
        # The journal (header + an empty first entry) appears atomically and before any row is written,
        # so an output without one is never ours and a journal is never headerless.
        self._offset = len(self._csv_header()) if self.fmt == "csv" else 0
        body = json.dumps(self.header).encode() + b"\n" + json.dumps({"keys": [], "offset": self._offset}).encode() + b"\n"
        tmp = self.journal.with_name(self.journal.name + ".tmp")
        _create(tmp, body)
        with _os_errors(self.journal):
            os.replace(tmp, self.journal)
        _create(self.path, self._csv_header() if self.fmt == "csv" else b"")
        _fsync_dir(self.path.parent)
        self._journal_size = len(body)

    def _resume(self, raw: bytes) -> None:
        complete = raw[: raw.rfind(b"\n") + 1]  # a line cut by a crash has no newline yet
        entries = []
        try:
            for line in complete.decode("utf-8").splitlines():
                entries.append(json.loads(line))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise OutputError(f"{self.journal} is corrupt (not JSON lines); remove it and {self.path.name}") from None
        if not entries or not isinstance(entries[0], dict) or "imr_progress" not in entries[0]:
            raise OutputError(f"{self.journal} is not an `imr score` progress journal")
        _check_header(self.path, entries[0], self.header)
        chunks = entries[1:]
        if not all(isinstance(e, dict) and isinstance(e.get("offset"), int) and isinstance(e.get("keys"), list) for e in chunks):
            raise OutputError(f"{self.journal} is corrupt (entries without keys/offset); remove it and {self.path.name}")
        if not any(e["keys"] for e in chunks):  # stopped before the first chunk: nothing to keep
            self._start()
            return
        n_keys = sum(len(e["keys"]) for e in chunks)
        for entry in chunks:
            self.done.update(entry["keys"])
        offsets = [e["offset"] for e in chunks]
        growing = all(b > a if e["keys"] else b >= a for a, b, e in zip(offsets, offsets[1:], chunks[1:]))
        if len(self.done) != n_keys or not growing:
            # Keys written twice, or offsets that go backwards: two writers appended to this journal.
            raise _duplicates_error(self.path, max(n_keys - len(self.done), 1), [self.path, self.journal])
        self._offset = offsets[-1]
        size = self.path.stat().st_size if self.path.exists() else -1
        if size < self._offset:
            raise OutputError(
                f"{self.path} is shorter ({size} bytes) than its journal records ({self._offset} bytes); "
                "it was modified outside `imr score`. Choose a new output."
            )
        with _os_errors(self.path):  # drop rows of a chunk whose journal entry never landed
            if size > self._offset:
                os.truncate(self.path, self._offset)
            if len(raw) > len(complete):
                os.truncate(self.journal, len(complete))
        self._journal_size = len(complete)

    def _csv_header(self) -> bytes:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(self.columns)
        return buf.getvalue().encode("utf-8")

    def _encode(self, rows: list[dict]) -> bytes:
        if self.fmt == "jsonl":
            return "".join(json.dumps({c: r.get(c) for c in self.columns}, ensure_ascii=False) + "\n" for r in rows).encode()
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        for r in rows:
            writer.writerow([_csv_cell(c, r.get(c)) for c in self.columns])
        return buf.getvalue().encode("utf-8")

    def _append_entry(self, keys: list[str]) -> None:
        line = json.dumps({"keys": keys, "offset": self._offset}).encode() + b"\n"
        _append(self.journal, line)
        self._journal_size += len(line)

    def write(self, keys: list[str], rows: list[dict]) -> None:
        """Append the rows of the letters `keys` as one unit (data first, then the journal entry).

        If either write fails (e.g. disk full) both files are cut back to the last complete chunk where
        possible, then `OutputWriteError` is raised; the next open repairs whatever could not be cut.
        """
        _check_new_keys(self.done, keys)
        data = _encode_clean(self._encode, rows)
        offset, journal_size = self._offset, self._journal_size
        try:
            _append(self.path, data)
            self._offset += len(data)
            self._append_entry(keys)
        except OutputWriteError:
            self._offset, self._journal_size = offset, journal_size
            self._rollback()
            raise
        self.done.update(keys)

    def _rollback(self) -> None:
        """Best effort after a failed chunk: journal back to its last complete entry, then the data."""
        try:
            os.truncate(self.journal, self._journal_size)
        except OSError:
            return  # the journal may still end in this chunk's entry: leave the data, the rerun decides
        with contextlib.suppress(OSError):
            os.truncate(self.path, self._offset)

    def close(self) -> None:
        """Nothing to finalise (every chunk is already durable); releases the lock if the writer took it."""
        self.abort()

    def abort(self) -> None:
        """Stop without finalising (after an error): the output stays resumable."""
        if self._lock is not None:
            self._lock.release()


def _csv_cell(column: str, value):
    if value is None:
        return ""
    if column in _JSON_COLUMNS:
        return json.dumps(value, ensure_ascii=False)
    return value


def parquet_schema(cols: list[str]) -> pa.Schema:
    types = {
        "letter_id": pa.string(),
        "item_index": pa.int32(),
        "request": pa.string(),
        "outcome": pa.string(),
        "p_overturned": pa.float64(),
        "guidelines": pa.map_(pa.string(), pa.float64()),
        "guideline_labels": pa.list_(pa.string()),
        "warnings": pa.list_(pa.string()),
        ATTRIBUTION_COLUMN: _ATTRIBUTION,
        "source": pa.string(),
        "error": pa.string(),
    }
    return pa.schema([(c, types[c]) for c in cols])


class _FdSink(io.RawIOBase):
    """A write-only file over a descriptor whose bytes go through `_write` (so errors keep their errno)."""

    def __init__(self, fd: int):
        self.fd = fd

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if self.fd is None:
            raise OSError(errno.EBADF, "output sink already closed")
        data = memoryview(data)
        _write_all(self.fd, data)
        return len(data)


def _write_parquet(path: Path, fill: Callable[[io.BufferedWriter], None]) -> None:
    """Create `path`, let `fill(sink)` write Parquet into it, fsync; on failure the file is removed."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    raw = _FdSink(fd)
    sink = io.BufferedWriter(raw, buffer_size=1 << 20)
    try:
        fill(sink)
        sink.flush()
        _fsync(fd)
    except BaseException:
        raw.fd = None  # whatever is still buffered must never reach a descriptor number reused later
        with contextlib.suppress(Exception):
            sink.close()
        os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    sink.close()
    os.close(fd)


class ParquetWriter:
    """Parquet via atomically renamed part files merged on close (see module docstring).

    Rows are buffered up to `rows_per_part` before a part is written; a crash loses at most that
    buffer, which the rerun recomputes (the buffer always ends on a letter boundary).
    """

    def __init__(self, path: Path, header: dict, rows_per_part: int = 2048, lock: OutputLock | None = None):
        self.path, self.header, self.rows_per_part, self._lock = path, header, rows_per_part, lock
        side = sidecars(path)
        self.parts_dir, self._tmp = side["parts"], side["tmp"]
        self.schema = parquet_schema(header["columns"])
        self.done: set[str] = set()
        self._buffer: list[dict] = []
        self._words = 0
        merged_parts: set[str] = set()
        runs: list[str] = []  # one key per contiguous block of rows, over the output and its parts
        with _os_errors(path, "open"):
            if path.exists():
                meta = self._metadata(path)
                if b"imr_run" not in meta:
                    raise OutputError(f"{path} exists but was not written by `imr score`; choose a new output")
                _check_header(path, json.loads(meta[b"imr_run"]), header)
                merged_parts = set(json.loads(meta.get(_PARTS_META, b"[]")))
                runs += _key_runs(path)
            self._tmp.unlink(missing_ok=True)  # a merge cut off by a crash or a full disk
            self.parts_dir.mkdir(exist_ok=True)
            for p in self.parts_dir.iterdir():
                if p.suffix == ".tmp" or p.name in merged_parts:  # crash leftovers: half-written or already merged
                    p.unlink()
            self.parts = sorted(p for p in self.parts_dir.iterdir() if _PART_NAME.fullmatch(p.name))
            for p in self.parts:
                runs += _key_runs(p)
        self.done.update(runs)
        if len(self.done) != len(runs):
            raise _duplicates_error(path, len(runs) - len(self.done), [path, self.parts_dir])
        numbers = [int(m.group(1)) for n in merged_parts | {p.name for p in self.parts} if (m := _PART_NAME.fullmatch(n))]
        self._next = max(numbers, default=0) + 1

    @staticmethod
    def _metadata(path: Path) -> dict:
        try:
            return pq.read_schema(path).metadata or {}
        except pa.ArrowInvalid:
            raise OutputError(f"{path} exists but is not a Parquet file; choose a new output or remove it") from None

    def write(self, keys: list[str], rows: list[dict]) -> None:
        _check_new_keys(self.done, keys)
        self._buffer.extend(rows)
        self._words += sum(len((r.get(ATTRIBUTION_COLUMN) or {}).get("words") or ()) for r in rows)
        self.done.update(keys)
        # Attribution rows carry every word of the item: bound the buffer by words too, not just rows.
        if len(self._buffer) >= self.rows_per_part or self._words >= MAX_BUFFERED_WORDS:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        name = f"part-{self._next:06d}.parquet"
        table = _encode_clean(lambda rows: pa.Table.from_pylist([_parquet_row(r) for r in rows], schema=self.schema), self._buffer)
        tmp = self.parts_dir / (name + ".tmp")
        with _os_errors(tmp):
            _write_parquet(tmp, lambda sink: pq.write_table(table, sink))
            os.replace(tmp, self.parts_dir / name)
            _fsync_dir(self.parts_dir)
        self._next += 1
        self.parts.append(self.parts_dir / name)
        self._buffer, self._words = [], 0

    def close(self) -> None:
        """Merge the previous output and the new parts into `path` (streamed part by part, atomic replace)."""
        try:
            self._flush()
            if self.parts or not self.path.exists():
                self._merge()
            self._cleanup()
        finally:
            self.abort()

    def _merge(self) -> None:
        old_meta = self._metadata(self.path) if self.path.exists() else {}
        names = json.loads(old_meta.get(_PARTS_META, b"[]")) + [p.name for p in self.parts]
        meta = {b"imr_run": json.dumps(self.header).encode(), _PARTS_META: json.dumps(names).encode()}
        sources = ([self.path] if self.path.exists() else []) + self.parts
        schema = self.schema.with_metadata(meta)

        def fill(sink) -> None:
            with pq.ParquetWriter(sink, schema) as out:
                for src in sources:
                    for batch in pq.ParquetFile(src).iter_batches(batch_size=4096):
                        out.write_table(pa.Table.from_batches([batch]).cast(self.schema))

        with _os_errors(self.path):
            _write_parquet(self._tmp, fill)
            os.replace(self._tmp, self.path)
            _fsync_dir(self.path.parent)

    def _cleanup(self) -> None:
        with _os_errors(self.parts_dir):
            for p in self.parts:
                p.unlink(missing_ok=True)
            self.parts = []
            if self.parts_dir.exists() and not any(self.parts_dir.iterdir()):
                self.parts_dir.rmdir()

    def abort(self) -> None:
        """Stop without merging (after an error): written parts stay for the rerun; unwritten rows are redone."""
        if self._lock is not None:
            self._lock.release()


def _parquet_row(row: dict) -> dict:
    guidelines = row.get("guidelines")
    return {**row, "guidelines": list(guidelines.items()) if guidelines else None}


def _key_runs(path: Path) -> list[str]:
    """The key of each contiguous block of rows in `path`, in order (a key listed twice is a duplicate)."""
    runs: list[str] = []
    try:
        batches = list(pq.ParquetFile(path).iter_batches(batch_size=65536, columns=["source", "letter_id"]))
    except pa.ArrowInvalid:
        raise OutputError(f"{path} is not a readable `imr score` Parquet file; remove it (and its parts) or choose a new output") from None
    for batch in batches:
        for source, letter_id in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
            key = row_key({"source": source, "letter_id": letter_id})
            if not runs or runs[-1] != key:
                runs.append(key)
    return runs
