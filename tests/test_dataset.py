"""Text views and masking, grouped/stratified splits, near duplicates, save/load, digests, record loaders."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from imr_model.dataset import (
    MASK_TOKEN,
    SPLITS,
    VIEWS,
    assign_splits,
    build_dataset,
    dataset_digest,
    find_near_duplicates,
    grouped_kfold,
    is_verdict,
    load_dataset_dir,
    load_records,
    mask_conclusions,
    save_dataset,
    split_sentences,
    text_view,
)
from imr_model.demo import generate_letters, write_demo_letters
from imr_model.types import OVERTURNED, UPHELD

FIXTURES = Path(__file__).parent / "fixtures"


def _record(letter_id: str, index: int, decision: str, rationale: str = "Some rationale.", **extra) -> dict:
    rec = {"letter_id": letter_id, "item_index": index, "request": f"Request {index}", "decision": decision,
           "rationale": rationale, "case_summary": f"Summary of {letter_id}.", "guideline_labels": []}  # fmt: skip
    rec.update(extra)
    return rec


@pytest.fixture(scope="module")
def demo_items() -> list[dict]:
    return [r for letter in generate_letters(300, seed=21) for r in letter.item_records()]


# --------------------------------------------------------------------------- views and masking

VERDICTS = [
    "The request for Norco 10/325mg #90 is medically necessary.",
    "Therefore, the request is not medically necessary.",
    "Medical necessity has not been established.",
    "The utilization review decision is upheld.",
    "The prior non-certification is overturned.",
    "The requested TENS unit is not warranted at this time.",
    "Therefore, continued use of Norco is not indicated.",
    "The guideline criteria for this request have not been met.",
    "The guidelines do not support the request.",
    "This treatment is appropriate for the injured worker.",
    "The request was previously non-certified by utilization review.",
    "Acupuncture is not necessary for this patient.",
]
NOT_VERDICTS = [
    "MTUS guidelines state that TENS is not recommended as a primary treatment modality.",
    "Continued use is supported when the injured worker has returned to work.",
    "A proton pump inhibitor is indicated for patients at high risk of gastrointestinal events.",
    "Documentation of functional benefit is necessary to continue opioid therapy.",
    "Imaging may be repeated if necessary.",
    "In this case, the patient has completed 24 sessions, more than the recommended number.",
    "Guidelines recommend a trial of 6 visits over 2 weeks.",
    "The injured worker reports pain of 6 out of 10 with tenderness of the lumbar spine.",
]


@pytest.mark.parametrize("sentence", VERDICTS)
def test_verdict_sentences_are_detected(sentence):
    assert is_verdict(sentence)


@pytest.mark.parametrize("sentence", NOT_VERDICTS)
def test_guideline_and_evidence_sentences_are_kept(sentence):
    assert not is_verdict(sentence)


def test_mask_counts_and_collapses_adjacent_masks():
    text = " ".join([NOT_VERDICTS[0], NOT_VERDICTS[5], VERDICTS[5], VERDICTS[1]])
    masked, n = mask_conclusions(text)
    assert n == 2
    assert masked == f"{NOT_VERDICTS[0]} {NOT_VERDICTS[5]} {MASK_TOKEN}"
    masked, n = mask_conclusions(f"{VERDICTS[2]} {NOT_VERDICTS[6]} {VERDICTS[0]}")
    assert (masked, n) == (f"{MASK_TOKEN} {NOT_VERDICTS[6]} {MASK_TOKEN}", 2)
    assert mask_conclusions("") == ("", 0)


def test_sentence_splitter_respects_abbreviations():
    text = (
        "Seen by Dr. Smith on 1/2/16. Pain is 5/10 (i.e. moderate), e.g. at night. Plan: PT 2x6. Norco 10 mg. was held."
    )
    assert split_sentences(text) == [
        "Seen by Dr. Smith on 1/2/16.",
        "Pain is 5/10 (i.e. moderate), e.g. at night.",
        "Plan: PT 2x6.",
        "Norco 10 mg. was held.",
    ]


def test_views(demo_items):
    rec = _record(
        "L1", 1, UPHELD, rationale="Guidelines recommend a trial first. The request is not medically necessary."
    )
    assert text_view(rec, "rationale") == rec["rationale"]
    assert text_view(rec, "rationale_masked") == f"Guidelines recommend a trial first. {MASK_TOKEN}"
    forecast = text_view(rec, "forecast")
    assert forecast == "Request: Request 1\nCase summary: Summary of L1."
    with pytest.raises(ValueError, match=r"valid views: \['rationale', 'rationale_masked', 'forecast'\]"):
        text_view(rec, "summary")
    for r in demo_items:
        masked = text_view(r, "rationale_masked")
        assert MASK_TOKEN in masked and "medically necessary" not in masked
        assert masked.split(". ")[0] == r["rationale"].split(". ")[0]  # the guideline sentence stays
        forecast = text_view(r, "forecast")
        assert r["request"] in forecast and r["rationale"][:60] not in forecast


# --------------------------------------------------------------------------- splits


def test_build_dataset_columns_groups_and_determinism(demo_items):
    dd = build_dataset(demo_items, seed=1)
    assert list(dd) == list(SPLITS)
    assert sum(len(dd[s]) for s in SPLITS) == len(demo_items)
    for col in ("letter_id", "request", "rationale", "guideline_labels", "label", *VIEWS):
        assert col in dd["train"].column_names
    assert dd["train"].features["label"].names == [UPHELD, OVERTURNED]
    ids = {s: set(dd[s]["letter_id"]) for s in SPLITS}
    assert not (ids["train"] & ids["validation"] or ids["train"] & ids["test"] or ids["validation"] & ids["test"])
    again = build_dataset(demo_items, seed=1)
    assert all(dd[s]["letter_id"] == again[s]["letter_id"] for s in SPLITS)
    other = build_dataset(demo_items, seed=2)
    assert dd["test"]["letter_id"] != other["test"]["letter_id"]
    for s in SPLITS:
        assert all((lab == 1) == (dec == OVERTURNED) for lab, dec in zip(dd[s]["label"], dd[s]["decision"]))


def test_split_sizes_and_stratification(demo_items):
    dd = build_dataset(demo_items, seed=0, val_size=0.2, test_size=0.1)
    n = len(demo_items)
    assert abs(len(dd["validation"]) / n - 0.2) < 0.02 and abs(len(dd["test"]) / n - 0.1) < 0.02
    overall = np.mean([r["decision"] == OVERTURNED for r in demo_items])
    for s in SPLITS:
        assert abs(np.mean(dd[s]["label"]) - overall) < 0.02, s
    report = dd.report
    assert report["sizes"] == {s: len(dd[s]) for s in SPLITS}
    assert report["masked_sentences"] >= n and report["items_without_masked_sentence"] == 0


def test_rare_positives_reach_every_split():
    rng = random.Random(0)
    recs = []
    for k in range(60):
        for i in range(rng.randint(1, 4)):
            recs.append(_record(f"L{k}", i + 1, OVERTURNED if k % 10 == 0 and i == 0 else UPHELD))
    dd = build_dataset(recs, seed=3)
    for s in SPLITS:
        assert 1 in dd[s]["label"], s


def test_grouped_kfold(demo_items):
    folds = grouped_kfold(demo_items, k=4, seed=5)
    assert len(folds) == 4
    tests = np.concatenate([te for _, te in folds])
    assert sorted(tests.tolist()) == list(range(len(demo_items)))
    for tr, te in folds:
        assert not {demo_items[i]["letter_id"] for i in tr} & {demo_items[i]["letter_id"] for i in te}
        assert 0.05 < np.mean([demo_items[i]["decision"] == OVERTURNED for i in te]) < 0.17
    again = grouped_kfold(demo_items, k=4, seed=5)
    assert all((a[1] == b[1]).all() for a, b in zip(folds, again))
    with pytest.raises(ValueError, match=r"k must be an int in \[2, "):
        grouped_kfold(demo_items, k=1)


def test_invalid_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="no records"):
        build_dataset([])
    with pytest.raises(ValueError, match="has no decision"):
        build_dataset([_record("L1", 1, None)])
    with pytest.raises(ValueError, match="unrecognised label 'Maybe'"):
        build_dataset([_record("L1", 1, "Maybe")])
    with pytest.raises(ValueError, match="val_size"):
        build_dataset([_record("L1", 1, UPHELD)], val_size=1.2)
    with pytest.raises(ValueError, match="must be < 1"):
        build_dataset([_record("L1", 1, UPHELD)], val_size=0.5, test_size=0.5)
    with pytest.raises(ValueError, match="labels has 2 items but groups has 1"):
        assign_splits([0, 1], ["a"], (0.5, 0.5))
    with pytest.raises(ValueError, match=r"sum to 1, got \[0.5, 0.6\]"):
        assign_splits([0, 1], ["a", "b"], (0.5, 0.6))


# --------------------------------------------------------------------------- near duplicates


def _random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(3000)]
    return [" ".join(rng.choice(vocab) for _ in range(60)) + "." for _ in range(n)]


def test_near_duplicate_detection_catches_a_planted_copy():
    texts = _random_texts(200)
    copy = texts[17].replace("w", "w", 1) + " Minor trailing note."
    texts.append(copy)
    groups = ["train"] * 150 + ["test"] * 51
    pairs = find_near_duplicates(texts, groups, threshold=0.9)
    assert [(i, j) for i, j, _ in pairs] == [(17, 200)]
    assert 0.9 <= pairs[0][2] <= 1.0
    groups[17] = "test"  # same split: not a cross-split duplicate any more
    assert find_near_duplicates(texts, groups) == []
    assert [(i, j) for i, j, _ in find_near_duplicates(texts)] == [(17, 200)]
    with pytest.raises(ValueError, match="groups has 3"):
        find_near_duplicates(texts, ["a", "b", "c"])


@pytest.mark.parametrize("threshold", [0.9, 0.6])
@pytest.mark.parametrize("cross_split", [False, True])
def test_near_duplicates_match_brute_force(threshold, cross_split):
    """The two-step search (rare-term candidates + heavy-document products) equals the full dense product."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    rng = random.Random(1)
    common, rare = [f"c{i}" for i in range(15)], [f"r{i}" for i in range(4000)]
    texts = []
    for k in range(400):  # common-only ("heavy"), rare-only and mixed documents
        n_common, n_rare = [(30, 0), (0, 30), (15, 6), (15, 6)][k % 4]
        texts.append(
            " ".join([rng.choice(common) for _ in range(n_common)] + [rng.choice(rare) for _ in range(n_rare)])
        )
    for k in range(0, 400, 7):  # near copies with one word changed
        words = texts[k].split()
        words[rng.randrange(len(words))] = rng.choice(common + rare)
        texts.append(" ".join(words))
    groups = [rng.choice(SPLITS) for _ in texts] if cross_split else None
    x = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, dtype=np.float32).fit_transform(texts).toarray()
    sims = x @ x.T
    expected = {
        (i, j)
        for i in range(len(texts))
        for j in range(i + 1, len(texts))
        if sims[i, j] >= threshold - 1e-6 and (groups is None or groups[i] != groups[j])
    }
    found = find_near_duplicates(texts, groups, threshold=threshold, chunk_size=37)
    assert {(i, j) for i, j, _ in found} == expected
    assert len(expected) >= 10
    assert all(abs(v - sims[i, j]) < 1e-4 for i, j, v in found)


def test_report_lists_cross_split_duplicates():
    texts = _random_texts(40, seed=1)
    recs = [_record(f"L{i}", 1, OVERTURNED if i % 5 == 0 else UPHELD, rationale=t) for i, t in enumerate(texts)]
    recs += [_record(f"COPY{i}", 1, UPHELD, rationale=texts[i]) for i in range(10)]
    report = build_dataset(recs, seed=0, val_size=0.3, test_size=0.3).report["near_duplicates"]
    assert report["pairs"] >= 1 and report["items_involved"] == 2 * report["pairs"]
    planted = [{f"L{i}", f"COPY{i}"} for i in range(10)]
    for example in report["examples"]:
        assert example["a"]["split"] != example["b"]["split"]
        assert {example["a"]["letter_id"], example["b"]["letter_id"]} in planted


# --------------------------------------------------------------------------- save / load / digest


def test_save_load_round_trip_and_digest(tmp_path, demo_items):
    dd = build_dataset(demo_items[:120], seed=0)
    path = save_dataset(dd, tmp_path / "ds")
    loaded = load_dataset_dir(path)
    assert all(loaded[s].to_list() == dd[s].to_list() for s in SPLITS)
    assert loaded.report["sizes"] == dd.report["sizes"]
    assert loaded.digest == dataset_digest(dd) == dataset_digest(loaded)
    assert dataset_digest(demo_items) == dataset_digest([dict(r) for r in demo_items])
    changed = [dict(r) for r in demo_items]
    changed[3]["rationale"] += " x"
    assert dataset_digest(changed) != dataset_digest(demo_items)
    with pytest.raises(FileNotFoundError, match="not a saved DatasetDict"):
        load_dataset_dir(tmp_path / "missing")


# --------------------------------------------------------------------------- record loaders


def _table_rows() -> list[dict]:
    return [
        {"case_id": "A1", "text": "Therapy helped. The request is medically necessary.", "outcome": "Overturned"},
        {"case_id": "A2", "text": "No benefit documented.", "outcome": "upheld"},
        {"case_id": "A3", "text": "Plan reviewed.", "outcome": "Overturned Decision of Health Plan"},
        {"case_id": "A4", "text": "Plan reviewed again.", "outcome": "Upheld Decision of Health Plan"},
    ]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_tabular_loaders(tmp_path, suffix):
    import pandas as pd

    frame = pd.DataFrame(_table_rows())
    path = tmp_path / f"items{suffix}"
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path)
    records, errors = load_records(path, text_column="text", label_column="outcome", id_column="case_id")
    assert errors == []
    assert [r["decision"] for r in records] == [OVERTURNED, UPHELD, OVERTURNED, UPHELD]
    assert [r["letter_id"] for r in records] == ["A1", "A2", "A3", "A4"]
    assert records[0]["rationale"].startswith("Therapy helped.")
    assert build_dataset(records * 3, seed=0)  # the normalised records are accepted as they are


@pytest.mark.parametrize(
    "value, expected", [(0, UPHELD), (1, OVERTURNED), (True, OVERTURNED), ("0", UPHELD), (" OVERTURNED ", OVERTURNED)]
)
def test_label_forms(tmp_path, value, expected):
    import pandas as pd

    path = tmp_path / "t.jsonl"
    pd.DataFrame([{"rationale": "x", "label": value}]).to_json(path, orient="records", lines=True)
    records, _ = load_records(path)
    assert records[0]["decision"] == expected


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_parse_output_tables_round_trip(tmp_path, suffix, demo_items):
    """Item records written as `imr parse` JSONL (or saved to CSV by pandas) load back unchanged."""
    import pandas as pd

    frame = pd.DataFrame(demo_items[:40])
    path = tmp_path / f"parsed{suffix}"
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_json(path, orient="records", lines=True)
    records, _ = load_records(path)
    fields = ("letter_id", "item_index", "request", "decision", "rationale", "case_summary", "guideline_labels")
    assert [{k: r[k] for k in (*fields, "odg_chapters")} for r in records] == [
        {k: r[k] for k in (*fields, "odg_chapters")} for r in demo_items[:40]
    ]
    assert any(r["odg_chapters"] for r in records)


def test_bad_columns_name_the_column_and_list_available(tmp_path):
    import pandas as pd

    path = tmp_path / "t.csv"
    pd.DataFrame(_table_rows()).to_csv(path, index=False)
    with pytest.raises(
        ValueError, match=r"text column 'body' not found; available columns: \['case_id', 'text', 'outcome'\]"
    ):
        load_records(path, text_column="body")
    with pytest.raises(ValueError, match=r"label column 'y' not found; available columns"):
        load_records(path, text_column="text", label_column="y")
    assert len(load_records(path)[0]) == 4  # "text" and "outcome" are recognised without naming them
    pd.DataFrame(_table_rows()).rename(columns={"text": "note"}).to_csv(path, index=False)
    with pytest.raises(
        ValueError, match=r"no text column found .* available columns: \['case_id', 'note', 'outcome'\]"
    ):
        load_records(path)
    pd.DataFrame([{"text": "a", "outcome": "Maybe"}]).to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"row 1, column 'outcome': unrecognised label 'Maybe'"):
        load_records(path, text_column="text", label_column="outcome")
    with pytest.raises(FileNotFoundError):
        load_records(tmp_path / "nope.csv")


def test_load_records_mixes_letters_tables_and_errors(tmp_path):
    write_demo_letters(tmp_path / "letters", 3, seed=2)
    (tmp_path / "letters" / "broken.txt").write_text("not a letter at all", encoding="utf-8")
    records, errors = load_records([tmp_path / "letters", str(FIXTURES / "dmhc_*.csv")])
    assert len(errors) == 1 and "broken.txt" in str(errors[0])
    truth = [r for x in generate_letters(3, seed=2) for r in x.item_records()]
    letter_recs = [r for r in records if r["letter_id"].startswith("CM99-")]
    assert [(r["letter_id"], r["decision"], r["rationale"]) for r in letter_recs] == [
        (r["letter_id"], r["decision"], r["rationale"]) for r in truth
    ]
    assert sum(r.get("dataset") == "dmhc" for r in records) == 8


def test_dmhc_fixture_schema():
    from imr_model.dataset import load_dmhc

    records = load_dmhc(FIXTURES / "dmhc_sample.csv")
    assert len(records) == 8
    assert {r["decision"] for r in records} == {UPHELD, OVERTURNED}
    first = records[0]
    assert first["letter_id"] == "ZZ99-00001" and first["request"] == "Diag Imag & Screen / MRI"
    assert first["rationale"].startswith("SYNTHETIC FIXTURE ROW.")
    assert "Orth/Musculoskeletal" in first["case_summary"] and "SYNTHETIC" not in text_view(first, "forecast")
    assert first["report_year"] == 2021
    json.dumps(records)  # JSON-ready


SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "raw"


@pytest.mark.shared
@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared not present")
def test_real_dmhc_sample_schema():
    from imr_model.dataset import load_dmhc

    records = load_dmhc(SHARED / "ca-dmhc-imr-eval-sample" / "eval_set_imr_preview.csv")
    assert len(records) == 20 and {r["decision"] for r in records} == {UPHELD}
    assert all(r["rationale"] and r["letter_id"] and " / " in r["request"] for r in records)


@pytest.mark.shared
@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared not present")
def test_real_dwc_items_csv_maps_to_records():
    records, errors = load_records(SHARED / "ca-dwc-imr-letters" / "ca_dwc_imr_items.csv")
    assert errors == [] and len(records) == 258
    assert sum(r["decision"] == OVERTURNED for r in records) == 33
    assert len({r["letter_id"] for r in records}) == 124
    assert all(r["request"] and r["case_summary"] for r in records)


# --------------------------------------------------------------------------- DMHC download (real loopback HTTP server)


@pytest.fixture()
def http_server(tmp_path):
    """Serve files from a temp folder on 127.0.0.1 (ephemeral port) in a background thread."""
    import functools
    import http.server
    import threading

    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None  # keep test output quiet
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_dmhc_from_loopback_server(http_server, tmp_path):
    from imr_model.dataset import download_dmhc, load_dmhc

    root, base = http_server
    (root / "imr.csv").write_bytes((FIXTURES / "dmhc_sample.csv").read_bytes())
    dest = tmp_path / "out" / "dmhc.csv"
    assert download_dmhc(dest, f"{base}/imr.csv", timeout=10, progress=False) == dest
    assert dest.read_bytes() == (FIXTURES / "dmhc_sample.csv").read_bytes()
    assert len(load_dmhc(dest)) == 8
    assert [p.name for p in dest.parent.iterdir()] == ["dmhc.csv"]


def test_download_dmhc_failures_leave_no_partial_file(http_server, tmp_path):
    from imr_model.dataset import DatasetDownloadError, download_dmhc

    root, base = http_server
    (root / "other.csv").write_text("id,text,label\n1,hello,0\n", encoding="utf-8")
    dest = tmp_path / "out" / "dmhc.csv"
    with pytest.raises(DatasetDownloadError, match="HTTP 404"):
        download_dmhc(dest, f"{base}/missing.csv", timeout=10, progress=False)
    with pytest.raises(
        DatasetDownloadError, match=r"missing columns \['ReferenceID'.*first columns found: \['id', 'text', 'label'\]"
    ):
        download_dmhc(dest, f"{base}/other.csv", timeout=10, progress=False)
    assert list(dest.parent.iterdir()) == []  # no partial or temp file
    dest.write_text("previous download", encoding="utf-8")
    with pytest.raises(DatasetDownloadError):
        download_dmhc(dest, f"{base}/other.csv", timeout=10, progress=False)
    assert dest.read_text(encoding="utf-8") == "previous download"  # the old file survives a failed update


def test_download_dmhc_connection_refused(tmp_path):
    import socket

    from imr_model.dataset import DatasetDownloadError, download_dmhc

    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(DatasetDownloadError, match="download failed"):
        download_dmhc(tmp_path / "x.csv", f"http://127.0.0.1:{port}/x.csv", timeout=5, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_data_commands(http_server, tmp_path):
    from typer.testing import CliRunner

    from imr_model.cli import app

    root, base = http_server
    (root / "imr.csv").write_bytes((FIXTURES / "dmhc_sample.csv").read_bytes())
    runner = CliRunner()
    dest = tmp_path / "dmhc.csv"
    result = runner.invoke(app, ["data", "download", "dmhc", "--url", f"{base}/imr.csv", "-o", str(dest)])
    assert result.exit_code == 0, result.output
    assert dest.is_file()
    result = runner.invoke(
        app, ["data", "download", "dmhc", "--url", f"{base}/nope.csv", "-o", str(tmp_path / "n.csv")]
    )
    assert result.exit_code == 1 and "HTTP 404" in result.output
    result = runner.invoke(app, ["data", "demo", "12", "-o", str(tmp_path / "demo"), "--seed", "4"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "demo").glob("CM99-*.txt"))) == 12
    out = tmp_path / "ds"
    result = runner.invoke(app, ["data", "build", str(tmp_path / "demo"), str(dest), "-o", str(out)])
    assert result.exit_code == 0, result.output
    loaded = load_dataset_dir(out)
    assert sum(len(loaded[s]) for s in SPLITS) == sum(len(x.items) for x in generate_letters(12, seed=4)) + 8


def test_load_records_reports_a_glob_that_matches_nothing(tmp_path):
    from imr_model.dataset import load_records

    records, errors = load_records([str(tmp_path / "none" / "*.pdf")])
    assert records == []
    assert [e.reason for e in errors] == ["pattern matched no files"]
