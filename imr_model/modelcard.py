"""The model card: `README.md` in every model directory, in the Hugging Face format (YAML metadata + Markdown).

Built with `huggingface_hub.ModelCard` / `ModelCardData` / `EvalResult` from what the directory already
holds (config.json, metrics.json, calibration.json), so `imr card MODEL_DIR` can rebuild it. The metadata's
`model-index` holds the model row's test (and pooled CV) metrics with the values of metrics.json; the Markdown
gives them with their 95% letter-level bootstrap intervals, beside the TF-IDF and majority rows.

No letter text ever reaches the card: only counts, rates, dates, digests, config values and metric values.
README.md is covered by config.json's digests like every other file (`write_card` records it): the card
shipped with a model is the one its metrics were written with.
"""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from imr_model import tracking
from imr_model.config import MINILM_ALIASES, ConfigError, TrainConfig, load_config
from imr_model.modeling import (
    CALIBRATION_FILE,
    CONFIG_FILE,
    DIGESTS_KEY,
    METRICS_FILE,
    MissingModelFileError,
    ModelDirectoryError,
    file_sha256,
    record_digest,
)

CARD_FILE = "README.md"
TAGS = ["imr", "workers-compensation", "text-classification"]
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
#: (metrics.json part, key, label): the metrics of the card's model-index and tables (type: `metric_type`).
CARD_METRICS = (("outcome", "auroc", "AUROC"), ("outcome", "auprc", "AUPRC"), ("outcome", "f1", "F1 (Overturned)"),
                ("outcome", "mcc", "MCC"), ("outcome", "balanced_accuracy", "balanced accuracy"),
                ("outcome", "brier", "Brier score"), ("outcome", "ece", "ECE"),
                ("guidelines", "micro_f1", "guideline micro-F1"), ("guidelines", "macro_f1", "guideline macro-F1"))  # fmt: skip
#: The config values the card's recipe table shows (all of them are in the MLflow run's params).
CARD_SETTINGS = ("seed", "train.recipe", "model.backbone", "model.init", "model.text_view", "model.window_unit",
                 "model.max_length", "model.stride", "model.max_windows", "model.pooling", "model.guideline_cues",
                 "model.guideline_tfidf", "model.outcome_cues", "train.epochs", "train.learning_rate",
                 "train.batch_size", "train.pos_weight", "train.guideline_decoding", "train.domain_adaptation",
                 "data.val_size", "data.test_size")  # fmt: skip
_NOT_REPRODUCED = ("output_dir", "mlflow.")  # where the run wrote, not what it trained
_VIEWS = {
    "rationale": "reads the rationale as the reviewer wrote it, which nearly always states the verdict. Its outcome "
                 "scores measure how well it reads a decision already made (parsing and consistency), not forecasting.",
    "rationale_masked": "reads the rationale with the sentences that state the conclusion masked (`[MASK]`): it "
                        "measures how far the reasoning predicts the outcome; residual wording can still leak it.",
    "forecast": "reads the request and case summary only, nothing the reviewer wrote after deciding: the "
                "decision-support view.",
}  # fmt: skip


def training_record(cfg: TrainConfig, dd, *, demo_prefix: str) -> dict:
    """metrics["training"]: the config name, the `--set` overrides that rebuild `cfg` from it, the git commit and
    the data counts per split (items, letters, Overturned, demo letters: case numbers starting `demo_prefix`) and
    the decision-date range. Never any text."""
    flat = {k: v for k, v in cfg.flat().items() if not k.startswith(_NOT_REPRODUCED)}
    try:
        base = load_config(cfg.name).flat()
        overrides = [f"{k}={_yaml_value(v)}" for k, v in flat.items() if k not in base or base[k] != v]
    except ConfigError:  # not a shipped config: the card lists the values instead
        overrides = None
    splits, dates, letters = {}, [], set()
    for name in ("train", "validation", "test"):
        rows = dd[name]
        ids = {str(i) for i in rows["letter_id"]}
        demo = {str(i) for i, c in zip(rows["letter_id"], rows["case_number"]) if str(c or "").startswith(demo_prefix)}
        splits[name] = {"items": len(rows), "letters": len(ids), "overturned": int(sum(rows["label"])),
                        "demo_letters": len(demo)}  # fmt: skip
        letters |= ids
        dates += [str(d)[:10] for d in rows["decision_date"] if d]
    total = {k: sum(s[k] for s in splits.values()) for k in ("items", "overturned", "demo_letters")}
    data = {**total, "letters": len(letters), "decision_dates": [min(dates), max(dates)] if dates else None,
            "splits": splits}  # fmt: skip
    return {"config": cfg.name, "overrides": overrides, "values": flat, "git_commit": tracking.git_commit(), "data": data}


def build_card(model_dir: str | Path) -> ModelCard:
    """The card of a saved model directory, from its config.json, metrics.json and calibration.json (each checked
    against the SHA-256 config.json records: the card never states numbers the model was not saved with)."""
    path = Path(model_dir)
    if not (path / CONFIG_FILE).is_file():
        raise MissingModelFileError(f"{path} is not an IMR model directory: missing {CONFIG_FILE}")
    config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    records = []
    for name in (METRICS_FILE, CALIBRATION_FILE):
        expected = (config.get(DIGESTS_KEY) or {}).get(name)
        if not (path / name).is_file() or expected is None:
            raise MissingModelFileError(f"{path}: missing {name} (or its digest in {CONFIG_FILE}); retrain the model")
        if file_sha256(path / name) != expected:
            raise ModelDirectoryError(f"{path / name}: SHA-256 mismatch (the file changed after the model was saved)")
        records.append(json.loads((path / name).read_text(encoding="utf-8")))
    return card_from(config, *records)


def write_card(model_dir: str | Path) -> Path:
    """Write (or rewrite) `README.md` in the model directory and record its digest in config.json; returns its path."""
    card = build_card(model_dir)
    path = Path(model_dir) / CARD_FILE
    card.save(path)
    record_digest(model_dir, CARD_FILE)
    return path


def card_from(config: dict, metrics: dict, calibration: dict) -> ModelCard:
    """The card from the three records `build_card` reads; for an `IMRClassifier` in memory:
    `card_from(clf.config.model_dump(mode="json"), clf.metrics, clf.calibration_dict())`."""
    name = config.get("version") or "imr-model"
    training = metrics.get("training") or {}
    demo = is_demo(config, training)
    results = [r for split in ("test", "cv") for r in _eval_results(metrics.get(split), split, config, demo)]
    data = ModelCardData(language="en", license="other", license_name="unspecified", library_name="imr-model",
                         tags=TAGS + (["synthetic-demo"] if demo else []), pipeline_tag="text-classification",
                         base_model=_base_model(config), model_name=name if results else None,
                         eval_results=results or None)  # fmt: skip
    sections = [_intro(name, config, demo), _uses(config, demo), _training_data(config, metrics, training),
                _recipe(config, metrics, training), _evaluation(metrics), _slices(metrics),
                _calibration(metrics, calibration), _limitations(training),
                _reproduce(config, metrics, training)]  # fmt: skip
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(s for s in sections if s) + "\n")


def is_demo(config: dict, training: dict) -> bool:
    """Trained only on the synthetic demo letters (case numbers CM99-…; data source "demo:…")."""
    data = training.get("data") or {}
    return str(config.get("data_source", "")).startswith("demo:") or bool(
        data.get("letters") and data.get("demo_letters") == data.get("letters"))  # fmt: skip


def _eval_results(split_rows: dict | None, split: str, config: dict, demo: bool) -> list[EvalResult]:
    row = (split_rows or {}).get("model")
    if not row:
        return []
    k = split_rows.get("k")
    where = f"{k}-fold grouped CV, pooled out-of-fold" if split == "cv" else "test split"
    dataset = ("synthetic demo letters" if demo else "IMR letters") + f" ({where})"
    return [EvalResult(task_type="text-classification", task_name="IMR outcome (Overturned vs Upheld) and guidelines",
                       dataset_type="imr-demo-letters" if demo else "imr-letters", dataset_name=dataset,
                       dataset_split=split if split == "test" else f"cv{k}", dataset_config=config.get("text_view"),
                       dataset_revision=config.get("data_digest") or None,
                       metric_type=metric_type(part, key), metric_name=label, metric_value=row[part][key])
            for part, key, label in CARD_METRICS if _finite((row.get(part) or {}).get(key))]  # fmt: skip


def metric_type(part: str, key: str) -> str:
    """The model-index metric type of metrics.json's `<split>.model.<part>.<key>`."""
    return f"guideline_{key}" if part == "guidelines" else key


def _intro(name: str, config: dict, demo: bool) -> str:
    head = (f"# {name}\n\nAn imr-model classifier for California workers' compensation Independent Medical Review "
            "(IMR) Final Determination Letters: for each disputed item it predicts the outcome (Upheld or "
            "Overturned, with a calibrated probability) and the guidelines the reviewer cited. Text view: "
            f"`{config.get('text_view', '?')}`. Load it with `imr_model.load_model(\"<this directory>\")`.")  # fmt: skip
    if demo:
        head += ("\n\n> **Trained only on synthetic demo letters** (case numbers `CM99-…`). This model checks that the "
                 "pipeline runs; its numbers say nothing about real letters. Do not use it for anything else.")
    return head


def _uses(config: dict, demo: bool) -> str:
    view = config.get("text_view", "")
    lines = ["## Intended use and misuse", "", f"This model {_VIEWS.get(view, f'reads the `{view}` view.')}", "",
             "- Intended: research on IMR decisions, checking parsed letters and their labels, extracting cited "
             "guidelines, and (`forecast` view) decision support read by a person.",
             "- Not for deciding an individual claim or treatment without a qualified human reviewer; not a "
             "substitute for the IMR process.",
             "- `rationale` scores are an upper bound, not a forecast; only the `forecast` view sees what is known "
             "before the review. Predictions carry `warnings` for input unlike the training items."]  # fmt: skip
    return "\n".join(lines + (["- Trained on synthetic letters: a pipeline check only."] if demo else []))


def _training_data(config: dict, metrics: dict, training: dict) -> str:
    data = training.get("data") or {}
    rows = [("source", f"`{_cell(config.get('data_source') or 'unknown')}`"), ("dataset digest (SHA-256)",
            f"`{metrics.get('data_digest') or config.get('data_digest') or 'unknown'}`")]  # fmt: skip
    if data:
        dates = data.get("decision_dates")
        rate = data["overturned"] / data["items"] if data.get("items") else float("nan")
        rows += [("letters", data.get("letters")), ("items", data.get("items")),
                 ("Overturned items", f"{data.get('overturned')} ({_fmt(rate)})"),
                 ("decision dates", f"{dates[0]} to {dates[1]}" if dates else "not stated")]  # fmt: skip
        rows += [(f"{n} split", f"{s['letters']} letters, {s['items']} items, {s['overturned']} Overturned")
                 for n, s in data.get("splits", {}).items()]  # fmt: skip
    elif "train_overturn_rate" in metrics:
        rows.append(("train Overturned rate", _fmt(metrics["train_overturn_rate"])))
    intro = "## Training data\n\nSplits are grouped by letter (no letter in two splits) and stratified by outcome."
    return f"{intro}\n\n{_table(('', 'value'), rows)}"


def _recipe(config: dict, metrics: dict, training: dict) -> str:
    values = training.get("values") or {f"model.{k}": v for k, v in config.items() if not isinstance(v, (dict, list))}
    rows = [(f"`{k}`", f"`{_yaml_value(values[k])}`") for k in CARD_SETTINGS if k in values]
    for label, value in (("best epoch", metrics.get("best_epoch")), ("outcome loss pos_weight", metrics.get("pos_weight")),
                         ("guideline head C", (metrics.get("guideline_head_refit") or {}).get("C")),
                         ("outcome head C", (metrics.get("outcome_head_refit") or {}).get("C"))):  # fmt: skip
        if value is not None:
            rows.append((label, _fmt(value)))
    return (f"## Recipe and configuration\n\nConfig `{training.get('config', '?')}`, backbone `{config.get('backbone', '?')}`"
            "; every value: the MLflow run's params.\n\n" + _table(("setting", "value"), rows))


def _evaluation(metrics: dict) -> str:
    parts = ["## Evaluation\n\nIntervals are 95% letter-level bootstrap intervals (letters resampled; resamples "
             "with one outcome only are dropped for AUROC, AUPRC and balanced accuracy)."]
    for split, title in (("test", "Test split"), ("cv", "Cross-validation (pooled out-of-fold)"),
                         ("validation", "Validation split (used for early stopping and calibration)")):  # fmt: skip
        rows = metrics.get(split) or {}
        if "model" not in rows:
            continue
        out = rows["model"]["outcome"]
        boot = (metrics.get("bootstrap") or {}).get(split) if split != "cv" else rows.get("bootstrap")
        note = f"{out.get('n')} items, {out.get('n_overturned')} Overturned"
        if boot:
            note += f"; {boot.get('n_resamples')} resamples, seed {boot.get('seed')}, {boot.get('n_dropped')} dropped"
        names = [n for n in ("model", "tfidf", "majority") if n in rows]
        table = _table(("metric", *(n.replace("tfidf", "TF-IDF") for n in names)), [(label, *(_ci(rows[n].get(part) or {}, key) for n in names))
                                            for part, key, label in CARD_METRICS])  # fmt: skip
        parts.append(f"### {title}\n\n{note}.\n\n{table}")
        paired = ((metrics.get("paired") or {}).get(split) or {}).get("model_minus_tfidf") or {}
        if paired:
            parts.append("Model − TF-IDF, paired on the same letter resamples: " + ", ".join(
                f"{m.upper()} {_fmt(paired[m].get('difference'))} {_interval(paired[m].get('difference_ci95'))}"
                for m in ("auroc", "auprc") if m in paired) + ".")  # fmt: skip
    return "\n\n".join(parts) if len(parts) > 1 else parts[0] + "\n\nNo held-out split was evaluated."


def _slices(metrics: dict) -> str:
    """metrics["slices"] (`imr_model.slices`) = {dimension: {value: {"n_items", "n_letters", "n_overturned",
    "outcome": {...}, "guideline": {...}}}}, or the same one level deeper per split; absent or empty: no section."""
    slices, info = metrics.get("slices"), metrics.get("slices_info") or {}
    tables = _slice_tables(slices) if isinstance(slices, dict) else []
    intro = (f"## Slices\n\nThe model's metrics within groups of {info.get('split', 'held-out')} items (an item may "
             "count in two groups); n/a where a group holds one outcome only. Intervals only for groups of at least "
             f"{info.get('min_items', 'a few')} items from two or more letters: small groups are noise.")  # fmt: skip
    return "\n\n".join([intro, *tables]) if tables else ""


def _slice_tables(slices: dict, title: str = "") -> list[str]:
    tables = []
    for dimension, groups in slices.items():
        if not isinstance(groups, dict) or not groups:
            continue
        if not any(isinstance(g, dict) and ("n_items" in g or "outcome" in g) for g in groups.values()):
            tables += _slice_tables(groups, f"{title}{dimension}: ") if not title else []  # one split level at most
            continue
        rows = [(_cell(value), g.get("n_items"), g.get("n_letters"), g.get("n_overturned"),
                 _ci(g.get("outcome") or {}, "auroc"), _ci(g.get("outcome") or {}, "auprc"),
                 _ci(g.get("guideline") or g.get("guidelines") or {}, "micro_f1"))
                for value, g in groups.items() if isinstance(g, dict)]  # fmt: skip
        header = ("value", "items", "letters", "Overturned", "AUROC", "AUPRC", "guideline micro-F1")
        tables.append(f"### {_cell(title + str(dimension))}\n\n" + _table(header, rows))
    return tables


def _calibration(metrics: dict, calibration: dict) -> str:
    lines = ["## Calibration", "", f"Temperature scaling (Platt-smoothed targets) fit on {metrics.get('calibrated_on', 'held-out items')}: "
             f"temperature {_fmt(calibration.get('temperature'))}, outcome threshold {_fmt(calibration.get('outcome_threshold'))} "
             "(half the best held-out F1); probabilities bounded to "
             f"{_interval(calibration.get('probability_bounds'))}."]  # fmt: skip
    for split in ("test", "cv"):
        out = ((metrics.get(split) or {}).get("model") or {}).get("outcome")
        if out:
            lines.append(f"- {split} ECE {_ci(out, 'ece')}, Brier {_ci(out, 'brier')}")
    return "\n".join(lines)


def _limitations(training: dict) -> str:
    data = training.get("data") or {}
    n = f"{data['items']} items, {data['overturned']} Overturned" if data else "a small dataset"
    return "\n".join(["## Limitations", "",
        f"- Small data ({n}): with a few dozen Overturned items the intervals are wide; differences of a few "
        "hundredths are noise.",
        "- The parser knows the 2013, 2015 and 2016+ letter layouts; other layouts, scanned letters without a text "
        "layer and non-English text are out of scope (flagged by `warnings`, not always).",
        "- English only. Trained and run on CPU; the decision threshold was chosen on few items.",
        f"- Trained on letters up to {data['decision_dates'][1]}: later changes to guidelines or practice are unseen."
        if data.get("decision_dates") else "- The decision dates of the training letters are not recorded."])  # fmt: skip


def _reproduce(config: dict, metrics: dict, training: dict) -> str:
    source = str(config.get("data_source") or "")
    source = source.removeprefix("demo:")
    paths = [] if not source or source.startswith("records:") else source.split(",")
    cmd = ["imr", "train", "--config", str(training.get("config", "default")), "--data", *(paths or ["LETTERS"])]
    for override in training.get("overrides") or []:
        cmd += ["--set", override]
    if (metrics.get("cv") or {}).get("k"):
        cmd += ["--cv", str(metrics["cv"]["k"])]
    lines = ["## How to reproduce", "", "```bash", shlex.join(cmd), "```", "",
             f"- data digest: `{config.get('data_digest') or 'unknown'}` (the new run's `data_digest` must equal it)",
             f"- imr-model {config.get('package_version') or '?'}, git commit `{training.get('git_commit') or 'unknown'}`",
             "- `output_dir` and the `mlflow` settings are left out: they say where the run wrote, not what it trained"]  # fmt: skip
    if training and training.get("overrides") is None:
        lines.append(f"- config `{training.get('config')}` is not a shipped config: use the YAML file it was read from")
    return "\n".join(lines)


def _base_model(config: dict) -> str | None:
    backbone = str(config.get("backbone", "")).split(" + ")[0].strip()
    if config.get("init") == "random" or not backbone or Path(backbone).expanduser().exists():
        return None  # a random encoder or a local directory is no Hub model
    return MINILM_HUB_ID if backbone.lower() in MINILM_ALIASES else backbone


def _yaml_value(value) -> str:
    """An override value that `apply_overrides` (YAML scalars) reads back as `value`."""
    if isinstance(value, float) and math.isfinite(value):
        text = repr(value)
        return text if "." in text or "e" not in text else text.replace("e", ".0e")  # YAML 1.1 floats need a dot
    try:
        plain = isinstance(value, str) and value and yaml.safe_load(value) == value
    except yaml.YAMLError:
        plain = False
    return value if plain else json.dumps(value)


# ------------------------------------------------------------------------------------------- formatting
def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fmt(value) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return f"{value:.3f}" if _finite(value) else ("n/a" if value is None or isinstance(value, float) else str(value))


def _interval(ci) -> str:
    return f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if isinstance(ci, (list, tuple)) and len(ci) == 2 else ""


def _ci(part: dict, key: str) -> str:
    """`value [low, high]` of metrics.json's `key` and `key_ci95` siblings."""
    return f"{_fmt(part.get(key))} {_interval(part.get(f'{key}_ci95'))}".strip()


def _cell(value) -> str:
    text = str(value).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 60 else text[:57] + "…"


def _table(header: tuple, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join("" if c is None else str(c) for c in row) + " |" for row in rows])
