"""The network (encoder + outcome head + guideline head) and `IMRClassifier`, its text-in/probabilities-out wrapper.

Texts are cut into windows (`imr_model.windows`): one per sentence (`model.window_unit:
sentences`, the default config) or fixed token windows of `max_length` tokens overlapping by
`stride` (`tokens`). Each window is encoded once; the outcome head reads an attention-weighted
average of its token states, the guideline head their mean (the pooling all-MiniLM-L6-v2 was
trained with). Window logits are pooled back to the item, separately per head
(`model.pooling` for the outcome, `model.guideline_pooling` for the guidelines):

* `last`: the item's last window. With sentence windows that is the rationale's closing sentence,
  where a MAXIMUS reviewer states the verdict. On the shared letters (grouped 5-fold CV, frozen
  MiniLM + logistic regression) the last sentence separates the outcomes at AUROC .997, the mean
  over sentences at .917 and the max at .928.
* `max`: the highest-scoring window decides (multiple-instance learning): evidence that sits in one
  place ("ODG states ...") is not diluted by the number of windows.
* `mean`: every window counts equally (citations spread over a rationale).
* `logsumexp`: log of the mean of exp, between mean and max.
* `mean_last`: the mean plus the last window (the window bias counts twice). For the masked view,
  whose closing verdict sentence is masked, the last window is the reviewer's last statement of the
  evidence before it; frozen MiniLM + logistic regression on the shared letters (grouped 5-fold CV,
  6 fold assignments): outcome AUROC .815 with `mean_last`, .783 with `mean`, .753 with `last`.

Training pools the same way as inference, so what is trained is what is served.

Context (`model.context_view`, e.g. `forecast` beside `rationale_masked`): the input holds a second
view after `views.CONTEXT_SEPARATOR`. Its windows get their own outcome head (`IMRNet.context_head`;
the network's outcome output is then (W, 2): main head, context head) pooled with `last`, and the
item's outcome logit is the main part's pooled logit plus the context's. Guidelines, cues and TF-IDF
read the main view only.

A model directory holds `config.json` (`ModelConfig`), `model.safetensors`, tokenizer files
(`tokenizer.json`, `tokenizer_config.json`), `calibration.json`, `metrics.json` and `taxonomy.json` (plus
`tfidf_vocabulary.json` when the guideline logits have a TF-IDF term); loading it needs neither pickle
nor the backbone: the encoder is rebuilt from the stored transformers config.

A model directory is input, not code: `from_pretrained` never runs code from it (transformers is called
with `trust_remote_code=False`, and an `auto_map` entry or a tokenizer class that is not transformers'
own fails with an error naming the file), never prompts, and never fills in a missing file with a
default. `config.json` records the SHA-256 of every other file `save_pretrained` wrote (`digests`),
checked on load; a step that writes a file into the directory afterwards adds it with `record_digest`.
`calibration.json` is range-checked. Probabilities are bounded to [0.001, 0.999]
(`calibration.bounded_sigmoid`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from imr_model.baseline import TfidfFeatures
from imr_model.calibration import PROB_MAX, PROB_MIN, bound_probability, bounded_sigmoid, decide_labels
from imr_model.config import POOLINGS, ModelConfig, hub_offline, resolve_backbone
from imr_model.cues import cue_matrix, cue_names, cue_version, evidence_matrix, evidence_names, evidence_version
from imr_model.views import main_text
from imr_model.windows import Windows, make_windows  # noqa: F401 - Windows is part of this module's API

CONFIG_FILE = "config.json"
#: Version of the model-directory layout (network modules and their weight names). 2: outcome head on
#: attention-pooled tokens, sentence windows. 3: SHA-256 digests in config.json, thresholds on the bounded
#: probability scale. Directories of another version fail with a clear message.
FORMAT_VERSION = 3
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CALIBRATION_FILE = "calibration.json"
METRICS_FILE = "metrics.json"
TAXONOMY_FILE = "taxonomy.json"
TFIDF_FILE = "tfidf_vocabulary.json"
#: Files every model directory needs besides config.json (plus TFIDF_FILE with `model.guideline_tfidf`).
REQUIRED_FILES = (WEIGHTS_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, CALIBRATION_FILE)
#: config.json key of the {file name: SHA-256 hex digest} map (`record_digest`, `verify_digests`).
DIGESTS_KEY = "digests"
_RESTORE = "retrain the model (`imr train`) or restore the file"


class ModelDirectoryError(ValueError):
    """A model directory that must not be loaded: tampered, incomplete, out of range or of another format."""


class MissingModelFileError(ModelDirectoryError, FileNotFoundError):
    """A file the model-directory format needs is absent."""

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

    def __init__(self, encoder: nn.Module, n_labels: int, dropout: float = 0.1, n_cues: int = 0, n_tfidf: int = 0,
                 n_outcome_cues: int = 0, context: bool = False):  # fmt: skip
        super().__init__()
        self.encoder = encoder
        hidden = int(encoder.config.hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.outcome_attention = nn.Linear(hidden, 1)  # token scores; zero init = mean pooling at the start
        nn.init.zeros_(self.outcome_attention.weight)
        nn.init.zeros_(self.outcome_attention.bias)
        self.outcome_head = nn.Linear(hidden, 1)
        self.guideline_head = nn.Linear(hidden, n_labels)
        # Outcome head of the context view's windows (`model.context_view`); fit by the logistic refit.
        self.context_head = nn.Linear(hidden, 1) if context else None
        if self.context_head is not None:
            nn.init.zeros_(self.context_head.weight)
            nn.init.zeros_(self.context_head.bias)
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

    def encode(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """(W, T) token windows → attention-pooled (W, H) for the outcome, mean-pooled (W, H) for guidelines."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (W, T, H)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (W, T, 1)
        mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        scores = self.outcome_attention(hidden).masked_fill(mask == 0, torch.finfo(hidden.dtype).min)  # (W, T, 1)
        attended = (torch.softmax(scores, dim=1) * hidden).sum(dim=1)
        return attended, mean

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """(W, T) token windows → outcome logit (W,) and guideline logits (W, L) per window.

        With a context head the outcome is (W, 2): the main head's logit, then the context head's.
        """
        attended, mean = self.encode(input_ids, attention_mask)
        attended = self.dropout(attended)
        outcome = self.outcome_head(attended)  # (W, 1)
        if self.context_head is not None:  # (W, 2); no squeeze: ONNX's Squeeze needs a dimension of 1
            outcome = torch.cat([outcome, self.context_head(attended)], dim=-1)
        else:
            outcome = outcome.squeeze(-1)
        return outcome, self.guideline_head(self.dropout(mean))

    def get_input_embeddings(self) -> nn.Embedding:
        """The word-embedding layer (the Captum LayerIntegratedGradients target)."""
        return self.encoder.get_input_embeddings()


def pool_logits(logits: Tensor, item_ids: Tensor, n_items: int, mode: str) -> Tensor:
    """Pool window logits (W,) or (W, L) into item logits (N,) or (N, L); differentiable."""
    if mode == "mean_last":
        return pool_logits(logits, item_ids, n_items, "mean") + pool_logits(logits, item_ids, n_items, "last")
    shape = (n_items,) + tuple(logits.shape[1:])
    index = item_ids.view(-1, *([1] * (logits.dim() - 1))).expand_as(logits)
    if mode == "max":
        return logits.new_full(shape, float("-inf")).scatter_reduce(0, index, logits, "amax", include_self=False)
    if mode == "last":  # the item's last window (windows are in text order)
        position = torch.arange(len(item_ids), device=item_ids.device)
        last = torch.zeros(n_items, dtype=torch.long, device=item_ids.device).scatter_reduce(
            0, item_ids, position, "amax", include_self=False
        )
        return logits[last]
    counts = torch.zeros(n_items, dtype=logits.dtype, device=logits.device).index_add_(
        0, item_ids, torch.ones_like(item_ids, dtype=logits.dtype)
    )
    counts = counts.clamp(min=1.0).view(-1, *([1] * (logits.dim() - 1)))
    if mode == "mean":
        return logits.new_zeros(shape).index_add_(0, item_ids, logits) / counts
    if mode == "logsumexp":
        peak = logits.new_full(shape, float("-inf")).scatter_reduce(0, index, logits, "amax", include_self=False)
        peak = peak.detach()  # a constant shift for stability; the gradient does not need it
        summed = logits.new_zeros(shape).index_add_(0, item_ids, torch.exp(logits - peak[item_ids]))
        return torch.log(summed / counts) + peak
    raise ValueError(f"unknown pooling {mode!r}; valid: {', '.join(POOLINGS)}")


def bias_multiplicity(mode: str) -> int:
    """How often a window head's bias enters the pooled item logit: 2 for `mean_last`, else 1."""
    return 2 if mode == "mean_last" else 1


def _encoder_from_config(encoder_config: dict) -> nn.Module:
    """The encoder, randomly initialised from a transformers config dict (transformers' own classes only)."""
    from transformers import AutoConfig, AutoModel

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
    from transformers.utils import logging as hf_logging

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
    from transformers import AutoConfig, AutoModel, AutoTokenizer

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
        encoder = _encoder_from_config(hf_config.to_dict())
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


class IMRClassifier:
    """Texts (already in the model's text view) → calibrated outcome and guideline probabilities."""

    def __init__(
        self,
        config: ModelConfig,
        net: IMRNet,
        tokenizer,
        *,
        temperature: float = 1.0,
        outcome_threshold: float = 0.5,
        guideline_thresholds: np.ndarray | None = None,
        metrics: dict | None = None,
        device: str = "cpu",
        tfidf_vocabulary: Sequence[str] | None = None,
        tfidf_ngram_max: int = 2,
        guideline_basis: Sequence[str] = (),
        guideline_basis_extra: float = 1.0,
    ):
        n_labels = len(config.label_names)
        if net.guideline_head.out_features != n_labels:
            raise ValueError(
                f"guideline head has {net.guideline_head.out_features} outputs but config lists {n_labels} labels"
            )
        self.config = config
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.tokenizer = tokenizer
        self.temperature = _check_temperature(temperature)
        self.outcome_threshold = _check_unit("outcome_threshold", outcome_threshold)
        thresholds = np.full(n_labels, 0.5) if guideline_thresholds is None else np.asarray(guideline_thresholds)
        if thresholds.shape != (n_labels,):
            raise ValueError(f"guideline_thresholds has shape {thresholds.shape}, expected ({n_labels},)")
        self.guideline_thresholds = np.array([_check_unit("guideline_thresholds", t) for t in thresholds], dtype=np.float64)
        unknown = [b for b in guideline_basis if b not in config.label_names]
        if unknown:
            raise ValueError(f"guideline_basis names {unknown}, not among the model's labels {list(config.label_names)}")
        # decision-basis labels (taxonomy `decision_basis`) decoded as one per item; empty = independent decisions
        self.guideline_basis = tuple(guideline_basis)
        self.guideline_basis_extra = _check_unit("guideline_basis_extra", guideline_basis_extra)
        self.metrics = dict(metrics or {})
        self.tfidf: TfidfFeatures | None = None
        if net.guideline_tfidf is not None:
            if tfidf_vocabulary is None or len(tfidf_vocabulary) != net.guideline_tfidf.in_features:
                raise ValueError(f"the guideline TF-IDF term has {net.guideline_tfidf.in_features} inputs but the "
                                 f"vocabulary has {0 if tfidf_vocabulary is None else len(tfidf_vocabulary)} terms")  # fmt: skip
            self.tfidf = TfidfFeatures(list(tfidf_vocabulary), net.tfidf_idf.detach().cpu().numpy(), tfidf_ngram_max)

    @property
    def label_names(self) -> list[str]:
        return list(self.config.label_names)

    # ----------------------------------------------------------------------------- construction / IO
    @classmethod
    def build(cls, config: ModelConfig, label_names: Sequence[str], device: str = "cpu",
              tfidf: TfidfFeatures | None = None) -> "IMRClassifier":  # fmt: skip
        """A new, untrained classifier on the configured backbone.

        `tfidf`: the fitted vocabulary of the guideline TF-IDF term; required when `config.guideline_tfidf`.
        """
        if not label_names:
            raise ValueError("label_names is empty; the guideline head needs at least one label")
        if config.guideline_tfidf and tfidf is None:
            raise ValueError("model.guideline_tfidf needs a fitted TF-IDF vocabulary (TfidfFeatures.fit on the training texts)")
        tfidf = tfidf if config.guideline_tfidf else None
        encoder, tokenizer = build_encoder(config)
        cues = cue_names() if config.guideline_cues else []
        evidence = evidence_names() if config.outcome_cues else []
        config = config.model_copy(update={"label_names": list(label_names), "encoder_config": encoder.config.to_dict(),
                                           "cue_names": cues, "cue_version": cue_version() if cues else 0,
                                           "outcome_cue_names": evidence,
                                           "outcome_cue_version": evidence_version() if evidence else 0})  # fmt: skip
        net = IMRNet(encoder, len(label_names), config.dropout, len(cues), len(tfidf) if tfidf is not None else 0,
                     len(evidence), context=config.context_view is not None)  # fmt: skip
        if tfidf is None:
            return cls(config, net, tokenizer, device=device)
        with torch.no_grad():
            net.tfidf_idf.copy_(torch.as_tensor(np.asarray(tfidf.idf, dtype=np.float64)))
        return cls(config, net, tokenizer, device=device, tfidf_vocabulary=tfidf.vocabulary, tfidf_ngram_max=tfidf.ngram_max)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu") -> "IMRClassifier":
        """Load a directory written by `save_pretrained` (no network, no pickle, no code from the directory).

        Raises `MissingModelFileError` (a FileNotFoundError) for a missing file and `ModelDirectoryError`
        (a ValueError) for a directory of another format, a file whose SHA-256 differs from the one
        config.json records, an `auto_map` or foreign tokenizer class, or calibration values out of range;
        every message names the file.
        """
        path = Path(path)
        if not (path / CONFIG_FILE).is_file():
            raise MissingModelFileError(f"{path} is not an IMR model directory: missing {CONFIG_FILE}; {_RESTORE}")
        raw = _read_model_json(path, CONFIG_FILE)
        version = raw.pop("format_version", 1)
        if version != FORMAT_VERSION:
            raise ModelDirectoryError(f"{path} holds an IMR model in directory format {version}; this imr-model reads "
                                      f"format {FORMAT_VERSION}. Retrain it with `imr train` (or load it with the "
                                      "release that wrote it).")  # fmt: skip
        digests = raw.pop(DIGESTS_KEY, None)
        if "auto_map" in raw:
            raise ModelDirectoryError(f"{path / CONFIG_FILE}: has an `auto_map` entry (custom code); IMR model "
                                      f"directories hold no code and imr-model runs none; {_RESTORE}")  # fmt: skip
        try:
            config = ModelConfig.model_validate(raw)
        except ValueError as exc:
            raise ModelDirectoryError(f"{path / CONFIG_FILE} does not describe an IMR model ({exc}); {_RESTORE}") from None
        if config.cue_names and (config.cue_names != cue_names() or config.cue_version != cue_version()):
            raise ValueError(f"{path} was trained with citation cues that differ from this imr-model's "
                             "(imr_model/resources/cues.yaml changed). Retrain it with `imr train`.")  # fmt: skip
        if config.outcome_cue_names and (config.outcome_cue_names != evidence_names()
                                         or config.outcome_cue_version != evidence_version()):
            raise ValueError(f"{path} was trained with evidence cues that differ from this imr-model's "
                             "(imr_model/resources/cues.yaml changed). Retrain it with `imr train`.")  # fmt: skip
        required = REQUIRED_FILES + ((TFIDF_FILE,) if config.guideline_tfidf else ())
        missing = [n for n in required if not (path / n).is_file()]
        if missing:
            raise MissingModelFileError(f"{path}: missing {', '.join(missing)}, which every IMR model directory "
                                        f"needs; {_RESTORE}")  # fmt: skip
        _verify_digests(path, digests, required)
        calibration = _calibration_kwargs(_read_model_json(path, CALIBRATION_FILE), config.label_names, path)
        tokenizer = _load_tokenizer(path, config.encoder_config)
        vocabulary, ngram_max = None, 2
        if config.guideline_tfidf:
            record = _read_model_json(path, TFIDF_FILE)
            try:
                vocabulary, ngram_max = [str(t) for t in record["vocabulary"]], int(record["ngram_max"])
            except (KeyError, TypeError, ValueError) as exc:
                raise ModelDirectoryError(f"{path / TFIDF_FILE}: no valid vocabulary / ngram_max ({exc!r}); {_RESTORE}") from None
        try:
            encoder = _encoder_from_config(config.encoder_config)
        except ModelDirectoryError as exc:
            raise ModelDirectoryError(f"{path / CONFIG_FILE}: {exc}; {_RESTORE}") from None
        net = IMRNet(encoder, len(config.label_names), config.dropout, len(config.cue_names), len(vocabulary or []),
                     len(config.outcome_cue_names), context=config.context_view is not None)  # fmt: skip
        state = load_file(str(path / WEIGHTS_FILE))
        bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise ModelDirectoryError(f"{path / WEIGHTS_FILE}: non-finite (NaN/inf) weights in {', '.join(bad[:5])}; "
                                      "retrain the model")  # fmt: skip
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelDirectoryError(f"{path / WEIGHTS_FILE} does not fit the network config.json describes "
                                      f"({exc}); {_RESTORE}") from None  # fmt: skip
        metrics = _read_model_json(path, METRICS_FILE) if (path / METRICS_FILE).is_file() else {}
        return cls(config, net, tokenizer, metrics=metrics, device=device, tfidf_vocabulary=vocabulary,
                   tfidf_ngram_max=ngram_max, **calibration)  # fmt: skip

    def save_pretrained(self, path: str | Path) -> None:
        """Write the self-contained model directory (JSON + safetensors + tokenizer files).

        config.json is written last and records the SHA-256 of every other file written here (`DIGESTS_KEY`).
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        written = [WEIGHTS_FILE]
        state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        save_file(state, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
        for saved in self.tokenizer.save_pretrained(str(path)):
            name = _member_name(path, Path(saved).resolve())  # transformers returns paths as given (maybe relative)
            if (path / name).is_file() and name not in written:
                written.append(name)
        for name in (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE):
            if name not in written:
                raise ValueError(f"the tokenizer did not write {name}; an IMR model needs a fast tokenizer")
        payloads = {CALIBRATION_FILE: self.calibration_dict(), METRICS_FILE: self.metrics,
                    TAXONOMY_FILE: _taxonomy_record(self.label_names)}  # fmt: skip
        if self.tfidf is not None:
            payloads[TFIDF_FILE] = {"ngram_max": self.tfidf.ngram_max, "vocabulary": self.tfidf.vocabulary}
        for name, payload in payloads.items():
            _write_json(path / name, payload)
            written.append(name)
        record = {"format_version": FORMAT_VERSION, **self.config.model_dump(mode="json"),
                  DIGESTS_KEY: {name: file_sha256(path / name) for name in written}}  # fmt: skip
        _write_text_atomic(path / CONFIG_FILE, json.dumps(record, indent=2))

    def calibration_dict(self) -> dict:
        """calibration.json: thresholds on the output (bounded) probability scale; `guideline_basis.extra_threshold`
        on the calibrated scale (`calibration.BASIS_EXTRA_GRID`). Values out of range raise (nothing saves them)."""
        thresholds = [_check_unit("guideline_thresholds", t) for t in self.guideline_thresholds]
        return {
            "temperature": _check_temperature(self.temperature),
            "outcome_threshold": _check_unit("outcome_threshold", self.outcome_threshold),
            "guideline_thresholds": dict(zip(self.label_names, thresholds)),
            "guideline_basis": {"labels": list(self.guideline_basis),
                                "extra_threshold": _check_unit("guideline_basis_extra", self.guideline_basis_extra)},  # fmt: skip
            "probability_bounds": [PROB_MIN, PROB_MAX],
        }

    # ----------------------------------------------------------------------------- inference
    def make_windows(self, texts: Sequence[str]) -> Windows:
        """Tokenize texts into windows (token windows with stride, or sentences); every text yields one or more."""
        cfg = self.config
        return make_windows(self.tokenizer, _check_texts(texts), max_length=cfg.max_length, stride=cfg.stride,
                            max_windows=cfg.max_windows, unit=cfg.window_unit,
                            context=cfg.context_view is not None)  # fmt: skip

    def forward_windows(
        self, windows: Windows, batch_size: int = 32, forward: ForwardFn | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Raw logits per window, (W,) and (W, L); the outcome is (W, 2) with a context head (main, context).

        Identical windows (the boilerplate sentences letters repeat: 23% of the sentence windows of the
        shared letters' rationales) are run once. Batches are length-sorted and trimmed (dynamic padding).
        """
        n, n_labels = len(windows), len(self.label_names)
        heads = 1 if self.net.context_head is None else 2
        lengths = windows.attention_mask.sum(dim=1)
        unique, inverse = _unique_windows(windows.input_ids, lengths)
        out_o = np.zeros((len(unique), heads), dtype=np.float32)
        out_g = np.zeros((len(unique), n_labels), dtype=np.float32)
        order = unique[torch.argsort(lengths[unique], descending=True, stable=True)]
        slot = torch.empty(n, dtype=torch.long)
        slot[unique] = torch.arange(len(unique))
        self.net.eval()
        for start in range(0, len(order), max(1, batch_size)):
            idx = order[start : start + batch_size]
            width = max(1, int(lengths[idx].max()))
            ids, mask = windows.input_ids[idx, :width], windows.attention_mask[idx, :width]
            if forward is None:
                with torch.inference_mode():
                    o, g = self.net(ids.to(self.device), mask.to(self.device))
                o, g = o.float().cpu().numpy(), g.float().cpu().numpy()
            else:
                o, g = forward(ids.numpy(), mask.numpy())
            rows = slot[idx].numpy()
            out_o[rows] = np.asarray(o, dtype=np.float32).reshape(len(idx), heads)
            out_g[rows] = np.asarray(g, dtype=np.float32).reshape(len(idx), n_labels)
        return (out_o[inverse, 0] if heads == 1 else out_o[inverse]), out_g[inverse]

    def pool(
        self, outcome_logits: np.ndarray, guideline_logits: np.ndarray, item_ids: np.ndarray, n_items: int,
        segments: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Window logits → item logits (N,), (N, L) with the configured poolings (outcome, guidelines).

        With a context head, `segments` (W,) tells the main windows (0), pooled as configured, from the
        context windows (1), whose context-head logits are pooled with `last` and added to the outcome.
        """
        ids = torch.as_tensor(np.asarray(item_ids), dtype=torch.long)
        o = torch.as_tensor(np.asarray(outcome_logits, dtype=np.float32))
        g = torch.as_tensor(np.asarray(guideline_logits, dtype=np.float32))
        if self.net.context_head is None:
            o_item = pool_logits(o, ids, n_items, self.config.pooling)
            return o_item.numpy(), pool_logits(g, ids, n_items, self.config.guideline_pool).numpy()
        if segments is None:
            raise ValueError("a model with model.context_view needs the windows' segments to pool")
        main = torch.as_tensor(np.asarray(segments)) == 0
        o_item = pool_logits(o[main, 0], ids[main], n_items, self.config.pooling)
        o_item = o_item + pool_logits(o[~main, 1], ids[~main], n_items, "last")
        return o_item.numpy(), pool_logits(g[main], ids[main], n_items, self.config.guideline_pool).numpy()

    def predict_logits(
        self, texts: Sequence[str], batch_size: int = 32, forward: ForwardFn | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Uncalibrated item logits: outcome (N,) and guidelines (N, L)."""
        texts = _check_texts(texts)
        return self.window_item_logits(self.make_windows(texts), texts, batch_size=batch_size, forward=forward)

    def window_item_logits(
        self, windows: Windows, texts: Sequence[str], batch_size: int = 32, forward: ForwardFn | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Uncalibrated item logits of `texts` from their already-made `windows` (pooled + item-level terms)."""
        o, g = self.forward_windows(windows, batch_size=batch_size, forward=forward)
        o, g = self.pool(o, g, windows.item_ids.numpy(), len(texts), windows.segments.numpy())
        o_term, g_term = self.item_term_logits(texts)
        return o + o_term, g + g_term

    def item_term_logits(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """The item-level terms of the logits: outcome (N,) from evidence cues, guidelines (N, L) from citation
        cues and TF-IDF; zeros without them.

        Both backends add them here, after pooling. Attributions give the evidence term to the words it
        matched (attribution.add_evidence_scores); the guideline terms are not attributed. They read the
        main view only (`views.main_text`).
        """
        texts = [main_text(t) for t in texts]
        o = np.zeros(len(texts), dtype=np.float32)
        if self.net.outcome_cues is not None:
            o += evidence_matrix(texts) @ self.net.outcome_cues.weight.detach().cpu().numpy()[0]
        out = np.zeros((len(texts), len(self.label_names)), dtype=np.float32)
        if self.net.guideline_cues is not None:
            out += cue_matrix(texts) @ self.net.guideline_cues.weight.detach().cpu().numpy().T
        if self.tfidf is not None:
            weight = self.net.guideline_tfidf.weight.detach().cpu().numpy().astype(np.float64)
            out += np.asarray(self.tfidf.transform(texts) @ weight.T, dtype=np.float32)
        return o, out

    def predict_proba(
        self, texts: Sequence[str], batch_size: int = 32, forward: ForwardFn | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated P(Overturned) (N,) and guideline probabilities (N, L) in `label_names` order."""
        o, g = self.predict_logits(texts, batch_size=batch_size, forward=forward)
        return self.calibrate(o, g)

    def calibrate(self, outcome_logits: np.ndarray, guideline_logits: np.ndarray, *,
                  bounded: bool = True) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """Item logits → probabilities (float64): σ(outcome / T) and σ(guidelines), mapped into [0.001, 0.999]
        by `calibration.bounded_sigmoid` (strictly increasing: rankings unchanged).

        `bounded=False` gives the calibrated probabilities before that map (what the threshold rules are fitted
        on; `calibration.calibrate`). NaN logits raise ValueError.
        """
        o = np.asarray(outcome_logits, dtype=np.float64) / _check_temperature(self.temperature)
        g = np.asarray(guideline_logits, dtype=np.float64)
        if bounded:
            return np.asarray(bounded_sigmoid(o)), np.asarray(bounded_sigmoid(g))
        from scipy.special import expit

        for name, x in (("outcome", o), ("guideline", g)):
            if np.isnan(x).any():
                raise ValueError(f"{int(np.isnan(x).sum())} {name} logits are NaN; no probability can be given for them")
        return expit(o), expit(g)

    def set_guideline_decoding(self, basis: Sequence[int], basis_extra: float | None) -> None:
        """Keep the guideline decoding `calibration.fit_basis_extra` chose: one decision basis per item over the
        `basis` columns with `basis_extra`, or independent decisions when it is None (or `basis` is empty).

        `basis_extra` is on the calibrated probability scale `fit_basis_extra` saw (a `BASIS_EXTRA_GRID` value);
        `decide_guidelines` maps it to the output scale."""
        one_basis = basis_extra is not None and len(basis) > 0
        self.guideline_basis = tuple(self.label_names[j] for j in basis) if one_basis else ()
        self.guideline_basis_extra = _check_unit("basis_extra", basis_extra) if one_basis else 1.0

    def decide_guidelines(self, guideline_probs: np.ndarray) -> np.ndarray:
        """Guideline probabilities (N, L) → 0/1 decisions (N, L): fitted thresholds, and one decision basis per
        item when the model was fit with `train.guideline_decoding: one_basis` (`calibration.decide_labels`)."""
        basis = [self.label_names.index(b) for b in self.guideline_basis]
        probs = np.asarray(guideline_probs, dtype=np.float64)
        if np.isnan(probs).any():
            raise ValueError(f"{int(np.isnan(probs).sum())} guideline probabilities are NaN; no decision can be made")
        # the extra-basis threshold is on the calibrated scale (see set_guideline_decoding): map it as probs were
        return decide_labels(probs, self.guideline_thresholds, basis, bound_probability(self.guideline_basis_extra))

    def decide(self, p_overturned: np.ndarray, guideline_probs: np.ndarray) -> tuple[list[str], list[list[str]]]:
        """Probabilities → outcome names and predicted label sets, using the fitted thresholds."""
        upheld, overturned = self.config.outcome_labels
        p_overturned = np.asarray(p_overturned, dtype=np.float64)
        if np.isnan(p_overturned).any():  # NaN >= threshold is False: it would read as a confident "Upheld"
            raise ValueError(f"{int(np.isnan(p_overturned).sum())} outcome probabilities are NaN; no decision can be made")
        outcomes = [overturned if p >= self.outcome_threshold else upheld for p in p_overturned]
        chosen = self.decide_guidelines(guideline_probs)
        labels = [[name for name, on in zip(self.label_names, row) if on] for row in chosen]
        return outcomes, labels


def _unique_windows(input_ids: Tensor, lengths: Tensor) -> tuple[Tensor, np.ndarray]:
    """(indices of the first occurrence of each distinct window, position of every window among them)."""
    first: dict[bytes, int] = {}
    inverse = np.empty(len(lengths), dtype=np.int64)
    keep: list[int] = []
    ids = input_ids.numpy()
    for i, n in enumerate(lengths.tolist()):
        j = first.setdefault(ids[i, :n].tobytes(), len(keep))
        if j == len(keep):
            keep.append(i)
        inverse[i] = j
    return torch.tensor(keep, dtype=torch.long), inverse


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings; wrap a single text in a list")
    out = []
    for i, text in enumerate(texts):
        if text is None:
            text = ""
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is {type(text).__name__}, expected str")
        out.append(text)
    return out


def _taxonomy_record(label_names: list[str]) -> dict:
    """The taxonomy (version, labels, descriptions) the guideline head was trained on."""
    from imr_model.taxonomy import load_taxonomy

    record = load_taxonomy().to_dict()
    return record if record.get("labels") == label_names else {"labels": label_names}


def _write_json(path: Path, payload: dict) -> None:
    _write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True, default=_json_default))


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _read_model_json(path: Path, name: str) -> dict:
    """A JSON object of the model directory; an error naming the file when it is absent, unreadable or not an object."""
    file = path / name
    if not file.is_file():
        raise MissingModelFileError(f"{path}: missing {name}; {_RESTORE}")
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ModelDirectoryError(f"{file} is not valid JSON ({exc}); {_RESTORE}") from None
    if not isinstance(record, dict):
        raise ModelDirectoryError(f"{file} holds a JSON {type(record).__name__}, not an object; {_RESTORE}")
    return record


# --------------------------------------------------------------------------------- digests
def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _member_name(model_dir: Path, filename: str | Path) -> str:
    """`filename` as a POSIX path relative to `model_dir`, refused when it leaves the directory or is config.json."""
    name = Path(filename)
    if name.is_absolute():
        try:
            name = name.resolve().relative_to(Path(model_dir).resolve())
        except ValueError:
            raise ValueError(f"{filename} is not inside the model directory {model_dir}") from None
    if not name.parts or ".." in name.parts or name.is_absolute():
        raise ValueError(f"{str(filename)!r} is not a file name inside the model directory")
    if name.as_posix() == CONFIG_FILE:
        raise ValueError(f"{CONFIG_FILE} holds the digests; it cannot record its own")
    return name.as_posix()


def record_digest(model_dir: str | Path, filename: str | Path) -> str:
    """Record the SHA-256 of `filename` (relative to `model_dir`, e.g. "reference.json") in config.json, so
    `from_pretrained` checks it too; returns the digest.

    For a step that writes a file into a saved model directory after `save_pretrained` (or rewrites one that
    `save_pretrained` wrote, e.g. calibration.json): call it after the file is complete. config.json is
    rewritten atomically; its other content is kept.
    """
    path = Path(model_dir)
    name = _member_name(path, filename)
    raw = _read_model_json(path, CONFIG_FILE)
    if raw.get("format_version") != FORMAT_VERSION:
        raise ModelDirectoryError(f"{path / CONFIG_FILE}: directory format {raw.get('format_version', 1)}, not "
                                  f"{FORMAT_VERSION}; record digests in directories of this format only")  # fmt: skip
    if not (path / name).is_file():
        raise MissingModelFileError(f"{path}: missing {name}; write the file before recording its digest")
    digests = raw.get(DIGESTS_KEY)
    if not isinstance(digests, dict):
        raise ModelDirectoryError(f"{path / CONFIG_FILE} has no `{DIGESTS_KEY}` map; {_RESTORE}")
    digests[name] = file_sha256(path / name)
    _write_text_atomic(path / CONFIG_FILE, json.dumps(raw, indent=2))
    return digests[name]


def verify_digests(model_dir: str | Path) -> dict[str, str]:
    """Check every file config.json records a digest for (and that the format's required files are among them);
    returns the {file: SHA-256} map. Raises ModelDirectoryError / MissingModelFileError naming the file."""
    path = Path(model_dir)
    raw = _read_model_json(path, CONFIG_FILE)
    required = REQUIRED_FILES + ((TFIDF_FILE,) if raw.get("guideline_tfidf") else ())
    return _verify_digests(path, raw.get(DIGESTS_KEY), required)


def _verify_digests(path: Path, digests, required: Sequence[str]) -> dict[str, str]:
    if not isinstance(digests, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in digests.items()):
        raise ModelDirectoryError(f"{path / CONFIG_FILE}: no valid `{DIGESTS_KEY}` map of file SHA-256 digests; {_RESTORE}")
    unrecorded = [n for n in required if n not in digests]
    if unrecorded:
        raise ModelDirectoryError(f"{path / CONFIG_FILE} records no SHA-256 for {', '.join(unrecorded)}; {_RESTORE}")
    for name, expected in digests.items():
        member = _member_name(path, name)
        if not (path / member).is_file():
            raise MissingModelFileError(f"{path}: missing {member} (saved with the model: config.json records its "
                                        f"SHA-256); {_RESTORE}")  # fmt: skip
        if file_sha256(path / member) != expected.lower():
            raise ModelDirectoryError(f"{path / member}: SHA-256 mismatch (the file changed after the model was "
                                      "saved); retrain or restore it")  # fmt: skip
    return dict(digests)


# ----------------------------------------------------------------------------- load checks
def _load_tokenizer(path: Path, encoder_config: dict):
    """The directory's fast tokenizer, by transformers' own class named in tokenizer_config.json, no code run."""
    from transformers import PreTrainedTokenizerBase
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    file = path / TOKENIZER_CONFIG_FILE
    record = _read_model_json(path, TOKENIZER_CONFIG_FILE)
    if "auto_map" in record:
        raise ModelDirectoryError(f"{file}: has an `auto_map` entry (custom tokenizer code); IMR model directories "
                                  f"hold no code and imr-model runs none; {_RESTORE}")  # fmt: skip
    name = record.get("tokenizer_class")
    cls = tokenizer_class_from_name(name) if isinstance(name, str) and name.isidentifier() else None
    if (not isinstance(cls, type) or not issubclass(cls, PreTrainedTokenizerBase)
            or not str(getattr(cls, "__module__", "")).startswith("transformers.")):  # fmt: skip
        raise ModelDirectoryError(f"{file}: tokenizer_class {name!r} is not a tokenizer class of transformers; "
                                  f"{_RESTORE}")  # fmt: skip
    try:
        with quiet_transformers():
            tokenizer = cls.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - any failure is a broken tokenizer file
        raise ModelDirectoryError(f"{path}: the tokenizer ({TOKENIZER_FILE}, {TOKENIZER_CONFIG_FILE}) does not load "
                                  f"({type(exc).__name__}: {exc}); {_RESTORE}") from None  # fmt: skip
    if not getattr(tokenizer, "is_fast", False):
        raise ModelDirectoryError(f"{path}: {TOKENIZER_FILE} did not give a fast tokenizer; {_RESTORE}")
    vocab_size = encoder_config.get("vocab_size") if isinstance(encoder_config, dict) else None
    if isinstance(vocab_size, int) and len(tokenizer) > vocab_size:
        raise ModelDirectoryError(f"{path / TOKENIZER_FILE}: {len(tokenizer)} tokens, more than the encoder's "
                                  f"{vocab_size} embeddings (config.json); {_RESTORE}")  # fmt: skip
    return tokenizer


def _number(value, field: str, path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ModelDirectoryError(f"{path / CALIBRATION_FILE}: {field} is {value!r}, not a finite number; {_RESTORE}")
    return float(value)


def _unit(value, field: str, path: Path) -> float:
    x = _number(value, field, path)
    if not 0.0 <= x <= 1.0:
        raise ModelDirectoryError(f"{path / CALIBRATION_FILE}: {field} is {x!r}, outside [0, 1]; {_RESTORE}")
    return x


def _calibration_kwargs(record: dict, label_names: Sequence[str], path: Path) -> dict:
    """calibration.json → IMRClassifier keyword arguments, every field present and in range."""
    missing = [k for k in ("temperature", "outcome_threshold", "guideline_thresholds", "guideline_basis",
                           "probability_bounds") if k not in record]  # fmt: skip
    if missing:
        raise ModelDirectoryError(f"{path / CALIBRATION_FILE}: missing field {', '.join(missing)}; {_RESTORE}")
    bounds = record["probability_bounds"]
    if bounds != [PROB_MIN, PROB_MAX]:
        raise ModelDirectoryError(f"{path / CALIBRATION_FILE}: probability_bounds is {bounds!r}; this imr-model's "
                                  f"thresholds compare with probabilities in [{PROB_MIN}, {PROB_MAX}]; retrain the model")  # fmt: skip
    temperature = _number(record["temperature"], "temperature", path)
    if temperature <= 0:
        raise ModelDirectoryError(f"{path / CALIBRATION_FILE}: temperature is {temperature!r}, not > 0; {_RESTORE}")
    label_thr = record["guideline_thresholds"]
    if not isinstance(label_thr, dict):
        raise ModelDirectoryError(f"{path / CALIBRATION_FILE}: guideline_thresholds is not a {{label: threshold}} "
                                  f"object; {_RESTORE}")  # fmt: skip
    absent = [n for n in label_names if n not in label_thr]
    unknown = [n for n in label_thr if n not in label_names]
    if absent:
        raise ModelDirectoryError(f"{path / CALIBRATION_FILE}: guideline_thresholds lacks {absent}; {_RESTORE}")
    if unknown:
        raise ModelDirectoryError(f"{path / CALIBRATION_FILE}: guideline_thresholds names labels the model does not "
                                  f"have {unknown}; {_RESTORE}")  # fmt: skip
    basis = record["guideline_basis"]
    if not isinstance(basis, dict) or not isinstance(basis.get("labels"), list):
        raise ModelDirectoryError(f"{path / CALIBRATION_FILE}: guideline_basis is not an object with a `labels` list; "
                                  f"{_RESTORE}")  # fmt: skip
    bad = [b for b in basis["labels"] if not isinstance(b, str) or b not in label_names]
    if bad or len(set(basis["labels"])) != len(basis["labels"]):
        raise ModelDirectoryError(f"{path / CALIBRATION_FILE}: guideline_basis.labels names {bad or 'a label twice'}, "
                                  f"not distinct labels of the model; {_RESTORE}")  # fmt: skip
    return {
        "temperature": temperature,
        "outcome_threshold": _unit(record["outcome_threshold"], "outcome_threshold", path),
        "guideline_thresholds": np.array([_unit(label_thr[n], f"guideline_thresholds.{n}", path) for n in label_names]),
        "guideline_basis": tuple(basis["labels"]),
        "guideline_basis_extra": _unit(basis.get("extra_threshold"), "guideline_basis.extra_threshold", path),
    }


def _check_temperature(value) -> float:
    t = float(value)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature is {value!r}; it must be finite and > 0")
    return t


def _check_unit(field: str, value) -> float:
    x = float(value)
    if not (math.isfinite(x) and 0.0 <= x <= 1.0):
        raise ValueError(f"{field} is {value!r}; it must be a probability in [0, 1]")
    return x


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
