"""A bounded LRU cache of window results that outlives a batch: the same sentence is run once per process.

Letters repeat boilerplate sentences ("The request is not medically necessary.", the guideline
quotations, ...): of the 2,045 sentence windows of the shared letters' rationales only 1,566 are
distinct, and 162 distinct last sentences close the 258 rationales. `IMRClassifier.forward_windows`
already runs each distinct window once per call; this cache carries the results over from one call
(one `imr score` chunk, one service request) to the next.

An entry is keyed by the model's identity and the window's token ids, so another model (or another
backend of the same model: int8 ONNX logits are not PyTorch's) never hits it. Its value is the row the
forward pass produced for that window: the outcome logit, the guideline logits and, for the torch backend, the
mean-pooled encoder vector the familiarity check reads. Attributions cache their per-window token scores
the same way (`imr_model.attribution`), keyed by target and `n_steps` as well.

Identity: `model_identity` digests the model directory's config.json, which records the SHA-256 of the
weights and every other file (checked on load), so a changed model is a different key. A network whose
weights are changed in memory after loading (training) must not use a cache keyed by its directory:
only `inference.load_model` attaches one.

Values are what that window's forward pass gave in the batch it ran in. Batches differ in padding width,
so a value can differ from a fresh run in the last float bits (~1e-7, the same as the within-batch
deduplication); tests/test_window_cache.py checks the probabilities to 1e-6 with the cache on and off.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Hashable, Sequence

DEFAULT_MAX_ENTRIES = 16_384  # ~2 KB a torch entry (a 384-float vector + 18 logits + the key): ~35 MB at most


class WindowCache:
    """Thread-safe LRU map (model key, window key) → value, holding at most `max_entries` values.

    `hits` and `misses` count lookups since creation (or `clear`); `stats()` reports them.
    """

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES):
        if max_entries < 0:
            raise ValueError(f"max_entries must be >= 0, got {max_entries}")
        self.max_entries = int(max_entries)
        self._data: OrderedDict[tuple[Hashable, Hashable], object] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._data)

    def lookup(self, model: Hashable, keys: Sequence[Hashable]) -> list:
        """The cached value of each key (None where absent); hits move to the recent end."""
        out = []
        with self._lock:
            for key in keys:
                value = self._data.get((model, key))
                if value is None:
                    self.misses += 1
                else:
                    self._data.move_to_end((model, key))
                    self.hits += 1
                out.append(value)
        return out

    def store(self, model: Hashable, keys: Sequence[Hashable], values: Sequence[object]) -> None:
        """Keep `values` under `keys`, dropping the least recently used entries beyond `max_entries`."""
        if self.max_entries == 0:
            return
        with self._lock:
            for key, value in zip(keys, values):
                self._data[(model, key)] = value
                self._data.move_to_end((model, key))
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self.hits = self.misses = 0

    def stats(self) -> dict:
        """{"entries", "max_entries", "hits", "misses", "hit_rate"}."""
        with self._lock:
            looked = self.hits + self.misses
            return {"entries": len(self._data), "max_entries": self.max_entries, "hits": self.hits,
                    "misses": self.misses, "hit_rate": self.hits / looked if looked else 0.0}  # fmt: skip


SIZE_ENV = "IMR_WINDOW_CACHE"  # entries of the process-wide cache; 0 turns it off
_SHARED: WindowCache | None = None
_SHARED_LOCK = threading.Lock()


def shared_cache() -> WindowCache:
    """The process-wide cache `inference.load_model` gives every predictor (one memory bound for all models):
    `DEFAULT_MAX_ENTRIES` entries, or ``$IMR_WINDOW_CACHE`` (0: nothing is kept)."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            raw = os.environ.get(SIZE_ENV, "").strip()
            try:
                size = int(raw) if raw else DEFAULT_MAX_ENTRIES
            except ValueError:
                raise ValueError(f"${SIZE_ENV} is {raw!r}: give a number of windows (0 turns the cache off)") from None
            _SHARED = WindowCache(size)
        return _SHARED


def model_identity(model_dir: str | Path, *parts: str) -> str:
    """A key for a model directory's content: SHA-256 of its config.json (which holds every other file's
    SHA-256) joined with `parts` (the backend, the ONNX file, ...)."""
    digest = hashlib.sha256((Path(model_dir) / "config.json").read_bytes()).hexdigest()[:32]
    return "|".join((digest, *parts))
