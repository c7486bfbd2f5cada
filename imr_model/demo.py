"""Seeded generator of synthetic IMR Final Determination Letters (2016+ layout) for demos, tests and benchmarks.

Every letter is marked synthetic twice: its first line is `SYNTHETIC_MARKER` and its case number starts
with ``CM99-``, a prefix that never occurs in real letters. All sentences are written for this module;
only the layout and the public guideline names follow the real letters.

Outcomes are drawn per item (about 11% Overturned). The rationale's last sentence states the verdict;
the supporting sentences before it, and one history sentence per item in the case summary, agree with
the outcome most of the time but not always, so the masked and forecast views keep a noisy signal.

Letter ``index`` under ``seed`` comes from its own RNG: letter 7 is the same whether 10 or 100,000
letters are generated, and a run can be split across processes.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace
from datetime import date, timedelta
from pathlib import Path
from typing import Iterator

from imr_model.demo_text import (
    ASSOCIATED,
    BOILERPLATE,
    FAMILIES,
    FAMILY_WEIGHTS,
    LICENSURES,
    MECHANISMS,
    PRIOR_CARE,
    REGIONS,
    SOFT_VERDICTS,
    SPECIALTIES,
    SUMMARY_LEAD,
    Family,
    Region,
)
from imr_model.types import OVERTURNED, UPHELD, Item, Letter

SYNTHETIC_MARKER = "SYNTHETIC DEMO LETTER - NOT A REAL CASE"
CASE_PREFIX = "CM99-"
WIDTH = 95  # characters per line, like the real letters' text layer
FORMATS = ("txt", "pdf")
OUT = "The Expert Reviewer based their decision on recommendation(s) outside of the MTUS Guidelines."
NO_CITATION = "{actor} did not cite any medical evidence for its decision."
ITEM_COUNT_WEIGHTS = (35, 25, 17, 12, 7, 4)  # 1..6 items per letter
_EVIDENCE_FRAMES = (
    "In this case, {f}.",
    "The submitted records indicate that {f}.",
    "Per the most recent progress report, {f}.",
    "Review of the medical records shows that {f}.",
)
_VERDICTS = (
    "Therefore, the request for {req} is {nec}.",
    "As such, the requested {req} is {nec}.",
    "Given the above, the request is {nec}.",
    "Based on the above, the request for {req} is {nec}.",
    "The request for {req} is therefore {nec}.",
    "Therefore, the request is {nec}.",
)
_ANCILLARY_UPHELD = (
    "Because the primary surgical procedure has not been found medically necessary, "
    "the associated service is also not medically necessary."
)
# P(supportive sentence | outcome): high but imperfect agreement keeps the views learnable, not trivial.
P_SUPPORT_RATIONALE = {OVERTURNED: 0.85, UPHELD: 0.15}
P_SUPPORT_SUMMARY = {OVERTURNED: 0.7, UPHELD: 0.2}
P_ASSOCIATED_OVERTURN = 0.6  # when the surgery itself was overturned
_DATE0 = date(2016, 1, 1).toordinal()
_WRAP: dict[int, re.Pattern] = {}


@dataclass(frozen=True)
class DemoLetter:
    """A synthetic letter: its text plus the ground truth a perfect parser would recover."""

    name: str  # also the case number, e.g. CM99-0000001
    text: str
    items: tuple[Item, ...]
    case_summary: str
    date_assigned: str  # ISO dates
    date_of_injury: str
    decision_date: str
    ur_denial_date: str
    priority: str
    reviewer_licensure: str
    reviewer_specialty: str

    def to_letter(self, source: str = "<demo>") -> Letter:
        """The ground truth as the shared `Letter` record (what `letters.parse_text` should return)."""
        return Letter(
            letter_id=self.name,
            source=source,
            layout="2016",
            items=self.items,
            case_number=self.name,
            date_assigned=self.date_assigned,
            date_of_injury=self.date_of_injury,
            decision_date=self.decision_date,
            ur_denial_date=self.ur_denial_date,
            priority=self.priority,
            reviewer_licensure=self.reviewer_licensure,
            reviewer_specialty=self.reviewer_specialty,
            case_summary=self.case_summary,
        )

    def item_records(self, source: str = "<demo>") -> list[dict]:
        """Ground-truth item records, the same schema `imr parse` writes."""
        return self.to_letter(source).item_records()


# --------------------------------------------------------------------------- small helpers


def wrap(text: str, width: int = WIDTH) -> list[str]:
    """Greedy word wrap at `width` characters: one C-level regex pass, ~10x faster than `textwrap`."""
    pattern = _WRAP.get(width) or _WRAP.setdefault(width, re.compile(rf"\S.{{0,{width - 1}}}(?= |$)|\S{{{width}}}"))
    return pattern.findall(" ".join(text.split()))


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _and(words: list[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def _us(iso: str) -> str:
    return f"{iso[5:7]}/{iso[8:10]}/{iso[:4]}"


def _short(d: date) -> str:
    return f"{d.month}-{d.day}-{d.year % 100:02d}"


def _fill(template: str, region: Region, side: str) -> str:
    if "{" not in template:
        return template
    part = f"{side} {region.site}" if region.sided else region.site
    return template.format(
        part=part, Part=_cap(part), side=side, Side=_cap(side), site=region.site, level=region.level,
        limbs=region.limbs, mtus=region.mtus, odg=region.odg, acoem=region.acoem, post=region.post, OUT=OUT,
    )


def _usable(template: str, region: Region) -> bool:
    """`{level}` templates need a spine region, `{Side}`/`{side}` ones a sided joint."""
    if "{level}" in template:
        return region.level != ""
    if "{side}" in template or "{Side}" in template:
        return region.sided
    return True


def _pick(rng: random.Random, templates: tuple[str, ...], region: Region, side: str) -> str:
    options = [t for t in templates if _usable(t, region)] or list(templates[:1])
    return _fill(rng.choice(options), region, side)


# --------------------------------------------------------------------------- items


@dataclass
class _Draft:
    family: Family
    region: Region
    side: str
    request: str
    decision: str
    after_upheld_surgery: bool = False  # an associated service of a surgery found not necessary


def _draft_items(rng: random.Random, regions: list[Region], side: str) -> list[_Draft]:
    n_items = rng.choices(range(1, 7), weights=ITEM_COUNT_WEIGHTS)[0]
    keys = list(FAMILY_WEIGHTS)
    drafts: list[_Draft] = []
    while len(drafts) < n_items:
        fam = FAMILIES[rng.choices(keys, weights=list(FAMILY_WEIGHTS.values()))[0]]
        region = REGIONS["psych"] if fam.key == "psych" else rng.choice(regions)
        requests = fam.region_requests.get(region.key, fam.requests)
        request = _pick(rng, requests, region, side)
        if any(d.request == request for d in drafts):
            continue
        decision = OVERTURNED if rng.random() < fam.p_over else UPHELD
        drafts.append(_Draft(fam, region, side, request, decision))
        if fam.key == "surgery":
            for assoc in rng.sample(list(ASSOCIATED.values()), k=rng.randint(0, 3)):
                if len(drafts) >= 6:
                    break
                over = decision == OVERTURNED and rng.random() < P_ASSOCIATED_OVERTURN
                request = _pick(rng, assoc.requests, region, side)
                drafts.append(_Draft(assoc, region, side, request, OVERTURNED if over else UPHELD, decision == UPHELD))
    return drafts


def _citation(rng: random.Random, fam: Family, region: Region, side: str, claims_admin: bool) -> str:
    actor = "The Claims Administrator" if claims_admin else "The Expert Reviewer"
    if rng.random() < (0.15 if claims_admin else 0.03):
        return NO_CITATION.format(actor=actor)
    text = _pick(rng, fam.cites, region, side)
    return text.replace("The Expert Reviewer", actor)


def _rationale(rng: random.Random, d: _Draft) -> str:
    fam, over = d.family, d.decision == OVERTURNED
    guides = rng.sample(fam.guide, k=min(len(fam.guide), rng.randint(1, 2)))
    sents = [_fill(g, d.region, d.side) for g in guides]
    if d.after_upheld_surgery:
        sents.append(_ANCILLARY_UPHELD)
        return " ".join(sents)
    used: set[str] = set()
    for _ in range(rng.randint(1, 3)):
        pool = [c for c in (fam.pos if rng.random() < P_SUPPORT_RATIONALE[d.decision] else fam.neg) if c not in used]
        if pool:
            clause = rng.choice(pool)
            used.add(clause)
            sents.append(rng.choice(_EVIDENCE_FRAMES).format(f=_fill(clause, d.region, d.side)))
    if rng.random() < 0.25:
        sents.append(rng.choice(SOFT_VERDICTS[d.decision]))
    nec = "medically necessary" if over else "not medically necessary"
    sents.append(_cap(rng.choice(_VERDICTS).format(req=d.request, nec=nec)))
    return " ".join(sents)


def _summary(rng: random.Random, drafts: list[_Draft], regions: list[Region], doi: date, ur: date) -> str:
    age, who = rng.randint(22, 68), rng.choice(("male", "female"))
    dx = [_fill(rng.choice(r.dx), r, drafts[0].side) for r in regions]
    visit = ur - timedelta(days=rng.randint(5, 40))
    sents = [
        f"The injured worker is a {age} year old {who} who sustained an industrial injury on {_short(doi)}.",
        f"The injury occurred while {rng.choice(MECHANISMS)}.",
        f"The injured worker was being treated for {', '.join(dx)}.",
        f"On {_short(visit)}, the injured worker reported {' and '.join(r.site + ' pain' for r in regions)} "
        f"rated {rng.randint(3, 9)} out of 10.",
        f"Objective findings included {'; '.join(_fill(rng.choice(r.exam), r, drafts[0].side) for r in regions)}.",
        f"Treatment to date has included {_and(rng.sample(PRIOR_CARE, k=rng.randint(2, 4)))}.",
    ]
    for d in drafts:
        if d.family.key.startswith("assoc") or rng.random() < 0.15:
            continue
        pool = d.family.hist_pos if rng.random() < P_SUPPORT_SUMMARY[d.decision] else d.family.hist_neg
        sents.append(f"Progress notes indicated that {_fill(rng.choice(pool), d.region, d.side)}.")
    requests = [d.request for d in drafts]
    sents.append(f"The treatment plan included {', '.join(requests)}.")
    sents.append(f"On {_short(ur)}, utilization review non-certified the requests for {', '.join(requests)}.")
    return " ".join(sents)


# --------------------------------------------------------------------------- letters


def _letter_rng(seed: int, index: int) -> random.Random:
    return random.Random(f"imr-demo:{seed}:{index}")  # str seeds hash with SHA-512: stable across runs


def generate_letter(rng: random.Random, index: int) -> DemoLetter:
    """Generate letter number `index` (0-based) from `rng`; same RNG state → same letter."""
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    name = f"{CASE_PREFIX}{index + 1:07d}"
    regions = rng.sample(list(r for k, r in REGIONS.items() if k != "psych"), k=rng.choice((1, 1, 2)))
    side = rng.choice(("right", "left"))
    ur = date.fromordinal(_DATE0 + rng.randint(0, 700))
    assigned = ur + timedelta(days=rng.randint(3, 10))
    decided = assigned + timedelta(days=rng.randint(14, 35))
    doi = ur - timedelta(days=rng.randint(60, 3000))
    priority = "Expedited" if rng.random() < 0.05 else "Standard"
    licensure, specialty = rng.choice(LICENSURES), rng.choice(SPECIALTIES)
    drafts = _draft_items(rng, regions, side)
    items = tuple(
        Item(
            index=i + 1,
            request=d.request,
            decision=d.decision,
            claims_admin_guideline=_citation(rng, d.family, d.region, d.side, claims_admin=True),
            maximus_guideline=_citation(rng, d.family, d.region, d.side, claims_admin=False),
            rationale=_rationale(rng, d),
        )
        for i, d in enumerate(drafts)
    )
    summary = _summary(rng, drafts, regions, doi, ur)
    letter = DemoLetter(
        name=name, text="", items=items, case_summary=summary, date_assigned=assigned.isoformat(),
        date_of_injury=doi.isoformat(), decision_date=decided.isoformat(), ur_denial_date=ur.isoformat(),
        priority=priority, reviewer_licensure=licensure, reviewer_specialty=specialty,
    )  # fmt: skip
    return replace(letter, text=_render(rng, letter))


def _render(rng: random.Random, letter: DemoLetter) -> str:
    """The letter text in the 2016+ layout; blank lines mark the paragraph breaks a PDF shows as gaps."""
    head = [
        SYNTHETIC_MARKER,
        f"Case Number: {letter.name}",
        f"Date Assigned: {_us(letter.date_assigned)} Date of Injury: {_us(letter.date_of_injury)}",
        f"Decision Date: {_us(letter.decision_date)} UR Denial Date: {_us(letter.ur_denial_date)}",
        f"Priority: {letter.priority} Application",
        "Received:",
        _us(letter.ur_denial_date),
        "",
        "HOW THE IMR FINAL DETERMINATION WAS MADE",
        *wrap(BOILERPLATE),
        "The Expert Reviewer has the following credentials:",
        f"State(s) of Licensure: {letter.reviewer_licensure}",
        f"Certification(s)/Specialty: {letter.reviewer_specialty}",
        "",
        "CLINICAL CASE SUMMARY",
        *wrap(SUMMARY_LEAD),
        *wrap(letter.case_summary),
        "",
        "IMR ISSUES, DECISIONS AND RATIONALES",
        "The Final Determination was based on decisions for the disputed items/services set forth below:",
    ]
    body = [line for item in letter.items for line in _item_lines(rng, item)]
    return "\n".join(head + body) + "\n"


def _item_lines(rng: random.Random, item: Item) -> list[str]:
    # Sometimes the decision word sits on its own line under a title ending in ':', as in some real letters.
    if rng.random() < 0.08:
        title = wrap(f"{item.request}:") + [item.decision]
    else:
        title = wrap(f"{item.request}: {item.decision}")
    return [
        "",
        *title,
        *wrap(f"Claims Administrator guideline: {item.claims_admin_guideline}"),
        *wrap(f"MAXIMUS guideline: {item.maximus_guideline}"),
        *wrap(f"Decision rationale: {item.rationale}"),
    ]


def iter_letters(n: int, seed: int = 0, start: int = 0) -> Iterator[DemoLetter]:
    """Yield letters `start .. start+n-1` for `seed` lazily (constant memory for big benchmarks)."""
    if n < 0 or start < 0:
        raise ValueError(f"n and start must be >= 0, got n={n}, start={start}")
    for index in range(start, start + n):
        yield generate_letter(_letter_rng(seed, index), index)


def generate_letters(n: int, seed: int = 0) -> list[DemoLetter]:
    """`n` synthetic letters; the same `seed` always gives identical letters."""
    return list(iter_letters(n, seed))


# --------------------------------------------------------------------------- files


def to_latin1(text: str) -> str:
    """Map text onto latin-1 (the PDF core fonts' charset): typographic punctuation → ASCII, rest → '?'."""
    table = {"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-", "\u2014": "-", "\u2026": "..."}
    text = "".join(table.get(ch, ch) for ch in text)
    return text.encode("latin-1", "replace").decode("latin-1")


def render_pdf(text: str, path: str | Path) -> None:
    """Write `text` as a PDF with a real text layer (fpdf2, core Helvetica); blank lines become paragraph gaps."""
    from fpdf import FPDF

    pdf = FPDF(format="letter")
    pdf.set_auto_page_break(auto=True, margin=15)
    pdf.add_page()
    pdf.set_font("Helvetica", size=10)
    for line in to_latin1(text).split("\n"):
        if line.strip():
            pdf.multi_cell(0, 5, line, new_x="LMARGIN", new_y="NEXT")
        else:
            pdf.ln(5)  # a 2x line gap: the extractor turns it back into a blank line
    pdf.output(str(path))


def write_demo_letters(out_dir: str | Path, n: int, seed: int = 0, fmt: str = "txt") -> list[Path]:
    """Write `n` letters as `<case number>.txt` or `.pdf` under `out_dir`; returns the paths in order."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {list(FORMATS)}, got {fmt!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for letter in iter_letters(n, seed):
        path = out / f"{letter.name}.{fmt}"
        if fmt == "txt":
            path.write_text(letter.text, encoding="utf-8")
        else:
            render_pdf(letter.text, path)
        paths.append(path)
    return paths
