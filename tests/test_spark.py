"""Spark local mode: the logged pyfunc as a struct-typed spark_udf matches in-process predictions."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from imr_model.demo import write_demo_letters
from imr_model.inference import predict_batch

from inference_helpers import tiny_model

pytestmark = pytest.mark.slow  # a JVM and Python workers start: ~30-60 s


@pytest.fixture(scope="module")
def spark():
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        pytest.skip("no Java runtime: Spark local mode needs Java 17")
    os.environ["PYSPARK_PYTHON"] = sys.executable
    os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
    from imr_model.spark import get_spark

    session = get_spark("local[2]", "imr-test")
    yield session
    session.stop()


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A tiny model logged as the models-from-code pyfunc in a throwaway sqlite store; (model dir, URI)."""
    import mlflow

    from imr_model.tracking import configure, log_model

    tmp = tmp_path_factory.mktemp("spark")
    model_dir = tiny_model(tmp / "model", seed=15)
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
    configure()
    mlflow.set_experiment("spark-test")
    with mlflow.start_run():
        uri, _ = log_model(model_dir, registered_model=None)
    yield model_dir, uri
    mp.undo()


@pytest.fixture(scope="module")
def letters(tmp_path_factory) -> list[Path]:
    return write_demo_letters(tmp_path_factory.mktemp("letters"), 50, seed=61)


def test_spark_udf_matches_in_process(spark, logged, letters):
    from imr_model.letters import parse_file
    from imr_model.spark import score

    model_dir, uri = logged
    records = [r for p in letters for r in parse_file(p).item_records()]
    cols = ["letter_id", "item_index", "request", "rationale", "case_summary"]
    df = spark.createDataFrame([tuple(r[c] for c in cols) for r in records], cols).repartition(4)
    scored = score(df, uri, parsed_letters=True)  # rows of parsed letters, as predict_batch sees them
    assert [f.name for f in scored.schema.fields][-5:] == ["outcome", "p_overturned", "guideline_labels", "guidelines",
                                                           "warnings"]
    rows = {(r["letter_id"], r["item_index"]): r for r in scored.collect()}
    assert len(rows) == len(records)
    expected = [p for group in predict_batch(letters, model=str(model_dir)) for p in group]
    got = [rows[(p.letter_id, p.item_index)] for p in expected]
    np.testing.assert_allclose([r["p_overturned"] for r in got], [p.p_overturned for p in expected], atol=1e-5)
    assert [r["outcome"] for r in got] == [p.outcome for p in expected]
    assert [list(r["guideline_labels"]) for r in got] == [list(p.guideline_labels) for p in expected]
    assert [list(r["warnings"]) for r in got] == [list(p.warnings) for p in expected]


def test_score_files_engine_spark(spark, logged, letters, tmp_path):
    import pandas as pd

    from imr_model.scoring import score as score_local
    from imr_model.spark import score_files

    model_dir, _ = logged
    inputs = [str(p) for p in letters[:20]] + [str(tmp_path / "missing.txt")]
    out = tmp_path / "spark.jsonl"
    summary = score_files(inputs, out, model_uri=str(model_dir), spark=spark)  # a plain dir is wrapped as a pyfunc
    assert (summary.letters, summary.errors) == (20, 1)
    local = tmp_path / "local.jsonl"
    score_local(inputs, local, model=str(model_dir), progress=False)
    a, b = pd.read_json(out, lines=True), pd.read_json(local, lines=True)
    assert a[["letter_id", "item_index", "request", "outcome"]].astype(str).values.tolist() == \
        b[["letter_id", "item_index", "request", "outcome"]].astype(str).values.tolist()  # fmt: skip
    np.testing.assert_allclose(a["p_overturned"].fillna(-1), b["p_overturned"].fillna(-1), atol=1e-5)
    assert "file not found" in a["error"].dropna().iloc[0]
    again = score_files(inputs, out, model_uri=str(model_dir), spark=spark)
    assert (again.letters, again.skipped) == (0, 21)
