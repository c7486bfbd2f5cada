"""Guideline taxonomy: every label id is produced by the citation wording it stands for, and only by it."""

from __future__ import annotations

import pytest

from imr_model.taxonomy import LABELS, TAXONOMY_VERSION, guideline_labels, load_taxonomy, odg_chapters, split_citation

EXPECTED_LABELS = (
    "MTUS_CHRONIC_PAIN", "MTUS_OPIOIDS", "MTUS_ACUPUNCTURE", "MTUS_POSTSURGICAL", "ACOEM_GENERAL", "ACOEM_NECK",
    "ACOEM_SHOULDER", "ACOEM_ELBOW", "ACOEM_WRIST_HAND", "ACOEM_LOW_BACK", "ACOEM_KNEE", "ACOEM_ANKLE_FOOT",
    "ACOEM_STRESS", "ODG", "ACOEM_3RD", "OTHER_CITATION", "NO_CITATION", "OUTSIDE_MTUS",
)  # fmt: skip

OUTSIDE = "The Expert Reviewer based their decision on recommendation(s) outside of the MTUS Guidelines. "
CASES = [
    ("Decision based on MTUS Chronic Pain Medical Treatment 2016, Section(s): Topical analgesics.", ["MTUS_CHRONIC_PAIN"]),
    ("Decision based on MTUS Opioid Treatment 2016, Section(s): 2. Opioids for Subacute Pain.", ["MTUS_OPIOIDS"]),
    ("Decision based on MTUS Acupuncture Treatment 2007.", ["MTUS_ACUPUNCTURE"]),
    ("Decision based on MTUS Postsurgical Treatment 2009, Section(s): Knee.", ["MTUS_POSTSURGICAL"]),
    ("Decision based on MTUS General Approaches 2004, Section(s): Initial Approaches to Treatment.", ["ACOEM_GENERAL"]),
    ("Decision based on MTUS Neck and Upper Back Complaints 2004, Section(s): Special Studies.", ["ACOEM_NECK"]),
    ("Decision based on MTUS Shoulder Complaints 2004, Section(s): Summary.", ["ACOEM_SHOULDER"]),
    ("Decision based on MTUS Elbow Complaints 2007, Section(s): Recommendations.", ["ACOEM_ELBOW"]),
    ("Decision based on MTUS Forearm, Wrist, and Hand Complaints 2004, Section(s): Special Studies.", ["ACOEM_WRIST_HAND"]),
    ("Decision based on MTUS Low Back Complaints 2004, Section(s): Physical Methods.", ["ACOEM_LOW_BACK"]),
    ("Decision based on MTUS Knee Complaints 2004, Section(s): Initial Care.", ["ACOEM_KNEE"]),
    ("Decision based on MTUS Ankle and Foot Complaints 2004, Section(s): Summary.", ["ACOEM_ANKLE_FOOT"]),
    ("Decision based on MTUS Stress Related Conditions 2004, Section(s): Summary.", ["ACOEM_STRESS"]),
    (OUTSIDE + "Decision based on Non-MTUS Citation Official Disability Guidelines (ODG) Low Back Chapter, Heat therapy.", ["ODG", "OUTSIDE_MTUS"]),
    ("Decision based on MTUS Shoulder Complaints 2004, Section(s): Summary. Decision based on Non-MTUS Citation ACOEM "
     "Occupational Medicine Practice Guidelines, 3rd ed., Shoulder Disorders, pg. 64.", ["ACOEM_3RD", "ACOEM_SHOULDER"]),
    (OUTSIDE + "Decision based on Non-MTUS Citation A synthetic journal article on cold therapy, J Test Med 2015.", ["OTHER_CITATION", "OUTSIDE_MTUS"]),
    ("The Expert Reviewer did not cite any medical evidence for its decision.", ["NO_CITATION"]),
    ("The Expert Reviewer did not base their decision on the MTUS. Decision based on Non-MTUS Citation Official "
     "Disability Guidelines (ODG), Mental Illness and Stress", ["ODG", "OUTSIDE_MTUS"]),
    (OUTSIDE + "Decision based on Non-MTUS Citation Official Disability Guidelines (ODG) Knee/DME and Other Medical "
     "Treatment Guidelines a payer policy on durable equipment.", ["ODG", "OTHER_CITATION", "OUTSIDE_MTUS"]),
    ("Decision based on MTUS Neck and Upper Back Complaints 2004, Section(s): Special Studies, and Chronic Pain Medical "
     "Treatment 2016, Section(s): Electrodiagnostic testing (EMG/NCS).", ["ACOEM_NECK", "MTUS_CHRONIC_PAIN"]),
    ("The Expert Reviewer based his/her decision on the ACOEM Practice Guidelines, 2nd Edition (2004), Chapter 12, "
     "Low Back Complaints, part of the MTUS.", ["ACOEM_LOW_BACK"]),
    ("", []),
]  # fmt: skip


def test_label_ids_are_exactly_the_evaluation_ids():
    assert LABELS == EXPECTED_LABELS
    assert TAXONOMY_VERSION >= 1 and load_taxonomy().to_dict()["labels"] == list(EXPECTED_LABELS)


@pytest.mark.parametrize(("citation", "expected"), CASES)
def test_citation_maps_to_labels(citation, expected):
    assert guideline_labels(citation) == expected


def test_every_label_is_covered_by_a_case():
    covered = {label for _, labels in CASES for label in labels}
    assert covered == set(EXPECTED_LABELS)


def test_odg_chapter_words_never_count_as_mtus_chapters():
    text = OUTSIDE + "Decision based on Non-MTUS Citation Official Disability Guidelines (ODG) Shoulder Chapter, Continuous-flow cryotherapy."
    assert "ACOEM_SHOULDER" not in guideline_labels(text)
    assert odg_chapters(text) == ["Shoulder"]


def test_odg_chapter_secondary_field():
    text = (
        "Decision based on MTUS Chronic Pain Medical Treatment 2016. Decision based on Non-MTUS Citation Official "
        "Disability Guidelines (ODG) Forearm, Wrist and Hand, Physical Therapy."
    )
    assert odg_chapters(text) == ["Forearm, Wrist and Hand"]
    assert odg_chapters("Decision based on MTUS Knee Complaints 2004.") == []


def test_split_citation_separates_sources():
    mtus, sources = split_citation(CASES[18][0])
    assert "MTUS Guidelines" in mtus
    assert len(sources) == 2 and sources[0].startswith("Official Disability Guidelines")
