"""Window → item pooling: the one registry every head, refit and backend uses.

A text is cut into windows (`imr_model.windows`); each window gets logits (or an encoder vector),
and pooling turns the windows of an item back into one row per item:

* `last`: the item's last window. With sentence windows that is the rationale's closing sentence,
  where a reviewer states the verdict (the default outcome pooling).
* `mean`: every window counts equally (citations are spread over a rationale: the guideline pooling).
* `mean_last`: the mean plus the last window. For the masked view, whose closing verdict sentence is
  masked, the last window is the reviewer's last statement of the evidence before it.

All three are linear in the window rows, so pooling the window vectors and fitting a linear head on
the pooled vectors gives exactly the head that pools its window logits: the logistic head fits
(`imr_model.heads`) rely on that. A window head's bias enters a pooled logit `bias_multiplicity`
times. The measurements behind these choices are in docs/experiments.md.
"""

from __future__ import annotations

from typing import Callable, Literal, get_args

import numpy as np
import torch
from torch import Tensor

Pooling = Literal["last", "mean", "mean_last"]
POOLINGS: tuple[str, ...] = get_args(Pooling)


def _mean(rows: Tensor, item_ids: Tensor, n_items: int) -> Tensor:
    shape = (n_items,) + tuple(rows.shape[1:])
    counts = torch.zeros(n_items, dtype=rows.dtype, device=rows.device).index_add_(
        0, item_ids, torch.ones_like(item_ids, dtype=rows.dtype)
    )
    counts = counts.clamp(min=1.0).view(-1, *([1] * (rows.dim() - 1)))
    return rows.new_zeros(shape).index_add_(0, item_ids, rows) / counts


def _last(rows: Tensor, item_ids: Tensor, n_items: int) -> Tensor:
    position = torch.arange(len(item_ids), device=item_ids.device)  # windows are in text order
    last = torch.zeros(n_items, dtype=torch.long, device=item_ids.device).scatter_reduce(
        0, item_ids, position, "amax", include_self=False
    )
    return rows[last]


def _mean_last(rows: Tensor, item_ids: Tensor, n_items: int) -> Tensor:
    return _mean(rows, item_ids, n_items) + _last(rows, item_ids, n_items)


#: name → (pool function, how often a window bias enters the pooled value)
_REGISTRY: dict[str, tuple[Callable[[Tensor, Tensor, int], Tensor], int]] = {
    "last": (_last, 1),
    "mean": (_mean, 1),
    "mean_last": (_mean_last, 2),
}
assert set(_REGISTRY) == set(POOLINGS)


def pool(rows: Tensor, item_ids: Tensor, n_items: int, mode: str) -> Tensor:
    """Pool window rows (W,) or (W, D) into item rows (N,) or (N, D); differentiable."""
    try:
        fn = _REGISTRY[mode][0]
    except KeyError:
        raise ValueError(f"unknown pooling {mode!r}; valid: {', '.join(POOLINGS)}") from None
    return fn(rows, item_ids, n_items)


def bias_multiplicity(mode: str) -> int:
    """How often a window head's bias enters the pooled item logit: 2 for `mean_last`, else 1."""
    try:
        return _REGISTRY[mode][1]
    except KeyError:
        raise ValueError(f"unknown pooling {mode!r}; valid: {', '.join(POOLINGS)}") from None


def window_weights(n_windows: int, mode: str) -> np.ndarray:
    """d(item value)/d(window value) of an item's `n_windows` windows, (W,): every pooling is linear, so this is
    the pooling of the identity matrix (what attributions weight each window's gradients by)."""
    eye = torch.eye(n_windows, dtype=torch.float64)
    return pool(eye, torch.zeros(n_windows, dtype=torch.long), 1, mode)[0].numpy()
