"""Typed records shared by every pipeline stage: a parsed letter and its disputed items."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from imr_model.taxonomy import guideline_labels, odg_chapters

UPHELD = "Upheld"
OVERTURNED = "Overturned"
DECISIONS = (UPHELD, OVERTURNED)
REPLACEMENT_CHAR = "\ufffd"
_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(text: str) -> str:
    """Replace lone UTF-16 surrogates (which no UTF-8 encoder, tokenizer or writer accepts).

    Untrusted text reaches the package as Python strings that may hold them: JSON `"\\ud800"` escapes
    become U+FFFD; the `surrogateescape` code points U+DC80–U+DCFF, which is how Python spells an
    undecodable byte of a file name, become the byte's escape (`\\xff`), so two file names that differ
    only in undecodable bytes stay two names (and two keys of a resumable output). Every input
    boundary calls this once.
    """
    return _SURROGATE.sub(_replace_surrogate, text) if _SURROGATE.search(text) else text


def _replace_surrogate(m: re.Match) -> str:
    code = ord(m.group())
    return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else REPLACEMENT_CHAR


@dataclass(frozen=True)
class Item:
    """One disputed treatment item of a letter (the unit that carries a label)."""

    index: int  # 1-based, letter order
    request: str
    decision: str  # UPHELD or OVERTURNED
    claims_admin_guideline: str = ""
    maximus_guideline: str = ""
    rationale: str = ""


@dataclass(frozen=True)
class Letter:
    """A parsed IMR Final Determination Letter."""

    letter_id: str  # file stem, or a caller-given id for raw text
    source: str  # path as given, or "<text>"
    layout: str  # "2016" (header block), "2015" (plain text, no header), "2013" (MAXIMUS has determined ...)
    items: tuple[Item, ...]
    case_number: str | None = None
    date_assigned: str | None = None  # ISO yyyy-mm-dd
    date_of_injury: str | None = None
    decision_date: str | None = None
    ur_denial_date: str | None = None
    priority: str | None = None
    reviewer_licensure: str | None = None
    reviewer_specialty: str | None = None
    case_summary: str = ""
    warnings: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return asdict(self)

    def item_records(self) -> list[dict]:
        """One flat JSON-ready record per item: the schema of `imr parse` output and of datasets."""
        return [
            {
                "letter_id": clean_text(self.letter_id),  # file names may hold undecodable bytes (surrogates)
                "case_number": self.case_number,
                "item_index": it.index,
                "request": it.request,
                "decision": it.decision,
                "guideline_labels": guideline_labels(it.maximus_guideline),
                "odg_chapters": odg_chapters(it.maximus_guideline),
                "maximus_guideline": it.maximus_guideline,
                "claims_admin_guideline": it.claims_admin_guideline,
                "rationale": it.rationale,
                "case_summary": self.case_summary,
                "reviewer_specialty": self.reviewer_specialty,
                "decision_date": self.decision_date,
                "layout": self.layout,
                "source": clean_text(self.source),
            }
            for it in self.items
        ]


class LetterError(ValueError):
    """A file could not be read or parsed as an IMR letter. The message names the file, never its text."""

    def __init__(self, source: str, reason: str):
        self.source = source
        self.reason = reason
        super().__init__(f"{source}: {reason}")

    def __reduce__(self):
        # The default reduce re-calls __init__ with self.args (one formatted string): a LetterError
        # could not cross a process boundary, which broke `imr parse`'s process pool.
        return (type(self), (self.source, self.reason))
