"""Text → token windows with character offsets: fixed-length windows with stride, or one window per sentence.

`tokens` (default): windows of `max_length` tokens overlapping by `stride` tokens (Hugging Face
overflow semantics). `sentences`: the text is split at sentence ends (and blank lines), fragments
shorter than `MIN_SENTENCE_CHARS` join the next sentence, and each sentence is one window (a
sentence longer than `max_length` tokens continues in further windows with `stride`). Sentence
windows keep a verdict ("... is not medically necessary.") from being diluted by the rest of a
long rationale: frozen MiniLM separates Upheld from Overturned perfectly from the last sentence
alone on the shared letters, but only at AUROC ~0.85 from the mean over the whole rationale.
Offsets always index the original text, so attributions map back to it.
"""

from __future__ import annotations

import itertools
import re
import threading
import weakref
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from tokenizers import Tokenizer

MIN_SENTENCE_CHARS = 20
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9\[])|\n\s*\n")


@dataclass
class Windows:
    """Token windows of a batch of texts, padded to the longest window."""

    input_ids: torch.LongTensor  # (W, T)
    attention_mask: torch.LongTensor  # (W, T)
    item_ids: torch.LongTensor  # (W,) index of the source text
    offsets: torch.LongTensor  # (W, T, 2) char offsets into the source text; (0, 0) for special/pad

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def select(self, items: Sequence[int]) -> "Windows":
        """The windows of the given items, renumbered 0..len(items)-1 in the order given."""
        items_t = torch.as_tensor(list(items), dtype=torch.long)
        remap = torch.full((int(self.item_ids.max()) + 1 if len(self) else 1,), -1, dtype=torch.long)
        remap[items_t] = torch.arange(len(items_t))
        keep = torch.nonzero(remap[self.item_ids] >= 0).squeeze(1)
        new_ids = remap[self.item_ids[keep]]
        order = torch.argsort(new_ids, stable=True)  # keep windows grouped in item order
        keep = keep[order]
        length = int(self.attention_mask[keep].sum(dim=1).max()) if len(keep) else 1
        return Windows(
            input_ids=self.input_ids[keep, :length],
            attention_mask=self.attention_mask[keep, :length],
            item_ids=new_ids[order],
            offsets=self.offsets[keep, :length],
        )


def sentence_spans(text: str, min_chars: int = MIN_SENTENCE_CHARS) -> list[tuple[int, int]]:
    """(start, end) character spans of the sentences of `text`; short fragments merge into the next one."""
    spans: list[tuple[int, int]] = []
    start = 0
    for m in _SENTENCE_END.finditer(text):
        if len(text[start : m.end()].strip()) >= min_chars:
            spans.append((start, m.end()))
            start = m.end()
    if text[start:].strip() or not spans:
        if spans and len(text[start:].strip()) < min_chars:
            spans[-1] = (spans[-1][0], len(text))  # a short tail joins the sentence before it
        else:
            spans.append((start, len(text)))
    return spans


def make_windows(tokenizer, texts: list[str], *, max_length: int, stride: int, max_windows: int,
                 unit: str = "tokens") -> Windows:  # fmt: skip
    """Windows of `texts` (see the module docstring); at most `max_windows` per text (head and tail kept).

    The same windows as ``tokenizer(pieces, truncation=True, max_length=..., stride=..., return_overflowing_tokens=True,
    return_offsets_mapping=True)``, but read straight from the Rust encodings (`_encode`): transformers' conversion of
    every encoding to Python lists took most of the time (2.1 of 2.9 s for the 2,045 sentences of the shared letters).
    """
    if not texts:
        empty = torch.zeros((0, 1), dtype=torch.long)
        return Windows(empty, empty.clone(), torch.zeros(0, dtype=torch.long), torch.zeros((0, 1, 2), dtype=torch.long))
    if unit not in ("sentences", "tokens"):
        raise ValueError(f"unknown window unit {unit!r}; valid: tokens, sentences")
    pieces = []  # (text index, start, end) in the text
    for i, text in enumerate(texts):
        spans = sentence_spans(text) if unit == "sentences" else [(0, len(text))]
        pieces += [(i, s, e) for s, e in spans]
    encodings, sources = _encode(tokenizer, [texts[i][a:b] for i, a, b in pieces], max_length, stride)
    owners = [pieces[p][0] for p in sources]
    keep = _cap_windows(owners, max_windows)
    ids = [encodings[i].ids for i in keep]
    offs = [encodings[i].offsets for i in keep]
    n = np.array([len(x) for x in ids], dtype=np.int64)
    width = int(n.max())
    real = np.arange(width)[None, :] < n[:, None]  # (W, T) the tokens of each window, padding after them
    input_ids = np.full((len(keep), width), tokenizer.pad_token_id or 0, dtype=np.int64)
    input_ids[real] = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(n.sum()))
    offsets = np.zeros((len(keep), width, 2), dtype=np.int64)
    flat = np.fromiter(itertools.chain.from_iterable(itertools.chain.from_iterable(offs)), dtype=np.int64,
                       count=2 * int(n.sum())).reshape(-1, 2)  # fmt: skip
    # special tokens stay (0, 0); real ones shift to the piece's place in the text
    shift = np.repeat(np.array([pieces[sources[i]][1] for i in keep], dtype=np.int64), n)
    flat[flat[:, 1] > 0] += shift[flat[:, 1] > 0, None]
    offsets[real] = flat
    return Windows(torch.from_numpy(input_ids), torch.from_numpy(real.astype(np.int64)),
                   torch.tensor([owners[i] for i in keep], dtype=torch.long), torch.from_numpy(offsets))  # fmt: skip


def _encode(tokenizer, pieces: list[str], max_length: int, stride: int) -> tuple[list, list[int]]:
    """(encodings, piece of each encoding): every piece's Rust encoding followed by its overflow windows, as
    transformers' fast tokenizers return them with ``truncation=True, return_overflowing_tokens=True``.

    Runs on a private copy of the backend tokenizer (`_backend`), so the caller's tokenizer keeps its settings.
    Tokenizers without a Rust backend go through their own ``__call__``.
    """
    backend = _backend(tokenizer, max_length, stride)
    if backend is None:
        enc = tokenizer(pieces, truncation=True, max_length=max_length, stride=stride,
                        return_overflowing_tokens=True, return_offsets_mapping=True, padding=False)  # fmt: skip
        rows = [_Encoding(ids, [tuple(o) for o in off]) for ids, off in zip(enc["input_ids"], enc["offset_mapping"])]
        return rows, list(enc["overflow_to_sample_mapping"])
    encodings, sources = [], []
    for p, e in enumerate(backend.encode_batch(pieces, add_special_tokens=True)):
        for window in [e, *e.overflowing]:
            encodings.append(window)
            sources.append(p)
    return encodings, sources


@dataclass
class _Encoding:
    ids: list[int]
    offsets: list[tuple[int, int]]


_BACKENDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_BACKENDS_LOCK = threading.Lock()


def _backend(tokenizer, max_length: int, stride: int):
    """A copy of `tokenizer`'s Rust tokenizer set up like transformers' ``truncation=True, padding=False`` call
    (truncation `longest_first` on the tokenizer's side, no padding), cached per tokenizer and settings; None for a
    tokenizer without one. The copy is not shared with transformers, which changes its backend's settings per call."""
    rust = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if rust is None:
        return None
    key = (max_length, stride, getattr(tokenizer, "truncation_side", "right"), bool(getattr(tokenizer, "split_special_tokens", False)))
    with _BACKENDS_LOCK:
        try:
            cached = _BACKENDS.get(tokenizer)
        except TypeError:  # not weakly referenceable: no cache
            cached = None
        if cached is not None and cached[0] == key and cached[1] is rust:
            return cached[2]
        copy = Tokenizer.from_str(rust.to_str())
        copy.no_padding()
        copy.enable_truncation(max_length=max_length, stride=stride, strategy="longest_first", direction=key[2])
        copy.encode_special_tokens = key[3]
        try:
            _BACKENDS[tokenizer] = (key, rust, copy)
        except TypeError:
            pass
        return copy


def _cap_windows(owners: list, max_windows: int) -> list[int]:
    """Indices of windows to keep: at most `max_windows` per owner text, the head and the tail ones.

    Verdicts tend to close a rationale and requests open a summary, so the middle goes first.
    """
    keep: list[int] = []
    for _, group in itertools.groupby(range(len(owners)), key=owners.__getitem__):
        span = list(group)
        if len(span) > max_windows:
            head = (max_windows + 1) // 2
            span = span[:head] + span[len(span) - (max_windows - head) :]
        keep.extend(span)
    return keep
