"""Per-letter training digests (`overlap`) and the train/evaluate overlap warning of `imr evaluate` / promote."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from imr_model import overlap


def _items(letter: str, *texts: str, decision: str = "Upheld") -> list[dict]:
    return [{"letter_id": letter, "item_index": i + 1, "request": f"request {i}", "rationale": t, "decision": decision}
            for i, t in enumerate(texts)]  # fmt: skip


def test_letter_digest_ignores_labels_file_names_and_whitespace_but_not_content():
    a = overlap.letter_digests(_items("L1", "The MTUS supports it.", "Not  recommended."))["L1"]
    renamed = overlap.letter_digests(_items("copy-of-L1", "the mtus supports it.", "Not recommended.\n",
                                            decision="Overturned"))["copy-of-L1"]  # fmt: skip
    edited = overlap.letter_digests(_items("L1", "The MTUS supports it.", "Recommended."))["L1"]
    shuffled = overlap.letter_digests(list(reversed(_items("L1", "The MTUS supports it.", "Not recommended."))))["L1"]
    assert a == renamed == shuffled and a != edited
    assert len(a) == overlap.DIGEST_HEX and all(c in "0123456789abcdef" for c in a)


def test_check_counts_fitted_and_test_letters_and_stores_no_text(tmp_path):
    train, val, test = _items("T1", "alpha text"), _items("V1", "beta text"), _items("S1", "gamma text")
    path = overlap.save_training_letters(tmp_path, {"train": train, "validation": val, "test": test})
    raw = path.read_text()
    assert "alpha" not in raw and "T1" not in raw and "request 0" not in raw
    stored = json.loads(raw)["splits"]
    assert all(len(d) == overlap.DIGEST_HEX and set(d) <= set("0123456789abcdef") for v in stored.values() for d in v)
    fresh = _items("N1", "delta text") + _items("N2", "epsilon text")
    result = overlap.check(fresh + train + test, tmp_path)
    assert result["checked"] and result["n_letters"] == 4 and result["n_items"] == 4
    assert (result["fitted_letters"], result["fitted_items"], result["test_letters"]) == (1, 1, 1)
    assert "1 of 4 evaluation letters" in result["warning"]
    clean = overlap.check(fresh + test, tmp_path)
    assert clean["fitted_letters"] == 0 and clean["warning"] is None and clean["test_letters"] == 1


def test_models_without_digests_and_broken_files(tmp_path):
    result = overlap.check(_items("L", "text"), tmp_path)
    assert result["checked"] is False and result["warning"] is None and "cannot be counted" in result["note"]
    (tmp_path / overlap.TRAINING_LETTERS_FILE).write_text(json.dumps({"format": 99}))
    with pytest.raises(ValueError, match=overlap.TRAINING_LETTERS_FILE):
        overlap.check(_items("L", "text"), tmp_path)


@pytest.mark.slow
def test_evaluate_warns_on_training_letters_even_relabelled_and_not_on_new_ones(tiny_config, tmp_path):
    from imr_model.demo import write_demo_letters
    from imr_model.evaluation import evaluate_model, load_labelled
    from imr_model.experiment import run_training
    from imr_model.modeling import verify_digests

    write_demo_letters(tmp_path / "train", 24, seed=5)
    write_demo_letters(tmp_path / "new", 6, seed=77)
    cfg = tiny_config.model_copy(update={"mlflow": tiny_config.mlflow.model_copy(update={"enabled": False})})
    result = run_training(cfg, [str(tmp_path / "train")], quiet=True)
    assert overlap.TRAINING_LETTERS_FILE in verify_digests(result.model_dir)  # tampering is caught on load

    seen, table = evaluate_model(result.model_dir, [str(tmp_path / "train")])
    assert seen["overlap"]["fitted_letters"] > 0 and seen["overlap"]["test_letters"] > 0
    assert table.startswith("WARNING:") and "training data" in table

    # a table copy under other letter ids, every label flipped: still the same letters
    records, errors = load_labelled([str(tmp_path / "train")])
    assert not errors
    flipped = pd.DataFrame([{**r, "letter_id": f"x{r['letter_id']}",
                             "decision": "Upheld" if r["decision"] == "Overturned" else "Overturned"} for r in records])
    flipped["guideline_labels"] = flipped["guideline_labels"].map(json.dumps)
    flipped["odg_chapters"] = flipped["odg_chapters"].map(json.dumps)
    flipped.to_json(tmp_path / "flipped.jsonl", orient="records", lines=True)
    copy, _ = evaluate_model(result.model_dir, [str(tmp_path / "flipped.jsonl")])
    assert copy["overlap"]["fitted_letters"] == seen["overlap"]["fitted_letters"]

    new, new_table = evaluate_model(result.model_dir, [str(tmp_path / "new")])
    assert new["overlap"] == {**new["overlap"], "checked": True, "fitted_letters": 0, "warning": None}
    assert "WARNING" not in new_table
