"""Batch scoring (`imr score`): letters (PDF/TXT files, folders, globs) and item tables → one row per item.

Streaming: inputs are parsed one letter at a time in a background thread (bounded queue) while the
model scores the previous batch, and rows are written as soon as a batch is done, so memory stays flat
however many letters there are. Resumable and crash-safe: rows are written in chunks of whole letters
(`score_output`), letters already in the output are skipped without being parsed, and chunks are
formed deterministically from the first unfinished letter, so a rerun after `kill -9` reproduces the
uninterrupted output exactly.

Tabular inputs (.csv, .jsonl, .parquet) hold item records, e.g. the output of `imr parse`: columns
`letter_id`, `item_index`, and `request` / `rationale` / `case_summary` (or a single `text` column).
Rows of one letter must be contiguous: a letter whose rows are split up becomes one error row (at its
first rows), so every letter owns exactly one block of output rows. A row with an `error` value
becomes an error row.

Messy input: every string entering scoring (table cells and column names, parsed letters, file names)
passes through `types.clean_text`, so a lone surrogate becomes U+FFFD in that row instead of failing
the table; JSONL/CSV tables with invalid UTF-8 bytes are read with U+FFFD replacements too.

The output is locked for the whole run (`score_output.lock_output`, before the model loads), so a
second run on the same output fails at once with `OutputLockedError` and changes nothing.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import pandas as pd
import pyarrow.parquet as pq

from imr_model.attribution import DEFAULT_STEPS, OUTCOME
from imr_model.drift import DriftAccumulator
from imr_model.inference import load_model
from imr_model.letters import iter_letter_files, parse_many
from imr_model.progress import progress_bar
from imr_model.score_output import OutputLock, lock_output, open_writer, output_format, row_key
from imr_model.tabular import records_from_table
from imr_model.types import Letter, LetterError, clean_text

logger = logging.getLogger(__name__)
TABLE_SUFFIXES = (".csv", ".jsonl", ".parquet")
TEXT_COLUMNS = ("request", "rationale", "case_summary", "text")
_PREFETCH = 64  # parsed letters waiting for the model; bounds memory


@dataclass
class Unit:
    """One input letter: its item records, or the reason it could not be read."""

    source: str
    letter_id: str
    records: list[dict]
    error: str | None = None

    def __post_init__(self) -> None:  # keys and error rows never carry lone surrogates
        self.source, self.letter_id = clean_text(str(self.source)), clean_text(str(self.letter_id))
        if self.error is not None:
            self.error = clean_text(str(self.error))

    @property
    def key(self) -> str:
        return row_key({"source": self.source, "letter_id": self.letter_id})


@dataclass
class ScoreSummary:
    letters: int = 0
    items: int = 0
    errors: int = 0
    skipped: int = 0  # already in the output from an earlier run
    seconds: float = 0.0
    drift: dict | None = None  # the batch drift report of the items scored in this run (`drift.compare`)

    @property
    def items_per_second(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else 0.0


def score(
    inputs: Iterable[str | Path],
    output: str | Path,
    *,
    model=None,
    attributions: bool = False,
    target: str = OUTCOME,
    n_steps: int = DEFAULT_STEPS,
    batch_size: int = 32,
    backend: str = "torch",
    progress: bool = True,
    checkpoint_rows: int = 2048,
    chunk_items: int | None = None,
    lock: OutputLock | None = None,
    drift: bool = True,
    device: str | None = None,
) -> ScoreSummary:
    """Score every letter in `inputs` into `output` (.jsonl/.csv/.parquet), resuming a previous run.

    Letters are scored and written in chunks of whole letters holding at least `chunk_items` items
    (default 4 × `batch_size`; the first chunk `batch_size`, so the model starts early); `batch_size` is the
    number of windows per forward pass. Bigger chunks
    pad less (windows are length-sorted within a chunk) and share more repeated sentences, which are
    run once per chunk. JSONL/CSV rows are durable after every chunk; Parquet rows every
    `checkpoint_rows` rows.

    The output is locked (`score_output.lock_output`) before the model is loaded and released on
    return; a caller that loads the model itself first can take the lock earlier and pass it as
    `lock` (it stays the caller's to release). Raises `OutputLockedError` / `OutputWriteError` (both
    `OutputError`) for an output in use, read-only, not permitted, or on a full disk.

    With `drift`, the summary's ``drift`` holds the batch drift report (`imr_model.drift`) of the items scored
    in this run (numbers gathered per chunk: the run's memory stays flat).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    chunk_items = 4 * batch_size if chunk_items is None else chunk_items
    if chunk_items < 1:
        raise ValueError(f"chunk_items must be >= 1, got {chunk_items}")
    output_format(output)  # a bad output name fails before the model is loaded
    output = Path(output)
    letter_paths, tables = split_inputs(inputs)
    own_lock = lock is None
    lock = lock_output(output) if own_lock else lock  # so do a locked, read-only or full output
    writer = None
    try:
        predictor = load_model(model, backend=backend, device=device)  # device: None = auto (`imr_model.devices`)
        run_info = {"model": predictor.identity()}
        if attributions:
            run_info.update(target=target, n_steps=n_steps)
        writer = open_writer(output, with_attributions=attributions, run_info=run_info,
                             parquet_rows_per_part=checkpoint_rows, lock=lock)  # fmt: skip
        summary, start = ScoreSummary(), time.perf_counter()
        tracker = DriftAccumulator.for_predictor(predictor) if drift else None
        scans = {t: scan_table(t) for t in tables}
        total = len(letter_paths) + sum(scan[0] for scan in scans.values())
        with progress_bar("scoring", total=total, unit="letters", disable=not progress) as bar:
            def skipped() -> None:
                summary.skipped += 1
                bar.advance()

            units = _prefetch(iter_units(letter_paths, tables, skip=writer.done, on_skip=skipped, scans=scans))
            for chunk in chunked(units, chunk_items, first_items=batch_size):
                chunk, rows = _score_chunk(predictor, chunk, drift=tracker, attributions=attributions, target=target,
                                           n_steps=n_steps, batch_size=batch_size)  # fmt: skip
                writer.write([u.key for u in chunk], rows)
                summary.letters += sum(1 for u in chunk if u.error is None)
                summary.errors += sum(1 for u in chunk if u.error is not None)
                summary.items += sum(len(u.records) for u in chunk)
                summary.seconds = time.perf_counter() - start
                bar.advance(len(chunk))
                bar.update(rate=f"{summary.items_per_second:.1f} items/s")
        writer.close()
        if tracker is not None:
            summary.drift = tracker.report(model=predictor.identity(), scope=_drift_scope(summary))
    finally:
        if writer is not None:
            writer.abort()
        if own_lock:
            lock.release()
    summary.seconds = time.perf_counter() - start
    return summary


def drift_report(inputs: Iterable[str | Path], *, model=None, batch_size: int = 32, progress: bool = True,
                 chunk_items: int | None = None) -> dict:  # fmt: skip
    """The batch drift report (`imr_model.drift`) of the items in `inputs` (letters, folders, globs, item tables),
    scored like `score` (same inputs, chunks and error handling) but writing no rows (`imr drift`)."""
    letter_paths, tables = split_inputs(inputs)
    predictor = load_model(model)
    tracker = DriftAccumulator.for_predictor(predictor)
    summary, start = ScoreSummary(), time.perf_counter()
    scans = {t: scan_table(t) for t in tables}
    total = len(letter_paths) + sum(scan[0] for scan in scans.values())
    with progress_bar("drift", total=total, unit="letters", disable=not progress) as bar:
        for chunk in chunked(_prefetch(iter_units(letter_paths, tables, scans=scans)), chunk_items or 4 * batch_size,
                             first_items=batch_size):  # fmt: skip
            chunk, _ = _score_chunk(predictor, chunk, drift=tracker, batch_size=batch_size)
            summary.letters += sum(1 for u in chunk if u.error is None)
            summary.errors += sum(1 for u in chunk if u.error is not None)
            summary.items += sum(len(u.records) for u in chunk)
            bar.advance(len(chunk))
    summary.seconds = time.perf_counter() - start
    return tracker.report(model=predictor.identity(), scope=f"{summary.items} items of {summary.letters} letters "
                          f"({summary.errors} inputs could not be read)", letters=summary.letters, errors=summary.errors,
                          seconds=round(summary.seconds, 2))  # fmt: skip


def _drift_scope(summary: ScoreSummary) -> str:
    done = f"; {summary.skipped} letters already in the output were not read again" if summary.skipped else ""
    return f"the {summary.items} items scored in this run{done}"


def _score_chunk(predictor, chunk: list[Unit], drift: DriftAccumulator | None = None,
                 **kwargs) -> tuple[list[Unit], list[dict]]:  # fmt: skip
    """`score_units` on a chunk; if it fails, each letter alone, and a letter that still fails becomes an
    error row naming the exception type (never its message, which may quote text). Chunks are formed
    deterministically, so without this one failing letter would stop every rerun at the same place.
    `drift` gathers the drift statistics of the letters scored (what a failed attempt observed is dropped)."""
    observe = drift.observe if drift is not None else None
    mark = drift.mark() if drift is not None else 0
    try:
        return chunk, score_units(predictor, chunk, observe=observe, **kwargs)
    except Exception:  # noqa: BLE001 - isolate the letter that fails
        if drift is not None:
            drift.rollback(mark)
    units, rows = [], []
    for unit in chunk:
        mark = drift.mark() if drift is not None else 0
        try:
            rows += score_units(predictor, [unit], observe=observe, **kwargs)
        except Exception as exc:  # noqa: BLE001 - one letter never ends the batch
            if drift is not None:
                drift.rollback(mark)
            logger.warning("prediction failed for %s (%s)", unit.source, type(exc).__name__)
            unit = Unit(unit.source, unit.letter_id, [], error=f"prediction failed ({type(exc).__name__})")
            rows += score_units(predictor, [unit], **kwargs)
        units.append(unit)
    return units, rows


def score_units(predictor, units: list[Unit], **kwargs) -> list[dict]:
    """Output rows for a chunk of letters: the item predictions in order, one error row per failed letter.
    `kwargs` go to `predict_records`."""
    records = [r for u in units if u.error is None for r in u.records]
    preds = iter(predictor.predict_records(records, **kwargs)) if records else iter(())
    with_attr = kwargs.get("attributions", False)
    rows = []
    for u in units:
        if u.error is not None:
            rows.append(error_row(u.source, u.letter_id, u.error, with_attr))
            continue
        for _ in u.records:
            d = next(preds).to_dict()
            d["source"], d["letter_id"], d["error"] = u.source, u.letter_id, None
            d["warnings"] = [clean_text(str(w)) for w in d.get("warnings") or ()]
            if not with_attr:
                d.pop("attributions")
            d.pop("letter_decision")
            rows.append(d)
    return rows


def error_row(source: str, letter_id: str, message: str, with_attributions: bool) -> dict:
    row = {"letter_id": letter_id, "item_index": None, "request": None, "outcome": None, "p_overturned": None,
           "guidelines": None, "guideline_labels": None, "warnings": None, "source": source, "error": message}
    if with_attributions:
        row["attributions"] = None
    return row


def chunked(units: Iterable[Unit], chunk_items: int, first_items: int | None = None) -> Iterator[list[Unit]]:
    """Whole letters per chunk, closed once it holds >= chunk_items items (deterministic from its first letter);
    the first chunk closes at `first_items` (at most chunk_items), so the model starts while the parse workers go
    on: on the 124 shared letters (int8 ONNX, 2 CPUs) a first chunk of 32 items, not 128, took `imr score` from
    7.3-7.6 s to 6.3-6.8 s."""
    chunk: list[Unit] = []
    n_items = 0
    limit = chunk_items if first_items is None else max(1, min(first_items, chunk_items))
    for u in units:
        chunk.append(u)
        n_items += len(u.records)
        if n_items >= limit:
            yield chunk
            chunk, n_items, limit = [], 0, chunk_items
    if chunk:
        yield chunk


# --------------------------------------------------------------------------- inputs


def split_inputs(inputs: Iterable[str | Path]) -> tuple[list[Path], list[Path]]:
    """(letter files, table files): tables are files named explicitly with a table suffix (each once)."""
    inputs = [str(x) for x in inputs]
    if not inputs:
        raise ValueError("no inputs given: pass letter files, folders, globs or item tables")
    tables = list(dict.fromkeys(Path(x) for x in inputs if Path(x).suffix.lower() in TABLE_SUFFIXES and Path(x).is_file()))
    others = [x for x in inputs if Path(x) not in tables]
    return (iter_letter_files(others) if others else []), tables


# (letters in the table, letter_ids whose rows are not contiguous, why the table cannot be read or None)
TableScan = tuple[int, frozenset, "str | None"]


class TableReadError(ValueError):
    """A table that cannot be read to its end; the message names the table and the row, never a cell's value."""


def iter_units(
    letter_paths: list[Path],
    tables: list[Path],
    *,
    skip: set[str] = frozenset(),
    on_skip: Callable[[], None] | None = None,
    scans: dict[Path, TableScan] | None = None,
) -> Iterator[Unit]:
    """Units in input order (letter files, then tables), leaving out keys in `skip` (never parsing them).

    `scans` holds `scan_table` results already computed for the tables (else each is scanned here).
    """
    todo = []
    for p in letter_paths:
        if Unit(str(p), p.stem, []).key in skip:
            on_skip and on_skip()
        else:
            todo.append(p)
    for result in parse_many(todo):
        yield _letter_unit(result)
    for table in tables:
        for unit in iter_table_units(table, scan=(scans or {}).get(table)):
            if unit.key in skip:
                on_skip and on_skip()
            else:
                yield unit


def _letter_unit(result: Letter | LetterError) -> Unit:
    if isinstance(result, LetterError):
        return Unit(str(result.source), Path(str(result.source)).stem, [], error=str(result.reason))
    return Unit(result.source, result.letter_id, [_clean(r) for r in result.item_records()])


def _clean(value):
    """`value` with `clean_text` applied to every string in it (dict keys and nested lists too)."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def scan_table(path: Path) -> TableScan:
    """(number of letters, letter_ids whose rows are split up, read problem) of a table: one streamed pass.

    A table that cannot be read to its end (bad JSON line, bad cell, I/O error) is one letter: its error
    unit. A table with no rows is one letter too ("table has no rows").
    """
    runs: dict[str, int] = {}
    try:
        for letter_id, _, _ in _table_groups(path):
            runs[letter_id] = runs.get(letter_id, 0) + 1
    except TableReadError as exc:
        return 1, frozenset(), str(exc)
    if not runs:
        return 1, frozenset(), "table has no rows"
    return len(runs), frozenset(i for i, n in runs.items() if n > 1), None


def iter_table_units(path: Path, chunk_rows: int = 1024, *, scan: TableScan | None = None) -> Iterator[Unit]:
    """One unit per letter of the table, in order of first appearance; rows are read in chunks of `chunk_rows`.

    Contiguous rows with the same `letter_id` form one letter. Columns are matched like training tables
    (`tabular.records_from_table`: loose names, a `text` column as the rationale, DMHC tables);
    `imr parse` error records become error rows. A letter whose rows are not contiguous becomes one
    error unit where its rows start, so no letter is ever scored twice or half. A table that cannot be
    read to its end, or has no rows, is one error unit named after the table and nothing of it is
    scored (`scan`, from `scan_table`, computed by a first pass when not given): scoring the rows before
    a bad line would leave its letter half-done for every rerun.
    """
    scan = scan_table(path) if scan is None else scan
    source, stem = str(path), clean_text(path.stem)
    if scan[2] is not None:
        yield Unit(source, stem, [], error=f"{scan[2]}; nothing from this table was scored: fix it and rerun")
        return
    split = scan[1]
    reported: set[str] = set()
    try:
        for letter_id, records, error in _table_groups(path, chunk_rows):
            if letter_id in split:
                if letter_id not in reported:
                    reported.add(letter_id)
                    yield Unit(source, letter_id, [], error="rows of this letter_id are not contiguous in the table; "
                                                            "group each letter's rows together")  # fmt: skip
                continue
            yield Unit(source, letter_id, [] if error else records, error=error)
    except TableReadError as exc:  # changed since it was scanned: the unfinished letter is never yielded
        yield Unit(source, stem, [], error=f"{exc}; the rest of this table was not scored: fix it and rerun")


def _table_groups(path: Path, chunk_rows: int = 1024) -> Iterator[tuple[str, list[dict], str | None]]:
    """(letter_id, records, error) per contiguous block of rows with the same letter_id, in order.

    Raises `TableReadError` (naming the table and the rows, never a cell's value) where the table stops
    being readable; the letter being collected then is not yielded.
    """
    source, stem = str(path), clean_text(path.stem)
    current: tuple[str, list[dict], str | None] | None = None
    offset = 0
    try:
        for rows in _row_chunks(path, chunk_rows):
            try:
                block = list(_table_records(rows, source, stem, offset))
            except (ValueError, TypeError, KeyError) as exc:
                raise TableReadError(f"cannot read table rows {offset + 1}-{offset + len(rows)}: {_no_values(exc)}") from None
            for letter_id, record, error in block:
                if current is not None and letter_id != current[0]:
                    yield current
                    current = None
                if current is None:
                    current = (letter_id, [], None)
                if error and not current[2]:
                    current = (letter_id, [], error)
                elif record is not None and not current[2]:
                    current[1].append(record)
            offset += len(rows)
    except TableReadError:
        raise
    except (ValueError, OSError) as exc:
        raise TableReadError(f"cannot read table after row {offset}: {_no_values(exc)}") from None
    if current is not None:
        yield current


# Quoted cell values inside library messages ("unrecognised label 'Patient ...'", "invalid literal for int()
# with base 10: '...'"): error rows name the table, row and column, never what a cell holds.
_QUOTED_VALUE = re.compile(r"""(label|base \d+:|value|literal)\s*(?:'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")""")


def _no_values(exc: Exception) -> str:
    text = clean_text(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
    return _QUOTED_VALUE.sub(r"\1 <value withheld>", text)[:300]


def _table_records(rows: list[dict], source: str, stem: str, offset: int) -> Iterator[tuple[str, dict | None, str | None]]:
    """(letter_id, record, error) per row, in row order."""
    good = [r for r in rows if not _is_error_record(r)]
    records = iter(records_from_table(pd.DataFrame(good), source=source)) if good else iter(())
    k = 0  # position among the rows handed to records_from_table, which numbers id-less rows by it
    for n, row in enumerate(rows, offset + 1):
        if _is_error_record(row):
            letter_id = str(row.get("letter_id") or Path(str(row.get("source") or f"row{n}")).stem)
            yield clean_text(letter_id), None, f"input row {n}: {clean_text(str(row['error']))}"
            continue
        rec, k = _clean(next(records)), k + 1
        if rec["letter_id"] == f"{stem}:{k}":  # no id column: number rows by their place in the file
            rec["letter_id"] = f"{stem}:{n}"
        rec["item_index"] = int(row.get("item_index") or 1)
        yield rec["letter_id"], rec, None


def _is_error_record(row: dict) -> bool:
    return bool(row.get("error")) and not any(row.get(c) for c in TEXT_COLUMNS)


def _row_chunks(path: Path, size: int) -> Iterator[list[dict]]:
    chunk: list[dict] = []
    for row in _table_rows(path):
        chunk.append(row)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _table_rows(path: Path) -> Iterator[dict]:
    """Raw rows of a .jsonl / .parquet / .csv table, streamed and cleaned (CSV values stay strings; "" → None).

    Every string (keys too) passes `clean_text`; undecodable bytes in JSONL/CSV become U+FFFD.
    """
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open(encoding="utf-8", errors="replace") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{path}: line {n} is not JSON ({exc.msg})") from None
                    if not isinstance(row, dict):
                        raise ValueError(f"{path}: line {n} is not a JSON object")
                    yield _clean(row)
    elif suffix == ".parquet":
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            yield from (_clean(r) for r in batch.to_pylist())
    elif suffix == ".csv":
        with path.open(encoding="utf-8-sig", errors="replace", newline="") as fh:
            for row in csv.DictReader(fh):
                yield {_clean(k): (_clean(v) if v != "" else None) for k, v in row.items()}
    else:
        raise ValueError(f"unsupported table {path}: use one of {', '.join(TABLE_SUFFIXES)}")


def count_table_letters(path: Path) -> int:
    """Number of letters in a table (for the progress total)."""
    return scan_table(path)[0]


def _prefetch(units: Iterator[Unit], depth: int = _PREFETCH) -> Iterator[Unit]:
    """Run `units` (PDF parsing) in a background thread so parsing overlaps with the model."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    failure: list[BaseException] = []
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():  # never block forever once the consumer has gone away
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for u in units:
                if not put(u):
                    return
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            failure.append(exc)
        put(done)

    thread = threading.Thread(target=work, name="imr-parse", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not done:
            yield item
        if failure:
            raise failure[0]
    finally:
        stop.set()
