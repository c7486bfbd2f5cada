"""Guideline taxonomy: map a reviewer's citation text to label ids.

The mapping lives in `resources/taxonomy.yaml` (versioned data, not code). A citation reads like
"Decision based on MTUS <chapter> <year>, Section(s): ... Decision based on Non-MTUS Citation
<source> and Other Medical Treatment Guidelines <source>". It is split into the MTUS part (before
the first "Non-MTUS Citation") and the non-MTUS sources; MTUS chapter patterns only count in the
MTUS part, so "ODG Low Back Chapter" never yields ACOEM_LOW_BACK. Each non-MTUS source that is
neither ODG nor ACOEM 3rd edition counts as OTHER_CITATION.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import yaml

_NON_MTUS = re.compile(r"Non-?\s?MTUS\s+Citations?\s*:?", re.I)
_OTHER_GUIDELINES = re.compile(r"\band\s+Other\s+Medical\s+Treatment\s+Guidelines?\b|\bOther\s+Medical\s+Treatment\s+Guidelines?\b", re.I)
_WS = re.compile(r"\s+")


@dataclass(frozen=True)
class Taxonomy:
    version: int
    labels: tuple[str, ...]
    descriptions: dict[str, str]
    mtus: dict[str, tuple[re.Pattern, ...]]
    non_mtus: dict[str, tuple[re.Pattern, ...]]
    anywhere: dict[str, tuple[re.Pattern, ...]]
    odg_chapters: tuple[tuple[str, re.Pattern], ...]
    decision_basis: tuple[str, ...] = ()  # labels naming what a decision was based on: one per item, rarely more

    def to_dict(self) -> dict:
        """JSON-ready description stored inside model directories."""
        return {"version": self.version, "labels": list(self.labels), "descriptions": self.descriptions}


def _compile(patterns: list[str] | None) -> tuple[re.Pattern, ...]:
    return tuple(re.compile(p, re.I) for p in patterns or ())


@lru_cache(maxsize=1)
def load_taxonomy() -> Taxonomy:
    raw = yaml.safe_load(resources.files("imr_model").joinpath("resources/taxonomy.yaml").read_text("utf-8"))
    labels = tuple(entry["id"] for entry in raw["labels"])
    return Taxonomy(
        version=int(raw["version"]),
        labels=labels,
        descriptions={e["id"]: e.get("description", "") for e in raw["labels"]},
        mtus={e["id"]: _compile(e.get("mtus_chapters")) for e in raw["labels"]},
        non_mtus={e["id"]: _compile(e.get("non_mtus")) for e in raw["labels"]},
        anywhere={e["id"]: _compile(e.get("anywhere")) for e in raw["labels"]},
        odg_chapters=tuple((c["chapter"], re.compile(c["pattern"], re.I)) for c in raw["odg_chapters"]),
        decision_basis=_basis(raw.get("decision_basis") or [], labels),
    )


def _basis(names: list[str], labels: tuple[str, ...]) -> tuple[str, ...]:
    unknown = [n for n in names if n not in labels]
    if unknown:
        raise ValueError(f"taxonomy.yaml decision_basis names unknown labels {unknown}; labels are {list(labels)}")
    return tuple(names)


def decision_basis_columns(label_names) -> list[int]:
    """Column indices of the decision-basis labels (`decision_basis` in taxonomy.yaml) among `label_names`."""
    basis = set(load_taxonomy().decision_basis)
    return [j for j, name in enumerate(label_names) if name in basis]


# `load_taxonomy().labels` and `.version`, read on first use (module `__getattr__`), not at import:
# `imr_model.types` imports this module, so `import imr_model` (the CLI, every parse worker) would
# otherwise parse taxonomy.yaml and compile its patterns at start-up.
LABELS: tuple[str, ...]
TAXONOMY_VERSION: int


def __getattr__(name: str):
    if name == "LABELS":
        return load_taxonomy().labels
    if name == "TAXONOMY_VERSION":
        return load_taxonomy().version
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def split_citation(text: str) -> tuple[str, list[str]]:
    """(MTUS part, [non-MTUS sources]) of a citation text."""
    text = _WS.sub(" ", text or "").strip()
    parts = _NON_MTUS.split(text)
    mtus_part, rest = parts[0], parts[1:]
    sources: list[str] = []
    for chunk in rest:
        # "Decision based on" that introduces the next Non-MTUS citation is not a source of its own.
        chunk = re.sub(r"\bDecision\s+based\s+on\s*$", "", chunk.strip(), flags=re.I).strip()
        for piece in _OTHER_GUIDELINES.split(chunk):
            piece = piece.strip(" .,;")
            if piece:
                sources.append(piece)
    return mtus_part, sources


def _matches(patterns: tuple[re.Pattern, ...], text: str) -> bool:
    return any(p.search(text) for p in patterns)


def guideline_labels(text: str) -> list[str]:
    """Sorted label ids cited by a guideline text (MAXIMUS or claims administrator wording)."""
    tax = load_taxonomy()
    mtus_part, sources = split_citation(text)
    full = _WS.sub(" ", text or "")
    found: set[str] = set()
    for label in tax.labels:
        if _matches(tax.mtus[label], mtus_part) or _matches(tax.anywhere[label], full):
            found.add(label)
        elif any(_matches(tax.non_mtus[label], s) for s in sources):
            found.add(label)
    for source in sources:
        is_odg = _matches(tax.anywhere["ODG"], source)
        is_acoem3 = _matches(tax.non_mtus["ACOEM_3RD"], source)
        if not (is_odg or is_acoem3):
            found.add("OTHER_CITATION")
    return sorted(found)


def odg_chapters(text: str) -> list[str]:
    """ODG chapter names cited (secondary field), in citation order, de-duplicated."""
    tax = load_taxonomy()
    _, sources = split_citation(text)
    odg_sources = [s for s in sources if _matches(tax.anywhere["ODG"], s)]
    if not odg_sources and _matches(tax.anywhere["ODG"], text or ""):
        odg_sources = [m.group(0) for m in re.finditer(r"(?:ODG|Official Disability Guidelines?)[^.;]{0,80}", text, re.I)]
    chapters: list[str] = []
    for src in odg_sources:
        src = re.sub(r"Official\s+Disability\s+Guidelines?\s*(?:\(ODG\))?|\bODG\b", " ", src, flags=re.I)
        for name, pattern in tax.odg_chapters:
            if pattern.search(src):
                if name not in chapters:
                    chapters.append(name)
                break
    return chapters
