"""Resumable, crash-safe writers for `imr score` output: JSON Lines, CSV and Parquet.

The unit of writing is a *chunk of whole letters*: either every row of a letter is in the output or
none is, so a `kill -9` at any instant followed by a rerun yields exactly the rows of an
uninterrupted run.

* JSONL / CSV are appended in place (readers can follow the file while it grows). After each chunk
  the data is fsync'ed, then one line ``{"keys": [...], "offset": N}`` is appended to the journal
  ``OUT.progress``. On open the journal is replayed: rows past the last recorded offset (a chunk cut
  off by a crash) are truncated away and a half-written journal line is dropped. The journal stays
  next to the output so a later rerun still knows which letters are done.
* Parquet cannot be appended to, so chunks go to ``OUT.parquet.parts/part-NNNNNN.parquet`` (each
  written to a temporary name, then renamed, so a part exists whole or not at all). `close()` merges
  the previous output and the parts into ``OUT.parquet`` atomically; the merged file's metadata names
  the parts it contains, so parts left behind by a crash during clean-up are recognised as merged.

A *key* identifies one input letter: `row_key(row)` = source + letter_id, present in every row (error
rows too). `done` holds the keys already in the output.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Protocol

import pyarrow as pa
import pyarrow.parquet as pq

FORMATS = {".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}
BASE_COLUMNS = (
    "letter_id",
    "item_index",
    "request",
    "outcome",
    "p_overturned",
    "guidelines",
    "guideline_labels",
    "source",
    "error",
)
ATTRIBUTION_COLUMN = "attributions"
_JSON_COLUMNS = ("guidelines", "guideline_labels", ATTRIBUTION_COLUMN)  # nested values; JSON text in CSV
_PARTS_META = b"imr_parts"
MAX_BUFFERED_WORDS = 200_000  # attribution words held in memory before a Parquet part is written
_WORD = pa.struct([("word", pa.string()), ("start", pa.int32()), ("end", pa.int32()), ("score", pa.float64())])
_ATTRIBUTION = pa.struct(
    [
        ("target", pa.string()),
        ("text_view", pa.string()),
        ("delta", pa.float64()),
        ("n_steps", pa.int32()),
        ("words", pa.list_(_WORD)),
    ]
)


class OutputError(ValueError):
    """The output path cannot be used (unknown format, or it belongs to a run with other settings)."""


class ScoreWriter(Protocol):
    path: Path
    done: set[str]

    def write(self, keys: list[str], rows: list[dict]) -> None: ...

    def close(self) -> None: ...


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


def open_writer(path: str | Path, *, with_attributions: bool, run_info: dict, parquet_rows_per_part: int = 2048) -> ScoreWriter:
    """Open (or resume) the output at `path`.

    `run_info` (model, backend, ...) is recorded with the output; resuming with a different value is
    an `OutputError`, because mixing two models' rows in one file would silently corrupt it.
    `parquet_rows_per_part` is the Parquet checkpoint size: a crash loses at most that many rows of work.
    """
    path = Path(path)
    fmt = output_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"imr_progress": 1, "format": fmt, "columns": columns(with_attributions), "run": run_info}
    if fmt == "parquet":
        return ParquetWriter(path, header, parquet_rows_per_part)
    return LineWriter(path, fmt, header)


def row_key(row: dict) -> str:
    """The letter a row belongs to: its source (file, or table) and letter id."""
    return f"{row['source']}::{row['letter_id']}"


def _fsync_append(path: Path, data: bytes) -> None:
    with path.open("ab") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _check_header(path: Path, found: dict, expected: dict) -> None:
    for field in ("format", "columns", "run"):
        if found.get(field) != expected[field]:
            raise OutputError(
                f"{path} was started by a run with {field}={found.get(field)!r}, this run has "
                f"{field}={expected[field]!r}. Rerun with the same options to resume, or write to a new output."
            )


class LineWriter:
    """JSONL or CSV appended in place, with a journal of finished letters (see module docstring)."""

    def __init__(self, path: Path, fmt: str, header: dict):
        self.path, self.fmt, self.header = path, fmt, header
        self.journal = path.with_name(path.name + ".progress")
        self.columns: list[str] = header["columns"]
        self.done: set[str] = set()
        if self.journal.exists():
            self._resume()
        elif path.exists() and path.stat().st_size > 0:
            raise OutputError(
                f"{path} exists but has no progress journal ({self.journal.name}), so it was not written by "
                "`imr score` or its journal was deleted; choose a new output or remove the file"
            )
        else:
            self._start()

    def _start(self) -> None:
        # The journal is created before any row is written, so an output without one is never ours.
        self.journal.write_text(json.dumps(self.header) + "\n", encoding="utf-8")
        self.path.write_bytes(self._csv_header() if self.fmt == "csv" else b"")
        self._offset = self.path.stat().st_size
        _fsync_append(self.journal, json.dumps({"keys": [], "offset": self._offset}).encode() + b"\n")

    def _resume(self) -> None:
        raw = self.journal.read_bytes()
        complete = raw[: raw.rfind(b"\n") + 1]  # a line cut by a crash has no newline yet
        entries = []
        for line in complete.decode("utf-8").splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                raise OutputError(f"{self.journal} is corrupt (not JSON lines); remove it and the output") from None
        if not entries or "imr_progress" not in entries[0]:
            raise OutputError(f"{self.journal} is not an `imr score` progress journal")
        _check_header(self.path, entries[0], self.header)
        offsets = [e["offset"] for e in entries[1:]]
        if not offsets:  # crashed before the first entry: nothing was written yet
            self._start()
            return
        self._offset = offsets[-1]
        for entry in entries[1:]:
            self.done.update(entry["keys"])
        size = self.path.stat().st_size if self.path.exists() else -1
        if size < self._offset:
            raise OutputError(
                f"{self.path} is shorter ({size} bytes) than its journal records ({self._offset} bytes); "
                "it was modified outside `imr score`. Choose a new output."
            )
        with self.path.open("r+b") as fh:  # drop rows of a chunk whose journal entry never landed
            fh.truncate(self._offset)
        with self.journal.open("r+b") as fh:
            fh.truncate(len(complete))

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

    def write(self, keys: list[str], rows: list[dict]) -> None:
        """Append the rows of the letters `keys` as one unit (data first, then the journal entry)."""
        data = self._encode(rows)
        _fsync_append(self.path, data)
        self._offset += len(data)
        _fsync_append(self.journal, json.dumps({"keys": keys, "offset": self._offset}).encode() + b"\n")
        self.done.update(keys)

    def close(self) -> None:
        """Nothing to finalise: every chunk is already durable."""


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
        ATTRIBUTION_COLUMN: _ATTRIBUTION,
        "source": pa.string(),
        "error": pa.string(),
    }
    return pa.schema([(c, types[c]) for c in cols])


class ParquetWriter:
    """Parquet via atomically renamed part files merged on close (see module docstring).

    Rows are buffered up to `rows_per_part` before a part is written; a crash loses at most that
    buffer, which the rerun recomputes (the buffer always ends on a letter boundary).
    """

    def __init__(self, path: Path, header: dict, rows_per_part: int = 2048):
        self.path, self.header, self.rows_per_part = path, header, rows_per_part
        self.parts_dir = path.with_name(path.name + ".parts")
        self.schema = parquet_schema(header["columns"])
        self.done: set[str] = set()
        self._buffer: list[dict] = []
        self._words = 0
        merged_parts: set[str] = set()
        if path.exists():
            meta = pq.read_schema(path).metadata or {}
            if b"imr_run" not in meta:
                raise OutputError(f"{path} exists but was not written by `imr score`; choose a new output")
            _check_header(path, json.loads(meta[b"imr_run"]), header)
            merged_parts = set(json.loads(meta.get(_PARTS_META, b"[]")))
            self.done.update(_keys_in(path))
        self.parts_dir.mkdir(exist_ok=True)
        for p in self.parts_dir.iterdir():
            if p.suffix == ".tmp" or p.name in merged_parts:  # crash leftovers: half-written or already merged
                p.unlink()
        self.parts = sorted(self.parts_dir.glob("part-*.parquet"))
        for p in self.parts:
            self.done.update(_keys_in(p))
        numbers = [int(n.split("-")[1].split(".")[0]) for n in merged_parts | {p.name for p in self.parts}]
        self._next = max(numbers, default=0) + 1

    def write(self, keys: list[str], rows: list[dict]) -> None:
        self._buffer.extend(rows)
        self._words += sum(len((r.get(ATTRIBUTION_COLUMN) or {}).get("words") or ()) for r in rows)
        # Attribution rows carry every word of the item: bound the buffer by words too, not just rows.
        if len(self._buffer) >= self.rows_per_part or self._words >= MAX_BUFFERED_WORDS:
            self._flush()
        self.done.update(keys)

    def _flush(self) -> None:
        if not self._buffer:
            return
        name = f"part-{self._next:06d}.parquet"
        self._next += 1
        table = pa.Table.from_pylist([_parquet_row(r) for r in self._buffer], schema=self.schema)
        tmp = self.parts_dir / (name + ".tmp")
        pq.write_table(table, tmp)
        _fsync_file(tmp)
        os.replace(tmp, self.parts_dir / name)
        self.parts.append(self.parts_dir / name)
        self._buffer, self._words = [], 0

    def close(self) -> None:
        """Merge the previous output and the new parts into `path` (streamed part by part, atomic replace)."""
        self._flush()
        if not self.parts and self.path.exists():
            self._cleanup()
            return
        old_meta = (pq.read_schema(self.path).metadata or {}) if self.path.exists() else {}
        names = json.loads(old_meta.get(_PARTS_META, b"[]")) + [p.name for p in self.parts]
        meta = {b"imr_run": json.dumps(self.header).encode(), _PARTS_META: json.dumps(names).encode()}
        tmp = self.path.with_name(self.path.name + ".tmp")
        sources = ([self.path] if self.path.exists() else []) + self.parts
        with pq.ParquetWriter(tmp, self.schema.with_metadata(meta)) as out:
            for src in sources:
                for batch in pq.ParquetFile(src).iter_batches(batch_size=4096):
                    out.write_table(pa.Table.from_batches([batch]).cast(self.schema))
        _fsync_file(tmp)
        os.replace(tmp, self.path)
        self._cleanup()

    def _cleanup(self) -> None:
        for p in self.parts:
            p.unlink(missing_ok=True)
        self.parts = []
        if self.parts_dir.exists() and not any(self.parts_dir.iterdir()):
            self.parts_dir.rmdir()


def _parquet_row(row: dict) -> dict:
    guidelines = row.get("guidelines")
    return {**row, "guidelines": list(guidelines.items()) if guidelines else None}


def _keys_in(path: Path) -> set[str]:
    table = pq.read_table(path, columns=["source", "letter_id"])
    return {row_key(r) for r in table.to_pylist()}


def _fsync_file(path: Path) -> None:
    with path.open("rb") as fh:
        os.fsync(fh.fileno())
