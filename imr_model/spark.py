"""Scale-out scoring on Spark with the logged MLflow pyfunc (`mlflow.pyfunc.spark_udf`).

`score(df, model_uri)` adds the prediction columns to any Spark DataFrame of item rows (columns
among `request`, `rationale`, `case_summary`, `text`), running the pyfunc in the executors' Python
workers with a struct result: `outcome`, `p_overturned`, `guideline_labels`, `guidelines` (JSON).

`score_files` is `imr score --engine spark`: letter files are parsed on the executors, scored with the
UDF, and the rows stream back to the driver in input order into the same resumable writers as the
local engine (letters already in the output are not sent to Spark again).

A plain model directory (not an MLflow model) is wrapped into a pyfunc on the fly, so any model that
`imr score` accepts also works here.

pyspark is the `[spark]` extra: every entry point checks for it first and, without it, raises
`extras.MissingExtraError` (``pip install 'imr-model[spark]'``).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable

import imr_model.pyfunc_model as pyfunc_code
from imr_model.extras import require
from imr_model.inference import resolve_model_uri
from imr_model.letters import iter_letter_files, parse_many
from imr_model.modeling import IMRClassifier
from imr_model.pyfunc_model import INPUT_COLUMNS, MODEL_DIR_ARTIFACT, OUTPUT_COLUMNS
from imr_model.score_output import lock_output, open_writer, output_format
from imr_model.scoring import ScoreSummary, Unit, error_row
from imr_model.tracking import resolve_model_dir
from imr_model.types import LetterError

FEATURE = "imr score --engine spark"

RESULT_TYPE = "outcome string, p_overturned double, guideline_labels array<string>, guidelines string, warnings array<string>"
_PARSED_SCHEMA = (
    "seq long, source string, letter_id string, item_index int, request string, rationale string, "
    "case_summary string, error string"
)


def require_pyspark() -> None:
    """Raise `MissingExtraError` (naming ``imr-model[spark]``) unless pyspark is installed."""
    require("pyspark", "spark", FEATURE)


def get_spark(master: str = "local[2]", app_name: str = "imr-score"):
    """The active SparkSession, or a new local one whose Python workers use this interpreter."""
    require_pyspark()
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    return (
        SparkSession.builder.master(master)
        .appName(app_name)
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "4")
        .getOrCreate()
    )


def as_pyfunc_uri(model: str | Path | None, workdir: str | Path) -> str:
    """A local pyfunc for `model` (a model directory, an MLflow URI or a logged pyfunc folder), wrapped with
    this installed package's `pyfunc_model.py`.

    The IMR model directory is taken out of whatever `model` names (`tracking.resolve_model_dir`) and
    checked like any model directory; a logged model's own python_model file (code stored with the
    artifact) is never run, so a tampered artifact runs nothing.
    """
    import mlflow

    model_dir = resolve_model_dir(resolve_model_uri(model), Path(workdir) / "download")
    IMRClassifier.from_pretrained(model_dir)  # digests, required files, calibration: fail here, not on executors
    target = Path(workdir) / "pyfunc"
    mlflow.pyfunc.save_model(str(target), python_model=pyfunc_code.__file__, artifacts={MODEL_DIR_ARTIFACT: str(model_dir)})
    return str(target)


def score(df, model_uri: str, *, batch_size: int = 32, parsed_letters: bool = False):
    """`df` with `outcome`, `p_overturned`, `guideline_labels`, `guidelines`, `warnings` added (pyfunc via spark_udf).

    `parsed_letters`: the rows are items of parsed letters (the input warnings then skip the structure check).
    """
    require_pyspark()
    import mlflow
    from pyspark.sql import functions as F

    inputs = [c for c in df.columns if c in INPUT_COLUMNS]
    if not inputs:
        raise ValueError(f"DataFrame has columns {df.columns}; expected some of {list(INPUT_COLUMNS)}")
    clash = [c for c in OUTPUT_COLUMNS if c in df.columns]
    if clash:
        raise ValueError(f"DataFrame already has output column(s) {clash}; drop or rename them first")
    udf = mlflow.pyfunc.spark_udf(df.sparkSession, model_uri, result_type=RESULT_TYPE, env_manager="local",
                                  params={"batch_size": batch_size, "parsed_letters": parsed_letters})  # fmt: skip
    scored = df.withColumn("_imr", udf(F.struct(*[F.col(c).cast("string").alias(c) for c in inputs])))
    return scored.select(*df.columns, *[F.col(f"_imr.{c}").alias(c) for c in OUTPUT_COLUMNS])


def _parse_partition(rows: Iterable) -> Iterable[tuple]:
    """Executor side: (seq, path) → one tuple per item, or one error tuple per unreadable letter.

    Parsed like `imr score` parses: in a worker process under the time and memory budget, so a bomb or a
    hang costs one error row, not the executor.
    """
    rows = list(rows)
    for (seq, path), letter in zip(rows, parse_many([p for _, p in rows])):
        if isinstance(letter, LetterError):
            yield (seq, path, Path(path).stem, None, None, None, None, letter.reason)
            continue
        for r in letter.item_records():
            yield (seq, path, letter.letter_id, r["item_index"], r["request"], r["rationale"], r["case_summary"], None)


def score_files(
    inputs: Iterable[str | Path],
    output: str | Path,
    *,
    model_uri: str | None = None,
    batch_size: int = 32,
    spark=None,
):
    """`imr score --engine spark`: parse and score letters on Spark, write rows like the local engine."""
    require_pyspark()  # before the model is loaded and wrapped
    output_format(output)
    start = time.perf_counter()
    lock = lock_output(output)  # before Spark starts: a second run on this output fails at once
    try:
        summary = _score_files_locked(inputs, output, model_uri, batch_size, spark, lock)
    finally:
        lock.release()
    summary.seconds = time.perf_counter() - start
    return summary


def _score_files_locked(inputs, output, model_uri, batch_size, spark, lock):
    with tempfile.TemporaryDirectory(prefix="imr-spark-") as tmp:
        uri = as_pyfunc_uri(model_uri, tmp)
        writer = open_writer(output, with_attributions=False, run_info={"model": f"spark|{resolve_model_uri(model_uri)}"},
                             lock=lock)  # fmt: skip
        paths = [str(p) for p in iter_letter_files([str(x) for x in inputs])]
        todo = [(i, p) for i, p in enumerate(paths) if Unit(p, Path(p).stem, []).key not in writer.done]
        summary = ScoreSummary(skipped=len(paths) - len(todo))
        if todo:
            from pyspark.sql import SparkSession

            owned = spark is None and SparkSession.getActiveSession() is None  # stop only a session we started
            spark = spark or get_spark()
            rdd = spark.sparkContext.parallelize(todo, max(1, min(len(todo) // 8, 64))).mapPartitions(_parse_partition)
            parsed = spark.createDataFrame(rdd, _PARSED_SCHEMA)
            ok = score(parsed.where("error IS NULL"), uri, batch_size=batch_size, parsed_letters=True)
            failed = parsed.where("error IS NOT NULL").select(*parsed.columns, *[_null(c) for c in OUTPUT_COLUMNS])
            rows = ok.unionByName(failed).orderBy("seq", "item_index").toLocalIterator()
            try:
                _write_grouped(rows, writer, summary, error_row)
            finally:
                if owned:
                    spark.stop()
        writer.close()
    return summary


def _null(column: str):
    from pyspark.sql import functions as F

    kinds = {"outcome": "string", "p_overturned": "double", "guideline_labels": "array<string>", "guidelines": "string",
             "warnings": "array<string>"}
    return F.lit(None).cast(kinds[column]).alias(column)


def _write_grouped(rows, writer, summary, error_row, letters_per_chunk: int = 16) -> None:
    """Collect driver-side rows by letter (`seq`) and write whole letters in chunks."""
    keys: list[str] = []
    out: list[dict] = []
    current = None
    for row in rows:
        r = row.asDict(recursive=True)
        if r["seq"] != current:
            current = r["seq"]
            if len(keys) >= letters_per_chunk:
                writer.write(keys, out)
                keys, out = [], []
            keys.append(f"{r['source']}::{r['letter_id']}")
            if r["error"]:
                summary.errors += 1
            else:
                summary.letters += 1
        if r["error"]:
            out.append(error_row(r["source"], r["letter_id"], r["error"], False))
            continue
        summary.items += 1
        out.append({
            "letter_id": r["letter_id"], "item_index": r["item_index"], "request": r["request"],
            "outcome": r["outcome"], "p_overturned": r["p_overturned"], "guidelines": json.loads(r["guidelines"]),
            "guideline_labels": list(r["guideline_labels"] or []), "warnings": list(r["warnings"] or []),
            "source": r["source"], "error": None,
        })  # fmt: skip
    if keys:
        writer.write(keys, out)
