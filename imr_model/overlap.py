"""Were these letters in a model's training data? Per-letter digests, never texts.

Training stores ``training_letters.json`` in the model directory: for each split (train, validation,
test) the sorted SHA-256 digests (first `DIGEST_HEX` hex digits) of its letters. A letter's digest
is computed from its items' content only — each item's request and rationale, whitespace-collapsed
and lower-cased, in item order — so the same letter matches whether it arrives as a PDF, a text
file or a table row, under any file name, and whatever label the table gives it (a relabelled copy
still counts as seen). No text, token or per-item vector is stored: a digest cannot be read back.

`imr evaluate` and `imr promote --data` call `check` and warn when evaluation letters were among the
letters the model was fitted on (train and validation: the probe recipe fits its heads on both, the
finetune recipe stops early and calibrates on validation). Letters of the model's own test split are
counted too, but only as information: that split was held out.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

TRAINING_LETTERS_FILE = "training_letters.json"
FORMAT = 1
DIGEST_HEX = 20  # 80 bits: no accidental collision among millions of letters
FITTED_SPLITS = ("train", "validation")
_WS = re.compile(r"\s+")


def _norm(value) -> str:
    return _WS.sub(" ", str(value or "")).strip().lower()


def letter_digests(records: Iterable[Mapping]) -> dict[str, str]:
    """{letter_id: digest} over item records grouped by ``letter_id`` (records without one are their own letter)."""
    letters: dict[str, list[tuple]] = {}
    for i, r in enumerate(records):
        key = str(r.get("letter_id") or f"__item_{i}")
        try:
            index = int(r.get("item_index") or 0)
        except (TypeError, ValueError):
            index = 0
        letters.setdefault(key, []).append((index, _norm(r.get("request")), _norm(r.get("rationale"))))
    out = {}
    for key, items in letters.items():
        h = hashlib.sha256()
        for _, request, rationale in sorted(items):
            h.update(json.dumps([request, rationale], ensure_ascii=False).encode("utf-8"))
            h.update(b"\n")
        out[key] = h.hexdigest()[:DIGEST_HEX]
    return out


def save_training_letters(model_dir: str | Path, splits: Mapping[str, Sequence[Mapping]]) -> Path:
    """Write ``training_letters.json`` (sorted digests per split) into a saved model directory."""
    payload = {"format": FORMAT, "digest": f"sha256[:{DIGEST_HEX}] of each letter's normalised requests and rationales",
               "splits": {name: sorted(set(letter_digests(rows).values())) for name, rows in splits.items()}}  # fmt: skip
    path = Path(model_dir) / TRAINING_LETTERS_FILE
    path.write_text(json.dumps(payload, indent=1), encoding="utf-8")
    return path


def load_training_letters(model_dir: str | Path) -> dict[str, set[str]] | None:
    """{split: digests} of a model directory, or None for models saved before digests were stored."""
    path = Path(model_dir) / TRAINING_LETTERS_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        splits = raw["splits"]
        if raw.get("format") != FORMAT or not isinstance(splits, dict):
            raise ValueError
        return {str(k): {str(d) for d in v} for k, v in splits.items()}
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{path}: not a valid {TRAINING_LETTERS_FILE} (format {FORMAT} with a `splits` map)") from None


def check(records: Sequence[Mapping], model_dir: str | Path) -> dict:
    """How many of the evaluation letters the model was fitted on (train/validation) or held out as its test split.

    Returns {"checked", "n_letters", "n_items", "fitted_letters", "fitted_items", "test_letters", "warning"};
    "warning" is a sentence when any evaluation letter was fitted on, else None.
    """
    digests = letter_digests(records)
    n_items = len(records)
    stored = load_training_letters(model_dir)
    if stored is None:
        return {"checked": False, "n_letters": len(digests), "n_items": n_items,
                "warning": None, "note": f"model has no {TRAINING_LETTERS_FILE} (saved before per-letter digests); "
                                         "overlap with its training letters cannot be counted"}  # fmt: skip
    fitted = set().union(*(stored.get(s, set()) for s in FITTED_SPLITS))
    seen = {k for k, d in digests.items() if d in fitted}
    keys = [str(r.get("letter_id") or f"__item_{i}") for i, r in enumerate(records)]
    fitted_items = sum(k in seen for k in keys)
    test_letters = sum(d in stored.get("test", set()) for d in digests.values())
    warning = None
    if seen:
        warning = (f"{len(seen)} of {len(digests)} evaluation letters ({fitted_items} of {n_items} items) were in this "
                   "model's training data (train/validation); their metrics are optimistic. Evaluate on letters the "
                   "model never saw")  # fmt: skip
    return {"checked": True, "n_letters": len(digests), "n_items": n_items, "fitted_letters": len(seen),
            "fitted_items": fitted_items, "test_letters": test_letters, "warning": warning}  # fmt: skip
