"""Label review (`imr review`, imr_model/review.py): out-of-fold cleanlab ranking of likely wrong labels.

The fast tests run the real grouped CV loop (`experiment.cross_validate`) and the real ranking on demo letters with
the tiny config, but with the classifier replaced by the fold's TF-IDF baseline (`fit_models` stubbed): the tiny
transformer's guideline-head refits take about a minute per CV, so that path is the `slow` test.
"""

from __future__ import annotations

import html
import json
import re

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from imr_model import experiment
from imr_model.review import (
    COLUMNS,
    ReviewResult,
    rank_items,
    review,
    review_html,
    write_review,
)
from imr_model.taxonomy import LABELS

SCRIPT = "<script>alert('x')</script>"


def _flip(records: list[dict], n: int, seed: int = 0) -> list[tuple[str, int]]:
    idx = np.random.default_rng(seed).choice(len(records), size=n, replace=False)
    for i in idx:
        records[i]["decision"] = "Upheld" if records[i]["decision"] == "Overturned" else "Overturned"
    return [(str(records[i]["letter_id"]), int(records[i]["item_index"])) for i in idx]


def _ranks(rows: pd.DataFrame, keys: list[tuple[str, int]]) -> list[int]:
    where = {(str(a), int(b)): int(r) for a, b, r in zip(rows["letter_id"], rows["item_index"], rows["rank"])}
    return sorted(where[k] for k in keys)


@pytest.fixture()
def baseline_as_model(monkeypatch):
    """cross_validate with the fold's TF-IDF baseline standing in for the classifier (fast; same interface)."""

    def fit_models(cfg, train, val, records, *, quiet=False, on_epoch=None):
        baseline = experiment.fit_baseline(cfg, train, val, list(LABELS))
        return {"tfidf": baseline, "model": baseline}, []

    monkeypatch.setattr(experiment, "fit_models", fit_models)


def test_rank_items_ranks_by_outcome_label_quality_and_names_guideline_doubts(demo_records):
    records = [dict(r) for r in demo_records[:40]]
    y_true = np.array([r["decision"] == "Overturned" for r in records], dtype=float)
    keys = _flip(records, 3)
    p = np.where(y_true == 1, 0.9, 0.05) + np.linspace(0, 0.02, len(records))
    Y = np.array([[lab in (r["guideline_labels"] or []) for lab in LABELS] for r in records], dtype=float)
    P = np.where(Y == 1, 0.9, 0.1)
    j = int(np.flatnonzero(Y[5])[0])
    P[5, j] = 0.01  # the model doubts a given label of item 5
    rows = rank_items(records, p, np.full(len(records), 0.5), P, P >= 0.5, [(["up"], ["down"])] * len(records),
                      list(LABELS))  # fmt: skip
    assert list(rows.columns) == list(COLUMNS) and rows["rank"].tolist() == list(range(1, len(records) + 1))
    assert _ranks(rows, keys) == [1, 2, 3]
    assert rows.head(3)["flagged_outcome"].all() and not rows.iloc[3:]["flagged_outcome"].any()
    item5 = rows[(rows["letter_id"] == records[5]["letter_id"]) & (rows["item_index"] == records[5]["item_index"])]
    assert item5["guidelines_doubted"].item() == f"{LABELS[j]} (0.01)" and item5["flagged"].item()
    assert set(rows["evidence_words"]) == {"up", "down"}  # the words towards the predicted outcome
    assert (rows["evidence_for"] == rows["predicted_outcome"]).all()


def test_review_finds_flipped_demo_labels_and_writes_csv_and_escaped_html(demo_records, tiny_config,
                                                                          baseline_as_model, tmp_path):  # fmt: skip
    records = [dict(r) for r in demo_records]
    keys = _flip(records, 5)
    records[0]["request"] = f"Tramadol {SCRIPT} & <b>more</b>"
    result = review(tiny_config, records, k=3, quiet=True)
    assert len(result.rows) == len(records) and result.k == 3 and result.text_view == "rationale"
    ranks = _ranks(result.rows, keys)
    assert max(ranks) <= 15, ranks  # 5 flips of ~125 items, all among the first 12%
    flipped = result.rows[result.rows["rank"].isin(ranks)]
    assert flipped["flagged_outcome"].all() and flipped["flagged"].all() and all(flipped["evidence_words"])

    csv = write_review(result, tmp_path / "review.csv")
    frame = pd.read_csv(csv)
    assert list(frame.columns) == list(COLUMNS) and len(frame) == len(records)

    page = write_review(result, tmp_path / "review.html").read_text(encoding="utf-8")
    assert "<script" not in page.lower() and html.escape(SCRIPT) in page and "&lt;b&gt;more&lt;/b&gt;" in page
    assert "http" not in page  # self-contained: no external script or stylesheet
    assert page.count("<tr") == len(records) + 1

    with pytest.raises(ValueError, match="must end in .csv or .html"):
        write_review(result, tmp_path / "review.json")


def test_imr_review_command_writes_the_ranked_table(demo_records, tiny_config, baseline_as_model, tmp_path):
    from imr_model.cli import app

    records = [dict(r) for r in demo_records]
    keys = _flip(records, 4, seed=1)
    table = tmp_path / "items.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    out = tmp_path / "review.csv"
    args = ["review", "--config", "tiny", "--data", str(table), "-o", str(out), "--folds", "3", "--quiet",
            "--set", f"output_dir={tmp_path / 'models'}"]  # fmt: skip
    cli = CliRunner().invoke(app, args)
    assert cli.exit_code == 0, cli.output
    assert f"{len(records)} items" in cli.output and "3-fold grouped CV" in cli.output
    frame = pd.read_csv(out)
    assert list(frame.columns) == list(COLUMNS) and len(frame) == len(records)
    assert frame["outcome_quality"].is_monotonic_increasing and frame["rank"].tolist() == list(range(1, len(frame) + 1))
    assert np.mean(_ranks(frame, keys)) < len(frame) / 4  # the flipped items sit high (the ranking test is above)
    assert re.search(r"first 10 of \d+ items", cli.output)
    assert not list(tmp_path.glob("models/*"))  # a review saves no model

    bad = CliRunner().invoke(app, ["review", "--data", str(table), "-o", str(tmp_path / "r.txt")])
    assert bad.exit_code == 2 and "must end in .csv or .html" in bad.output


@pytest.mark.slow
def test_review_with_the_tiny_transformer(demo_records, tiny_config):
    """The real classifier path (no stub): every item once, flipped items well above the median rank."""
    records = [dict(r) for r in demo_records]
    keys = _flip(records, 4)
    result = review(tiny_config, records, k=2, quiet=True)
    assert isinstance(result, ReviewResult) and len(result.rows) == len(records)
    assert sorted(zip(result.rows["letter_id"], result.rows["item_index"])) == sorted(
        (r["letter_id"], r["item_index"]) for r in records)
    assert np.mean(_ranks(result.rows, keys)) < len(records) / 2
    assert "<table>" in review_html(result)
