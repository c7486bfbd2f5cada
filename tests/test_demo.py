"""Synthetic demo letters: determinism, marking, outcome mix, learnable signal, and parser round trips."""

from __future__ import annotations

import random
import re
import time

import pytest

from imr_model.demo import (
    CASE_PREFIX,
    SYNTHETIC_MARKER,
    DemoLetter,
    generate_letter,
    generate_letters,
    iter_letters,
    to_latin1,
    wrap,
    write_demo_letters,
)
from imr_model.demo_text import FAMILIES
from imr_model.types import OVERTURNED, UPHELD


@pytest.fixture(scope="module")
def letters() -> list[DemoLetter]:
    return generate_letters(1500, seed=11)


def test_same_seed_same_letters_and_index_independent_of_n():
    a, b = generate_letters(40, seed=3), generate_letters(40, seed=3)
    assert [x.text for x in a] == [x.text for x in b]
    assert [x.items for x in a] == [x.items for x in b]
    assert generate_letters(41, seed=3)[:40] == a  # letter i does not depend on how many are made
    assert list(iter_letters(5, seed=3, start=20)) == a[20:25]
    assert [x.text for x in generate_letters(40, seed=4)] != [x.text for x in a]


def test_generate_letter_uses_the_given_rng():
    one = generate_letter(random.Random(5), 0)
    assert generate_letter(random.Random(5), 0) == one
    assert generate_letter(random.Random(6), 0).text != one.text
    with pytest.raises(ValueError, match="index"):
        generate_letter(random.Random(0), -1)


def test_letters_are_marked_synthetic(letters):
    for i, letter in enumerate(letters[:50]):
        assert letter.text.startswith(SYNTHETIC_MARKER + "\n")
        assert letter.name == f"{CASE_PREFIX}{i + 1:07d}"
        assert f"Case Number: {letter.name}\n" in letter.text


def test_layout_sections_and_wrapping(letters):
    for letter in letters[:100]:
        for heading in ("HOW THE IMR FINAL DETERMINATION WAS MADE", "CLINICAL CASE SUMMARY",
                        "IMR ISSUES, DECISIONS AND RATIONALES", "Date Assigned:", "UR Denial Date:"):  # fmt: skip
            assert heading in letter.text
        assert max(len(line) for line in letter.text.splitlines()) <= 97


def test_item_counts_outcome_rate_and_verdict_sentences(letters):
    items = [it for letter in letters for it in letter.items]
    counts = {len(letter.items) for letter in letters}
    assert counts == {1, 2, 3, 4, 5, 6}
    rate = sum(it.decision == OVERTURNED for it in items) / len(items)
    assert 0.08 <= rate <= 0.14, rate
    for it in items:
        last = re.split(r"(?<=\.)\s+", it.rationale)[-1]
        if it.decision == UPHELD:
            assert last.endswith("not medically necessary."), last
        else:
            assert last.endswith("medically necessary.") and "not medically" not in last, last


def test_variety_and_parser_stress_features(letters):
    requests = [it.request for letter in letters for it in letter.items]
    assert len(set(requests)) > 150
    assert any(r.startswith("Associated surgical service: ") for r in requests)
    assert any("IMR eligible portion" in r and len(r) > 95 for r in requests)
    assert any(re.search(r":\n(Upheld|Overturned)\n", letter.text) for letter in letters)
    cites = " ".join(it.maximus_guideline for letter in letters for it in letter.items)
    for phrase in ("MTUS Chronic Pain Medical Treatment 2016", "MTUS Acupuncture Treatment 2007",
                   "MTUS Postsurgical Treatment 2009", "Official Disability Guidelines (ODG)",
                   "ACOEM Occupational Medicine Practice Guidelines, 3rd ed.", "did not cite any medical evidence",
                   "MTUS Opioid Treatment 2016", "MTUS General Approaches 2004"):  # fmt: skip
        assert phrase in cites
    claims = [it.claims_admin_guideline for letter in letters for it in letter.items]
    assert any(c.startswith("The Claims Administrator") for c in claims)
    assert not any("The Expert Reviewer" in c for c in claims)


def test_supporting_sentences_correlate_with_outcome(letters):
    """Supportive clauses are much more frequent in overturned rationales and summaries (the learnable signal)."""
    pos = {c for f in FAMILIES.values() for c in f.pos if "{" not in c}
    neg = {c for f in FAMILIES.values() for c in f.neg if "{" not in c}

    def support_share(texts):
        hits_pos = sum(sum(c in t for c in pos) for t in texts)
        hits_neg = sum(sum(c in t for c in neg) for t in texts)
        return hits_pos / max(hits_pos + hits_neg, 1)

    over = [it.rationale for letter in letters for it in letter.items if it.decision == OVERTURNED]
    upheld = [it.rationale for letter in letters for it in letter.items if it.decision == UPHELD]
    assert support_share(over) > 0.7 > 0.3 > support_share(upheld)
    sum_over = [letter.case_summary for letter in letters if all(it.decision == OVERTURNED for it in letter.items)]
    sum_up = [letter.case_summary for letter in letters if all(it.decision == UPHELD for it in letter.items)]
    assert support_share(sum_over) > support_share(sum_up) + 0.3


def test_wrap_and_latin1():
    assert wrap("aa bb cc dd", 5) == ["aa bb", "cc dd"]
    assert wrap("x" * 12, 5) == ["xxxxx", "xxxxx", "xx"]  # an over-long word is split, never dropped
    assert wrap("  ") == []
    assert to_latin1("“quoted” – café…") == '"quoted" - café...'
    assert to_latin1("→") == "?"


def test_text_round_trip_through_parser(letters):
    from imr_model.letters import parse_text

    for letter in letters[:300]:
        parsed = parse_text(letter.text, letter_id=letter.name)
        assert parsed == letter.to_letter(source="<text>"), letter.name


def test_item_records_schema(letters):
    recs = letters[0].item_records()
    assert [r["item_index"] for r in recs] == list(range(1, len(letters[0].items) + 1))
    assert all(r["letter_id"] == letters[0].name and r["guideline_labels"] for r in recs)


def test_write_txt_and_pdf_round_trip(tmp_path):
    from imr_model.letters import parse_file

    truth = {x.name: x for x in generate_letters(4, seed=8)}
    txt = write_demo_letters(tmp_path / "txt", 4, seed=8)
    pdf = write_demo_letters(tmp_path / "pdf", 4, seed=8, fmt="pdf")
    assert [p.name for p in txt] == [f"{n}.txt" for n in truth]
    for path in txt + pdf:
        parsed = parse_file(path)
        expected = truth[path.stem]
        assert parsed.items == expected.items, path.name
        assert parsed.case_summary == expected.case_summary
        assert parsed.case_number == expected.name and parsed.decision_date == expected.decision_date
    with pytest.raises(ValueError, match=r"\['txt', 'pdf'\]"):
        write_demo_letters(tmp_path, 1, fmt="docx")


@pytest.mark.slow
def test_hundred_thousand_letters_are_fast():
    start = time.perf_counter()
    n_items = sum(len(letter.items) for letter in iter_letters(100_000, seed=1))
    elapsed = time.perf_counter() - start
    assert n_items > 200_000
    assert elapsed < 120, f"100k letters took {elapsed:.0f}s"
