"""Token attributions: Captum `IntegratedGradients` along the word embeddings (the input of the encoder's
embedding layer, which adds positions and normalises; what `LayerIntegratedGradients` on the word-embedding
layer computes, without hooking that shared layer, so that batches can run concurrently on the CPU).

For one item text:

1. The text is cut into the model's windows. The baseline of a window keeps its special tokens
   ([CLS], [SEP]) and replaces every other token by [PAD]: [CLS] [PAD] … [PAD] [SEP]; the attention
   mask is the input's, so only the word identities change along the integration path.
2. The item logit is a pooling of window logits, so its attribution is the pooling's gradient-
   weighted sum of window attributions (`pooling.window_weights`): last → only the item's last window
   (with sentence windows: the sentence that states the verdict; the others are not run), mean → 1/W
   each, mean_last → 1/W each and 1 more for the last. The outcome uses `model.pooling`, guideline
   labels mean.
3. Integrated gradients along `n_steps` points (Gauss-Legendre, Captum's default) in internal
   batches, parameters frozen so the backward pass computes no weight gradients. `attribute_many`
   batches the attributed windows of many items (grouped by length) into shared passes.
4. Sub-word scores are summed into whitespace-delimited words with character offsets into the text,
   so scores still add up (completeness): Σ word scores = Σ_w weight_w·(F_w(x) − F_w(baseline)) −
   `delta`, where `delta` is Captum's convergence delta (weighted the same way).

5. With evidence cues (`model.outcome_cues`), the outcome logit also holds the item-level term v·e(text)
   (imr_model/cues.py; zero for a text without words). Its share goes to the words that made it: pattern
   k's v_k·log(1 + n_k) is split evenly over its n_k matches and each match's share over the words it
   overlaps; `log_words`'s v·log(W) is split evenly over the W words. So completeness covers the whole
   outcome logit. The guideline logits' item-level terms (citation cues, TF-IDF) are not attributed.

Scores are in raw logit units (before temperature scaling); positive pushes towards the target
(Overturned for `target="outcome"`, or the named guideline label).
"""

from __future__ import annotations

import bisect
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from captum.attr import IntegratedGradients

from imr_model import devices
from imr_model.cues import evidence_spans
from imr_model.modeling import GUIDELINE_POOLING
from imr_model.pooling import window_weights
from imr_model.window_cache import WindowCache
from imr_model.windows import Windows

OUTCOME = "outcome"
DEFAULT_STEPS = 32
BATCH_TOKENS = 4096  # tokens per integrated-gradients pass (steps × rows × window length)
_WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class WordScore:
    """One whitespace-delimited word of the model input and its summed sub-word attribution."""

    word: str
    start: int  # character offsets into `Attribution.text`
    end: int
    score: float


@dataclass(frozen=True)
class WindowSpan:
    """One window of an item: where it is in the text, its pooling weight, and whether it was attributed.

    `contribution` is weight × (F(window) − F(baseline)), the window's share of the item's target logit
    difference: for an attributed window its word scores add up to it (up to the convergence delta); a
    window with weight 0 (not pooled, e.g. all but the last under `last` pooling) contributes exactly 0; a
    window left out by `coverage` < 1 carries what its words would have held, and they score 0.
    """

    start: int  # character span of the window's tokens in `Attribution.text`
    end: int
    weight: float
    attributed: bool
    contribution: float


@dataclass(frozen=True)
class Attribution:
    """Attributions of one item's target logit to the words of the text the model saw."""

    target: str  # "outcome" or a guideline label id
    text_view: str  # the text view the model was trained on (what `text` is)
    text: str
    words: tuple[WordScore, ...]
    delta: float  # Captum convergence delta: Σ scores − (F(x) − F(baseline)), pooled like the logits
    n_steps: int
    windows: tuple[WindowSpan, ...] = ()  # every window of the item, attributed or not, in text order

    @property
    def unattributed(self) -> float:
        """The part of the target logit difference held by windows that were not attributed (0 unless `coverage` < 1)."""
        return float(sum(w.contribution for w in self.windows if not w.attributed))

    def top(self, k: int = 10, *, by: str = "abs") -> list[WordScore]:
        """The k words with the largest |score| (`by="abs"`), or the largest positive (`by="positive"`)."""
        keys = {"abs": lambda w: -abs(w.score), "positive": lambda w: -w.score, "negative": lambda w: w.score}
        if by not in keys:
            raise ValueError(f"by must be one of {sorted(keys)}, got {by!r}")
        return sorted(self.words, key=keys[by])[:k]

    def to_dict(self, *, include_text: bool = False) -> dict:
        """JSON-ready; the text itself only on request (the words already carry their spelling)."""
        out = {
            "target": self.target,
            "text_view": self.text_view,
            "delta": self.delta,
            "n_steps": self.n_steps,
            "words": [asdict(w) for w in self.words],
            "windows": [asdict(w) for w in self.windows],
        }
        if include_text:
            out["text"] = self.text
        return out


def check_target(target: str, label_names: list[str]) -> int | None:
    """None for the outcome logit, else the guideline column; unknown names list the valid ones."""
    if target == OUTCOME:
        return None
    if target in label_names:
        return label_names.index(target)
    shown = ", ".join(label_names[:20]) + (" ..." if len(label_names) > 20 else "")
    raise ValueError(f"unknown attribution target {target!r}; valid: {OUTCOME!r} or a guideline label ({shown})")


def attribute(
    classifier,
    text: str,
    *,
    target: str = OUTCOME,
    n_steps: int = DEFAULT_STEPS,
    batch_tokens: int = BATCH_TOKENS,
    text_view: str | None = None,
    coverage: float = 1.0,
) -> Attribution:
    """Attribute one item's `target` logit to the words of `text` (already in the model's text view)."""
    return attribute_many(classifier, [text], target=target, n_steps=n_steps, batch_tokens=batch_tokens,
                          text_view=text_view, coverage=coverage)[0]  # fmt: skip


def attribute_many(
    classifier,
    texts: Sequence[str],
    *,
    target: str = OUTCOME,
    n_steps: int = DEFAULT_STEPS,
    batch_tokens: int = BATCH_TOKENS,
    text_view: str | None = None,
    coverage: float = 1.0,
    windows: Windows | None = None,
    cache: WindowCache | None = None,
    cache_key: str = "",
) -> list[Attribution]:
    """Attributions of many items at once: the attributed windows of all items share forward passes.

    Rows are independent (each has its own attention mask), so batching changes nothing but speed.
    Windows are grouped by length so that little is padding; `batch_tokens` bounds the tokens per
    forward pass (interpolation steps × rows × window length). A window that occurs several times (the
    same sentence in several items) is integrated once. `cache` (`window_cache.WindowCache`, `cache_key`
    naming the model) keeps each window's token scores for later calls, per target and `n_steps`.

    `coverage` < 1 integrates only the windows that decide the item: the fewest, by |weight × (F(x) −
    F(baseline))| (two plain forward passes per window), that carry `coverage` of the item's total; the others
    are listed in `Attribution.windows` as not attributed, with their contribution, and their words score 0.
    `windows`: `classifier.make_windows(texts)` when the caller has them already.
    """
    if n_steps < 2:
        raise ValueError(f"n_steps must be >= 2, got {n_steps}")
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    column = check_target(target, classifier.label_names)
    texts = list(texts)
    if not texts:
        return []
    net, device = classifier.net, classifier.device
    windows = classifier.make_windows(texts) if windows is None else windows
    owners = windows.item_ids.numpy()
    lengths = windows.attention_mask.sum(dim=1).numpy()
    pad = classifier.tokenizer.pad_token_id or 0

    def target_logit(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        outcome, guidelines = net(input_ids, attention_mask)
        return outcome if column is None else guidelines[:, column]  # (rows,)

    def baseline(group: np.ndarray, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = windows.input_ids[group, :width].to(device)
        mask = windows.attention_mask[group, :width].to(device)
        special = (windows.offsets[group, :width] == 0).all(dim=-1).to(device)  # [CLS]/[SEP]/pad: no text span
        return ids, mask, torch.where(special, ids, torch.full_like(ids, pad))

    # every pooling is linear: a window's weight does not depend on the logits (no extra forward pass)
    pooling = classifier.config.pooling if column is None else GUIDELINE_POOLING
    weights = np.zeros(len(windows), dtype=np.float64)
    for item in range(len(texts)):
        rows = np.flatnonzero(owners == item)
        weights[rows] = window_weights(len(rows), pooling)
    chosen = np.flatnonzero(weights > 0)
    contribution = np.zeros(len(windows), dtype=np.float64)  # weight × (F(x) − F(baseline)) per window
    if coverage < 1.0:
        contribution[chosen] = weights[chosen] * _logit_gaps(chosen, lengths, baseline, target_logit, batch_tokens)
        chosen = _deciding_windows(chosen, owners, contribution, coverage)
    keys = windows.input_ids.numpy()
    key_of = {int(r): keys[r, : lengths[r]].tobytes() for r in chosen}
    first: dict[bytes, int] = {}  # each distinct window once: the row that stands for it
    for r in chosen:
        first.setdefault(key_of[int(r)], int(r))
    model_key = (cache_key, target, n_steps)
    done: dict[bytes, tuple[np.ndarray, float]] = {}
    if cache is not None:
        done = {k: v for k, v in zip(first, cache.lookup(model_key, list(first))) if v is not None}
    todo = np.array([r for k, r in first.items() if k not in done], dtype=np.int64)
    todo = todo[np.argsort(lengths[todo], kind="stable")]  # by length: similar lengths share a pass
    embeddings = net.get_input_embeddings()

    def target_from_embeddings(embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        outcome, guidelines = net(None, attention_mask, inputs_embeds=embeds)
        return outcome if column is None else guidelines[:, column]  # (rows,)

    ig = IntegratedGradients(target_from_embeddings)  # along the word embeddings: see the module docstring
    groups, start = [], 0
    while start < len(todo):
        width = max(1, int(lengths[todo[start]]))
        rows_fit = max(1, batch_tokens // (n_steps * width))  # all steps of these rows in one pass
        groups.append(todo[start : start + rows_fit])
        start += len(groups[-1])
    new: dict[bytes, tuple[np.ndarray, float]] = {}

    def run(group: np.ndarray) -> None:
        width = max(1, int(lengths[group].max()))
        ids, mask, baselines = baseline(group, width)
        with torch.no_grad():
            inputs, base = embeddings(ids), embeddings(baselines)
        with torch.enable_grad():  # per thread: `_frozen` enables it in the calling thread only
            attrs, delta = ig.attribute(inputs=inputs, baselines=base, additional_forward_args=(mask,),
                                        n_steps=n_steps, internal_batch_size=max(len(group), batch_tokens // width),
                                        return_convergence_delta=True)  # fmt: skip
        token_scores = attrs.sum(dim=-1).detach().double().cpu().numpy()
        delta = delta.detach().double().cpu().numpy()
        for j, r in enumerate(group):
            new[key_of[int(r)]] = (token_scores[j, : lengths[r]].copy(), float(delta[j]))

    with _frozen(net):
        devices.run_streams(run, groups, devices.cpu_streams(device))
    if cache is not None and new:
        cache.store(model_key, list(new), list(new.values()))
    done.update(new)
    scores = np.zeros(tuple(windows.input_ids.shape), dtype=np.float64)  # (W, T); unattributed windows stay 0
    deltas = np.zeros(len(windows), dtype=np.float64)
    attributed = np.zeros(len(windows), dtype=bool)
    for r in chosen:
        token_scores, delta = done[key_of[int(r)]]
        scores[r, : lengths[r]] = token_scores * weights[r]
        deltas[r] = delta * weights[r]
        contribution[r] = weights[r] * (token_scores.sum() - delta)  # = weight × (F(x) − F(baseline)), Captum's delta
        attributed[r] = True
    evidence = None  # the outcome's evidence-cue weights (model.outcome_cues), attributed after the windows
    if column is None and net.outcome_cues is not None:
        evidence = net.outcome_cues.weight.detach().double().cpu().numpy()[0]
    out = []
    for item, text in enumerate(texts):
        rows = np.flatnonzero(owners == item)
        words = merge_words(text, scores[rows[attributed[rows]]], windows.offsets[rows[attributed[rows]]].numpy())
        if evidence is not None:
            words = add_evidence_scores(text, words, evidence)
        spans = tuple(_window_span(windows.offsets[r].numpy(), lengths[r], weights[r], attributed[r], contribution[r])
                      for r in rows)  # fmt: skip
        out.append(Attribution(target, text_view or classifier.config.text_view, text, words,
                               float(deltas[rows].sum()), n_steps, spans))  # fmt: skip
    return out


def _logit_gaps(rows: np.ndarray, lengths: np.ndarray, baseline, target_logit, batch_tokens: int) -> np.ndarray:
    """F(x) − F(baseline) of the target logit for each window in `rows` (plain forward passes, by length)."""
    gaps = np.zeros(len(rows), dtype=np.float64)
    order = np.argsort(lengths[rows], kind="stable")
    start = 0
    with torch.inference_mode():
        while start < len(order):
            width = max(1, int(lengths[rows[order[start]]]))
            take = order[start : start + max(1, batch_tokens // (2 * width))]
            width = max(1, int(lengths[rows[take]].max()))
            ids, mask, base = baseline(rows[take], width)
            both = target_logit(torch.cat([ids, base]), torch.cat([mask, mask])).double().cpu().numpy()
            gaps[take] = both[: len(take)] - both[len(take) :]
            start += len(take)
    return gaps


def _deciding_windows(rows: np.ndarray, owners: np.ndarray, contribution: np.ndarray, coverage: float) -> np.ndarray:
    """Per item, the fewest of `rows` whose |contribution| adds up to `coverage` of the item's total."""
    keep = []
    for item in np.unique(owners[rows]):
        mine = rows[owners[rows] == item]
        size = np.abs(contribution[mine])
        ranked = mine[np.argsort(-size, kind="stable")]
        cum = np.cumsum(np.sort(size)[::-1])
        n = int(np.searchsorted(cum, coverage * cum[-1] - 1e-12)) + 1 if cum[-1] > 0 else len(mine)
        keep.extend(ranked[: min(n, len(mine))])
    return np.sort(np.asarray(keep, dtype=np.int64))


def _window_span(offsets: np.ndarray, length: int, weight: float, attributed: bool, contribution: float) -> "WindowSpan":
    real = offsets[:length][offsets[:length, 1] > 0]
    start, end = (int(real[:, 0].min()), int(real[:, 1].max())) if len(real) else (0, 0)
    return WindowSpan(start, end, float(weight), bool(attributed), float(contribution))


def add_evidence_scores(text: str, words: tuple[WordScore, ...], weights: np.ndarray) -> tuple[WordScore, ...]:
    """Add the evidence-cue term v·e(text) to the words that made it (module docstring, step 5).

    `weights`: the model's evidence weights v in `cues.evidence_names` order (patterns, then `log_words`).
    """
    extra = np.zeros(len(words), dtype=np.float64)
    starts = np.array([w.start for w in words], dtype=np.int64)
    ends = np.array([w.end for w in words], dtype=np.int64)
    for v, spans in zip(weights[:-1], evidence_spans(text)):
        for s, e in spans:
            hit = np.flatnonzero((starts < e) & (ends > s))
            if len(hit):
                extra[hit] += v * np.log1p(len(spans)) / len(spans) / len(hit)
    if len(words):
        extra += weights[-1] * np.log(len(words)) / len(words)
    return tuple(WordScore(w.word, w.start, w.end, w.score + float(x)) for w, x in zip(words, extra))


def merge_words(text: str, token_scores: np.ndarray, offsets: np.ndarray) -> tuple[WordScore, ...]:
    """Sum token scores (S, T) with char offsets (S, T, 2) into the whitespace words of `text`.

    Every word of the text is returned (words no window covered score 0) so a report can shade the
    whole text; tokens without a span ((0, 0): specials, padding) are skipped.
    """
    spans = [(m.start(), m.end()) for m in _WORD.finditer(text)]
    starts = [s for s, _ in spans]
    scores = np.zeros(len(spans), dtype=np.float64)
    for s, e, score in zip(offsets[..., 0].ravel(), offsets[..., 1].ravel(), token_scores.ravel()):
        if e <= s:
            continue
        k = bisect.bisect_right(starts, int(s)) - 1
        if k >= 0:
            scores[k] += float(score)
    return tuple(WordScore(text[s:e], s, e, float(v)) for (s, e), v in zip(spans, scores))


@contextmanager
def _frozen(net: torch.nn.Module) -> Iterator[None]:
    """No parameter gradients during attribution: the backward pass only needs activation gradients."""
    flags = [p.requires_grad for p in net.parameters()]
    for p in net.parameters():
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            yield
    finally:
        for p, flag in zip(net.parameters(), flags):
            p.requires_grad_(flag)
