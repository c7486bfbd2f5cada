"""A few fixed, synthetic item records shipped with the package (`resources/example_items.json`).

Production code that needs sample items (the MLflow input example, the ONNX int8 check) reads these
instead of running the demo generator (`imr_model.demo`, which is for tests, ``imr data demo`` and
the README's demo run). The items were generated once from the demo letters and are marked
synthetic in the file; they are never real letter text.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

RESOURCE = "example_items.json"


@lru_cache(maxsize=1)
def _load() -> dict:
    doc = json.loads((resources.files("imr_model") / "resources" / RESOURCE).read_text(encoding="utf-8"))
    if doc.get("synthetic") is not True:  # the file must say what it is
        raise ValueError(f"resources/{RESOURCE} is not marked synthetic")
    return doc


def example_records() -> list[dict]:
    """The synthetic example items (fresh dicts: letter_id, item_index, request, decision, rationale, case_summary)."""
    return [dict(item) for item in _load()["items"]]
