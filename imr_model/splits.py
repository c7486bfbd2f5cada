"""Labelled items as the model sees them: `Split` (texts in one view, outcome and guideline labels, letters).

`records_to_split` turns item records (`imr_model.dataset`) into a Split in a text view
(`imr_model.views`); training, cross-validation and evaluation all work on Splits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from imr_model.types import OVERTURNED
from imr_model.views import text_view


@dataclass
class Split:
    """Texts in the model's view with their labels: y (N,) 1 = Overturned, Y (N, L) guideline 0/1."""

    texts: list[str]
    y: np.ndarray
    Y: np.ndarray
    groups: list[str] | None = None  # letter of each item (grouped inner cross-validation)

    def __post_init__(self) -> None:
        self.y = np.asarray(self.y).astype(int)
        self.Y = np.asarray(self.Y).astype(int)
        if self.Y.ndim != 2:
            raise ValueError(f"Y must be a 2-D (items, labels) matrix, got shape {self.Y.shape}")
        if not len(self.y) == len(self.Y) == len(self.texts):
            raise ValueError(f"{len(self.texts)} texts, {len(self.y)} outcome labels and {len(self.Y)} guideline rows")
        if self.groups is not None and len(self.groups) != len(self.texts):
            raise ValueError(f"{len(self.texts)} texts but {len(self.groups)} groups")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def group_ids(self) -> np.ndarray:
        """The letter of each item for grouped folds; each item its own group when letters are unknown."""
        return np.asarray(self.groups if self.groups is not None else np.arange(len(self)))


def concat_splits(a: Split, b: Split) -> Split:
    """The items of `a` then those of `b` (groups kept when both have them)."""
    groups = a.groups + b.groups if a.groups is not None and b.groups is not None else None
    return Split(list(a.texts) + list(b.texts), np.concatenate([a.y, b.y]), np.concatenate([a.Y, b.Y]), groups=groups)


def label_matrix(records: Sequence[dict], label_names: Sequence[str]) -> np.ndarray:
    """(N, L) 0/1 guideline matrix in `label_names` order; unknown label ids are an error."""
    index = {name: j for j, name in enumerate(label_names)}
    Y = np.zeros((len(records), len(label_names)), dtype=int)
    for i, rec in enumerate(records):
        for label in rec.get("guideline_labels") or []:
            if label not in index:
                raise ValueError(f"item {i} has guideline label {label!r}, not in the taxonomy {list(label_names)}")
            Y[i, index[label]] = 1
    return Y


def records_to_split(records: Sequence[dict], view: str, label_names: Sequence[str]) -> Split:
    """Item records → a Split of model inputs in the given text view (`views.text_view`)."""
    return Split(
        texts=[text_view(r, view) for r in records],
        y=np.array([int(r.get("decision") == OVERTURNED) for r in records]),
        Y=label_matrix(records, label_names),
        groups=[str(r.get("letter_id") or i) for i, r in enumerate(records)],
    )
