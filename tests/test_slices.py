"""Evaluation slices (#21 item 2): assignment, the request taxonomy, per-slice metrics and intervals, the JSON."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from imr_model.intervals import bootstrap_metrics
from imr_model.metrics import guideline_metrics, outcome_metrics
from imr_model.slices import (
    DIMENSIONS,
    MIN_SLICE_ITEMS,
    decision_basis,
    format_slices,
    layout,
    load_request_categories,
    mlflow_metrics,
    request_category,
    reviewer_specialty,
    sanitize,
    slice_metrics,
)

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "raw" / "ca-dwc-imr-letters"

# hand-written, generic request strings (not taken from any letter) → expected category
GENERIC_REQUESTS = [
    ("MRI of the left knee without contrast", "imaging"),
    ("CT scan of the lumbar spine", "imaging"),
    ("X-rays of the right wrist, 3 views", "imaging"),
    ("EMG/NCV of the bilateral lower extremities", "imaging"),
    ("Diagnostic ultrasound of the left shoulder", "imaging"),
    ("Physical therapy 2 x 4 for the cervical spine", "physical_therapy"),
    ("Post-operative physical therapy, 12 visits", "physical_therapy"),
    ("Therapeutic ultrasound three times weekly", "physical_therapy"),
    ("Aquatic therapy, 8 sessions", "physical_therapy"),
    ("Chiropractic manipulation, 6 visits", "chiropractic"),
    ("Osteopathic manipulative treatment x4", "chiropractic"),
    ("Electroacupuncture 1-2 x per week for 6 weeks", "acupuncture"),
    ("Hydrocodone/APAP 10/325 mg #90", "opioids"),
    ("Oxycontin 20mg extended release #60", "opioids"),
    ("Tylenol #3 with one refill", "opioids"),
    ("Butrans patch 10 mcg/hr #4", "opioids"),
    ("Meloxicam 15mg #30", "other_medication"),
    ("Compounded topical cream: ketoprofen 10%, 240 g", "other_medication"),
    ("Zolpidem 10 mg at bedtime", "other_medication"),
    ("Unspecified muscle relaxant", "other_medication"),
    ("Lumbar epidural steroid injection at L4-5 under fluoroscopy", "injections"),
    ("Bilateral L3-L5 medial branch blocks", "injections"),
    ("Trigger point injections x3 to the trapezius", "injections"),
    ("Botox 200 units for migraine", "injections"),
    ("CT-guided facet injection, right L5-S1", "injections"),
    ("L4-5 anterior lumbar interbody fusion", "surgery"),
    ("Right carpal tunnel release", "surgery"),
    ("Total knee arthroplasty, left", "surgery"),
    ("Lumbar laminectomy and discectomy", "surgery"),
    ("Assistant surgeon for the procedure", "surgery"),
    ("Knee brace, hinged", "dme"),
    ("TENS unit, 30 day trial", "dme"),
    ("Post-op cold therapy unit, 14 day rental", "dme"),
    ("Four-wheeled walker with seat", "dme"),
    ("Orthopedic mattress", "dme"),
    ("Cognitive behavioral therapy, 6 sessions", "psychological"),
    ("Psychiatric evaluation and follow-up", "psychological"),
    ("Biofeedback training, 4 sessions", "psychological"),
    ("Home health aide 4 hours a day", "other"),
    ("Pre-operative labs: PT/INR", "other"),
    ("Urine drug screen", "other"),
    ("Functional capacity evaluation", "other"),
    ("", "other"),
]


@pytest.mark.parametrize("request_text, expected", GENERIC_REQUESTS)
def test_request_categories_on_generic_requests(request_text, expected):
    assert request_category({"request": request_text}) == (expected,)


def test_shipped_request_taxonomy_is_versioned_and_complete():
    rc = load_request_categories()
    assert rc.version == 1 and rc.fallback == "other"
    assert set(rc.ids) == {"imaging", "physical_therapy", "chiropractic", "acupuncture", "opioids", "other_medication",
                           "injections", "surgery", "dme", "psychological", "other"}  # fmt: skip
    assert load_request_categories() is rc  # cached


@pytest.mark.parametrize("text, message", [
    ("version: 1\nfallback: other\ncategories: [{id: a, patterns: [x]}]\nextra: 1\n", "unknown key(s) ['extra']"),
    ("version: 1\ncategories: [{id: a, patterns: [x], regex: [y]}]\n", "category 'a': unknown key(s) ['regex']"),
    ("version: 1\ncategories: [{id: a, patterns: [x]}, {id: a, patterns: [y]}]\n", "appears twice"),
    ("version: 1\ncategories: [{id: a, patterns: ['(']}]\n", "invalid pattern"),
    ("version: 1\ncategories: [{id: a, patterns: []}]\n", "non-empty list of pattern"),
    ("version: one\ncategories: [{id: a, patterns: [x]}]\n", "version must be an integer"),
])  # fmt: skip
def test_bad_request_taxonomy_is_rejected(tmp_path, text, message):
    path = tmp_path / "cats.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_request_categories(path)


def test_slice_assignment_per_record():
    assert decision_basis({"guideline_labels": ["ODG", "MTUS_CHRONIC_PAIN"]}) == ("MTUS_CHRONIC_PAIN",)
    assert decision_basis({"guideline_labels": ["ACOEM_NECK", "MTUS_CHRONIC_PAIN"]}) == ("ACOEM_NECK", "MTUS_CHRONIC_PAIN")
    assert decision_basis({"guideline_labels": ["ODG"]}) == ("unknown",) == decision_basis({})
    assert reviewer_specialty({"reviewer_specialty": "Family  Practice, Sports Medicine"}) == ("Family Practice",)
    assert reviewer_specialty({"reviewer_specialty": None}) == ("unknown",) == reviewer_specialty({})
    assert layout({"layout": "2013"}) == ("2013",) and layout({}) == ("unknown",) and layout({"layout": ""}) == ("unknown",)


def test_letter_records_carry_the_layout(tmp_path):
    from imr_model.dataset import RECORD_FIELDS, build_dataset, load_records
    from imr_model.demo import generate_letters
    from imr_model.letters import parse_text

    letter = generate_letters(1, seed=5)[0]
    records = parse_text(letter.text, letter_id=letter.name).item_records()
    assert "layout" in RECORD_FIELDS and {r["layout"] for r in records} == {"2016"}
    recs = [r for x in generate_letters(30, seed=5) for r in x.item_records()]
    dd = build_dataset(recs, seed=0)
    assert set(dd["train"]["layout"]) == {"2016"}
    table = tmp_path / "items.jsonl"
    table.write_text("\n".join(json.dumps(r) for r in records[:1]), encoding="utf-8")
    assert load_records([table])[0][0]["layout"] == "2016"  # an `imr parse` table keeps it


def _synthetic(n_letters: int = 40, seed: int = 0):
    """Records of synthetic letters with known slices, and aligned y, p, Y, decisions, groups."""
    from imr_model.taxonomy import LABELS

    rng = np.random.default_rng(seed)
    labels = list(LABELS)
    requests = ["MRI of the left knee", "Physical therapy, 8 visits", "Ibuprofen 800 mg #90", "Home health aide"]
    records, y = [], []
    for k in range(n_letters):
        specialty = ["Family Practice", "Orthopedic Surgery, Sports Medicine", None][k % 3]
        for j in range(1 + k % 3):
            req = requests[(k + j) % 4]
            yes = int(rng.random() < 0.3) if req != "Home health aide" else 0  # "other": a single-class slice
            basis = ["MTUS_CHRONIC_PAIN", "ACOEM_LOW_BACK"][(k + j) % 2]
            records.append({"letter_id": f"L{k:03d}", "request": req, "guideline_labels": [basis, "ODG"],
                            "reviewer_specialty": specialty, "layout": "2016" if k % 4 else "2013"})  # fmt: skip
            y.append(yes)
    y = np.array(y)
    p = np.clip(0.25 + 0.4 * y + rng.normal(0, 0.2, y.size), 0, 1)
    Y = np.array([[int(lab in r["guideline_labels"]) for lab in labels] for r in records])
    D = Y.copy()
    D[rng.random(Y.shape) < 0.05] ^= 1
    groups = [r["letter_id"] for r in records]
    return records, y, p, Y, D, groups, labels


def test_a_slice_interval_equals_an_independent_bootstrap_on_the_slice():
    records, y, p, Y, D, groups, labels = _synthetic()
    out = slice_metrics(records, y, p, 0.4, Y, D, groups, n=300)
    assert list(out) == list(DIMENSIONS)
    s = out["request_category"]["imaging"]
    ix = np.array([i for i, r in enumerate(records) if r["request"].startswith("MRI")])
    assert s["n_items"] == ix.size and s["n_overturned"] == int(y[ix].sum())
    assert s["n_letters"] == len({groups[i] for i in ix})
    ref = bootstrap_metrics(y[ix], p[ix], 0.4, groups=np.array(groups)[ix], Y=Y[ix], decided=D[ix], n=300)
    point = outcome_metrics(y[ix], p[ix], 0.4)
    for key in ("auroc", "auprc", "f1", "mcc", "brier", "ece", "balanced_accuracy"):
        assert s["outcome"][key] == pytest.approx(point[key])
        assert s["outcome"][f"{key}_ci95"] == pytest.approx(ref["outcome"][key])
    gl = guideline_metrics(Y[ix], D[ix], labels)
    for key in ("micro_f1", "macro_f1"):
        assert s["guideline"][key] == pytest.approx(gl[key])
        assert s["guideline"][f"{key}_ci95"] == pytest.approx(ref["guidelines"][key])
    # an item with two decision bases counts in both; every item is in exactly one value of the other dimensions
    assert sum(v["n_items"] for v in out["layout"].values()) == len(records)
    assert set(out["reviewer_specialty"]) == {"Family Practice", "Orthopedic Surgery", "unknown"}


def test_single_class_and_small_slices_report_n_and_null_not_crash():
    records, y, p, Y, D, groups, _ = _synthetic()
    out = slice_metrics(records, y, p, 0.4, Y, D, groups, n=200)
    other = out["request_category"]["other"]  # every "Home health aide" item is Upheld
    assert other["n_items"] > MIN_SLICE_ITEMS and other["n_overturned"] == 0
    assert other["outcome"]["auroc"] is None and other["outcome"]["auroc_ci95"] is None
    assert other["outcome"]["balanced_accuracy"] is None and other["outcome"]["mcc"] is None
    assert other["outcome"]["brier"] is not None and other["n_dropped"] == 200
    assert other["outcome"]["brier_ci95"] is not None  # defined metrics keep their interval
    tiny = slice_metrics(records[:3], y[:3], p[:3], 0.4, Y[:3], D[:3], groups[:3], n=200)
    for values in tiny.values():
        for s in values.values():
            assert s["n_items"] < MIN_SLICE_ITEMS and all(s["outcome"][f"{k}_ci95"] is None for k in ("f1", "brier"))
    no_gl = slice_metrics(records, y, p, np.full(len(y), 0.4), groups=groups, n=50)  # per-item thresholds, no labels
    assert no_gl["layout"]["2016"]["guideline"] is None
    assert no_gl["layout"]["2016"]["outcome"]["f1"] == pytest.approx(out["layout"]["2016"]["outcome"]["f1"])
    json.dumps(out, allow_nan=False)  # nulls, never NaN
    text = format_slices(out)
    assert "Slices by request_category" in text and "—" in text


def test_mlflow_slice_metrics_are_sanitised_and_need_both_classes():
    records, y, p, Y, D, groups, _ = _synthetic()
    out = slice_metrics(records, y, p, 0.4, Y, D, groups, n=50)
    flat = mlflow_metrics(out, "test_slice")
    assert "test_slice_request_category_imaging_auroc" in flat and "test_slice_request_category_imaging_n" in flat
    assert "test_slice_reviewer_specialty_orthopedic_surgery_auroc" in flat
    assert "test_slice_request_category_other_n" not in flat and "test_slice_request_category_other_auroc" not in flat
    assert all(set(k) <= set("abcdefghijklmnopqrstuvwxyz0123456789_") and math.isfinite(v) for k, v in flat.items())
    assert sanitize("Physical Medicine & Rehabilitation") == "physical_medicine_rehabilitation"


def test_imr_evaluate_json_and_slices_table(tmp_path, label_names):
    from inference_helpers import tiny_model
    from typer.testing import CliRunner

    from imr_model.cli import app
    from imr_model.demo import write_demo_letters

    model_dir = tiny_model(tmp_path / "model", labels=list(label_names))
    write_demo_letters(tmp_path / "letters", 10, seed=3)
    out = tmp_path / "eval.json"
    cli = CliRunner().invoke(app, ["evaluate", "--model", str(model_dir), "--data", str(tmp_path / "letters"),
                                   "--json", str(out), "--slices"])  # fmt: skip
    assert cli.exit_code == 0, cli.output
    assert "Slices by decision_basis" in cli.output and "Slices by layout" in cli.output
    result = json.loads(out.read_text())
    assert set(result["slices"]) == set(DIMENSIONS)
    assert result["slices_info"]["request_categories_version"] == 1
    n = result["n_items"]
    assert result["slices"]["layout"]["2016"]["n_items"] == n  # demo letters are all 2016-layout
    assert sum(s["n_items"] for s in result["slices"]["request_category"].values()) == n
    for values in result["slices"].values():
        for s in values.values():
            assert {"n_items", "n_letters", "n_overturned", "outcome", "guideline"} <= set(s)
            assert "auroc" in s["outcome"] and "auroc_ci95" in s["outcome"] and "micro_f1" in s["guideline"]


@pytest.mark.shared
@pytest.mark.skipif(not (SHARED / "ca_dwc_imr_items.csv").is_file(), reason="../shared real letters not present")
def test_request_taxonomy_covers_most_shared_requests():
    with (SHARED / "ca_dwc_imr_items.csv").open(newline="", encoding="utf-8") as fh:
        requests = [row["item_request"] for row in csv.DictReader(fh)]
    cats = [request_category({"request": r})[0] for r in requests]
    assert len(cats) == 258
    assert cats.count("other") / len(cats) <= 0.15  # measured 0.085 with version 1
    assert len(set(cats)) >= 10


@pytest.mark.slow
def test_training_keeps_the_test_slices_and_logs_them(tiny_config, demo_records, tmp_path, monkeypatch):
    import mlflow

    from imr_model.config import apply_overrides
    from imr_model.experiment import run_training

    monkeypatch.chdir(tmp_path)  # MLflow artifacts stay in tmp
    cfg = type(tiny_config).model_validate(apply_overrides(tiny_config.model_dump(), ["mlflow.log_model=false",
                                                                                       "train.epochs=1"]))  # fmt: skip
    result = run_training(cfg, records=demo_records, quiet=True)
    saved = json.loads((result.model_dir / "metrics.json").read_text())
    n_test = result.metrics["test"]["model"]["outcome"]["n"]
    assert set(saved["slices"]) == set(DIMENSIONS) and saved["slices_info"]["split"] == "test"
    assert saved["slices"]["layout"]["2016"]["n_items"] == n_test
    logged = mlflow.MlflowClient().get_run(result.run_id).data.metrics
    assert {k: v for k, v in logged.items() if k.startswith("test_slice_")} == pytest.approx(
        mlflow_metrics(saved["slices"], "test_slice"))
    both = saved["slices"]["layout"]["2016"]["n_overturned"] not in (0, n_test)
    assert ("test_slice_layout_2016_n" in logged) == both
