"""One `imr train` run end to end, and `imr evaluate`.

records → grouped splits → TF-IDF baseline and transformer (both calibrated on validation) →
majority / TF-IDF / model rows on validation and test → optional grouped K-fold CV with pooled
out-of-fold metrics → saved model directory (with the baseline inside) → MLflow run, pyfunc,
registry alias `candidate`.
"""

from __future__ import annotations

import gc
import logging
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from imr_model import familiarity
from imr_model.baseline import ARRAYS_FILE as BASELINE_ARRAYS
from imr_model.baseline import JSON_FILE as BASELINE_JSON
from imr_model.baseline import BaselineModel
from imr_model.config import ConfigError, TrainConfig, resolve_backbone
from imr_model.modeling import record_digest
from imr_model.metrics import format_table, majority_probabilities, summary_row
from imr_model.calibration import calibrate_baseline
from imr_model.training import Split, concat_splits, score_predictions, train_classifier

logger = logging.getLogger(__name__)
BASELINE_DIR = "baseline"
SPLIT_NAMES = {"validation": "val", "test": "test"}


@dataclass
class TrainResult:
    """What a run produced: where the model is, every metric, the printed table, MLflow ids."""

    model_dir: Path
    metrics: dict
    table: str
    run_id: str | None = None
    model_uri: str | None = None
    version: str | None = None
    history: list[dict] = field(default_factory=list)


def label_matrix(records: Sequence[dict], label_names: Sequence[str]) -> np.ndarray:
    """(N, L) 0/1 guideline matrix in `label_names` order; unknown label ids are an error."""
    index = {name: j for j, name in enumerate(label_names)}
    Y = np.zeros((len(records), len(label_names)), dtype=int)
    for i, rec in enumerate(records):
        for label in rec.get("guideline_labels") or []:
            if label not in index:
                raise ValueError(f"item {i} has guideline label {label!r}, not in the taxonomy {list(label_names)}")
            Y[i, index[label]] = 1
    return Y


def records_to_split(records: Sequence[dict], view: str, label_names: Sequence[str],
                     context_view: str | None = None) -> Split:  # fmt: skip
    """Item records → a Split of model inputs in the given text view (+ `context_view`, `views.model_input`)."""
    from imr_model.types import OVERTURNED
    from imr_model.views import model_input

    return Split(
        texts=[model_input(r, view, context_view) for r in records],
        y=np.array([int(r.get("decision") == OVERTURNED) for r in records]),
        Y=label_matrix(records, label_names),
        groups=[str(r.get("letter_id") or i) for i, r in enumerate(records)],
    )


def load_training_records(data: Sequence[str] | None, cfg: TrainConfig) -> tuple[list[dict], str]:
    """Records from `--data` paths, or the demo letters when none are given; returns (records, source)."""
    if not data:
        from imr_model.demo import generate_letters

        n, seed = cfg.data.demo_letters, cfg.seed
        records = [r for letter in generate_letters(n, seed=seed) for r in letter.item_records()]
        return records, f"demo:letters={n},seed={seed}"
    from imr_model.dataset import load_records

    records, errors = load_records(list(data))
    if errors:  # names only: a failed letter's text is never shown
        logger.warning("%d input files could not be parsed: %s", len(errors), ", ".join(e.source for e in errors[:10]))
    if not records:
        raise ValueError(f"no labelled items found in {list(data)}")
    return records, ",".join(str(Path(d).resolve()) for d in data)


def check_labels(y: np.ndarray, where: str) -> None:
    if y.sum() == 0 or y.sum() == len(y):
        raise ValueError(f"{where} holds only one outcome ({int(y.sum())} Overturned of {len(y)}); need both to train")


def compare_rows(split: Split, label_names: Sequence[str], train_rate: float, models: dict) -> dict:
    """{"majority"|name: {"outcome", "guidelines"}} on one split; majority predicts the training rate."""
    rows = {}
    p_major = np.full(len(split), float(train_rate))
    rows["majority"] = score_predictions(split, p_major, np.zeros_like(split.Y), 0.5, label_names)
    for name, model in models.items():
        p, P = model.predict_proba(split.texts)
        rows[name] = score_predictions(split, p, model.decide_guidelines(P), model.outcome_threshold, label_names)
        rows[name]["_probabilities"] = p
    return rows


def _table_rows(by_split: dict) -> dict:
    return {f"{split}/{name}": summary_row(r["outcome"], r["guidelines"])
            for split, rows in by_split.items() for name, r in rows.items()}  # fmt: skip


def _strip_private(obj):
    if isinstance(obj, dict):
        return {k: _strip_private(v) for k, v in obj.items() if not str(k).startswith("_")}
    return obj


def fit_baseline(cfg: TrainConfig, train: Split, val: Split, label_names: Sequence[str]) -> BaselineModel:
    """TF-IDF + LogReg on the items the transformer's heads see: calibrated on validation, or with
    `train.fit_on_validation` fit on train + validation and calibrated on grouped out-of-fold logits."""
    if not cfg.train.fit_on_validation:
        model = _fit_baseline_on(cfg, train, label_names)
        calibrate_baseline(model, val)
        return model
    from sklearn.model_selection import GroupKFold

    from imr_model.calibration import fit_temperature

    both = concat_splits(train, val)
    groups = both.group_ids
    k = min(5, len(set(groups.tolist())))
    oof = np.zeros(len(both))
    for tr, te in GroupKFold(n_splits=k).split(both.texts, both.y, groups) if k >= 2 else ():
        part = Split([both.texts[i] for i in tr], both.y[tr], both.Y[tr])
        oof[te] = _fit_baseline_on(cfg, part, label_names).decision_function([both.texts[i] for i in te])[0]
    model = _fit_baseline_on(cfg, both, label_names)
    model.temperature = fit_temperature(oof, both.y) if k >= 2 else 1.0
    model.outcome_threshold, model.guideline_thresholds = 0.5, np.full(len(label_names), 0.5)
    return model


def _fit_baseline_on(cfg: TrainConfig, split: Split, label_names: Sequence[str]) -> BaselineModel:
    return BaselineModel.fit(split.texts, split.y, split.Y, label_names, cfg.baseline,
                             text_view=cfg.model.text_view, seed=cfg.seed)  # fmt: skip


@contextmanager
def domain_adapted(cfg: TrainConfig, records: Sequence[dict], quiet: bool = False) -> Iterator[tuple[TrainConfig, dict | None]]:
    """`train.domain_adaptation`: continue MLM pretraining of the backbone on these letters' text (the training
    letters: never the items a model is evaluated on) into a temporary directory, and yield the config that
    builds the model on it, with the pretraining summary; otherwise yield `cfg` unchanged and None.

    Build the model inside the block: the directory is removed after it. The model directory keeps the
    adapted encoder weights, so nothing needs it later. Measured on the shared letters (grouped 5-fold CV,
    each fold pretrained on its own training letters, ~11-13 min a fold, fold assignments 13 / 14 / 15): outcome
    AUROC .850 → .880 / .853 → .867 / .863 → .890 (masked config) and .603 → .681 / .658 → .760 / .601 → .616
    (forecast config; its AUPRC fell on seed 15, .367 → .202).
    """
    if not cfg.train.domain_adaptation:
        yield cfg, None
        return
    from imr_model.pretrain import run_pretrain

    with tempfile.TemporaryDirectory(prefix="imr-backbone-") as tmp:
        report = run_pretrain(cfg, records, tmp, quiet=quiet)
        logger.info("domain adaptation: held-out MLM perplexity %.1f → %.1f (%d steps, %.0fs)",
                    report["perplexity_before"], report["perplexity_after"], report["steps"], report["seconds"])  # fmt: skip
        # the adapted directory holds the full encoder: load it as it is (no random init, no config overrides)
        model = cfg.model.model_copy(update={"backbone": tmp, "init": "pretrained", "encoder_overrides": {}})
        yield cfg.model_copy(update={"model": model}), {"backbone": cfg.model.backbone, **_pretrain_summary(report),
                                                        "seconds": report["seconds"]}  # fmt: skip


def _mark_adapted(clf, adaptation: dict | None) -> None:
    """Name the backbone a domain-adapted model was built on (its temporary directory is gone)."""
    if adaptation is not None:
        clf.config = clf.config.model_copy(update={"backbone": f"{adaptation['backbone']} + domain adaptation"})
        clf.metrics["domain_adaptation"] = adaptation


def unadapted_config(cfg: TrainConfig) -> TrainConfig | None:
    """The config of the `unadapted` comparison row (`train.compare_unadapted`): the same model on the backbone
    before domain adaptation. With `train.domain_adaptation` that is the configured backbone; for a backbone
    directory written by `imr pretrain`, the backbone its pretraining report names (when it is on this machine).
    None when no adaptation is in play or the option is off."""
    if not cfg.train.compare_unadapted:
        return None
    if cfg.train.domain_adaptation:
        return cfg.model_copy(update={"train": cfg.train.model_copy(update={"domain_adaptation": False})})
    from imr_model.pretrain import backbone_report

    base = (backbone_report(cfg.model.backbone) or {}).get("backbone")
    if not base:
        return None
    try:
        local = Path(resolve_backbone(base)).is_dir()
    except ConfigError:
        local = False
    if not local:
        logger.info("no unadapted row: %s was adapted from %r, which is not on this machine", cfg.model.backbone, base)
        return None
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"backbone": base})})


def cross_validate(cfg: TrainConfig, records: list[dict], k: int, label_names: Sequence[str], *,
                   quiet: bool = False, log=None) -> dict:  # fmt: skip
    """Grouped K-fold: every item is scored once by models that never saw its letter; pooled metrics."""
    from imr_model.dataset import build_dataset, grouped_kfold
    from imr_model.metrics import guideline_metrics, outcome_metrics

    view, context = cfg.model.text_view, cfg.model.context_view
    all_split = records_to_split(records, view, label_names, context)
    n, L = len(records), len(label_names)
    plain_cfg = unadapted_config(cfg)
    probs = {m: np.zeros(n) for m in ("majority", "tfidf") + (("unadapted",) if plain_cfg else ()) + ("model",)}
    thr = {m: np.full(n, 0.5) for m in probs}
    decided = {m: np.zeros((n, L), dtype=int) for m in probs}
    for fold, (tr, te) in enumerate(grouped_kfold(records, k, seed=cfg.seed)):
        start = time.perf_counter()
        inner = build_dataset([records[i] for i in tr], seed=cfg.seed + fold,
                              val_size=cfg.data.val_size / (1 - cfg.data.test_size), test_size=0.0)  # fmt: skip
        train = records_to_split(list(inner["train"]), view, label_names, context)
        val = records_to_split(list(inner["validation"]), view, label_names, context)
        test = records_to_split([records[i] for i in te], view, label_names, context)
        check_labels(train.y, f"CV fold {fold} training split")
        baseline = fit_baseline(cfg, train, val, label_names)
        with domain_adapted(cfg, [records[i] for i in tr], quiet) as (fold_cfg, _):
            clf, _ = train_classifier(fold_cfg, train, val, label_names, quiet=quiet)
        models = {"tfidf": baseline, "model": clf}
        if plain_cfg is not None:
            models["unadapted"], _ = train_classifier(plain_cfg, train, val, label_names, quiet=quiet)
        probs["majority"][te] = majority_probabilities(train.y, len(te))
        for name, model in models.items():
            p, P = model.predict_proba(test.texts)
            probs[name][te], thr[name][te] = p, model.outcome_threshold
            decided[name][te] = model.decide_guidelines(P)
        fold_auc = outcome_metrics(test.y, probs["model"][te], 0.5)["auroc"]
        logger.info("CV fold %d/%d: %d test items, model AUROC %.3f, %.0fs", fold + 1, k, len(te), fold_auc,
                    time.perf_counter() - start)  # fmt: skip
        if log is not None:
            log(fold, {"cv_fold_auroc": fold_auc, "cv_fold_seconds": time.perf_counter() - start})
        del clf, models
        gc.collect()
    out = {}
    for name in probs:
        outcome = outcome_metrics_per_item(all_split.y, probs[name], thr[name])
        out[name] = {"outcome": outcome, "guidelines": guideline_metrics(all_split.Y, decided[name], label_names),
                     "_probabilities": probs[name]}  # fmt: skip
    out["_y"] = all_split.y
    return out


def outcome_metrics_per_item(y: np.ndarray, p: np.ndarray, thresholds: np.ndarray) -> dict:
    """Pooled out-of-fold outcome metrics when each fold chose its own threshold.

    Threshold-free metrics use the pooled probabilities; decision metrics use each item's own fold
    threshold (shifting p by the threshold difference leaves every decision unchanged).
    """
    from imr_model.metrics import outcome_metrics

    decisions = outcome_metrics(y, np.clip(p - thresholds + 0.5, 0, 1), 0.5)
    pooled = outcome_metrics(y, p, float(np.median(thresholds)))
    for key in ("accuracy", "balanced_accuracy", "precision", "recall", "f1", "mcc", "confusion"):
        pooled[key] = decisions[key]
    pooled["threshold"] = float(np.median(thresholds))
    return pooled


def _save(cfg: TrainConfig, clf, baseline: BaselineModel, digest: str, metrics: dict, source: str = "") -> Path:
    from imr_model import __version__

    stamp = time.strftime("%Y%m%d-%H%M%S")
    model_dir = Path(cfg.output_dir) / f"{cfg.name}-{stamp}"
    suffix = 1
    while model_dir.exists():
        model_dir = Path(cfg.output_dir) / f"{cfg.name}-{stamp}-{suffix}"
        suffix += 1
    clf.config = clf.config.model_copy(update={"version": f"{cfg.name}-{stamp}", "data_digest": digest,
                                               "data_source": source, "package_version": __version__})  # fmt: skip
    clf.metrics.update(metrics)
    clf.save_pretrained(model_dir)
    familiarity.save_classifier_profile(clf, model_dir)  # the input-warning statistics (no texts); digest recorded
    baseline.save(model_dir / BASELINE_DIR)
    for name in (BASELINE_JSON, BASELINE_ARRAYS):  # checked on load like the model's own files
        record_digest(model_dir, f"{BASELINE_DIR}/{name}")
    return model_dir


def _log_evaluation(by_split: dict, label_names: Sequence[str], splits: dict, prefix: str = "") -> None:
    """MLflow metrics and plots for every evaluated split (model, tfidf and majority rows)."""
    from imr_model import plots, tracking
    from imr_model.metrics import flat_metrics

    for split, rows in by_split.items():
        short = SPLIT_NAMES.get(split, split)
        values = {}
        for name, r in rows.items():
            if name.startswith("_"):
                continue
            key = f"{prefix}{short}" if name == "model" else f"{prefix}{name}_{short}"
            values.update(flat_metrics(key, summary_row(r["outcome"], r["guidelines"])))
            values.update(flat_metrics(f"{key}_guideline", {"macro_f1_all_labels": r["guidelines"]["macro_f1_all_labels"]}))
        tracking.log_metrics(values)
        y = splits[split]
        curves = {n: rows[n]["_probabilities"] for n in ("tfidf", "unadapted", "model") if n in rows}
        tracking.log_figure(plots.reliability_diagram(y, curves, title=f"Reliability, {split}"), f"plots/{prefix}{short}_reliability.png")
        tracking.log_figure(plots.pr_curve(y, curves, title=f"Precision-recall, {split}"), f"plots/{prefix}{short}_pr_curve.png")
        tracking.log_figure(plots.confusion_matrix_figure(rows["model"]["outcome"]["confusion"],
                            title=f"Model, {split}"), f"plots/{prefix}{short}_confusion.png")  # fmt: skip


def _log_adaptation_effect(by_split: dict) -> None:
    """One line per evaluated split: the adapted model against the same model before adaptation."""
    for split, rows in by_split.items():
        if "unadapted" in rows:
            before, after = rows["unadapted"]["outcome"], rows["model"]["outcome"]
            logger.info("domain adaptation, %s: AUROC %.3f → %.3f, AUPRC %.3f → %.3f, guideline micro-F1 %.3f → %.3f",
                        split, before["auroc"], after["auroc"], before["auprc"], after["auprc"],
                        rows["unadapted"]["guidelines"]["micro_f1"], rows["model"]["guidelines"]["micro_f1"])  # fmt: skip


@dataclass
class _Prepared:
    records: list[dict]
    source: str
    dd: object  # DatasetDict
    digest: str
    splits: dict[str, Split]


def _prepare(cfg: TrainConfig, data: Sequence[str] | None, label_names: Sequence[str]) -> _Prepared:
    from imr_model.dataset import build_dataset, dataset_digest

    records, source = load_training_records(data, cfg)
    dd = build_dataset(records, seed=cfg.seed, val_size=cfg.data.val_size, test_size=cfg.data.test_size)
    view, context = cfg.model.text_view, cfg.model.context_view
    splits = {name: records_to_split(list(dd[name]), view, label_names, context) for name in ("train", "validation", "test")}
    check_labels(splits["train"].y, "the training split")
    return _Prepared(records, source, dd, dataset_digest(dd), splits)


def _pretrain_summary(report: dict) -> dict:
    """The part of a pretraining report (`pretrain.run_pretrain`) kept beside a model's results."""
    return {k: report[k] for k in ("perplexity_before", "perplexity_after", "steps")}


def _backbone_pretraining(cfg: TrainConfig, logging_on: bool) -> dict | None:
    """Perplexities of a domain-adapted backbone (from `imr pretrain`), kept beside the results."""
    from imr_model import tracking
    from imr_model.pretrain import backbone_report

    report = backbone_report(cfg.model.backbone)
    if report is None:
        return None
    summary = _pretrain_summary(report)
    if logging_on:
        tracking.log_metrics({f"backbone_{k}": v for k, v in summary.items()})
    return summary


def run_training(cfg: TrainConfig, data: Sequence[str] | None = None, *, cv: int = 0,
                 config_path: str | Path | None = None, quiet: bool = False) -> TrainResult:  # fmt: skip
    """Train baseline + transformer, evaluate, optionally cross-validate, save, and log to MLflow."""
    from contextlib import nullcontext

    from imr_model import tracking
    from imr_model.taxonomy import LABELS

    label_names, view = list(LABELS), cfg.model.text_view
    prep = _prepare(cfg, data, label_names)
    splits = prep.splits
    run_ctx = (tracking.start_run(cfg.mlflow.tracking_uri, cfg.mlflow.experiment, cfg.name, {"text_view": view})
               if cfg.mlflow.enabled else nullcontext(None))  # fmt: skip
    with run_ctx as run:
        if run is not None:
            tracking.log_run_context(cfg.flat(), config_path, cfg.model_dump())
            tracking.log_datasets(prep.source, prep.digest, {k: len(v) for k, v in splits.items()}, view,
                                  getattr(prep.dd, "report", None))  # fmt: skip
        metrics: dict = {"train_overturn_rate": float(splits["train"].y.mean()), "data_digest": prep.digest}
        if (pretraining := _backbone_pretraining(cfg, run is not None)) is not None:
            metrics["backbone_pretraining"] = pretraining
        if cv:
            metrics["cv"] = _cross_validate_and_log(cfg, prep.records, cv, label_names, quiet, run is not None)
        baseline = fit_baseline(cfg, splits["train"], splits["validation"], label_names)
        with domain_adapted(cfg, list(prep.dd["train"]) + list(prep.dd["validation"]), quiet) as (fit_cfg, adaptation):
            clf, history = train_classifier(fit_cfg, splits["train"], splits["validation"], label_names, quiet=quiet,
                                            on_epoch=tracking.epoch_logger() if run is not None else None)  # fmt: skip
        _mark_adapted(clf, adaptation)
        if adaptation is not None and run is not None:
            tracking.log_metrics({f"domain_adaptation_{k}": v for k, v in adaptation.items() if k != "backbone"})
        models = {"tfidf": baseline}
        if (plain_cfg := unadapted_config(cfg)) is not None:  # the same model without adaptation, for comparison
            models["unadapted"], _ = train_classifier(plain_cfg, splits["train"], splits["validation"], label_names, quiet=quiet)
        models["model"] = clf
        held_out = ("test",) if cfg.train.fit_on_validation else ("validation", "test")  # validation items fit the heads
        by_split = {name: compare_rows(splits[name], label_names, splits["train"].y.mean(), models)
                    for name in held_out if len(splits[name])}  # fmt: skip
        _log_adaptation_effect(by_split)
        metrics.update({name: _strip_private(rows) for name, rows in by_split.items()})
        metrics["history"] = history
        model_dir = _save(cfg, clf, baseline, prep.digest, metrics, prep.source)
        result = TrainResult(model_dir=model_dir, metrics=clf.metrics, table=_format(metrics), history=history)
        if run is not None:
            _log_evaluation(by_split, label_names, {k: splits[k].y for k in by_split})
            tracking.log_dict(clf.metrics, "metrics/metrics.json")
            tracking.log_text(result.table, "metrics/table.txt")
            tracking.set_tags({"model_dir": str(model_dir.resolve()), "eval.digest": _eval_digest(prep.dd)})
            result.run_id = run.info.run_id
            if cfg.mlflow.log_model:
                name = cfg.mlflow.registered_model if cfg.mlflow.register_model else None
                result.model_uri, result.version = tracking.log_model(model_dir, name)
    return result


def _cross_validate_and_log(cfg: TrainConfig, records: list[dict], k: int, label_names: Sequence[str],
                            quiet: bool, logging_on: bool) -> dict:  # fmt: skip
    from imr_model import tracking

    log = (lambda fold, values: tracking.log_metrics({f"{n}_{fold}": v for n, v in values.items()})) if logging_on else None
    oof = cross_validate(cfg, records, k, label_names, quiet=quiet, log=log)
    y_all = oof.pop("_y")
    _log_adaptation_effect({"cv": oof})
    if logging_on:
        _log_evaluation({"cv": oof}, label_names, {"cv": y_all})
    return {"k": k, **_strip_private(oof)}


def _eval_digest(dd) -> str:
    """Digest of the held-out items (test, else validation): promotion compares like with like."""
    from imr_model.dataset import dataset_digest

    split = "test" if len(dd["test"]) else "validation"
    return dataset_digest(list(dd[split]))


def _format(metrics: dict) -> str:
    """Text table: CV rows first (when present), then validation and test."""
    by_split = {k: metrics[k] for k in ("cv", "validation", "test") if k in metrics}
    by_split = {k: {n: r for n, r in v.items() if isinstance(r, dict) and "outcome" in r} for k, v in by_split.items()}
    return format_table(_table_rows(by_split), "Outcome = Overturned vs Upheld; guideline F1 at fitted thresholds")


def evaluate_model(model: str | Path, data: Sequence[str], *, batch_size: int = 32) -> tuple[dict, str]:
    """Score a saved or registered model (and its TF-IDF baseline, and the majority rule) on labelled letters."""
    from imr_model import tracking
    from imr_model.dataset import dataset_digest, load_records
    from imr_model.modeling import IMRClassifier

    model_dir = tracking.resolve_model_dir(model)
    clf = IMRClassifier.from_pretrained(model_dir)
    records, errors = load_records(list(data))
    if not records:
        raise ValueError(f"no labelled items found in {list(data)} ({len(errors)} files failed to parse)")
    split = records_to_split(records, clf.config.text_view, clf.label_names, clf.config.context_view)
    models: dict = {}
    if (model_dir / BASELINE_DIR).is_dir():
        models["tfidf"] = BaselineModel.load(model_dir / BASELINE_DIR)
    models["model"] = _BatchedScorer(clf, batch_size)
    train_rate = float(clf.metrics.get("train_overturn_rate", 0.0))
    rows = compare_rows(split, clf.label_names, train_rate, models)
    result = {
        "model": str(model), "model_dir": str(model_dir), "model_version": clf.config.version,
        "text_view": clf.config.text_view, "data_digest": dataset_digest(records), "n_items": len(records),
        "n_overturned": int(split.y.sum()), "parse_errors": [e.source for e in errors],
        "evaluation": _strip_private(rows),
    }  # fmt: skip
    table = format_table(_table_rows({"eval": rows}), f"{len(records)} items, {int(split.y.sum())} Overturned")
    return result, table


class _BatchedScorer:
    """An IMRClassifier with a fixed batch size, shaped like the other scorers."""

    def __init__(self, clf, batch_size: int):
        self.clf, self.batch_size = clf, batch_size
        self.outcome_threshold = clf.outcome_threshold

    def predict_proba(self, texts):
        return self.clf.predict_proba(texts, batch_size=self.batch_size)

    def decide_guidelines(self, guideline_probs):
        return self.clf.decide_guidelines(guideline_probs)
