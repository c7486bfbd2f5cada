"""Domain adaptation: continue masked-LM pretraining of the backbone on unlabelled letter text.

Texts are each item's rationale and request plus each letter's case summary (labels unused),
cut into `pretrain.max_length`-token blocks. A fraction of the letters is held out, and
perplexity on their blocks is measured with one fixed set of masks, so the numbers compare.

all-MiniLM-L6-v2 ships without its masked-LM head, so the head starts random and perplexity with a
random head says nothing about the encoder. The run therefore first fits the head on the frozen
encoder (`HEAD_WARMUP_STEPS`) and reports that as "before"; "after" is the same head and encoder
after training both. The output directory (encoder + MLM head + tokenizer + `pretrain_report.json`)
can be given as `model.backbone`; `AutoModel` loads the encoder from it and ignores the head.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from imr_model import devices
from imr_model.config import TrainConfig, hub_offline, resolve_backbone
from imr_model.network import quiet_transformers
from imr_model.progress import progress_bar
from imr_model.training import seed_everything

HEAD_WARMUP_STEPS = 60  # fit the (new) MLM head on the frozen encoder first
MLM_PROBABILITY = 0.15  # BERT's masking rate
HELD_OUT = 0.1  # fraction of letters kept for perplexity

logger = logging.getLogger(__name__)

REPORT_FILE = "pretrain_report.json"


def letter_texts(records: Sequence[dict]) -> dict[str, list[str]]:
    """Unlabelled texts per letter: every item's request and rationale, and the case summary once."""
    by_letter: dict[str, list[str]] = {}
    for rec in records:
        texts = by_letter.setdefault(str(rec.get("letter_id") or rec.get("source") or len(by_letter)), [])
        summary = str(rec.get("case_summary") or "").strip()
        if summary and summary not in texts:
            texts.append(summary)
        for key in ("request", "rationale"):
            value = str(rec.get(key) or "").strip()
            if value:
                texts.append(value)
    return by_letter


def split_letters(letters: Sequence[str], held_out: float, seed: int) -> tuple[list[str], list[str]]:
    """(train letters, held-out letters); at least one letter on each side."""
    if len(letters) < 2:
        raise ValueError(f"need at least 2 letters to hold some out for perplexity, got {len(letters)}")
    order = np.random.default_rng(seed).permutation(len(letters))
    n_out = min(len(letters) - 1, max(1, round(held_out * len(letters))))
    out = {letters[i] for i in order[:n_out]}
    return [x for x in letters if x not in out], [x for x in letters if x in out]


def blocks(tokenizer, texts: Sequence[str], max_length: int) -> torch.Tensor:
    """Non-overlapping token blocks (B, max_length) with [CLS]/[SEP], padded with the pad id."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, return_overflowing_tokens=True,
                    stride=0, padding="max_length", return_tensors="pt")  # fmt: skip
    return enc["input_ids"]


def mask_tokens(ids: torch.Tensor, tokenizer, probability: float, generator: torch.Generator):
    """BERT masking: of `probability` of real tokens, 80% [MASK], 10% random, 10% kept; labels -100 elsewhere."""
    labels = ids.clone()
    special = torch.zeros_like(ids, dtype=torch.bool)
    for tid in tokenizer.all_special_ids:
        special |= ids == tid
    chosen = (torch.rand(ids.shape, generator=generator) < probability) & ~special
    labels[~chosen] = -100
    inputs = ids.clone()
    replace = chosen & (torch.rand(ids.shape, generator=generator) < 0.8)
    inputs[replace] = tokenizer.mask_token_id
    randomize = chosen & ~replace & (torch.rand(ids.shape, generator=generator) < 0.5)
    inputs[randomize] = torch.randint(len(tokenizer), ids.shape, generator=generator)[randomize]
    return inputs, labels


def perplexity(model, batches: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int) -> float:
    """exp(mean cross-entropy over masked tokens) on fixed (inputs, labels) batches."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.inference_mode():
        for inputs, labels in batches:
            inputs, labels = inputs.to(device), labels.to(device)
            with devices.autocast(device):
                logits = model(input_ids=inputs, attention_mask=(inputs != pad_id).long()).logits
            loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1),
                                                     ignore_index=-100, reduction="sum")  # fmt: skip
            total += float(loss)
            count += int((labels != -100).sum())
    return math.exp(total / max(1, count))


def _train(model, data: torch.Tensor, tokenizer, cfg: TrainConfig, steps: int | None, params, label: str,
           quiet: bool) -> int:  # fmt: skip
    """MLM steps over shuffled blocks; `steps` caps the count (None: `pretrain.epochs` epochs). Blocks are masked on
    the CPU (one seeded generator, so the masks do not depend on the device) and moved to the model's device."""
    p = cfg.pretrain
    device = next(model.parameters()).device
    scaler = devices.grad_scaler(device)  # fp16 on CUDA only
    optimizer = torch.optim.AdamW(params, lr=p.learning_rate if steps is None else 1e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(cfg.seed + (0 if steps is None else 1))
    per_epoch = math.ceil(len(data) / p.batch_size)
    total = steps if steps is not None else per_epoch * p.epochs
    done = 0
    model.train()
    with progress_bar(label, total=total, unit="steps", disable=quiet) as bar:
        while done < total:
            order = torch.randperm(len(data), generator=gen)
            for b in range(0, len(order), p.batch_size):
                if done >= total:
                    break
                inputs, labels = mask_tokens(data[order[b : b + p.batch_size]], tokenizer, MLM_PROBABILITY, gen)
                inputs, labels = inputs.to(device), labels.to(device)
                with devices.autocast(device):
                    loss = model(input_ids=inputs, attention_mask=(inputs != tokenizer.pad_token_id).long(),
                                 labels=labels).loss  # fmt: skip
                optimizer.zero_grad(set_to_none=True)
                if scaler is None:
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    optimizer.step()
                else:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    scaler.step(optimizer)
                    scaler.update()
                done += 1
                bar.advance()
    return done


def _masked_lm(cfg: TrainConfig, source: str):
    """The backbone with a masked-LM head: pretrained weights, or random init (tiny test configs)."""
    from transformers import AutoConfig, AutoModelForMaskedLM

    hf_config = AutoConfig.from_pretrained(source, local_files_only=hub_offline(), trust_remote_code=False)
    for key, value in cfg.model.encoder_overrides.items():
        if not hasattr(hf_config, key):
            raise ValueError(f"model.encoder_overrides: {type(hf_config).__name__} has no field {key!r}")
        setattr(hf_config, key, value)
    if cfg.model.init == "random":
        return AutoModelForMaskedLM.from_config(hf_config)
    # transformers' load report would flag the absent MLM head as a corrupted checkpoint: expected here (the
    # head is warmed up before "before" is measured), so say that in one line instead
    with quiet_transformers():
        model, info = AutoModelForMaskedLM.from_pretrained(source, config=hf_config, local_files_only=hub_offline(),
                                                           output_loading_info=True, trust_remote_code=False)  # fmt: skip
    if missing := sorted(info.get("missing_keys") or ()):
        logger.info("%d tensors not in the backbone start random (%s%s): expected for the masked-LM head, which is "
                    "warmed up on the frozen encoder first", len(missing), ", ".join(missing[:3]),
                    ", ..." if len(missing) > 3 else "")  # fmt: skip
    return model


def run_pretrain(cfg: TrainConfig, records: Sequence[dict], output: str | Path, *, quiet: bool = False) -> dict:
    """Adapt `cfg.model.backbone` to the letters' text; write the backbone directory; return the report."""
    from transformers import AutoTokenizer

    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = devices.resolve_device(cfg.train.device)  # a missing device fails before any work
    seed_everything(cfg.seed)
    source = resolve_backbone(cfg.model.backbone)
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=hub_offline(), trust_remote_code=False)
    model = _masked_lm(cfg, source).to(device)
    by_letter = letter_texts(records)
    train_letters, held_letters = split_letters(sorted(by_letter), HELD_OUT, cfg.seed)
    train_blocks = blocks(tokenizer, [t for k in train_letters for t in by_letter[k]], cfg.pretrain.max_length)
    held_blocks = blocks(tokenizer, [t for k in held_letters for t in by_letter[k]], cfg.pretrain.max_length)
    eval_gen = torch.Generator().manual_seed(cfg.seed + 99)  # the same masks for every measurement
    eval_batches = [mask_tokens(held_blocks[i : i + 32], tokenizer, MLM_PROBABILITY, eval_gen)
                    for i in range(0, len(held_blocks), 32)]  # fmt: skip
    start = time.perf_counter()
    report = {"backbone": cfg.model.backbone, "letters": {"train": len(train_letters), "held_out": len(held_letters)},
              "blocks": {"train": len(train_blocks), "held_out": len(held_blocks)}, "settings": cfg.pretrain.model_dump(),
              "device": devices.describe(device)}  # fmt: skip
    report["perplexity_initial_head"] = perplexity(model, eval_batches, tokenizer.pad_token_id)
    head = [p for n, p in model.named_parameters() if not n.startswith(model.base_model_prefix + ".")]
    if HEAD_WARMUP_STEPS:
        _train(model, train_blocks, tokenizer, cfg, HEAD_WARMUP_STEPS, head, "MLM head warm-up", quiet)
    report["perplexity_before"] = perplexity(model, eval_batches, tokenizer.pad_token_id)
    steps = _train(model, train_blocks, tokenizer, cfg, None, list(model.parameters()), "MLM pretraining", quiet)
    report["perplexity_after"] = perplexity(model, eval_batches, tokenizer.pad_token_id)
    report.update({"steps": steps, "seconds": round(time.perf_counter() - start, 1)})
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():  # no "Writing model shards" bar between ours
        model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report


def backbone_report(backbone: str) -> dict | None:
    """The pretraining report of a backbone directory written by `run_pretrain`, if any."""
    try:
        path = Path(resolve_backbone(backbone)) / REPORT_FILE
    except ValueError:
        return None
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

