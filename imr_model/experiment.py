"""One `imr train` run end to end.

records → grouped train/validation/test → TF-IDF baseline and classifier (fit by the config's
recipe, `imr_model.training`) → majority / TF-IDF / model rows on the held-out splits → optional
grouped K-fold CV with pooled out-of-fold metrics → saved model directory (with the baseline inside)
→ MLflow run, pyfunc, registry alias `candidate`.
"""

from __future__ import annotations

import gc
import json
import logging
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from sklearn.model_selection import GroupKFold

from imr_model import __version__, devices, familiarity, overlap, plots, tracking
from imr_model.baseline import ARRAYS_FILE as BASELINE_ARRAYS
from imr_model.baseline import JSON_FILE as BASELINE_JSON
from imr_model.baseline import BaselineModel
from imr_model.calibration import fit_temperature
from imr_model.config import TrainConfig, load_config, resolve_config_path
from imr_model.dataset import build_dataset, dataset_digest, grouped_kfold, load_records
from imr_model.evaluation import (
    BASELINE_DIR,
    add_row_intervals,
    compare_rows,
    format_metrics,
    outcome_metrics_per_item,
    paired_rows,
    strip_private,
)
from imr_model.metrics import flat_metrics, guideline_metrics, majority_probabilities, outcome_metrics, summary_row
from imr_model.modeling import record_digest
from imr_model.modelcard import CARD_FILE, training_record, write_card
from imr_model.pretrain import backbone_report, run_pretrain
from imr_model.slices import mlflow_metrics as slice_mlflow_metrics
from imr_model.slices import slice_info, slice_metrics
from imr_model.splits import Split, concat_splits, records_to_split
from imr_model.taxonomy import LABELS
from imr_model.training import train_classifier

logger = logging.getLogger(__name__)
SPLIT_NAMES = {"validation": "val", "test": "test"}
#: Case numbers of the synthetic demo letters (`imr_model.demo.CASE_PREFIX`): a model trained only on them is
#: recorded with data_source "demo:...", and every command that loads it warns.
DEMO_CASE_PREFIX = "CM99-"


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


def load_training_records(data: Sequence[str]) -> tuple[list[dict], str]:
    """Labelled item records from `--data` paths (letters, folders, globs or item tables); returns (records, source)."""
    if not data:
        raise ValueError("no training data: give --data (letters, folders or item tables); for synthetic demo "
                         "letters run `imr data demo 120 -o data/demo` and train with --data data/demo")  # fmt: skip
    records, errors = load_records(list(data))
    if errors:  # names only: a failed letter's text is never shown
        logger.warning("%d input files could not be parsed: %s", len(errors), ", ".join(e.source for e in errors[:10]))
    if not records:
        raise ValueError(f"no labelled items found in {list(data)}")
    return records, ",".join(str(Path(d).resolve()) for d in data)


def check_labels(y: np.ndarray, where: str) -> None:
    if y.sum() == 0 or y.sum() == len(y):
        raise ValueError(f"{where} holds only one outcome ({int(y.sum())} Overturned of {len(y)}); need both to train")


def fit_baseline(cfg: TrainConfig, train: Split, val: Split, label_names: Sequence[str]) -> BaselineModel:
    """TF-IDF + LogReg on the items the classifier's heads see: fit on train and calibrated on validation
    (recipe finetune), or fit on train + validation and calibrated on grouped out-of-fold logits (probe)."""
    if cfg.train.recipe != "probe":
        model = _fit_baseline_on(cfg, train, label_names)
        model.fit_calibration(val.texts, val.y)
        return model
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
    adapted encoder weights, so nothing needs it later. Its measured effect is in docs/experiments.md.
    """
    if not cfg.train.domain_adaptation:
        yield cfg, None
        return
    with tempfile.TemporaryDirectory(prefix="imr-backbone-") as tmp:
        report = run_pretrain(cfg, records, tmp, quiet=quiet)
        logger.info("domain adaptation: held-out MLM perplexity %.1f → %.1f (%d steps, %.0fs)",
                    report["perplexity_before"], report["perplexity_after"], report["steps"], report["seconds"])  # fmt: skip
        # the adapted directory holds the full encoder: load it as it is (no random init, no config overrides)
        model = cfg.model.model_copy(update={"backbone": tmp, "init": "pretrained", "encoder_overrides": {}})
        yield cfg.model_copy(update={"model": model}), {"backbone": cfg.model.backbone, **_pretrain_summary(report),
                                                        "seconds": report["seconds"]}  # fmt: skip


def fit_models(cfg: TrainConfig, train: Split, val: Split, records: Sequence[dict], *, quiet: bool = False,
               on_epoch=None) -> tuple[dict, list[dict]]:  # fmt: skip
    """The TF-IDF baseline and the classifier (domain-adapted on `records` when configured) on one split pair;
    returns ({"tfidf": baseline, "model": classifier}, fine-tuning history)."""
    label_names = list(LABELS)
    baseline = fit_baseline(cfg, train, val, label_names)
    with domain_adapted(cfg, records, quiet) as (fit_cfg, adaptation):
        clf, history = train_classifier(fit_cfg, train, val, label_names, quiet=quiet, on_epoch=on_epoch)
    if adaptation is not None:  # name the backbone it was built on (its temporary directory is gone)
        clf.set_provenance(backbone=f"{adaptation['backbone']} + domain adaptation")
        clf.metrics["domain_adaptation"] = adaptation
    return {"tfidf": baseline, "model": clf}, history


def cross_validate(cfg: TrainConfig, records: list[dict], k: int, label_names: Sequence[str], *,
                   quiet: bool = False, log=None, on_fold=None) -> dict:  # fmt: skip
    """Grouped K-fold: every item is scored once by models that never saw its letter; pooled metrics.

    Rows keep the out-of-fold arrays in item order: "_probabilities" (N,), "_threshold", "_decided" (N, L) and, for
    the fitted rows, "_guideline_probabilities" (N, L). `on_fold(fold, test_idx, models, test_split)` runs after each
    fold is scored, while its models are alive (`imr_model.review` reads the fold's TF-IDF baseline there)."""
    view = cfg.model.text_view
    all_split = records_to_split(records, view, label_names)
    n, L = len(records), len(label_names)
    probs = {m: np.zeros(n) for m in ("majority", "tfidf", "model")}
    thr = {m: np.full(n, 0.5) for m in probs}
    decided = {m: np.zeros((n, L), dtype=int) for m in probs}
    guideline_probs = {m: np.zeros((n, L)) for m in ("tfidf", "model")}
    for fold, (tr, te) in enumerate(grouped_kfold(records, k, seed=cfg.seed)):
        start = time.perf_counter()
        inner = build_dataset([records[i] for i in tr], seed=cfg.seed + fold,
                              val_size=cfg.data.val_size / (1 - cfg.data.test_size), test_size=0.0)  # fmt: skip
        train = records_to_split(list(inner["train"]), view, label_names)
        val = records_to_split(list(inner["validation"]), view, label_names)
        test = records_to_split([records[i] for i in te], view, label_names)
        check_labels(train.y, f"CV fold {fold} training split")
        models, _ = fit_models(cfg, train, val, [records[i] for i in tr], quiet=quiet)
        probs["majority"][te] = majority_probabilities(train.y, len(te))
        for name, model in models.items():
            p, P = model.predict_proba(test.texts)
            probs[name][te], thr[name][te] = p, model.outcome_threshold
            decided[name][te], guideline_probs[name][te] = model.decide_guidelines(P), P
        fold_auc = outcome_metrics(test.y, probs["model"][te], 0.5)["auroc"]
        logger.info("CV fold %d/%d: %d test items, model AUROC %.3f, %.0fs", fold + 1, k, len(te), fold_auc,
                    time.perf_counter() - start)  # fmt: skip
        if log is not None:
            log(fold, {"cv_fold_auroc": fold_auc, "cv_fold_seconds": time.perf_counter() - start})
        if on_fold is not None:
            on_fold(fold, te, models, test)
        del models
        gc.collect()
    out = {}
    for name in probs:
        outcome = outcome_metrics_per_item(all_split.y, probs[name], thr[name])
        out[name] = {"outcome": outcome, "guidelines": guideline_metrics(all_split.Y, decided[name], label_names),
                     "_probabilities": probs[name], "_threshold": thr[name], "_decided": decided[name]}  # fmt: skip
        if name in guideline_probs:
            out[name]["_guideline_probabilities"] = guideline_probs[name]
    add_row_intervals(out, all_split.y, all_split.Y, all_split.groups)  # each row's "_bootstrap": resamples, dropped
    out["_y"] = all_split.y
    return out


def _save(cfg: TrainConfig, clf, baseline: BaselineModel, digest: str, metrics: dict, source: str = "") -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    model_dir = Path(cfg.output_dir) / f"{cfg.name}-{stamp}"
    suffix = 1
    while model_dir.exists():
        model_dir = Path(cfg.output_dir) / f"{cfg.name}-{stamp}-{suffix}"
        suffix += 1
    clf.set_provenance(version=f"{cfg.name}-{stamp}", data_digest=digest, data_source=source,
                       package_version=__version__)  # fmt: skip
    clf.metrics.update(metrics)
    clf.save_pretrained(model_dir)
    familiarity.save_classifier_profile(clf, model_dir)  # the input-warning statistics (no texts); digest recorded
    baseline.save(model_dir / BASELINE_DIR)
    for name in (BASELINE_JSON, BASELINE_ARRAYS):  # checked on load like the model's own files
        record_digest(model_dir, f"{BASELINE_DIR}/{name}")
    write_card(model_dir)  # README.md, the model card (from config.json and metrics.json); digest recorded
    return model_dir


def _log_evaluation(by_split: dict, splits: dict, prefix: str = "") -> None:
    """MLflow metrics and plots for every evaluated split (model, tfidf and majority rows)."""
    for split, rows in by_split.items():
        short = SPLIT_NAMES.get(split, split)
        values = {}
        for name, r in rows.items():
            if name.startswith("_"):
                continue
            key = f"{prefix}{short}" if name == "model" else f"{prefix}{name}_{short}"
            values.update(flat_metrics(key, summary_row(r["outcome"], r["guidelines"])))
            values.update(flat_metrics(f"{key}_guideline", {"macro_f1_all_labels": r["guidelines"]["macro_f1_all_labels"]}))
            values.update(_interval_metrics(key, r))
        tracking.log_metrics(values)
        y = splits[split]
        curves = {n: rows[n]["_probabilities"] for n in ("tfidf", "model") if n in rows}
        tracking.log_figure(plots.reliability_diagram(y, curves, title=f"Reliability, {split}"), f"plots/{prefix}{short}_reliability.png")
        tracking.log_figure(plots.pr_curve(y, curves, title=f"Precision-recall, {split}"), f"plots/{prefix}{short}_pr_curve.png")
        tracking.log_figure(plots.confusion_matrix_figure(rows["model"]["outcome"]["confusion"],
                            title=f"Model, {split}"), f"plots/{prefix}{short}_confusion.png")  # fmt: skip


LOGGED_INTERVALS = (("outcome", "auroc", ""), ("outcome", "auprc", ""), ("outcome", "f1", ""), ("outcome", "brier", ""),
                    ("outcome", "ece", ""), ("guidelines", "micro_f1", "guideline_"))  # fmt: skip


def _interval_metrics(key: str, row: dict) -> dict[str, float]:
    """`<key>_<metric>_ci_low` / `_ci_high` for the logged intervals a row holds (non-finite bounds: tracking skips them)."""
    out = {}
    for part, metric, prefix in LOGGED_INTERVALS:
        ci = (row.get(part) or {}).get(f"{metric}_ci95")
        if isinstance(ci, (list, tuple)) and len(ci) == 2:
            out[f"{key}_{prefix}{metric}_ci_low"], out[f"{key}_{prefix}{metric}_ci_high"] = float(ci[0]), float(ci[1])
    return out


@dataclass
class _Prepared:
    records: list[dict]
    source: str
    dd: object  # DatasetDict
    digest: str
    splits: dict[str, Split]


def _prepare(cfg: TrainConfig, data: Sequence[str] | None, records: Sequence[dict] | None,
             label_names: Sequence[str]) -> _Prepared:  # fmt: skip
    if records is not None:
        records, source = list(records), f"records:{len(records)}"
    else:
        records, source = load_training_records(data or [])
    if records and all(str(r.get("case_number") or "").startswith(DEMO_CASE_PREFIX) for r in records):
        source = f"demo:{source}"
    dd = build_dataset(records, seed=cfg.seed, val_size=cfg.data.val_size, test_size=cfg.data.test_size)
    view = cfg.model.text_view
    splits = {name: records_to_split(list(dd[name]), view, label_names) for name in ("train", "validation", "test")}
    check_labels(splits["train"].y, "the training split")
    return _Prepared(records, source, dd, dataset_digest(dd), splits)


def _pretrain_summary(report: dict) -> dict:
    """The part of a pretraining report (`pretrain.run_pretrain`) kept beside a model's results."""
    return {k: report[k] for k in ("perplexity_before", "perplexity_after", "steps")}


def _backbone_pretraining(cfg: TrainConfig, logging_on: bool) -> dict | None:
    """Perplexities of a domain-adapted backbone (from `imr pretrain`), kept beside the results."""
    report = backbone_report(cfg.model.backbone)
    if report is None:
        return None
    summary = _pretrain_summary(report)
    if logging_on:
        tracking.log_metrics({f"backbone_{k}": v for k, v in summary.items()})
    return summary


def run_training(cfg: TrainConfig, data: Sequence[str] | None = None, *, records: Sequence[dict] | None = None,
                 cv: int = 0, config_path: str | Path | None = None, quiet: bool = False) -> TrainResult:  # fmt: skip
    """Train baseline + classifier on `data` (paths) or `records` (item records), evaluate, optionally
    cross-validate, save, and log to MLflow."""
    label_names, view = list(LABELS), cfg.model.text_view
    devices.resolve_device(cfg.train.device)  # a device this machine does not have fails before the data is read
    prep = _prepare(cfg, data, records, label_names)
    splits = prep.splits
    run_ctx = (tracking.start_run(cfg.mlflow.tracking_uri, cfg.mlflow.experiment, cfg.name, {"text_view": view})
               if cfg.mlflow.enabled else nullcontext(None))  # fmt: skip
    with run_ctx as run:
        if run is not None:
            tracking.log_run_context(cfg.flat(), config_path, cfg.model_dump())
            tracking.log_datasets(prep.source, prep.digest, {k: len(v) for k, v in splits.items()}, view,
                                  getattr(prep.dd, "report", None))  # fmt: skip
        metrics: dict = {"train_overturn_rate": float(splits["train"].y.mean()), "data_digest": prep.digest}
        metrics["training"] = training_record(cfg, prep.dd, demo_prefix=DEMO_CASE_PREFIX)  # for the card: counts only
        if (pretraining := _backbone_pretraining(cfg, run is not None)) is not None:
            metrics["backbone_pretraining"] = pretraining
        if cv:
            metrics["cv"] = _cross_validate_and_log(cfg, prep.records, cv, label_names, quiet, run is not None)
        models, history = fit_models(cfg, splits["train"], splits["validation"],
                                     list(prep.dd["train"]) + list(prep.dd["validation"]), quiet=quiet,
                                     on_epoch=tracking.epoch_logger() if run is not None else None)  # fmt: skip
        clf = models["model"]
        if run is not None and (device := clf.metrics.get("device")):  # where it ran (the config keeps the spec)
            tracking.log_params({"device": device["device"], "device_precision": device["precision"],
                                 "device_name": device["name"]})  # fmt: skip
        if (adaptation := clf.metrics.get("domain_adaptation")) is not None and run is not None:
            tracking.log_metrics({f"domain_adaptation_{k}": v for k, v in adaptation.items() if k != "backbone"})
        held_out = ("test",) if cfg.train.recipe == "probe" else ("validation", "test")  # probe fits on validation
        by_split = {name: compare_rows(splits[name], label_names, splits["train"].y.mean(), models)
                    for name in held_out if len(splits[name])}  # fmt: skip
        metrics.update({name: strip_private(rows) for name, rows in by_split.items()})
        if by_split:  # letter-level bootstrap summary and model - TF-IDF paired differences per held-out split
            metrics["bootstrap"] = {name: rows["model"].get("_bootstrap") for name, rows in by_split.items()}
            metrics["paired"] = {name: paired_rows(rows, splits[name].y, splits[name].groups)
                                 for name, rows in by_split.items()}  # fmt: skip
        if "test" in by_split:  # the test split's metrics per slice (`imr_model.slices`; the model card reads them)
            metrics["slices"] = _test_slices(by_split["test"], splits["test"], list(prep.dd["test"]))
            metrics["slices_info"] = {"split": "test", **slice_info()}
        metrics["history"] = history
        model_dir = _save(cfg, clf, models["tfidf"], prep.digest, metrics, prep.source)
        overlap.save_training_letters(model_dir, {name: list(prep.dd[name]) for name in ("train", "validation", "test")})
        record_digest(model_dir, overlap.TRAINING_LETTERS_FILE)  # per-letter digests, no text: `imr evaluate` counts overlap
        result = TrainResult(model_dir=model_dir, metrics=clf.metrics, table=format_metrics(metrics), history=history)
        if run is not None:
            _log_evaluation(by_split, {k: splits[k].y for k in by_split})
            tracking.log_metrics(slice_mlflow_metrics(metrics.get("slices") or {}, "test_slice"))
            tracking.log_dict(clf.metrics, "metrics/metrics.json")
            tracking.log_text(result.table, "metrics/table.txt")
            tracking.log_text((model_dir / CARD_FILE).read_text(encoding="utf-8"), f"model_card/{CARD_FILE}")
            tracking.set_tags({"model_dir": str(model_dir.resolve()), "eval.digest": _eval_digest(prep.dd)})
            result.run_id = run.info.run_id
            if cfg.mlflow.log_model:
                result.model_uri, result.version = tracking.log_model(model_dir, cfg.mlflow.registered_model)
    return result


def _test_slices(rows: dict, split: Split, records: list[dict]) -> dict:
    model = rows["model"]
    return slice_metrics(records, split.y, model["_probabilities"], model["_threshold"], split.Y, model["_decided"],
                         split.groups)  # fmt: skip


def _cross_validate_and_log(cfg: TrainConfig, records: list[dict], k: int, label_names: Sequence[str],
                            quiet: bool, logging_on: bool) -> dict:  # fmt: skip
    log = (lambda fold, values: tracking.log_metrics({f"{n}_{fold}": v for n, v in values.items()})) if logging_on else None
    oof = cross_validate(cfg, records, k, label_names, quiet=quiet, log=log)
    y_all = oof.pop("_y")
    if logging_on:
        _log_evaluation({"cv": oof}, {"cv": y_all})
    return {"k": k, "bootstrap": oof["model"].get("_bootstrap"), **strip_private(oof)}


def _eval_digest(dd) -> str:
    """Digest of the held-out items (test, else validation): promotion compares like with like."""
    split = "test" if len(dd["test"]) else "validation"
    return dataset_digest(list(dd[split]))


def train_from_config(config: str | Path, data: Sequence[str] | None, overrides: Sequence[str] = (), *, cv: int = 0,
                      json_out: str | Path | None = None, quiet: bool = False) -> TrainResult:  # fmt: skip
    """What `imr train` and `train/train.py` run: load the config (a path or a name in configs/) with overrides,
    train, and optionally write every metric to `json_out`."""
    if cv == 1 or cv < 0:
        raise ValueError(f"--cv must be 0 (off) or >= 2, got {cv}")
    cfg = load_config(config, list(overrides))
    result = run_training(cfg, data, cv=cv, config_path=resolve_config_path(config), quiet=quiet)
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        with open(json_out, "w", encoding="utf-8") as fh:
            json.dump({"model_dir": str(result.model_dir), "run_id": result.run_id, "model_uri": result.model_uri,
                       "metrics": result.metrics}, fh, indent=2, default=float)  # fmt: skip
    return result


def result_lines(result: TrainResult) -> list[str]:
    """What a training command prints: the metrics table, the model directory, the MLflow run and version."""
    lines = [result.table, f"model directory: {result.model_dir}"]
    if result.run_id:
        lines.append(f"MLflow run: {result.run_id}"
                     + (f"  registered: {result.model_uri} (alias candidate)" if result.version else ""))  # fmt: skip
    return lines


def pretrain_from_config(config: str | Path, data: Sequence[str], output: str | Path, overrides: Sequence[str] = (), *,
                         quiet: bool = False) -> dict:  # fmt: skip
    """What `imr pretrain` and `train/pretrain.py` run: adapt the config's backbone on the letters in `data`."""
    cfg = load_config(config, list(overrides))
    devices.resolve_device(cfg.train.device)  # fails before the letters are parsed
    records, _ = load_training_records(data)
    return run_pretrain(cfg, records, output, quiet=quiet)


def pretrain_report_lines(report: dict, output: str | Path) -> list[str]:
    """What a pretraining command prints."""
    return [f"held-out MLM perplexity: {report['perplexity_before']:.2f} before → {report['perplexity_after']:.2f} after "
            f"({report['steps']} steps, {report['seconds']:.0f}s; random-head start {report['perplexity_initial_head']:.0f})",
            f"backbone written to {output} (use --set model.backbone={output})"]  # fmt: skip
