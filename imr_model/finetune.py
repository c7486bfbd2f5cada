"""Recipe `finetune`: fine-tune the encoder and both heads on items, with early stopping on validation.

One step takes `batch_size` items, stacks all their windows, pools window logits back to items
(the model's pooling, so training sees what inference computes) and adds the outcome loss (binary
cross-entropy with `pos_weight` on Overturned) to `guideline_loss_weight` × the guideline loss
(multi-label BCE). After each epoch the validation split is scored; the epoch with the lowest
validation outcome loss is kept, and training stops after `patience` epochs without improvement.
`pos_weight` shifts the learned outcome logit by log(pos_weight); `fine_tune` takes that shift back
out of the outcome bias at the end. Head refits and calibration are the classifier's own
(`IMRClassifier.fit_heads`, `fit_calibration`), run by `imr_model.training` afterwards.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from imr_model import devices
from imr_model.config import TrainSection
from imr_model.metrics import guideline_metrics, outcome_metrics
from imr_model.modeling import GUIDELINE_POOLING, IMRClassifier, Windows
from imr_model.pooling import pool
from imr_model.progress import progress_bar
from imr_model.splits import Split

EpochCallback = Callable[[int, dict], None]
logger = logging.getLogger(__name__)

WEIGHT_DECAY = 0.01  # AdamW, on weight matrices (not biases and norms)
MAX_GRAD_NORM = 1.0
GUIDELINE_HEAD_LR = 1e-2  # 18 labels from scratch, few examples each (the head is refit afterwards anyway)
EARLY_STOPPING_METRIC = "outcome_loss"  # epochs are chosen for the outcome; the guideline head is refit after


def resolve_pos_weight(setting: float | str, y: np.ndarray) -> float:
    """`auto` → sqrt(n_upheld / n_overturned): up-weights the rare class without swamping the rest."""
    if setting != "auto":
        return float(setting)
    pos = int(np.sum(y))
    neg = int(len(y) - pos)
    return float(math.sqrt(neg / pos)) if pos and neg else 1.0



def _optimizer(net: nn.Module, t: TrainSection) -> torch.optim.Optimizer:
    outcome = {id(p) for m in (net.outcome_head, net.outcome_attention) for p in m.parameters()}
    guideline = {id(p) for p in net.guideline_head.parameters()}
    groups: dict[str, list] = {"decay": [], "no_decay": [], "outcome": [], "guideline": []}
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in outcome:
            groups["outcome"].append(p)
        elif id(p) in guideline:
            groups["guideline"].append(p)
        elif p.ndim < 2 or "norm" in name.lower():
            groups["no_decay"].append(p)  # biases and norms: decay would only pull them to 0
        else:
            groups["decay"].append(p)
    return torch.optim.AdamW(
        [
            {"params": groups["decay"], "lr": t.learning_rate, "weight_decay": WEIGHT_DECAY},
            {"params": groups["no_decay"], "lr": t.learning_rate, "weight_decay": 0.0},
            {"params": groups["outcome"], "lr": t.head_learning_rate, "weight_decay": WEIGHT_DECAY},
            {"params": groups["guideline"], "lr": GUIDELINE_HEAD_LR, "weight_decay": WEIGHT_DECAY},
        ]
    )


def _schedule(optimizer: torch.optim.Optimizer, total: int, warmup_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = int(round(total * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _loss(o: torch.Tensor, g: torch.Tensor, y: torch.Tensor, Y: torch.Tensor, pos_weight: float, lam: float) -> torch.Tensor:
    outcome = nn.functional.binary_cross_entropy_with_logits(o, y, pos_weight=torch.tensor(pos_weight, device=o.device))
    if lam == 0 or g.shape[-1] == 0:
        return outcome
    return outcome + lam * nn.functional.binary_cross_entropy_with_logits(g, Y)



def _improved(metric: str, value: float, best: float | None) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return best is None
    if best is None or (isinstance(best, float) and math.isnan(best)):
        return True
    return value < best - 1e-6 if metric.endswith("loss") else value > best + 1e-6


def length_batches(lengths: Sequence[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """Shuffled batches of items with similar token counts (less padding), in random order.

    Items are shuffled, cut into pools of 50 batches, sorted by length inside a pool and batched;
    the batch order is shuffled again, so every epoch still sees a different mix.
    """
    order = torch.randperm(len(lengths), generator=generator).tolist()
    span = 50 * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: lengths[i])
        batches.extend(chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size))
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffled]


def _micro_batches(items: list[int], n_windows: Sequence[int], cap: int) -> list[list[int]]:
    """Split a batch so no forward pass holds more than `cap` windows (an item is never split)."""
    groups: list[list[int]] = [[]]
    count = 0
    for item in items:
        if groups[-1] and count + n_windows[item] > cap:
            groups.append([])
            count = 0
        groups[-1].append(item)
        count += n_windows[item]
    return groups


def _forward_by_length(net: nn.Module, win: Windows, chunk_tokens: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward windows in length-sorted chunks, each padded only to its own longest window.

    Sentence windows vary from 5 to 100+ tokens; one padded batch would be mostly padding. The
    chunks stay in one autograd graph, so the pooled loss still sees every window of an item. The windows
    stay on the CPU; each chunk moves to the network's device.
    """
    device = next(net.parameters()).device
    lengths = win.attention_mask.sum(dim=1)
    order = torch.argsort(lengths, descending=True, stable=True)
    outs_o, outs_g, start = [], [], 0
    while start < len(order):
        width = max(1, int(lengths[order[start]]))
        size = max(1, chunk_tokens // width)
        idx = order[start : start + size]
        o, g = net(win.input_ids[idx, :width].to(device), win.attention_mask[idx, :width].to(device))
        outs_o.append(o)
        outs_g.append(g)
        start += size
    inverse = torch.argsort(order).to(device)
    return torch.cat(outs_o)[inverse], torch.cat(outs_g)[inverse]


class _Trainer:
    """State of one fine-tuning run; `epoch()` does one pass over the training items.

    On CUDA the forward passes autocast (`devices.autocast`: bf16, or fp16 with a GradScaler); losses and pooling
    are computed in fp32. On the CPU nothing differs from a run without devices (same operations, same order).
    """

    def __init__(self, t: TrainSection, seed: int, clf: IMRClassifier, windows: Windows, train: Split, pos_weight: float):
        self.t, self.clf, self.net, self.pos_weight = t, clf, clf.net, pos_weight
        self.device = clf.device
        self.scaler = devices.grad_scaler(self.device)  # fp16 on CUDA only; None elsewhere
        self.windows = windows
        self.n_windows = torch.bincount(self.windows.item_ids, minlength=len(train)).tolist()
        tokens = torch.zeros(len(train), dtype=torch.long).index_add_(
            0, self.windows.item_ids, self.windows.attention_mask.sum(dim=1)
        )
        self.lengths = tokens.tolist()
        self.y, self.Y = torch.from_numpy(train.y).float(), torch.from_numpy(train.Y).float()
        self.steps_per_epoch = math.ceil(len(train) / t.batch_size)
        self.optimizer = _optimizer(self.net, t)
        self.scheduler = _schedule(self.optimizer, self.steps_per_epoch * t.epochs, t.warmup_ratio)
        self.generator = torch.Generator().manual_seed(seed)

    def _step(self, items: list[int]) -> float:
        t, pooling = self.t, self.clf.config.pooling
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for group in _micro_batches(items, self.n_windows, t.max_windows_per_step):
            win = self.windows.select(group)
            with devices.autocast(self.device):
                o, g = _forward_by_length(self.net, win)
            o, g, ids = o.float(), g.float(), win.item_ids.to(self.device)  # fp32 pooling and loss (no-op on CPU)
            n = len(group)
            loss = _loss(pool(o, ids, n, pooling), pool(g, ids, n, GUIDELINE_POOLING), self.y[group].to(self.device),
                         self.Y[group].to(self.device), self.pos_weight, t.guideline_loss_weight)  # fmt: skip
            scaled = loss * (n / len(items))  # gradient of the batch mean, however it is split
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            total += loss.item() * n
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients
        nn.utils.clip_grad_norm_([p for p in self.net.parameters() if p.requires_grad], MAX_GRAD_NORM)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the step when fp16 gradients overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        return total

    def epoch(self, label: str, quiet: bool) -> float:
        """One pass; returns the mean training loss per item."""
        self.net.train()
        total = 0.0
        batches = length_batches(self.lengths, self.t.batch_size, self.generator)
        with progress_bar(label, total=len(batches), unit="steps", disable=quiet) as bar:
            for items in batches:
                total += self._step(items)
                bar.advance()
        return total / max(1, len(self.lengths))


def _validate(clf: IMRClassifier, windows: Windows, split: Split, t: TrainSection, pos_weight: float) -> dict:
    o, g = clf.window_item_logits(windows, split.texts, batch_size=t.eval_batch_size)
    o_t, y_t = torch.from_numpy(o), torch.from_numpy(split.y).float()
    loss = _loss(o_t, torch.from_numpy(g), y_t, torch.from_numpy(split.Y).float(), pos_weight, t.guideline_loss_weight)
    outcome_loss = nn.functional.binary_cross_entropy_with_logits(o_t, y_t, pos_weight=torch.tensor(pos_weight))
    p, P = 1 / (1 + np.exp(-o)), 1 / (1 + np.exp(-g))
    out = outcome_metrics(split.y, p, 0.5)
    gl = guideline_metrics(split.Y, (P >= 0.5).astype(int), clf.label_names)
    return {"loss": float(loss), "outcome_loss": float(outcome_loss), "auroc": out["auroc"], "auprc": out["auprc"],
            "guideline_micro_f1": gl["micro_f1"]}  # fmt: skip


def fine_tune(clf: IMRClassifier, windows: Windows, train: Split, w_val: Windows, val: Split, t: TrainSection, *,
              seed: int, on_epoch: EpochCallback | None = None, quiet: bool = False) -> dict:  # fmt: skip
    """Fine-tune `clf` in place on `train` (its `windows`), keeping the best epoch on `val` (its `w_val`); returns
    {"history": per-epoch logs, "best_epoch", "pos_weight"}."""
    pos_weight = resolve_pos_weight(t.pos_weight, train.y)
    trainer = _Trainer(t, seed, clf, windows, train, pos_weight)
    history: list[dict] = []
    best_value, best_state, best_epoch, waited = None, None, 0, 0
    for epoch in range(1, t.epochs + 1):
        start = time.perf_counter()
        log = {"epoch": epoch, "train_loss": trainer.epoch(f"epoch {epoch}/{t.epochs}", quiet)}
        log.update({f"val_{k}": v for k, v in _validate(clf, w_val, val, t, pos_weight).items()})
        log["seconds"] = time.perf_counter() - start
        history.append(log)
        logger.info("epoch %d: %s", epoch, ", ".join(f"{k} {v:.4g}" for k, v in log.items() if k != "epoch"))
        if on_epoch is not None:
            on_epoch(epoch, log)
        value = log[f"val_{EARLY_STOPPING_METRIC}"]
        if _improved(EARLY_STOPPING_METRIC, value, best_value):
            best_value, best_epoch, waited = value, epoch, 0
            best_state = copy.deepcopy(clf.net.state_dict())
        else:
            waited += 1
            if waited > t.patience:
                break
    if best_state is not None:
        clf.net.load_state_dict(best_state)
    clf.shift_outcome_bias(-math.log(pos_weight))  # undo the prior shift pos_weight taught the head
    clf.net.eval()
    return {"history": history, "best_epoch": best_epoch, "pos_weight": pos_weight}
