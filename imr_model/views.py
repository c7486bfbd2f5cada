"""Text views of an item record and the verdict-masking rule.

Views (`text_view(record, view)`):

* ``rationale``: the decision rationale as written. The verdict is in the text, so this view leaks the label.
* ``rationale_masked``: the rationale with every verdict sentence replaced by ``[MASK]`` (a run of
  adjacent masked sentences becomes one token, so the mask count does not hint at the outcome).
* ``forecast``: ``Request: <request>`` and ``Case summary: <summary>`` only; nothing the reviewer wrote.

Masking rule (`mask_conclusions`). The text is split into sentences at ``.``, ``!`` or ``?`` followed
by whitespace and an upper-case letter, digit, quote or bracket, except after common abbreviations
(e.g., i.e., Dr., vs., No., ...) and single-letter initials. A sentence is a verdict and is masked when

1. it has a *strong* verdict term: "medically (un)necessary", "medical necessity", "necessity",
   "upheld"/"uphold", "overturn(ed)", or "(not) (un)necessary" unless preceded by "if"/"when"/"as"
   or followed by "to"/"if"/"when"/"unless"/"in order" (those state a general condition); or
2. it has a *soft* verdict predicate, i.e. a form of be/remain/appear (up to two words between)
   before warranted / indicated / appropriate / recommended / supported / reasonable / justified /
   established / approved / certified / non-certified / denied / substantiated, or "criteria ...
   (are|is|has|have been) met", or do/does/did/would/can(not) (not) support/recommend/warrant/justify,
   or "support(s) the/this request"; AND it refers to this case: "this case/request/patient/claimant/
   injured worker", "the request(ed)", "currently requested", "at this time", or it opens with a
   conclusion connector (Therefore, Thus, Hence, As such, Consequently, Accordingly, Given/Based on the
   above, In summary/conclusion); or it names "the patient/claimant/injured worker/employee" and is not
   a conditional statement (no if/when/unless/provided, "for/in patients", "patients who/with").

General guideline statements such as "Continued use is supported when the injured worker has returned
to work." or "TENS is not recommended as a primary treatment modality." therefore stay unmasked.
On the 258 real items of the shared DWC sample this masks 437 sentences; every item but one gets a
mask, and no masked text still contains "medically necessary", "upheld" or "overturn".
"""

from __future__ import annotations

import re
from typing import Mapping

VIEWS = ("rationale", "rationale_masked", "forecast")
MASK_TOKEN = "[MASK]"

_ABBREV = {"e.g", "i.e", "dr", "mr", "mrs", "ms", "vs", "no", "nos", "approx", "etc", "al", "fig", "pg", "pp", "ed",
           "st", "jr", "inc", "dept", "u.s", "min", "max", "hr", "hrs"}  # fmt: skip
_BOUNDARY = re.compile(r"[.!?][\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9\[])")
_STRONG = re.compile(
    r"\bmedical(?:ly)?\s+(?:un)?necess|\bnecessity\b"
    r"|(?<!\bif\s)(?<!\bwhen\s)(?<!\bas\s)\b(?:not\s+(?:\w+\s+)?)?(?:un)?necessary\b"
    r"(?!\s+(?:to|if|when|unless|in\s+order)\b)"
    r"|\bupheld\b|\buphold(?:s|ing)?\b|\boverturn(?:ed|s|ing)?\b",
    re.I,
)
_SOFT_TERMS = (
    r"(?:warranted|indicated|appropriate|recommended|supported|reasonable|justified|established|approved"
    r"|certified|non-?certified|denied|substantiated)"
)
_SOFT = re.compile(
    rf"\b(?:is|are|was|were|be|been|being|remains?|appears?|seems?)\s+(?:[\w-]+\s+){{0,2}}?{_SOFT_TERMS}\b"
    r"|\bcriteria\b(?:\s+[\w-]+){0,6}?\s+(?:is|are|has|have|had)\s+(?:not\s+)?(?:been\s+)?met\b"
    r"|\b(?:do|does|did|would|will|can|could|cannot)\s+(?:not\s+)?(?:support|recommend|warrant|justify)\b"
    r"|\bsupports?\s+(?:the|this)\s+request",
    re.I,
)
_THIS_CASE = re.compile(
    r"\bthis\s+(?:case|request|patient|claimant|injured\s+worker|individual|employee)\b|\bthe\s+request(?:ed)?\b"
    r"|\bcurrently\s+requested\b|\bat\s+this\s+time\b"
    r"|^\s*(?:therefore|thus|hence|as\s+such|consequently|accordingly|(?:given|based\s+on)\s+the\s+above"
    r"|in\s+(?:summary|conclusion))\b",
    re.I,
)
_PERSON = re.compile(r"\bthe\s+(?:patient|claimant|injured\s+worker|employee)\b", re.I)
_CONDITIONAL = re.compile(
    r"\b(?:if|when|whenever|unless|provided)\b|\b(?:for|in)\s+patients\b|\bpatients\s+(?:who|with)\b", re.I
)


def split_sentences(text: str) -> list[str]:
    """Split prose into sentences (see the module docstring for the rule)."""
    text = " ".join(text.split())
    out, start = [], 0
    for m in _BOUNDARY.finditer(text):
        space = text.rfind(" ", start, m.start())
        word = text[space + 1 : m.start()].lstrip("(\"'").lower()
        if word in _ABBREV or re.fullmatch(r"[a-z]", word):
            continue
        out.append(text[start : m.end()].strip())
        start = m.end()
    if text[start:].strip():
        out.append(text[start:].strip())
    return out


def is_verdict(sentence: str) -> bool:
    """True when the sentence states the conclusion (the masking rule of the module docstring)."""
    if _STRONG.search(sentence):
        return True
    if not _SOFT.search(sentence):
        return False
    if _THIS_CASE.search(sentence):
        return True
    return bool(_PERSON.search(sentence)) and not _CONDITIONAL.search(sentence)


def mask_conclusions(text: str) -> tuple[str, int]:
    """Replace verdict sentences by `MASK_TOKEN` (adjacent ones by a single token); return (text, n_masked)."""
    out: list[str] = []
    n = 0
    for sentence in split_sentences(text or ""):
        if is_verdict(sentence):
            n += 1
            if not out or out[-1] != MASK_TOKEN:
                out.append(MASK_TOKEN)
        else:
            out.append(sentence)
    return " ".join(out), n


def text_view(record: Mapping, view: str) -> str:
    """The model input text of one item record for `view` (one of `VIEWS`)."""
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; valid views: {list(VIEWS)}")
    if not isinstance(record, Mapping):
        raise TypeError(f"record must be a mapping (an item record dict), got {type(record).__name__}")
    if view == "rationale":
        return str(record.get("rationale") or "")
    if view == "rationale_masked":
        return mask_conclusions(str(record.get("rationale") or ""))[0]
    request, summary = str(record.get("request") or "").strip(), str(record.get("case_summary") or "").strip()
    return f"Request: {request}\nCase summary: {summary}" if summary else f"Request: {request}"
