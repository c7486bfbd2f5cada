"""Letter parsing: layouts, robustness features, bad input, and exactness on the shared real letters."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imr_model.cli import main as cli_main
from imr_model.letters import iter_letter_files, normalize_ws, parse_file, parse_many, parse_text
from imr_model.taxonomy import guideline_labels
from imr_model.types import OVERTURNED, UPHELD, Letter, LetterError

FIXTURES = Path(__file__).parent / "fixtures"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "raw" / "ca-dwc-imr-letters"

HEADER = """Case Number: CM99-0000007
Date Assigned: 11/09/2016 Date of Injury: 10/13/2014
Decision Date: 12/09/2016 UR Denial Date: 11/03/2016
Priority: Standard Application
Received:
11/03/2016

HOW THE IMR FINAL DETERMINATION WAS MADE
MAXIMUS Federal Services sent the complete case file to an expert reviewer.

The Expert Reviewer has the following credentials:
State(s) of Licensure: California
Certification(s)/Specialty: Orthopedic Surgery

CLINICAL CASE SUMMARY
The expert reviewer developed the following clinical case summary based on a review of the
case file, including all medical records:
A synthetic worker with knee pain after a fall. Imaging was requested.

IMR ISSUES, DECISIONS AND RATIONALES
The Final Determination was based on decisions for the disputed items/services set forth below:
"""


def item_block(title: str, decision: str, *, own_line: bool = False, guideline: str | None = None) -> str:
    head = f"{title}:\n{decision}" if own_line else f"{title}: {decision}"
    verdict = "is medically necessary" if decision.lower().startswith(("o", "0")) else "is not medically necessary"
    guideline = guideline or "Decision based on MTUS Knee Complaints 2004, Section(s): Special Studies."
    return (
        f"\n{head}\n\nClaims Administrator guideline: Decision based on MTUS Knee Complaints 2004.\n\n"
        f"MAXIMUS guideline: {guideline}\n\n"
        f"Decision rationale: The guideline criteria were reviewed against the records. The request {verdict}.\n"
    )


def synthetic_letter(blocks: list[str]) -> str:
    return HEADER + "".join(blocks)


def test_2016_layout_header_and_items():
    letter = parse_text(synthetic_letter([item_block("MRI of the left knee", "Upheld"), item_block("Knee brace", "Overturned")]))
    assert letter.layout == "2016"
    assert (letter.case_number, letter.date_assigned, letter.decision_date) == ("CM99-0000007", "2016-11-09", "2016-12-09")
    assert (letter.date_of_injury, letter.ur_denial_date, letter.priority) == ("2014-10-13", "2016-11-03", "Standard")
    assert letter.reviewer_specialty == "Orthopedic Surgery" and letter.reviewer_licensure == "California"
    assert letter.case_summary == "A synthetic worker with knee pain after a fall. Imaging was requested."
    assert [(i.index, i.request, i.decision) for i in letter.items] == [(1, "MRI of the left knee", UPHELD), (2, "Knee brace", OVERTURNED)]
    first = letter.items[0]
    assert first.claims_admin_guideline == "Decision based on MTUS Knee Complaints 2004."
    assert first.maximus_guideline.endswith("Special Studies.")
    assert first.rationale.endswith("The request is not medically necessary.")


def test_robust_to_wrapping_own_line_decisions_colons_ocr_and_page_numbers():
    blocks = [
        item_block("Associated surgical service: Cold therapy unit; 7 day rental", "Upheld"),
        item_block("Physical therapy\nthree times a week for four weeks", "Overturned", own_line=True),
        item_block("Tramadol 50mg #60", "Uphe1d"),  # OCR typo
        item_block("Acupuncture x6", "Overtumed"),  # OCR typo
        item_block(
            "Physical therapy eight sessions was the original request. Physical therapy six sessions was\n"
            "authorized by the Claims Administrator. The remaining IMR eligible portion of the original\n"
            "request, Physical therapy two sessions is",
            "Upheld",
            own_line=True,
        ),
    ]
    text = synthetic_letter(blocks).replace("Knee brace", "x") + "\nPage 3 of 3\n"
    text = text.replace("\nAcupuncture x6", "\nPage 2 of 3\n\fAcupuncture x6")
    letter = parse_text(text)
    got = [(i.request, i.decision) for i in letter.items]
    assert got == [
        ("Associated surgical service: Cold therapy unit; 7 day rental", UPHELD),
        ("Physical therapy three times a week for four weeks", OVERTURNED),
        ("Tramadol 50mg #60", UPHELD),
        ("Acupuncture x6", OVERTURNED),
        (
            "Physical therapy eight sessions was the original request. Physical therapy six sessions was authorized "
            "by the Claims Administrator. The remaining IMR eligible portion of the original request, Physical "
            "therapy two sessions",
            UPHELD,
        ),
    ]
    assert all("Page" not in i.rationale for i in letter.items)


def test_25_items_and_double_spaced_2015_text():
    blocks = [item_block(f"Item number {k}", "Overturned" if k % 5 == 0 else "Upheld") for k in range(1, 26)]
    text = synthetic_letter(blocks).split("HOW THE IMR", 1)[1]  # 2015 layout: no header block
    double_spaced = "\n\n".join(text.split("\n"))
    for variant in (text, double_spaced):
        letter = parse_text("HOW THE IMR" + variant)
        assert letter.layout == "2015"
        assert [i.request for i in letter.items] == [f"Item number {k}" for k in range(1, 26)]
        assert sum(i.decision == OVERTURNED for i in letter.items) == 5


def test_2013_layout_fixture():
    letter = parse_file(FIXTURES / "letter_2013.txt")
    assert letter.layout == "2013" and letter.case_number == "CM13-0000042"
    assert [(i.request, i.decision) for i in letter.items] == [
        ("physical therapy 2x6 for the lumbar spine", UPHELD),
        ("MRI of the lumbar spine", OVERTURNED),
        ("tramadol 50mg #60", UPHELD),
    ]
    assert guideline_labels(letter.items[1].maximus_guideline) == ["ACOEM_LOW_BACK", "ODG"]
    assert guideline_labels(letter.items[2].maximus_guideline) == ["ODG", "OUTSIDE_MTUS"]
    assert "has determined" not in letter.case_summary  # decisions must not leak into the forecast view
    assert letter.items[0].rationale.startswith("The guidelines allow a short course")


def _pdf_bytes(text: str, **encryption) -> bytes:
    from fpdf import FPDF

    pdf = FPDF()
    if encryption:
        pdf.set_encryption(**encryption)
    pdf.add_page()
    pdf.set_font("Helvetica", size=10)
    for line in text.split("\n"):
        if line.strip():
            pdf.cell(0, 5, line, new_x="LMARGIN", new_y="NEXT")
        else:
            pdf.ln(5)  # a paragraph gap, like a blank line in the real letters
    return bytes(pdf.output())


def test_pdf_round_trip_recovers_paragraphs(tmp_path):
    text = synthetic_letter([item_block("MRI of the left knee", "Upheld"), item_block("Knee brace for purchase", "Overturned")])
    path = tmp_path / "CM99-0000007.pdf"
    path.write_bytes(_pdf_bytes(text))
    letter = parse_file(path)
    assert letter.letter_id == "CM99-0000007" and letter.source == str(path)
    assert [(i.request, i.decision) for i in letter.items] == [("MRI of the left knee", UPHELD), ("Knee brace for purchase", OVERTURNED)]
    assert letter.items[1].rationale.endswith("The request is medically necessary.")


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name → (file, substring the error must contain)."""
    from fpdf import FPDF

    good_pdf = _pdf_bytes(synthetic_letter([item_block("MRI of the left knee", "Upheld")]))
    image_only = FPDF()
    image_only.add_page()
    image_only.rect(20, 20, 100, 60, style="F")
    cases = {
        "empty.txt": (b"", "empty file"),
        "garbage.bin": (bytes(range(256)) * 40, "binary data"),
        "scan.pdf": (bytes(image_only.output()), "needs OCR"),
        "locked.pdf": (_pdf_bytes("secret", owner_password="o", user_password="u"), "encrypted"),
        "truncated.pdf": (good_pdf[: len(good_pdf) // 3], "not a readable PDF"),
        "latin1.txt": ("Décision rationale: café".encode("latin-1"), "not valid UTF-8"),
        "recipe.txt": (b"Mix flour and water. Bake for 20 minutes.\n" * 20, "not an IMR Final Determination Letter"),
        "noitems.txt": (HEADER.encode(), "no disputed items"),
        "huge.txt": (b"IMR letter text line that repeats.\n" * 320_000, "too large"),
    }
    out = {}
    for name, (data, expected) in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        out[name] = (p, expected)
    return out


def test_bad_inputs_give_clear_errors_naming_the_file(tmp_path):
    for name, (path, expected) in _bad_inputs(tmp_path).items():
        with pytest.raises(LetterError) as info:
            parse_file(path)
        assert expected in info.value.reason, (name, info.value.reason)
        assert str(path) in str(info.value)
        assert "flour" not in str(info.value) and "secret" not in str(info.value)  # never quote content


def test_parse_many_never_drops_a_file(tmp_path):
    bad = _bad_inputs(tmp_path)
    good = tmp_path / "good.txt"
    good.write_text(synthetic_letter([item_block("MRI of the left knee", "Upheld")]))
    paths = iter_letter_files([str(tmp_path), str(tmp_path / "missing.pdf")])
    results = list(parse_many(paths))
    assert len(results) == len(paths)
    sources = {r.source for r in results}
    assert str(tmp_path / "missing.pdf") in sources and str(good) in sources
    assert sum(isinstance(r, Letter) for r in results) == 1
    assert sum(isinstance(r, LetterError) for r in results) == len(paths) - 1
    assert all(str(p) in sources for p, _ in bad.values() if p.suffix in (".pdf", ".txt"))


def test_cli_parse_writes_items_and_error_records(tmp_path, capsys):
    letters = tmp_path / "in"
    letters.mkdir()
    (letters / "a.txt").write_text(synthetic_letter([item_block("MRI of the left knee", "Upheld"), item_block("Knee brace", "Overturned")]))
    (letters / "b.pdf").write_bytes(b"%PDF-1.7 broken")
    out = tmp_path / "items.jsonl"
    with pytest.raises(SystemExit) as done:
        cli_main(["parse", str(letters), "-o", str(out)])
    assert done.value.code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r.get("request") for r in rows if "error" not in r] == ["MRI of the left knee", "Knee brace"]
    assert rows[0]["guideline_labels"] == ["ACOEM_KNEE"] and rows[0]["letter_id"] == "a" and rows[0]["item_index"] == 1
    errors = [r for r in rows if "error" in r]
    assert len(errors) == 1 and errors[0]["source"].endswith("b.pdf")
    assert "1 letters, 2 items, 1 errors" in capsys.readouterr().err


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=3000) | st.builds(lambda a, b: HEADER + a + ": Upheld\n" + b, st.text(max_size=200), st.text(max_size=500)))
def test_any_text_gives_a_letter_or_a_letter_error(text):
    try:
        letter = parse_text(text)
    except LetterError as exc:
        assert exc.reason
    else:
        assert letter.items and all(i.decision in (UPHELD, OVERTURNED) for i in letter.items)


# --------------------------------------------------------------------------- real letters (../shared)

needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared real letters not present")


@pytest.mark.shared
@needs_shared
def test_real_letters_match_reference_parse():
    ref: dict[str, list[dict]] = defaultdict(list)
    with (SHARED / "ca_dwc_imr_items.csv").open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            ref[row["case_number"]].append(row)
    pdfs = sorted((SHARED / "pdfs").glob("*.pdf"))
    letters = {r.letter_id: r for r in parse_many(pdfs, workers=2)}
    assert all(isinstance(v, Letter) for v in letters.values())
    # The isolated workers (the default path) parse exactly like this process does.
    assert {r.letter_id: r for r in parse_many(pdfs, isolate=False)} == letters
    n_ref = sum(len(v) for v in ref.values())
    n_found = sum(len(v.items) for v in letters.values())
    assert n_found == n_ref == 258
    pairs = [(row, item) for case, rows in ref.items() for row, item in zip(rows, letters[case].items)]
    assert all(row["determination"] == item.decision for row, item in pairs)

    def share(field: str, attr: str) -> float:
        return sum(normalize_ws(r[field]) == normalize_ws(getattr(i, attr)) for r, i in pairs) / len(pairs)

    assert share("item_request", "request") >= 0.98
    assert share("maximus_guideline", "maximus_guideline") >= 0.98
    assert share("claims_admin_guideline", "claims_admin_guideline") >= 0.98
    assert share("decision_rationale", "rationale") >= 0.98
    same_labels = sum(guideline_labels(r["maximus_guideline"]) == guideline_labels(i.maximus_guideline) for r, i in pairs)
    assert same_labels / len(pairs) >= 0.98


@pytest.mark.shared
@needs_shared
def test_real_plain_text_letters_2015_layout():
    letters = [parse_file(p) for p in sorted((SHARED / "txt-samples").glob("*.txt"))]
    assert [lt.layout for lt in letters] == ["2015", "2015"]
    assert [len(lt.items) for lt in letters] == [1, 2]
    assert all(i.rationale and i.maximus_guideline and i.claims_admin_guideline for lt in letters for i in lt.items)
    assert all(lt.case_summary for lt in letters)
