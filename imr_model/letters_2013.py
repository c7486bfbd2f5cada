"""Items of 2013–2014 layout letters.

Those letters state each decision as a sentence, usually once in a numbered summary near the top
and again at the end of the item's section::

    1. MAXIMUS Federal Services, Inc. has determined the request for physical therapy 2x6 is not
       medically necessary and appropriate.
    ...
    1) Regarding the request for physical therapy 2x6:
       Medical Treatment Guideline Schedule (MTUS) Citation Used:
       The Claims Administrator based its decision on the MTUS ...
       The Expert Reviewer based his/her decision on the MTUS ...
       Rationale for the Decision:
       ...

Decisions: "is medically necessary and appropriate" → Overturned, "is not ..." → Upheld. Each
"Citation Used" section is one item's detail block; blocks pair with the distinct decisions in order.

Linear time on any input: decisions are searched in whitespace-collapsed text, and a request runs
at most `MAX_REQUEST_CHARS` characters and never across the next "has determined", so each
character is scanned by at most one attempt.
"""

from __future__ import annotations

import re

from imr_model.textsource import PAGE_BREAK
from imr_model.types import OVERTURNED, UPHELD, Item

_WS = re.compile(r"\s+")
MAX_REQUEST_CHARS = 1000  # the longest request in the reference letters is ~350 characters
MAX_DECISIONS = 100  # as letters.MAX_ITEMS: past this the text is not one letter (no block matching)
# Applied to text whose whitespace runs are single spaces (so each \s+ is one character).
DETERMINATION = re.compile(
    r"has\s+determined\s+(?:that\s+)?the\s+request(?:ed)?\s+(?:for\s+)?"
    rf"(?P<request>(?:(?!has\s+determined\s).){{1,{MAX_REQUEST_CHARS}}}?)\s+"
    r"(?:is|are|was|were)\s+(?P<neg>not\s+)?medically\s+necessary(?:\s+and\s+appropriate)?",
    re.I | re.S,
)
_CITATION = re.compile(r"(?:Medical\s+Treatment\s+Guideline\s+Schedule\s*\(MTUS\)\s*)?Citation\s+Used\s*:", re.I)
_CLAIMS = re.compile(r"The\s+Claims\s+Administrator\s+(?:based|did\s+not\s+base)", re.I)
_REVIEWER = re.compile(r"The\s+(?:Expert\s+)?Reviewer\s+(?:based|found|did\s+not\s+(?:base|cite))", re.I)
_RATIONALE = re.compile(r"Rationale\s+for\s+the\s+Decision\s*:", re.I)
_NEXT_HEADER = re.compile(r"^\s*\d{1,2}\s*[).]\s*Regarding\s+the\s+request", re.I)  # matched on stripped lines


def _norm(text: str) -> str:
    return _WS.sub(" ", text).strip()


def _decisions(text: str) -> list[tuple[str, str]]:
    """Distinct (request, decision) pairs in first-seen order."""
    seen: dict[str, tuple[str, str]] = {}
    for m in DETERMINATION.finditer(_WS.sub(" ", text)):
        request = _norm(m.group("request")).rstrip(" ,.:")
        decision = UPHELD if m.group("neg") else OVERTURNED
        seen.setdefault(request.lower(), (request, decision))
    return list(seen.values())


def _blocks(text: str) -> list[dict[str, str]]:
    starts = [m.start() for m in _CITATION.finditer(text)]
    blocks = []
    for n, s in enumerate(starts):
        end = starts[n + 1] if n + 1 < len(starts) else len(text)
        chunk = text[s:end]
        chunk = _CITATION.sub("", chunk, count=1)
        rat = _RATIONALE.search(chunk)
        cites, rationale = (chunk[: rat.start()], chunk[rat.end() :]) if rat else (chunk, "")
        rationale = _strip_next_header(rationale)
        rev = _REVIEWER.search(cites)
        claims = _CLAIMS.search(cites)
        claims_text = cites[claims.start() : rev.start() if rev and rev.start() > claims.start() else len(cites)] if claims else ""
        reviewer_text = cites[rev.start() :] if rev else ""
        blocks.append({"claims_admin_guideline": _norm(claims_text), "maximus_guideline": _norm(reviewer_text), "rationale": _norm(rationale)})
    return blocks


def _strip_next_header(rationale: str) -> str:
    """Drop the next item's "2) Regarding the request for X:" heading that trails a block."""
    lines = rationale.rstrip().split("\n")
    while lines and (not lines[-1].strip() or _NEXT_HEADER.match(lines[-1])):
        lines.pop()
    return "\n".join(lines)


def parse_items_2013(lines: list[str]) -> list[Item]:
    text = "\n".join(ln for ln in lines if ln != PAGE_BREAK)
    decisions = _decisions(text)
    if not decisions:
        return []
    if len(decisions) > MAX_DECISIONS:  # not a letter: pairing blocks would cost decisions × blocks
        return [Item(index=k + 1, request=r, decision=d) for k, (r, d) in enumerate(decisions)]
    blocks = _blocks(text)
    items = []
    for k, (request, decision) in enumerate(decisions):
        fields = blocks[k] if k < len(blocks) and len(blocks) == len(decisions) else _match_block(request, text, blocks)
        items.append(Item(index=k + 1, request=request, decision=decision, **fields))
    return items


def _match_block(request: str, text: str, blocks: list[dict[str, str]]) -> dict[str, str]:
    """When blocks and decisions don't pair one-to-one, pick the block whose rationale names the request."""
    key = request.lower()[:40]
    for block in blocks:
        if key and key in block["rationale"].lower():
            return block
    return {"claims_admin_guideline": "", "maximus_guideline": "", "rationale": ""}
