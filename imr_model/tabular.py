"""Tabular item sources → item records: CSV / JSONL / parquet files and the California DMHC IMR dataset.

Column names are matched loosely (case, spaces and punctuation ignored), so ``Reference ID``,
``ReferenceID`` and ``reference_id`` are the same column. Labels are accepted as Upheld/Overturned,
0/1, true/false and the DMHC strings "Upheld Decision of Health Plan" / "Overturned Decision of
Health Plan"; anything else is an error naming the file, the row and the value.

The DMHC health-plan IMR dataset (CHHS open data portal, `DMHC_DATASET_PAGE`) has one row per case:
``Findings`` becomes the rationale, treatment category/subcategory the request, ``ReferenceID`` the
letter id, and the pre-decision facts (diagnosis, review type, age range, gender) the case summary,
so the `forecast` view sees only what was known before the review.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import pandas as pd

from imr_model import __version__
from imr_model.progress import progress_bar
from imr_model.types import OVERTURNED, UPHELD

TABLE_SUFFIXES = (".csv", ".jsonl", ".parquet")
DMHC_DATASET_PAGE = "https://data.chhs.ca.gov/dataset/independent-medical-review-imr-determinations-trend"
# The CSV resource of that dataset page (CKAN download link); override with `url=` / `--url` if it moves.
DEFAULT_DMHC_URL = (
    "https://data.chhs.ca.gov/dataset/b79b3447-4c10-4ae6-84e2-1076f83bb24e/resource/"
    "3340c5d7-4054-4d03-90e0-5f44290ed095/download/independent-medical-review-imr-determinations-trends.csv"
)
DEFAULT_DMHC_PATH = Path("data/raw/dmhc/imr-determinations.csv")
DMHC_COLUMNS = (
    "ReferenceID", "ReportYear", "DiagnosisCategory", "DiagnosisSubCategory", "TreatmentCategory",
    "TreatmentSubCategory", "Determination", "Type", "AgeRange", "PatientGender", "Findings",
)  # fmt: skip
_LABELS = {
    "upheld": UPHELD, "overturned": OVERTURNED, "0": UPHELD, "1": OVERTURNED, "false": UPHELD, "true": OVERTURNED,
    "upheld decision of health plan": UPHELD, "overturned decision of health plan": OVERTURNED,
}  # fmt: skip
# Candidate column names (normalised) when the caller does not name the column.
_TEXT_COLS = ("rationale", "decisionrationale", "text", "findings")
_LABEL_COLS = ("decision", "determination", "label", "outcome")
_ID_COLS = ("letterid", "casenumber", "referenceid", "id")
_REQUEST_COLS = ("request", "itemrequest")
_SUMMARY_COLS = ("casesummary", "clinicalcasesummary", "summary")
_COPY_FIELDS = ("case_number", "maximus_guideline", "claims_admin_guideline", "reviewer_specialty", "decision_date",
                "layout", "source")  # fmt: skip


class DatasetDownloadError(RuntimeError):
    """A download failed (HTTP error, network error, or a file that is not the expected dataset)."""


def norm_column(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def normalize_label(value: Any) -> str | None:
    """Map a label value to "Upheld"/"Overturned"; None for a missing label. Raises ValueError otherwise."""
    value = _py(value)
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return OVERTURNED if value else UPHELD
    if isinstance(value, (int, float)) and value in (0, 1):
        return OVERTURNED if value == 1 else UPHELD
    label = _LABELS.get(str(value).strip().lower())
    if label is None:
        raise ValueError(
            f"unrecognised label {value!r}; expected Upheld/Overturned, 0/1, true/false, or the DMHC "
            "'Upheld Decision of Health Plan' / 'Overturned Decision of Health Plan'"
        )
    return label


def _py(value: Any) -> Any:
    """numpy/pandas scalars and arrays → plain Python; NaN / NA → None."""
    if hasattr(value, "tolist") and not isinstance(value, str):
        value = value.tolist()
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if type(value).__name__ in ("NAType", "NaTType"):
        return None
    return value


def _table_suffix(path: Path) -> str:
    """The lower-cased suffix of an existing table file; ValueError / FileNotFoundError naming the file otherwise."""
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise ValueError(f"{path}: unsupported table format {suffix!r}; expected one of {list(TABLE_SUFFIXES)}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return suffix


def read_table(path: str | Path):
    """Read a .csv (UTF-8, falling back to cp1252), .jsonl or .parquet file into a pandas DataFrame."""
    path = Path(path)
    suffix = _table_suffix(path)
    if suffix == ".parquet":
        return pd.read_parquet(path)
    if suffix == ".jsonl":
        return pd.read_json(path, lines=True, dtype=False)
    try:  # strings only: ids such as 0012 or CM99-0000001 must not be parsed as numbers
        return pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except UnicodeDecodeError:
        return pd.read_csv(path, dtype=str, keep_default_na=False, encoding="cp1252")


def _find_column(columns: Sequence[str], wanted: str | None, candidates: tuple[str, ...], what: str, source: str):
    """The actual column for `wanted` (loosely matched), else the first candidate present, else None."""
    by_norm = {norm_column(c): c for c in columns}
    if wanted is not None:
        if norm_column(wanted) not in by_norm:
            raise ValueError(f"{source}: {what} column {wanted!r} not found; available columns: {list(columns)}")
        return by_norm[norm_column(wanted)]
    return next((by_norm[c] for c in candidates if c in by_norm), None)


def is_dmhc(columns: Sequence[str]) -> bool:
    present = {norm_column(c) for c in columns}
    return all(norm_column(c) in present for c in DMHC_COLUMNS)


TABLE_CHUNK_ROWS = 2000  # rows per chunk when a table is streamed (`iter_table_records`)


def iter_table_records(
    path: str | Path,
    *,
    source: str | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    id_column: str | None = None,
    request_column: str | None = None,
    summary_column: str | None = None,
    chunk_rows: int = TABLE_CHUNK_ROWS,
) -> Iterator[dict]:
    """`records_from_table(read_table(path), ...)` as a stream: the table is read `chunk_rows` rows at a time.

    The columns are those of the whole file (a JSONL key missing from a chunk's rows is still a column), and rows
    are numbered as in the whole file, so the records are those of the whole-table read; memory stays bounded.
    `source` (default: the path) is each record's `source`, as `records_from_table` takes it.
    """
    path = Path(path)
    kwargs = dict(source=str(path) if source is None else source, text_column=text_column, label_column=label_column, id_column=id_column,
                  request_column=request_column, summary_column=summary_column)  # fmt: skip
    start = 1
    for frame in _table_chunks(path, chunk_rows):
        yield from records_from_table(frame, start=start, **kwargs)
        start += len(frame)


def _table_chunks(path: Path, chunk_rows: int) -> Iterator[Any]:
    """DataFrames of at most `chunk_rows` rows, with the whole file's columns (dtypes as `read_table`)."""
    suffix = _table_suffix(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.ParquetFile(path)
        empty = True
        for batch in table.iter_batches(batch_size=chunk_rows):
            empty = False
            yield batch.to_pandas()
        if empty:
            yield table.schema_arrow.empty_table().to_pandas()
        return
    if suffix == ".jsonl":
        columns: dict[str, None] = {}
        with path.open(encoding="utf-8") as fh:  # pass 1: every key of every row (the whole-file columns)
            for line in fh:
                if line.strip():
                    columns.update(dict.fromkeys(json.loads(line)))
        with path.open(encoding="utf-8") as fh:
            lines: list[str] = []
            for line in fh:
                if line.strip():
                    lines.append(line)
                if len(lines) >= chunk_rows:
                    yield pd.read_json(io.StringIO("".join(lines)), lines=True, dtype=False).reindex(columns=list(columns))
                    lines = []
            if lines or not columns:
                yield (pd.read_json(io.StringIO("".join(lines)), lines=True, dtype=False) if lines
                       else pd.DataFrame()).reindex(columns=list(columns))  # fmt: skip
        return
    encoding = "utf-8-sig" if _decodes(path, "utf-8-sig") else "cp1252"
    yield from pd.read_csv(path, dtype=str, keep_default_na=False, encoding=encoding, chunksize=chunk_rows)


def _decodes(path: Path, encoding: str) -> bool:
    """Whether the whole file decodes as `encoding` (read in 1 MB blocks: constant memory)."""
    import codecs

    decoder = codecs.getincrementaldecoder(encoding)()
    try:
        with path.open("rb") as fh:
            while block := fh.read(1 << 20):
                decoder.decode(block)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def records_from_table(
    frame,
    *,
    source: str,
    text_column: str | None = None,
    label_column: str | None = None,
    id_column: str | None = None,
    request_column: str | None = None,
    summary_column: str | None = None,
    start: int = 1,
) -> list[dict]:
    """Normalise a DataFrame to item records. A DMHC table is recognised by its columns when no column is named.

    `start`: the number of the frame's first row in its file (a chunk of a streamed table, `iter_table_records`)."""
    columns = [str(c) for c in frame.columns]
    if text_column is None and label_column is None and is_dmhc(columns):
        return dmhc_records(frame, source=source, start=start)
    text = _find_column(columns, text_column, _TEXT_COLS, "text", source)
    if text is None:
        raise ValueError(
            f"{source}: no text column found (looked for {list(_TEXT_COLS)}); pass text_column=...; "
            f"available columns: {columns}"
        )
    label = _find_column(columns, label_column, _LABEL_COLS, "label", source)
    ident = _find_column(columns, id_column, _ID_COLS, "id", source)
    request = _find_column(columns, request_column, _REQUEST_COLS, "request", source)
    summary = _find_column(columns, summary_column, _SUMMARY_COLS, "summary", source)
    stem = Path(source).stem
    records = []
    for n, row in enumerate(frame.to_dict("records"), start=start):
        try:
            decision = normalize_label(row[label]) if label else None
        except ValueError as exc:
            raise ValueError(f"{source}: row {n}, column {label!r}: {exc}") from None
        rec = {
            "letter_id": str(_py(row[ident])) if ident and _py(row[ident]) is not None else f"{stem}:{n}",
            "item_index": int(_py(row.get("item_index")) or 1),
            "request": str(_py(row[request]) or "") if request else "",
            "decision": decision,
            "rationale": str(_py(row[text]) or ""),
            "case_summary": str(_py(row[summary]) or "") if summary else "",
            "guideline_labels": _labels(row.get("guideline_labels")),
            "odg_chapters": _labels(row.get("odg_chapters")),
        }
        for key in _COPY_FIELDS:
            if key in row:
                rec[key] = _py(row[key])
        rec.setdefault("source", source)
        records.append(rec)
    return records


def _labels(value: Any) -> list[str]:
    """A list cell: a list (JSONL/parquet), a JSON list string, or labels separated by ';' or '|' (CSV)."""
    value = _py(value)
    if value is None or value == "":
        return []
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = json.loads(value.replace("'", '"'))
        except ValueError:
            value = value.strip(" []")
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [p.strip(" '\"") for p in re.split(r"[;|]", str(value)) if p.strip(" '\"")]


# --------------------------------------------------------------------------- DMHC


def dmhc_records(frame, *, source: str, start: int = 1) -> list[dict]:
    """DMHC rows → item records (one item per case); `start` numbers the first row (see `records_from_table`)."""
    cols = {norm_column(c): c for c in frame.columns}
    missing = [c for c in DMHC_COLUMNS if norm_column(c) not in cols]
    if missing:
        raise ValueError(
            f"{source}: not the DMHC IMR schema; missing columns {missing}; available columns: {list(frame.columns)}"
        )

    def get(row: Mapping, name: str) -> str:
        value = _py(row[cols[norm_column(name)]])
        return "" if value is None else str(value).strip()

    records = []
    for n, row in enumerate(frame.to_dict("records"), start=start):
        try:
            decision = normalize_label(get(row, "Determination"))
        except ValueError as exc:
            raise ValueError(f"{source}: row {n}, column 'Determination': {exc}") from None
        ref = get(row, "ReferenceID") or f"{Path(source).stem}:{n}"
        treat = " / ".join(p for p in (get(row, "TreatmentCategory"), get(row, "TreatmentSubCategory")) if p)
        diag = " / ".join(p for p in (get(row, "DiagnosisCategory"), get(row, "DiagnosisSubCategory")) if p)
        facts = [("Diagnosis", diag), ("Review type", get(row, "Type")), ("Age range", get(row, "AgeRange")),
                 ("Gender", get(row, "PatientGender"))]  # fmt: skip
        year = get(row, "ReportYear")
        records.append({
            "letter_id": ref, "case_number": ref, "item_index": 1, "request": treat, "decision": decision,
            "guideline_labels": [], "odg_chapters": [], "maximus_guideline": "", "claims_admin_guideline": "",
            "rationale": get(row, "Findings"), "case_summary": " ".join(f"{k}: {v}." for k, v in facts if v),
            "reviewer_specialty": None, "decision_date": None, "source": source, "dataset": "dmhc",
            "report_year": int(year) if year.isdigit() else None, "diagnosis_category": get(row, "DiagnosisCategory"),
            "treatment_category": get(row, "TreatmentCategory"), "review_type": get(row, "Type"),
        })  # fmt: skip
    return records


def load_dmhc(path: str | Path) -> list[dict]:
    """Load a DMHC IMR CSV/JSONL/parquet file (full dataset or a sample) as item records."""
    return dmhc_records(read_table(path), source=str(path))


def download_dmhc(
    dest: str | Path = DEFAULT_DMHC_PATH, url: str = DEFAULT_DMHC_URL, *, timeout: float = 60.0, progress: bool = True
) -> Path:
    """Download the DMHC IMR CSV to `dest`: streamed to a temp file beside it, header-checked, then renamed.

    Raises `DatasetDownloadError` on HTTP/network failure or when the file lacks the DMHC columns;
    `dest` is then left untouched and no partial file remains.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            _stream(url, out, timeout=timeout, progress=progress)
        _check_dmhc_header(tmp, url)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _stream(url: str, out, *, timeout: float, progress: bool) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": f"imr-model/{__version__}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with progress_bar("downloading DMHC IMR data", total=total, unit="B", disable=not progress) as bar:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
                    bar.advance(len(chunk))
    except urllib.error.HTTPError as exc:
        raise DatasetDownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DatasetDownloadError(f"{url}: download failed ({reason})") from None


def _check_dmhc_header(path: Path, url: str) -> None:
    with path.open("rb") as fh:
        head = fh.read(64 * 1024)
    if not head.strip():
        raise DatasetDownloadError(f"{url}: empty response (0 bytes of data)")
    try:
        text = head.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = head.decode("cp1252", errors="replace")
    header = next(csv.reader(io.StringIO(text)), [])
    present = {norm_column(h) for h in header}
    missing = [c for c in DMHC_COLUMNS if norm_column(c) not in present]
    if missing:
        shown = [h[:40] for h in header[:20]]
        raise DatasetDownloadError(
            f"{url}: not the DMHC IMR CSV; missing columns {missing}; first columns found: {shown}"
        )
