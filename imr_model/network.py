"""The network: a transformers encoder with an outcome head and a guideline head, and how it is built.

`IMRNet` encodes token windows (`imr_model.windows`); the outcome head reads an attention-weighted
average of each window's token states, the guideline head their mean (the pooling all-MiniLM-L6-v2
was trained with). Window logits are pooled to items by `imr_model.pooling`; the item-level linear
terms (citation cues, TF-IDF, evidence cues) are added after pooling by `IMRClassifier`.
`build_encoder` makes a new encoder from the configured backbone (offline, transformers' own classes
only); `encoder_from_config` rebuilds one from a stored transformers config without weights.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, AutoTokenizer
from transformers.utils import logging as hf_logging

from imr_model.config import ModelConfig, hub_offline, resolve_backbone

HEAD_DROPOUT = 0.1  # dropout on the heads' inputs while fine-tuning


class ModelDirectoryError(ValueError):
    """A model directory that must not be loaded: tampered, incomplete, out of range or of another format."""


#: forward(input_ids (B, T) int64, attention_mask (B, T) int64) -> (outcome (B,), guidelines (B, L)) logits
ForwardFn = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


class IMRNet(nn.Module):
    """Transformer encoder with an outcome head on attention-pooled tokens and a guideline head on the mean.

    Outcome: a verdict turns on a word or two ("is *not* medically necessary") in one sentence; in a
    mean over ~250 tokens that word is noise, and a model trained on the mean learned topics instead
    (validation AUROC fell while training loss went to 0). A learned attention over the tokens
    (initialised to the mean) lets the head read that sentence. Guidelines: the cited guideline
    shows in many small cues (body part, drug class, "ODG", "chronic pain") that a mean adds up;
    per-label attention (CAML-style) did worse on the shared letters.
    """

    def __init__(self, encoder: nn.Module, n_labels: int, dropout: float = HEAD_DROPOUT, n_cues: int = 0, n_tfidf: int = 0,
                 n_outcome_cues: int = 0):  # fmt: skip
        super().__init__()
        self.encoder = encoder
        hidden = int(encoder.config.hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.outcome_attention = nn.Linear(hidden, 1)  # token scores; zero init = mean pooling at the start
        nn.init.zeros_(self.outcome_attention.weight)
        nn.init.zeros_(self.outcome_attention.bias)
        self.outcome_head = nn.Linear(hidden, 1)
        self.guideline_head = nn.Linear(hidden, n_labels)
        # Item-level linear term on citation cues (imr_model/cues.py), added after pooling; zero at the start.
        self.guideline_cues = nn.Linear(n_cues, n_labels, bias=False) if n_cues else None
        if self.guideline_cues is not None:
            nn.init.zeros_(self.guideline_cues.weight)
        # Item-level linear term on evidence cues (`model.outcome_cues`), added to the pooled outcome logit.
        self.outcome_cues = nn.Linear(n_outcome_cues, 1, bias=False) if n_outcome_cues else None
        if self.outcome_cues is not None:
            nn.init.zeros_(self.outcome_cues.weight)
        # Item-level linear term on the text's TF-IDF vector (`model.guideline_tfidf`); idf kept beside it.
        self.guideline_tfidf = nn.Linear(n_tfidf, n_labels, bias=False) if n_tfidf else None
        if self.guideline_tfidf is not None:
            nn.init.zeros_(self.guideline_tfidf.weight)
            self.register_buffer("tfidf_idf", torch.ones(n_tfidf, dtype=torch.float64))

    def encode(self, input_ids: Tensor | None, attention_mask: Tensor,
               inputs_embeds: Tensor | None = None) -> tuple[Tensor, Tensor]:  # fmt: skip
        """(W, T) token windows → attention-pooled (W, H) for the outcome, mean-pooled (W, H) for guidelines.

        `inputs_embeds` (W, T, E): the word embeddings to use instead of looking up `input_ids` (attributions
        integrate along them; positions and the embedding layer norm are applied as for token ids)."""
        if inputs_embeds is not None:
            input_ids = None
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              inputs_embeds=inputs_embeds).last_hidden_state  # (W, T, H)  # fmt: skip
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (W, T, 1)
        mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        scores = self.outcome_attention(hidden).masked_fill(mask == 0, torch.finfo(hidden.dtype).min)  # (W, T, 1)
        attended = (torch.softmax(scores, dim=1) * hidden).sum(dim=1)
        return attended, mean

    def forward(self, input_ids: Tensor | None, attention_mask: Tensor,
                inputs_embeds: Tensor | None = None) -> tuple[Tensor, Tensor]:  # fmt: skip
        """(W, T) token windows → outcome logit (W,) and guideline logits (W, L) per window (`inputs_embeds`:
        see `encode`)."""
        attended, mean = self.encode(input_ids, attention_mask, inputs_embeds)
        return self.outcome_head(self.dropout(attended)).squeeze(-1), self.guideline_head(self.dropout(mean))

    def get_input_embeddings(self) -> nn.Embedding:
        """The word-embedding layer (what attributions integrate along)."""
        return self.encoder.get_input_embeddings()


def encoder_from_config(encoder_config: dict) -> nn.Module:
    """The encoder, randomly initialised from a transformers config dict (transformers' own classes only)."""
    params = dict(encoder_config)
    if "auto_map" in params:  # would name classes in Python files beside the config
        raise ModelDirectoryError("encoder_config has an `auto_map` entry (custom model code); imr-model builds "
                                  "transformers' own encoders only and runs no code from a model directory")  # fmt: skip
    model_type = params.pop("model_type", None)
    if not model_type:
        raise ValueError("encoder_config has no model_type; cannot rebuild the encoder")
    hf_config = AutoConfig.for_model(model_type, **params)
    try:  # the pooler is unused (we mean-pool); BERT-like encoders can skip it
        return AutoModel.from_config(hf_config, add_pooling_layer=False, trust_remote_code=False)
    except TypeError:
        return AutoModel.from_config(hf_config, trust_remote_code=False)


@contextmanager
def quiet_transformers():
    """Silence transformers' load report and progress bar for one call, then restore the user's settings."""
    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def build_encoder(config: ModelConfig) -> tuple[nn.Module, object]:
    """Encoder and tokenizer for a new model, from the backbone (pretrained weights or random init)."""
    source = resolve_backbone(config.backbone)
    local = hub_offline()
    # trust_remote_code=False: a backbone that needs its own Python code fails instead of prompting or running it
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local, trust_remote_code=False)
    hf_config = AutoConfig.from_pretrained(source, local_files_only=local, trust_remote_code=False)
    for key, value in config.encoder_overrides.items():
        if not hasattr(hf_config, key):
            raise ValueError(f"model.encoder_overrides: {type(hf_config).__name__} has no field {key!r}")
        setattr(hf_config, key, value)
    if config.init == "random":
        hf_config.vocab_size = len(tokenizer)
        encoder = encoder_from_config(hf_config.to_dict())
    else:  # overrides such as attention_probs_dropout_prob apply on top of the pretrained weights
        with quiet_transformers():  # the unused pooler weights are reported as "unexpected" on every load
            try:
                encoder = AutoModel.from_pretrained(source, config=hf_config, local_files_only=local,
                                                    add_pooling_layer=False, trust_remote_code=False)  # fmt: skip
            except TypeError:
                encoder = AutoModel.from_pretrained(source, config=hf_config, local_files_only=local,
                                                    trust_remote_code=False)  # fmt: skip
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"backbone {config.backbone!r} has no fast tokenizer; character offsets need one")
    return encoder, tokenizer


