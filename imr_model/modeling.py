"""The network (encoder + outcome head + guideline head) and `IMRClassifier`, its text-in/probabilities-out wrapper.

Long texts are cut into token windows of `max_length` tokens that overlap by `stride` tokens. Each
window is encoded once and both heads read the mean of its token states (the pooling
all-MiniLM-L6-v2 was trained with). Window logits are pooled back to the item with **max pooling** by default:
the evidence for an overturn ("is medically necessary") and for a citation ("ODG states ...")
sits in one sentence, so the window that contains it should decide. The mean would dilute that
window by the number of windows and make probabilities depend on text length. Training pools the
same way (multiple-instance learning), so the heads learn to keep evidence-free windows low.
`mean` and `logsumexp` (log of the mean of exp, between mean and max) are available as
`model.pooling`.

A model directory holds `config.json` (`ModelConfig`), `model.safetensors`, tokenizer files,
`calibration.json`, `metrics.json` and `taxonomy.json`; loading it needs neither pickle nor the
backbone: the encoder is rebuilt from the stored transformers config.
"""

from __future__ import annotations

import itertools
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from imr_model.config import ModelConfig, hub_offline, resolve_backbone

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CALIBRATION_FILE = "calibration.json"
METRICS_FILE = "metrics.json"
TAXONOMY_FILE = "taxonomy.json"

#: forward(input_ids (B, T) int64, attention_mask (B, T) int64) -> (outcome (B,), guidelines (B, L)) logits
ForwardFn = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


class IMRNet(nn.Module):
    """Transformer encoder with two linear heads on the mean of each window's token states.

    Both heads read the same (W, H) window vector. For the guidelines this beat label-wise
    attention (one query per label, as in CAML) on the shared letters: which guideline a reviewer
    cited shows in many small cues (body part, drug class, "ODG", "chronic pain") that a mean adds
    up, whereas per-label attention fixes on one spot and overfits 258 items.
    """

    def __init__(self, encoder: nn.Module, n_labels: int, dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        hidden = int(encoder.config.hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.outcome_head = nn.Linear(hidden, 1)
        self.guideline_head = nn.Linear(hidden, n_labels)

    def encode(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(W, T) token windows → (W, H) mean of the token states (padding excluded)."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (W, T, H)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (W, T, 1)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """(W, T) token windows → outcome logit (W,) and guideline logits (W, L) per window."""
        pooled = self.dropout(self.encode(input_ids, attention_mask))  # (W, H)
        return self.outcome_head(pooled).squeeze(-1), self.guideline_head(pooled)

    def get_input_embeddings(self) -> nn.Embedding:
        """The word-embedding layer (the Captum LayerIntegratedGradients target)."""
        return self.encoder.get_input_embeddings()


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


def pool_logits(logits: Tensor, item_ids: Tensor, n_items: int, mode: str) -> Tensor:
    """Pool window logits (W,) or (W, L) into item logits (N,) or (N, L); differentiable."""
    shape = (n_items,) + tuple(logits.shape[1:])
    index = item_ids.view(-1, *([1] * (logits.dim() - 1))).expand_as(logits)
    if mode == "max":
        return logits.new_full(shape, float("-inf")).scatter_reduce(0, index, logits, "amax", include_self=False)
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
    raise ValueError(f"unknown pooling {mode!r}; valid: max, mean, logsumexp")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60.0, 60.0)))


def _encoder_from_config(encoder_config: dict) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    params = dict(encoder_config)
    model_type = params.pop("model_type", None)
    if not model_type:
        raise ValueError("encoder_config has no model_type; cannot rebuild the encoder")
    hf_config = AutoConfig.for_model(model_type, **params)
    try:  # the pooler is unused (we mean-pool); BERT-like encoders can skip it
        return AutoModel.from_config(hf_config, add_pooling_layer=False)
    except TypeError:
        return AutoModel.from_config(hf_config)


@contextmanager
def _quiet_transformers():
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
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
    hf_config = AutoConfig.from_pretrained(source, local_files_only=local)
    for key, value in config.encoder_overrides.items():
        if not hasattr(hf_config, key):
            raise ValueError(f"model.encoder_overrides: {type(hf_config).__name__} has no field {key!r}")
        setattr(hf_config, key, value)
    if config.init == "random":
        hf_config.vocab_size = len(tokenizer)
        encoder = _encoder_from_config(hf_config.to_dict())
    else:  # overrides such as attention_probs_dropout_prob apply on top of the pretrained weights
        with _quiet_transformers():  # the unused pooler weights are reported as "unexpected" on every load
            try:
                encoder = AutoModel.from_pretrained(source, config=hf_config, local_files_only=local, add_pooling_layer=False)
            except TypeError:
                encoder = AutoModel.from_pretrained(source, config=hf_config, local_files_only=local)
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
        self.temperature = float(temperature)
        self.outcome_threshold = float(outcome_threshold)
        thresholds = np.full(n_labels, 0.5) if guideline_thresholds is None else np.asarray(guideline_thresholds)
        if thresholds.shape != (n_labels,):
            raise ValueError(f"guideline_thresholds has shape {thresholds.shape}, expected ({n_labels},)")
        self.guideline_thresholds = thresholds.astype(np.float64)
        self.metrics = dict(metrics or {})

    @property
    def label_names(self) -> list[str]:
        return list(self.config.label_names)

    # ----------------------------------------------------------------------------- construction / IO
    @classmethod
    def build(cls, config: ModelConfig, label_names: Sequence[str], device: str = "cpu") -> "IMRClassifier":
        """A new, untrained classifier on the configured backbone."""
        if not label_names:
            raise ValueError("label_names is empty; the guideline head needs at least one label")
        encoder, tokenizer = build_encoder(config)
        config = config.model_copy(
            update={"label_names": list(label_names), "encoder_config": encoder.config.to_dict()}
        )
        return cls(config, IMRNet(encoder, len(label_names), config.dropout), tokenizer, device=device)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu") -> "IMRClassifier":
        """Load a directory written by `save_pretrained` (no network, no pickle)."""
        from transformers import AutoTokenizer

        path = Path(path)
        missing = [n for n in (CONFIG_FILE, WEIGHTS_FILE) if not (path / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{path} is not an IMR model directory: missing {', '.join(missing)}")
        config = ModelConfig.model_validate_json((path / CONFIG_FILE).read_text(encoding="utf-8"))
        net = IMRNet(_encoder_from_config(config.encoder_config), len(config.label_names), config.dropout)
        net.load_state_dict(load_file(str(path / WEIGHTS_FILE)), strict=True)
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        calibration = _read_json(path / CALIBRATION_FILE) or {}
        label_thr = calibration.get("guideline_thresholds", {})
        thresholds = np.array([float(label_thr.get(name, 0.5)) for name in config.label_names])
        return cls(
            config,
            net,
            tokenizer,
            temperature=calibration.get("temperature", 1.0),
            outcome_threshold=calibration.get("outcome_threshold", 0.5),
            guideline_thresholds=thresholds,
            metrics=_read_json(path / METRICS_FILE) or {},
            device=device,
        )

    def save_pretrained(self, path: str | Path) -> None:
        """Write the self-contained model directory (JSON + safetensors + tokenizer files)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_FILE).write_text(self.config.model_dump_json(indent=2), encoding="utf-8")
        state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        save_file(state, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
        self.tokenizer.save_pretrained(str(path))
        _write_json(path / CALIBRATION_FILE, self.calibration_dict())
        _write_json(path / METRICS_FILE, self.metrics)
        _write_json(path / TAXONOMY_FILE, _taxonomy_record(self.label_names))

    def calibration_dict(self) -> dict:
        return {
            "temperature": self.temperature,
            "outcome_threshold": self.outcome_threshold,
            "guideline_thresholds": dict(zip(self.label_names, map(float, self.guideline_thresholds))),
        }

    # ----------------------------------------------------------------------------- inference
    def make_windows(self, texts: Sequence[str]) -> Windows:
        """Tokenize texts into overlapping windows; every text yields at least one window."""
        texts = _check_texts(texts)
        if not texts:
            empty = torch.zeros((0, 1), dtype=torch.long)
            return Windows(empty, empty.clone(), torch.zeros(0, dtype=torch.long), torch.zeros((0, 1, 2), dtype=torch.long))
        cfg = self.config
        enc = self.tokenizer(
            texts,
            truncation=True,
            max_length=cfg.max_length,
            stride=cfg.stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
            padding=False,
        )
        owners = list(enc["overflow_to_sample_mapping"])
        keep = _cap_windows(owners, cfg.max_windows)
        ids = [enc["input_ids"][i] for i in keep]
        width = max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(keep), width), pad, dtype=torch.long)
        mask = torch.zeros((len(keep), width), dtype=torch.long)
        offsets = torch.zeros((len(keep), width, 2), dtype=torch.long)
        for row, i in enumerate(keep):
            n = len(enc["input_ids"][i])
            input_ids[row, :n] = torch.tensor(enc["input_ids"][i])
            mask[row, :n] = 1
            offsets[row, :n] = torch.tensor(enc["offset_mapping"][i], dtype=torch.long).view(n, 2)
        return Windows(input_ids, mask, torch.tensor([owners[i] for i in keep], dtype=torch.long), offsets)

    def forward_windows(
        self, windows: Windows, batch_size: int = 32, forward: ForwardFn | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Raw logits per window, (W,) and (W, L). Batches are length-sorted and trimmed (dynamic padding)."""
        n, n_labels = len(windows), len(self.label_names)
        out_o = np.zeros(n, dtype=np.float32)
        out_g = np.zeros((n, n_labels), dtype=np.float32)
        lengths = windows.attention_mask.sum(dim=1)
        order = torch.argsort(lengths, descending=True, stable=True)
        self.net.eval()
        for start in range(0, n, max(1, batch_size)):
            idx = order[start : start + batch_size]
            width = max(1, int(lengths[idx].max()))
            ids, mask = windows.input_ids[idx, :width], windows.attention_mask[idx, :width]
            if forward is None:
                with torch.inference_mode():
                    o, g = self.net(ids.to(self.device), mask.to(self.device))
                o, g = o.float().cpu().numpy(), g.float().cpu().numpy()
            else:
                o, g = forward(ids.numpy(), mask.numpy())
            out_o[idx.numpy()] = np.asarray(o, dtype=np.float32).reshape(-1)
            out_g[idx.numpy()] = np.asarray(g, dtype=np.float32).reshape(len(idx), n_labels)
        return out_o, out_g

    def pool(
        self, outcome_logits: np.ndarray, guideline_logits: np.ndarray, item_ids: np.ndarray, n_items: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Window logits → item logits (N,), (N, L) with the configured pooling."""
        ids = torch.as_tensor(np.asarray(item_ids), dtype=torch.long)
        o = pool_logits(torch.as_tensor(np.asarray(outcome_logits, dtype=np.float32)), ids, n_items, self.config.pooling)
        g = pool_logits(torch.as_tensor(np.asarray(guideline_logits, dtype=np.float32)), ids, n_items, self.config.pooling)
        return o.numpy(), g.numpy()

    def predict_logits(
        self, texts: Sequence[str], batch_size: int = 32, forward: ForwardFn | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Uncalibrated item logits: outcome (N,) and guidelines (N, L)."""
        texts = _check_texts(texts)
        windows = self.make_windows(texts)
        o, g = self.forward_windows(windows, batch_size=batch_size, forward=forward)
        return self.pool(o, g, windows.item_ids.numpy(), len(texts))

    def predict_proba(
        self, texts: Sequence[str], batch_size: int = 32, forward: ForwardFn | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated P(Overturned) (N,) and guideline probabilities (N, L) in `label_names` order."""
        o, g = self.predict_logits(texts, batch_size=batch_size, forward=forward)
        return self.calibrate(o, g)

    def calibrate(self, outcome_logits: np.ndarray, guideline_logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Item logits → probabilities: temperature-scaled outcome, plain sigmoid for guidelines."""
        return _sigmoid(np.asarray(outcome_logits) / self.temperature), _sigmoid(np.asarray(guideline_logits))

    def decide(self, p_overturned: np.ndarray, guideline_probs: np.ndarray) -> tuple[list[str], list[list[str]]]:
        """Probabilities → outcome names and predicted label sets, using the fitted thresholds."""
        upheld, overturned = self.config.outcome_labels
        outcomes = [overturned if p >= self.outcome_threshold else upheld for p in np.asarray(p_overturned)]
        chosen = np.asarray(guideline_probs) >= self.guideline_thresholds[None, :]
        labels = [[name for name, on in zip(self.label_names, row) if on] for row in chosen]
        return outcomes, labels


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


def _cap_windows(owners: list[int], max_windows: int) -> list[int]:
    """Indices of windows to keep: at most `max_windows` per text, the head and the tail ones.

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


def _taxonomy_record(label_names: list[str]) -> dict:
    """The taxonomy (version, labels, descriptions) the guideline head was trained on."""
    from imr_model.taxonomy import load_taxonomy

    record = load_taxonomy().to_dict()
    return record if record.get("labels") == label_names else {"labels": label_names}


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=_json_default), encoding="utf-8")


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
