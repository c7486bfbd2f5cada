"""`IMRClassifier`: the model. It fits its own heads and calibration, predicts, and saves/loads its directory.

Texts are cut into windows (`imr_model.windows`: one per sentence, or fixed token windows); the
network (`imr_model.network.IMRNet`) gives each window an outcome logit and guideline logits, which
are pooled to items (`imr_model.pooling`: `model.pooling` for the outcome, `mean` for the guidelines)
and joined by the item-level linear terms (citation cues, TF-IDF, evidence cues). Training pools the
same way as inference, so what is trained is what is served.

Fitting (the trainer, `imr_model.training`, only runs these phases in order):
* fine-tuning the encoder with both heads (`imr_model.finetune`, recipe `finetune` only);
* `fit_heads`: the guideline head and its cue / TF-IDF terms as logistic regressions on the cached
  window vectors (`imr_model.heads`), and, with `refit_outcome=True` (recipe `probe`), the outcome
  head and its evidence-cue term the same way;
* `fit_calibration`: the outcome temperature and decision threshold from held-out logits
  (`imr_model.calibration`).

A model directory (this module is its format; `FORMAT_VERSION`):
* `config.json`: `ModelConfig` (what builds the network, the cues and labels it was built with, the
  provenance) + `format_version` + `digests` (SHA-256 of every other file, checked on load);
* `model.safetensors`: the network's weights; `tokenizer.json`, `tokenizer_config.json`;
* `calibration.json`: temperature, outcome threshold, guideline thresholds and one-basis decoding;
* `metrics.json` (what training measured), `taxonomy.json` (the labels), `tfidf_vocabulary.json`
  (with `model.guideline_tfidf`), and files later steps add with `record_digest`
  (`reference_profile.json`, `baseline/`).
Loading needs neither pickle nor the backbone (the encoder is rebuilt from the stored transformers
config) and runs no code from the directory: transformers is called with `trust_remote_code=False`,
and an `auto_map` entry or a tokenizer class that is not transformers' own fails with an error naming
the file; nothing prompts, and no missing file is filled in with a default. `calibration.json` is
range-checked. Probabilities are bounded to [0.001, 0.999] (`calibration.bounded_sigmoid`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from scipy.special import expit
from transformers import PreTrainedTokenizerBase
from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

from imr_model import devices, heads
from imr_model.baseline import TfidfFeatures
from imr_model.calibration import (
    PROB_MAX,
    PROB_MIN,
    bound_probability,
    bounded_sigmoid,
    decide_labels,
    fit_temperature,
    half_max_f1_threshold,
)
from imr_model.config import ModelConfig
from imr_model.cues import (
    cue_matrix,
    cue_names,
    cue_version,
    evidence_matrix,
    evidence_names,
    evidence_version,
    label_cue_columns,
)
from imr_model.network import (  # noqa: F401 - ForwardFn and ModelDirectoryError are part of this module's API
    ForwardFn,
    IMRNet,
    ModelDirectoryError,
    build_encoder,
    encoder_from_config,
    quiet_transformers,
)
from imr_model.pooling import bias_multiplicity, pool
from imr_model.taxonomy import decision_basis_columns, load_taxonomy
from imr_model.types import OVERTURNED, UPHELD
from imr_model.window_cache import WindowCache
from imr_model.windows import Windows, make_windows

GUIDELINE_POOLING = "mean"  # citations are spread over a rationale: every window counts

CONFIG_FILE = "config.json"
#: Version of the model-directory layout (network modules and their weight names). 2: outcome head on
#: attention-pooled tokens, sentence windows. 3: SHA-256 digests in config.json, thresholds on the bounded
#: probability scale. 4: recipes instead of head flags, no context head, guideline pooling always mean (#20).
#: Directories of another version fail with a clear message.
FORMAT_VERSION = 4
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


class MissingModelFileError(ModelDirectoryError, FileNotFoundError):
    """A file the model-directory format needs is absent."""

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
        device: str | torch.device = "cpu",
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

    @property
    def precision(self) -> str:
        """What the forward passes run in on this device: fp32, or bf16 / fp16 autocast on CUDA (`imr_model.devices`)."""
        return devices.precision(self.device)

    def to(self, device: str | torch.device) -> "IMRClassifier":
        """Move the network to `device` (a `torch.device` or a spec for `devices.resolve_device`); returns self."""
        self.device = device if isinstance(device, torch.device) else devices.resolve_device(device)
        self.net.to(self.device)
        return self

    # ----------------------------------------------------------------------------- construction / IO
    @classmethod
    def build(cls, config: ModelConfig, label_names: Sequence[str], device: str | torch.device = "cpu",
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
        net = IMRNet(encoder, len(label_names), n_cues=len(cues), n_tfidf=len(tfidf) if tfidf is not None else 0,
                     n_outcome_cues=len(evidence))  # fmt: skip
        if tfidf is None:
            return cls(config, net, tokenizer, device=device)
        with torch.no_grad():
            net.tfidf_idf.copy_(torch.as_tensor(np.asarray(tfidf.idf, dtype=np.float64)))
        return cls(config, net, tokenizer, device=device, tfidf_vocabulary=tfidf.vocabulary, tfidf_ngram_max=tfidf.ngram_max)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> "IMRClassifier":
        """Load a directory written by `save_pretrained` (no network, no pickle, no code from the directory).

        The weights are read onto the CPU (wherever they were saved from) and the network then moved to `device`.

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
            encoder = encoder_from_config(config.encoder_config)
        except ModelDirectoryError as exc:
            raise ModelDirectoryError(f"{path / CONFIG_FILE}: {exc}; {_RESTORE}") from None
        net = IMRNet(encoder, len(config.label_names), n_cues=len(config.cue_names), n_tfidf=len(vocabulary or []),
                     n_outcome_cues=len(config.outcome_cue_names))  # fmt: skip
        state = load_file(str(path / WEIGHTS_FILE), device="cpu")
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
                            max_windows=cfg.max_windows, unit=cfg.window_unit)

    def forward_windows(
        self, windows: Windows, batch_size: int = 32, forward: ForwardFn | None = None, *,
        cache: WindowCache | None = None, cache_key: str = "", vectors: bool = False, batch_tokens: int | None = None,
    ) -> tuple[np.ndarray, ...]:  # fmt: skip
        """Raw logits per window, (W,) and (W, L); with `vectors` also the mean-pooled encoder states (W, H)
        (the guideline head's input, which the familiarity check reads; torch only).

        Identical windows (the boilerplate sentences letters repeat: 23% of the sentence windows of the
        shared letters' rationales) are run once. `cache` (`window_cache.WindowCache`; `cache_key` names the
        model and backend) carries window results over from earlier calls: only the windows it does not hold
        are run, and they are added to it. Batches are length-sorted (longest first) and trimmed (dynamic padding),
        of `batch_size` windows each, or with `batch_tokens` of as many windows as fit in that many padded tokens
        (many short sentences, few long ones; `inference.TOKENS_PER_WINDOW`). On the CPU `devices.cpu_streams`
        batches run at once, each on one thread (for `forward`, its `streams` attribute; 1 when it has none).
        `forward`: another backend's forward (the ONNX session's), same inputs and outputs as `IMRNet`.
        """
        if vectors and forward is not None:
            raise ValueError("vectors=True needs the torch network (forward=None): other backends return logits only")
        if cache is not None and not cache_key:
            raise ValueError("a window cache needs a cache_key naming the model and backend")
        n_labels = len(self.label_names)
        row_width = 1 + n_labels + (int(self.net.encoder.config.hidden_size) if vectors else 0)
        lengths = windows.attention_mask.sum(dim=1)
        unique, inverse, keys = _unique_windows(windows.input_ids, lengths)
        out = np.zeros((len(unique), row_width), dtype=np.float32)  # per distinct window: [o, g (L), v (H)]
        todo = np.arange(len(unique))
        if cache is not None:
            found = cache.lookup(cache_key, keys)
            hit = np.array([v is not None and len(v) >= row_width for v in found], dtype=bool)
            for j in np.flatnonzero(hit):
                out[j] = found[j][:row_width]
            todo = np.flatnonzero(~hit)
        first = unique.numpy()
        order = todo[np.argsort(-lengths.numpy()[first[todo]], kind="stable")]  # longest first
        self.net.eval()

        def run(rows: np.ndarray) -> None:  # one batch; its rows of `out` are its own
            idx = torch.from_numpy(first[rows])
            width = max(1, int(lengths[idx].max()))
            ids, mask = windows.input_ids[idx, :width], windows.attention_mask[idx, :width]
            if forward is not None:
                o, g = forward(ids.numpy(), mask.numpy())
            else:
                with torch.inference_mode(), devices.autocast(self.device):
                    if vectors:  # IMRNet.forward step by step (dropout is the identity in eval mode)
                        attended, mean = self.net.encode(ids.to(self.device), mask.to(self.device))
                        o, g = self.net.outcome_head(attended).squeeze(-1), self.net.guideline_head(mean)
                        out[rows, 1 + n_labels :] = mean.float().cpu().numpy()
                    else:
                        o, g = self.net(ids.to(self.device), mask.to(self.device))
                o, g = o.float().cpu().numpy(), g.float().cpu().numpy()
            out[rows, 0] = np.asarray(o, dtype=np.float32).reshape(len(idx))
            out[rows, 1 : 1 + n_labels] = np.asarray(g, dtype=np.float32).reshape(len(idx), n_labels)

        batches = _batches(order, lengths.numpy()[first], batch_size, batch_tokens)
        streams = getattr(forward, "streams", 1) if forward is not None else devices.cpu_streams(self.device)
        devices.run_streams(run, batches, streams)
        if cache is not None and len(todo):
            cache.store(cache_key, [keys[j] for j in todo], [out[j].copy() for j in todo])
        out = out[inverse]
        result = (np.ascontiguousarray(out[:, 0]), np.ascontiguousarray(out[:, 1 : 1 + n_labels]))
        return result + (np.ascontiguousarray(out[:, 1 + n_labels :]),) if vectors else result

    def pool(
        self, outcome_logits: np.ndarray, guideline_logits: np.ndarray, item_ids: np.ndarray, n_items: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Window logits → item logits (N,), (N, L): `model.pooling` for the outcome, mean for the guidelines."""
        ids = torch.as_tensor(np.asarray(item_ids), dtype=torch.long)
        o = torch.as_tensor(np.asarray(outcome_logits, dtype=np.float32))
        g = torch.as_tensor(np.asarray(guideline_logits, dtype=np.float32))
        return pool(o, ids, n_items, self.config.pooling).numpy(), pool(g, ids, n_items, GUIDELINE_POOLING).numpy()

    def predict_logits(
        self, texts: Sequence[str], batch_size: int = 32, forward: ForwardFn | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Uncalibrated item logits: outcome (N,) and guidelines (N, L)."""
        texts = _check_texts(texts)
        return self.window_item_logits(self.make_windows(texts), texts, batch_size=batch_size, forward=forward)

    def window_item_logits(
        self, windows: Windows, texts: Sequence[str], batch_size: int = 32, forward: ForwardFn | None = None, *,
        cache: WindowCache | None = None, cache_key: str = "", vectors: bool = False, batch_tokens: int | None = None,
    ) -> tuple[np.ndarray, ...]:  # fmt: skip
        """Uncalibrated item logits of `texts` from their already-made `windows` (pooled + item-level terms);
        with `vectors` also the windows' mean-pooled states (W, H). `cache`, `cache_key`, `batch_tokens`: see
        `forward_windows`."""
        o, g, *rest = self.forward_windows(windows, batch_size=batch_size, forward=forward, cache=cache,
                                           cache_key=cache_key, vectors=vectors, batch_tokens=batch_tokens)  # fmt: skip
        o, g = self.pool(o, g, windows.item_ids.numpy(), len(texts))
        o_term, g_term = self.item_term_logits(texts)
        return (o + o_term, g + g_term, *rest)

    def item_term_logits(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """The item-level terms of the logits: outcome (N,) from evidence cues, guidelines (N, L) from citation
        cues and TF-IDF; zeros without them.

        Both backends add them here, after pooling. Attributions give the evidence term to the words it
        matched (attribution.add_evidence_scores); the guideline terms are not attributed.
        """
        texts = list(texts)
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
        return self.probabilities(o, g)

    def probabilities(self, outcome_logits: np.ndarray, guideline_logits: np.ndarray, *,
                  bounded: bool = True) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """Item logits → probabilities (float64): σ(outcome / T) and σ(guidelines), mapped into [0.001, 0.999]
        by `calibration.bounded_sigmoid` (strictly increasing: rankings unchanged).

        `bounded=False` gives the calibrated probabilities before that map (what the threshold rules are fitted
        on). NaN logits raise ValueError.
        """
        o = np.asarray(outcome_logits, dtype=np.float64) / _check_temperature(self.temperature)
        g = np.asarray(guideline_logits, dtype=np.float64)
        if bounded:
            return np.asarray(bounded_sigmoid(o)), np.asarray(bounded_sigmoid(g))
        for name, x in (("outcome", o), ("guideline", g)):
            if np.isnan(x).any():
                raise ValueError(f"{int(np.isnan(x).sum())} {name} logits are NaN; no probability can be given for them")
        return expit(o), expit(g)

    # ----------------------------------------------------------------------------- fitting
    def window_vectors(self, windows: Windows, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """The heads' inputs for every window, computed once: attention-pooled (W, H) (outcome head) and
        mean-pooled (W, H) (guideline head) encoder states, in eval mode; on the CPU `devices.cpu_streams`
        batches of `batch_size` windows at a time, one thread each (the shared letters' 2,045 windows: 12.0 s
        against 14.0 s one batch at a time on two threads, vectors bit-identical)."""
        n = len(windows)
        hidden = int(self.net.encoder.config.hidden_size)
        attended, mean = torch.zeros(n, hidden), torch.zeros(n, hidden)
        lengths = windows.attention_mask.sum(dim=1)
        order = torch.argsort(lengths, descending=True, stable=True)
        self.net.eval()

        def run(idx: torch.Tensor) -> None:  # one batch; its rows are its own
            t = max(1, int(lengths[idx].max()))
            with torch.no_grad(), devices.autocast(self.device):
                a, m = self.net.encode(windows.input_ids[idx, :t].to(self.device),
                                       windows.attention_mask[idx, :t].to(self.device))  # fmt: skip
            attended[idx], mean[idx] = a.float().cpu(), m.float().cpu()

        batches = [order[b : b + batch_size] for b in range(0, n, batch_size)]
        devices.run_streams(run, batches, devices.cpu_streams(self.device))
        return attended, mean

    def fit_heads(self, texts: Sequence[str], windows: Windows, y: np.ndarray, Y: np.ndarray, groups: np.ndarray, *,
                  refit_outcome: bool, decoding: str = "one_basis", seed: int = 0, batch_size: int = 32,
                  vectors: tuple[torch.Tensor, torch.Tensor] | None = None) -> np.ndarray | None:  # fmt: skip
        """Fit the guideline head (and its cue / TF-IDF terms) and, with `refit_outcome`, the outcome head (and its
        evidence-cue term) as logistic regressions on the encoder's pooled window vectors (`imr_model.heads`).

        `windows` are `make_windows(texts)`; `groups` the letter of each item (grouped inner folds); `decoding`
        `one_basis` or `independent` (`train.guideline_decoding`); `vectors` the cached `window_vectors`.
        What was chosen goes to `metrics` (`guideline_head_refit`, `outcome_head_refit`). Returns the outcome
        head's grouped out-of-fold logits (None without `refit_outcome` or without folds).
        """
        texts = _check_texts(texts)
        attended, mean = vectors if vectors is not None else self.window_vectors(windows, batch_size)
        ids, n = windows.item_ids, len(texts)
        groups = np.asarray(groups)
        self._fit_guideline_head(texts, pool(mean.double(), ids, n, GUIDELINE_POOLING).numpy(), np.asarray(Y),
                                 groups, decoding, seed)  # fmt: skip
        if not refit_outcome:
            return None
        return self._fit_outcome_head(texts, pool(attended.double(), ids, n, self.config.pooling).numpy(),
                                      np.asarray(y), groups)  # fmt: skip

    def _fit_guideline_head(self, texts: list[str], pooled: np.ndarray, Y: np.ndarray, groups: np.ndarray,
                            decoding: str, seed: int) -> None:  # fmt: skip
        basis = decision_basis_columns(self.label_names) if decoding == "one_basis" else []
        fit = heads.fit_guideline(
            pooled, Y, groups, seed=seed, basis=basis,
            cues=cue_matrix(texts) if self.net.guideline_cues is not None else None,
            tfidf=self.tfidf.transform(texts) if self.tfidf is not None else None,
            label_cues=label_cue_columns(self.label_names) if self.net.guideline_cues is not None else (),
        )  # fmt: skip
        t = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32)  # noqa: E731
        with torch.no_grad():
            self.net.guideline_head.weight.copy_(t(fit.weight))
            self.net.guideline_head.bias.copy_(t(fit.bias / bias_multiplicity(GUIDELINE_POOLING)))
            if fit.cue_weight is not None:
                self.net.guideline_cues.weight.copy_(t(fit.cue_weight))
            if fit.tfidf_weight is not None:
                self.net.guideline_tfidf.weight.copy_(t(fit.tfidf_weight))
        self.set_guideline_decoding(basis, fit.basis_extra)
        self.guideline_thresholds = np.full(len(self.label_names), bound_probability(0.5))  # balanced: 0.5
        info = dict(fit.info, cue_prior={self.label_names[j]: v for j, v in fit.info["cue_prior"].items()})
        self.metrics["guideline_head_refit"] = info

    def _fit_outcome_head(self, texts: list[str], pooled: np.ndarray, y: np.ndarray, groups: np.ndarray) -> np.ndarray | None:
        evidence = evidence_matrix(texts).astype(np.float64) if self.net.outcome_cues is not None else None
        fit = heads.fit_outcome(pooled, y, groups, evidence)
        with torch.no_grad():
            self.net.outcome_head.weight.copy_(torch.as_tensor(fit.weight, dtype=torch.float32).view(1, -1))
            self.net.outcome_head.bias.fill_(fit.bias / bias_multiplicity(self.config.pooling))
            if fit.evidence_weight is not None:
                self.net.outcome_cues.weight.copy_(torch.as_tensor(fit.evidence_weight, dtype=torch.float32).view(1, -1))
        info = dict(fit.info)
        if fit.evidence_weight is not None:  # logit change per unit of each cue (per log(1 + matches); per log(words))
            info["evidence_weights"] = {name: round(float(x), 4)
                                        for name, x in zip(self.config.outcome_cue_names, fit.evidence_weight)}  # fmt: skip
        self.metrics["outcome_head_refit"] = info
        return fit.oof

    PROVENANCE_FIELDS = ("backbone", "version", "data_digest", "data_source", "package_version")

    def set_provenance(self, **fields: str) -> None:
        """Record where the model came from in its config (`PROVENANCE_FIELDS` only: nothing that changes the network)."""
        unknown = sorted(set(fields) - set(self.PROVENANCE_FIELDS))
        if unknown:
            raise ValueError(f"not provenance fields: {unknown}; valid: {list(self.PROVENANCE_FIELDS)}")
        self.config = self.config.model_copy(update=fields)

    def shift_outcome_bias(self, delta: float) -> None:
        """Add `delta` to the outcome logit (fine-tuning undoes the log(pos_weight) its weighted loss taught)."""
        with torch.no_grad():
            self.net.outcome_head.bias += delta / bias_multiplicity(self.config.pooling)

    def fit_calibration(self, outcome_logits: np.ndarray, y: np.ndarray, *, on: str) -> None:
        """Temperature (NLL against Platt's targets) and outcome threshold (half the best F1) from held-out
        outcome logits: validation items' (recipe finetune) or grouped out-of-fold ones (probe). The rule sees
        the calibrated probabilities; the threshold kept is on the output scale (`calibration.bound_probability`).
        `on` says which items, for `metrics["calibrated_on"]`."""
        o = np.asarray(outcome_logits, dtype=np.float64)
        if np.isnan(o).any():
            raise ValueError(f"{int(np.isnan(o).sum())} of {len(o)} held-out outcome logits are NaN: too few items of "
                             "each outcome to calibrate on; train on more letters (or use train.recipe: finetune, "
                             "which calibrates on the validation items)")  # fmt: skip
        self.temperature = fit_temperature(o, y)
        p, _ = self.probabilities(o, np.zeros((len(o), 0)), bounded=False)
        self.outcome_threshold = bound_probability(half_max_f1_threshold(y, p))
        self.metrics["calibrated_on"] = on

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
        upheld, overturned = UPHELD, OVERTURNED  # model.outcome_labels was retired (#20)
        p_overturned = np.asarray(p_overturned, dtype=np.float64)
        if np.isnan(p_overturned).any():  # NaN >= threshold is False: it would read as a confident "Upheld"
            raise ValueError(f"{int(np.isnan(p_overturned).sum())} outcome probabilities are NaN; no decision can be made")
        outcomes = [overturned if p >= self.outcome_threshold else upheld for p in p_overturned]
        chosen = self.decide_guidelines(guideline_probs)
        labels = [[name for name, on in zip(self.label_names, row) if on] for row in chosen]
        return outcomes, labels


def _batches(order: np.ndarray, lengths: np.ndarray, batch_size: int, batch_tokens: int | None) -> list[np.ndarray]:
    """`order` (rows, longest first; `lengths` per row) cut into batches of `batch_size` rows, or, with
    `batch_tokens`, of as many rows as fit in `batch_tokens` padded tokens (at least one)."""
    if batch_tokens is None:
        step = max(1, batch_size)
        return [order[i : i + step] for i in range(0, len(order), step)]
    out, start = [], 0
    while start < len(order):
        fit = max(1, batch_tokens // max(1, int(lengths[order[start]])))  # the first row is the widest
        out.append(order[start : start + fit])
        start += fit
    return out


def _unique_windows(input_ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, np.ndarray, list[bytes]]:
    """(indices of the first occurrence of each distinct window, position of every window among them, the
    distinct windows' keys: their token ids as bytes)."""
    first: dict[bytes, int] = {}
    inverse = np.empty(len(lengths), dtype=np.int64)
    keep: list[int] = []
    ids = input_ids.numpy()
    for i, n in enumerate(lengths.tolist()):
        j = first.setdefault(ids[i, :n].tobytes(), len(keep))
        if j == len(keep):
            keep.append(i)
        inverse[i] = j
    return torch.tensor(keep, dtype=torch.long), inverse, list(first)


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
