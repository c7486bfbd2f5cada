"""A model directory is input, not code: tampered, incomplete or out-of-range directories fail with errors
naming the file; nothing prompts, nothing from the directory runs (issue "Messy and hostile input")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from imr_model.modeling import (
    CALIBRATION_FILE,
    CONFIG_FILE,
    DIGESTS_KEY,
    FORMAT_VERSION,
    METRICS_FILE,
    REQUIRED_FILES,
    TAXONOMY_FILE,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    IMRClassifier,
    MissingModelFileError,
    ModelDirectoryError,
    file_sha256,
    record_digest,
    verify_digests,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
EVIL_CODE = "from pathlib import Path\nPath({marker!r}).write_text('ran')\nfrom transformers import BertTokenizer\n\n\nclass EvilTokenizer(BertTokenizer):\n    pass\n"


@pytest.fixture()
def model_dir(tiny_classifier, tmp_path) -> Path:
    path = tmp_path / "model"
    tiny_classifier.save_pretrained(path)
    return path


def _edit_json(path: Path, edit) -> None:
    record = json.loads(path.read_text(encoding="utf-8"))
    edit(record)
    path.write_text(json.dumps(record), encoding="utf-8")


def _plant_auto_map(model_dir: Path, marker: Path, *, keep_class: bool) -> None:
    """What the issue reproduced: tokenizer_config.json names a class in a Python file beside it."""
    (model_dir / "tokenization_evil.py").write_text(EVIL_CODE.format(marker=str(marker)), encoding="utf-8")

    def edit(record):
        record["auto_map"] = {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]}
        if not keep_class:
            record.pop("tokenizer_class", None)

    _edit_json(model_dir / TOKENIZER_CONFIG_FILE, edit)


def test_save_records_a_digest_of_every_file_it_writes(model_dir):
    record = json.loads((model_dir / CONFIG_FILE).read_text())
    assert record["format_version"] == FORMAT_VERSION == 4
    digests = record[DIGESTS_KEY]
    written = {p.name for p in model_dir.iterdir()} - {CONFIG_FILE}
    assert set(digests) == written >= {*REQUIRED_FILES, METRICS_FILE, TAXONOMY_FILE}
    assert {TOKENIZER_FILE, TOKENIZER_CONFIG_FILE} <= set(digests)
    assert all(digests[n] == file_sha256(model_dir / n) for n in digests)
    assert verify_digests(model_dir) == digests
    assert not list(model_dir.glob("*.tmp"))


@pytest.mark.parametrize("name", [*REQUIRED_FILES, METRICS_FILE, TAXONOMY_FILE])
def test_a_missing_file_is_an_error_naming_it(model_dir, name):
    (model_dir / name).unlink()
    with pytest.raises(MissingModelFileError, match=rf"missing {name}.*retrain the model .* or restore the file"):
        IMRClassifier.from_pretrained(model_dir)
    with pytest.raises(FileNotFoundError):  # still a FileNotFoundError for callers that catch that
        IMRClassifier.from_pretrained(model_dir)


def test_a_changed_file_is_an_error_naming_it(model_dir):
    state = load_file(str(model_dir / WEIGHTS_FILE))
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = state[key] + 1e-3  # still a valid safetensors file, other weights
    save_file(state, str(model_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    with pytest.raises(ModelDirectoryError, match=r"model\.safetensors: SHA-256 mismatch \(the file changed after the "
                                                  r"model was saved\); retrain or restore it"):  # fmt: skip
        IMRClassifier.from_pretrained(model_dir)


@pytest.mark.parametrize("name", [TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, CALIBRATION_FILE, METRICS_FILE, TAXONOMY_FILE])
def test_every_saved_file_is_checked(model_dir, name):
    with (model_dir / name).open("a", encoding="utf-8") as fh:
        fh.write("\n")  # even a change that keeps the JSON valid
    with pytest.raises(ModelDirectoryError, match=rf"{name}: SHA-256 mismatch"):
        IMRClassifier.from_pretrained(model_dir)


def test_directories_without_digests_or_of_format_2_fail_with_retrain(model_dir):
    _edit_json(model_dir / CONFIG_FILE, lambda r: r.pop(DIGESTS_KEY))
    with pytest.raises(ModelDirectoryError, match=r"config\.json: no valid `digests` map.*retrain"):
        IMRClassifier.from_pretrained(model_dir)
    _edit_json(model_dir / CONFIG_FILE, lambda r: r.update(format_version=2))
    with pytest.raises(ModelDirectoryError, match=r"directory format 2; this imr-model reads format 4.*Retrain"):
        IMRClassifier.from_pretrained(model_dir)


def test_a_digest_map_without_a_required_file_fails(model_dir):
    _edit_json(model_dir / CONFIG_FILE, lambda r: r[DIGESTS_KEY].pop(CALIBRATION_FILE))
    with pytest.raises(ModelDirectoryError, match=r"records no SHA-256 for calibration\.json"):
        IMRClassifier.from_pretrained(model_dir)


def test_record_digest_covers_a_file_written_after_save(model_dir):
    """What another step (e.g. an out-of-distribution reference profile) calls after writing its own file."""
    ref = model_dir / "reference.json"
    ref.write_text(json.dumps({"mean": [0.0, 1.0]}), encoding="utf-8")
    digest = record_digest(model_dir, "reference.json")
    assert digest == file_sha256(ref) == json.loads((model_dir / CONFIG_FILE).read_text())[DIGESTS_KEY]["reference.json"]
    IMRClassifier.from_pretrained(model_dir)  # still loads
    assert record_digest(model_dir, ref) == digest  # an absolute path inside the directory works too
    ref.write_text(json.dumps({"mean": [0.0, 2.0]}), encoding="utf-8")
    with pytest.raises(ModelDirectoryError, match=r"reference\.json: SHA-256 mismatch"):
        IMRClassifier.from_pretrained(model_dir)
    ref.unlink()
    with pytest.raises(MissingModelFileError, match=r"missing reference\.json \(saved with the model"):
        IMRClassifier.from_pretrained(model_dir)
    for bad in ("../outside.json", CONFIG_FILE, "/etc/hostname"):
        with pytest.raises(ValueError):
            record_digest(model_dir, bad)
    with pytest.raises(MissingModelFileError, match="write the file before recording its digest"):
        record_digest(model_dir, "not_written.json")


def test_rewriting_calibration_then_recording_its_digest_loads(model_dir):
    _edit_json(model_dir / CALIBRATION_FILE, lambda r: r.update(temperature=2.5))
    with pytest.raises(ModelDirectoryError, match="calibration.json: SHA-256 mismatch"):
        IMRClassifier.from_pretrained(model_dir)
    record_digest(model_dir, CALIBRATION_FILE)
    assert IMRClassifier.from_pretrained(model_dir).temperature == 2.5


@pytest.mark.parametrize("keep_class", [False, True])
def test_an_auto_map_neither_prompts_nor_runs_code(model_dir, tmp_path, keep_class):
    """The issue: transformers asked on stdin whether to run the directory's Python file, and `y` ran it.

    A separate interpreter gets `y` on stdin: a prompt would read it and run the file, which writes the marker.
    The digest is re-recorded, so the auto_map check itself is what refuses (a changed digest would too).
    """
    marker = tmp_path / "MARKER"
    _plant_auto_map(model_dir, marker, keep_class=keep_class)
    record_digest(model_dir, TOKENIZER_CONFIG_FILE)
    code = "import sys; from imr_model.modeling import IMRClassifier; IMRClassifier.from_pretrained(sys.argv[1])"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    run = subprocess.run([sys.executable, "-c", code, str(model_dir)], input="y\ny\n", capture_output=True, text=True,
                         timeout=300, env=env, cwd=str(tmp_path))  # fmt: skip
    assert run.returncode != 0
    assert "tokenizer_config.json: has an `auto_map` entry" in run.stderr
    assert "Do you wish to run the custom code" not in run.stdout + run.stderr
    assert not marker.exists()


def test_code_references_in_config_json_are_refused(model_dir, tmp_path, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))  # were anything to prompt, it would read yes
    marker = tmp_path / "MARKER"
    (model_dir / "modeling_evil.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n")
    _edit_json(model_dir / CONFIG_FILE, lambda r: r.update(auto_map={"AutoConfig": "modeling_evil.EvilConfig"}))
    with pytest.raises(ModelDirectoryError, match=r"config\.json: has an `auto_map` entry"):
        IMRClassifier.from_pretrained(model_dir)
    _edit_json(model_dir / CONFIG_FILE, lambda r: r.pop("auto_map"))
    _edit_json(model_dir / CONFIG_FILE, lambda r: r["encoder_config"].update(auto_map={"AutoModel": "modeling_evil.M"}))
    with pytest.raises(ModelDirectoryError, match=r"config\.json: encoder_config has an `auto_map` entry"):
        IMRClassifier.from_pretrained(model_dir)
    assert not marker.exists()


@pytest.mark.parametrize("tokenizer_class", ["EvilTokenizer", "AutoModel", "os.system", None])
def test_only_transformers_tokenizer_classes_load(model_dir, tokenizer_class):
    _edit_json(model_dir / TOKENIZER_CONFIG_FILE, lambda r: r.update(tokenizer_class=tokenizer_class))
    record_digest(model_dir, TOKENIZER_CONFIG_FILE)
    with pytest.raises(ModelDirectoryError, match=r"tokenizer_config\.json: tokenizer_class .* is not a tokenizer class of transformers"):
        IMRClassifier.from_pretrained(model_dir)


NAN = float("nan")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("temperature", NAN, "temperature is nan, not a finite number"),
        ("temperature", float("inf"), "temperature is inf, not a finite number"),
        ("temperature", 0.0, "temperature is 0.0, not > 0"),
        ("temperature", -1.0, "temperature is -1.0, not > 0"),
        ("temperature", "1.0", "temperature is '1.0', not a finite number"),
        ("temperature", True, "temperature is True, not a finite number"),
        ("outcome_threshold", 1.5, "outcome_threshold is 1.5, outside \\[0, 1\\]"),
        ("outcome_threshold", NAN, "outcome_threshold is nan"),
        ("outcome_threshold", None, "outcome_threshold is None"),
        ("guideline_thresholds.ODG", -0.1, "guideline_thresholds.ODG is -0.1, outside"),
        ("guideline_thresholds.ODG", NAN, "guideline_thresholds.ODG is nan"),
        ("guideline_thresholds.ODG", "drop", "guideline_thresholds lacks \\['ODG'\\]"),
        ("guideline_thresholds.NOT_A_LABEL", 0.5, "guideline_thresholds names labels the model does not have \\['NOT_A_LABEL'\\]"),
        ("guideline_thresholds", [0.5], "guideline_thresholds is not a"),
        ("guideline_basis.labels", ["NOT_A_LABEL"], "guideline_basis.labels names \\['NOT_A_LABEL'\\]"),
        ("guideline_basis.labels", ["ODG", "ODG"], "guideline_basis.labels names a label twice"),
        ("guideline_basis.extra_threshold", 2.0, "guideline_basis.extra_threshold is 2.0, outside"),
        ("guideline_basis", "drop", "missing field guideline_basis"),
        ("temperature", "drop", "missing field temperature"),
        ("probability_bounds", [0.0, 1.0], "probability_bounds is \\[0.0, 1.0\\]"),
    ],
)
def test_calibration_values_are_range_checked(model_dir, field, value, message):
    def edit(record):
        *parents, key = field.split(".")
        target = record
        for part in parents:
            target = target[part]
        if value == "drop":
            del target[key]
        else:
            target[key] = value

    _edit_json(model_dir / CALIBRATION_FILE, edit)  # json writes NaN/Infinity, as a careless writer would
    record_digest(model_dir, CALIBRATION_FILE)
    with pytest.raises(ModelDirectoryError, match=rf"calibration\.json: {message}"):
        IMRClassifier.from_pretrained(model_dir)


def test_non_finite_weights_and_broken_json_fail_naming_the_file(model_dir):
    state = load_file(str(model_dir / WEIGHTS_FILE))
    state["outcome_head.bias"] = torch.tensor([float("nan")])
    save_file(state, str(model_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    record_digest(model_dir, WEIGHTS_FILE)
    with pytest.raises(ModelDirectoryError, match=r"model\.safetensors: non-finite \(NaN/inf\) weights in outcome_head\.bias"):
        IMRClassifier.from_pretrained(model_dir)
    (model_dir / CALIBRATION_FILE).write_text("{not json", encoding="utf-8")
    record_digest(model_dir, CALIBRATION_FILE)
    with pytest.raises(ModelDirectoryError, match=r"calibration\.json is not valid JSON"):
        IMRClassifier.from_pretrained(model_dir)
    (model_dir / CONFIG_FILE).write_text("[]", encoding="utf-8")
    with pytest.raises(ModelDirectoryError, match=r"config\.json holds a JSON list, not an object"):
        IMRClassifier.from_pretrained(model_dir)


def test_a_tokenizer_file_replaced_by_another_fails(model_dir):
    """An [UNK]-only (or otherwise foreign) tokenizer.json is a digest mismatch, not a silently useless tokenizer."""
    record = json.loads((model_dir / TOKENIZER_FILE).read_text(encoding="utf-8"))
    record["model"]["vocab"] = {"[UNK]": 0}
    (model_dir / TOKENIZER_FILE).write_text(json.dumps(record), encoding="utf-8")
    with pytest.raises(ModelDirectoryError, match=r"tokenizer\.json: SHA-256 mismatch"):
        IMRClassifier.from_pretrained(model_dir)


def test_a_saved_model_still_round_trips_with_relative_paths(tiny_classifier, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny_classifier.save_pretrained("rel/model")
    assert set(json.loads(Path("rel/model/config.json").read_text())[DIGESTS_KEY]) >= set(REQUIRED_FILES)
    loaded = IMRClassifier.from_pretrained("rel/model")
    texts = ["The request is not medically necessary."]
    for a, b in zip(tiny_classifier.predict_proba(texts), loaded.predict_proba(texts)):
        assert np.allclose(a, b, atol=1e-6)
