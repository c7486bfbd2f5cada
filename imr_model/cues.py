"""Citation cues: yes/no features of a text that point at the guideline its reviewer cited.

The guideline labels come from the reviewer's citation, which no text view contains; the rationale
names its sources in passing ("per ACOEM, an MRI of the lumbar spine ..."). Those few decisive words
are diluted in a mean over sentence vectors and each label has a handful of training examples, so
the guideline head also gets a linear term on these cues (`ModelConfig.guideline_cues`):

* ``mention:<source>``: the text names ACOEM, MTUS, ODG, chronic pain, an opioid, ... ;
* ``body:<region>``: the text is about the low back, neck, shoulder, ... ;
* ``acoem_x:<region>``: both ACOEM and that region (the ACOEM chapter labels are exactly this);
* ``no_source``, ``odg_not_mtus``, ``mtus_not_odg``, ``short_text``;
* ``taxonomy:<label>``: the citation matcher of `imr_model.taxonomy` fires on the text.

*Evidence cues* (`ModelConfig.outcome_cues`) are the outcome head's counterpart: log(1 + matches) of
phrases in which a reviewer weighs the record ("there is no documentation of ...", "failed", "however")
and log(words), for the view whose verdict sentences are masked (`evidence_matrix`).

Patterns are data (`resources/cues.yaml`, versioned). On the shared letters (grouped 5-fold CV,
TF-IDF + logistic regression on the rationale) adding them moved guideline micro-F1 from .761 to
.805. Models store the cue names and version they were trained with, and refuse to load against other cues.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Sequence

import numpy as np
import yaml

from imr_model.taxonomy import LABELS, guideline_labels

SHORT_TEXT_CHARS = 40


@dataclass(frozen=True)
class Cues:
    version: int
    mentions: dict[str, re.Pattern]
    body_parts: dict[str, re.Pattern]
    label_cues: dict[str, list[str]]
    evidence_version: int = 0
    evidence: dict[str, re.Pattern] = field(default_factory=dict)

    @property
    def evidence_names(self) -> list[str]:
        return [f"evidence:{k}" for k in self.evidence] + ["log_words"]

    def evidence_spans(self, text: str) -> list[list[tuple[int, int]]]:
        return [[m.span() for m in p.finditer(text)] for p in self.evidence.values()]

    def evidence_features(self, text: str) -> list[float]:
        counts = [len(spans) for spans in self.evidence_spans(text)]
        return [math.log1p(c) for c in counts] + [math.log(max(len(text.split()), 1))]

    @property
    def names(self) -> list[str]:
        return (
            [f"mention:{k}" for k in self.mentions]
            + [f"body:{k}" for k in self.body_parts]
            + [f"acoem_x:{k}" for k in self.body_parts]
            + ["no_source", "odg_not_mtus", "mtus_not_odg", "short_text"]
            + [f"taxonomy:{label}" for label in LABELS]
        )

    def features(self, text: str) -> list[float]:
        m = {k: bool(p.search(text)) for k, p in self.mentions.items()}
        b = {k: bool(p.search(text)) for k, p in self.body_parts.items()}
        acoem, odg, mtus = m.get("acoem", False), m.get("odg", False), m.get("mtus", False)
        found = set(guideline_labels(text))
        row = (
            list(m.values())
            + list(b.values())
            + [acoem and v for v in b.values()]
            + [not any(m.values()), odg and not mtus, mtus and not odg, len(text.strip()) < SHORT_TEXT_CHARS]
            + [label in found for label in LABELS]
        )
        return [float(v) for v in row]


@lru_cache(maxsize=1)
def load_cues() -> Cues:
    raw = yaml.safe_load(resources.files("imr_model").joinpath("resources/cues.yaml").read_text("utf-8"))

    def compile_all(section: str) -> dict[str, re.Pattern]:
        return {name: re.compile(pattern, re.I) for name, pattern in (raw.get(section) or {}).items()}

    cues = Cues(version=int(raw["version"]), mentions=compile_all("mentions"), body_parts=compile_all("body_parts"),
                label_cues={k: list(v) for k, v in (raw.get("label_cues") or {}).items()},
                evidence_version=int(raw.get("evidence_version", 0)), evidence=compile_all("evidence"))  # fmt: skip
    unknown = [f"{label}: {c}" for label, cs in cues.label_cues.items() for c in cs if c not in cues.names]
    unknown += [label for label in cues.label_cues if label not in LABELS]
    if unknown:
        raise ValueError(f"resources/cues.yaml label_cues names unknown labels or cues: {', '.join(unknown)}")
    return cues


def cue_names() -> list[str]:
    """Names of the cue columns, in order (a model directory records them with `cue_version`)."""
    return load_cues().names


def cue_version() -> int:
    """Version of `resources/cues.yaml`: bumped whenever a pattern changes, even if no name does."""
    return load_cues().version


def label_cue_columns(labels: Sequence[str]) -> list[list[int]]:
    """For each label, the cue columns that name it: its `taxonomy:<label>` cue and its `label_cues` aliases."""
    cues = load_cues()
    index = {name: i for i, name in enumerate(cues.names)}
    return [[index[n] for n in [f"taxonomy:{label}", *cues.label_cues.get(label, [])] if n in index] for label in labels]


def cue_matrix(texts: Sequence[str]) -> np.ndarray:
    """(N, C) float32 matrix of 0/1 cues for `texts` (columns: `Cues.names`)."""
    cues = load_cues()
    if not texts:
        return np.zeros((0, len(cues.names)), dtype=np.float32)
    return np.asarray([cues.features(t) for t in texts], dtype=np.float32)


def evidence_names() -> list[str]:
    """Names of the evidence cue columns, in order (a model directory records them with `evidence_version`)."""
    return load_cues().evidence_names


def evidence_version() -> int:
    """Version of the evidence patterns in `resources/cues.yaml`: bumped whenever one changes."""
    return load_cues().evidence_version


def evidence_matrix(texts: Sequence[str]) -> np.ndarray:
    """(N, E) float32 matrix of evidence cues for `texts`: log(1 + matches) per pattern, then log(words)."""
    cues = load_cues()
    if not texts:
        return np.zeros((0, len(cues.evidence_names)), dtype=np.float32)
    return np.asarray([cues.evidence_features(t) for t in texts], dtype=np.float32)


def evidence_spans(text: str) -> list[list[tuple[int, int]]]:
    """Character spans of each evidence pattern's matches in `text`, in `evidence_names` order (without `log_words`)."""
    return load_cues().evidence_spans(text)
