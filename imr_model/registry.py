"""The MLflow model registry: promote the `candidate` version to `champion` when it is at least as good.

`imr train` registers each model it logs and points alias `candidate` at it (`tracking.log_model`);
`promote` compares candidate and champion on one metric, either as their runs logged it (only when
both were measured on the same held-out items) or by scoring both on given letters now.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlflow
from mlflow.exceptions import MlflowException

from imr_model.evaluation import evaluate_records, load_labelled
from imr_model.intervals import OUTCOME_INTERVALS, paired_difference
from imr_model.tracking import CANDIDATE, CHAMPION, LOWER_IS_BETTER, configure


@dataclass
class Promotion:
    """Outcome of `promote`: whether `champion` moved, and the numbers behind the decision."""

    promoted: bool
    reason: str
    metric: str
    candidate_version: str
    champion_version: str | None = None
    candidate_value: float | None = None
    champion_value: float | None = None
    #: candidate − champion on the same letters, with its letter-level bootstrap interval (`--data`, outcome metrics)
    paired: dict | None = None
    #: `overlap.check` of the given letters against each version's training letters (`--data` only)
    overlap: dict | None = None


def _bare_metric(metric: str) -> str:
    """`test_auprc` → `auprc` (the split prefix of a logged metric name removed)."""
    for prefix in ("test_", "val_", "cv_", "eval_"):
        if metric.startswith(prefix):
            return metric[len(prefix):]
    return metric


def _metric_from_evaluation(evaluation: dict, metric: str) -> float:
    """`test_auprc`/`auprc`/`guideline_micro_f1` → the model row's value in an `evaluate_model` result."""
    key = _bare_metric(metric)
    row = evaluation["model"]
    if key.startswith("guideline_"):
        value = row["guidelines"].get(key[len("guideline_"):])
    else:
        value = row["outcome"].get(key)
    if not isinstance(value, (int, float)):
        valid = sorted(k for k, v in row["outcome"].items() if isinstance(v, (int, float)))
        raise ValueError(f"unknown metric {metric!r}; valid: {valid} or guideline_micro_f1/guideline_macro_f1 "
                         "(optionally prefixed test_/val_/cv_)")  # fmt: skip
    return float(value)


def _logged_metric(client, version, metric: str) -> tuple[float | None, str | None]:
    run = client.get_run(version.run_id)
    tag = "dataset.digest" if metric.startswith("cv_") else "eval.digest"
    return run.data.metrics.get(metric), run.data.tags.get(tag)


def _better_or_equal(metric: str, candidate: float, champion: float, tolerance: float) -> bool:
    if any(metric.endswith(k) for k in LOWER_IS_BETTER):
        return candidate <= champion + tolerance
    return candidate >= champion - tolerance


def promote(name: str = "imr-classifier", metric: str = "test_auprc", data: list[str] | None = None, *,
            uri: str | None = None, tolerance: float = 0.0) -> Promotion:  # fmt: skip
    """Move alias `champion` to the `candidate` version if it is at least as good on `metric`.

    With `data`, both versions are scored on those letters now. Without it, the metrics logged by
    their runs are compared, and only if both were measured on the same held-out items (same digest).
    """
    configure(uri)
    client = mlflow.MlflowClient()
    try:
        cand = client.get_model_version_by_alias(name, CANDIDATE)
    except MlflowException:
        raise ValueError(f"registered model {name!r} has no version with alias {CANDIDATE!r}; run `imr train` first") from None
    try:
        champ = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champ = None
    cand_v, champ_v = str(cand.version), (str(champ.version) if champ is not None else None)
    if champ_v == cand_v:
        return Promotion(False, f"version {cand_v} is already {CHAMPION}", metric, cand_v, champ_v)
    if champ is None:
        client.set_registered_model_alias(name, CHAMPION, cand_v)
        return Promotion(True, f"no {CHAMPION} yet: version {cand_v} becomes {CHAMPION}", metric, cand_v)
    if data:
        records, errors = load_labelled(data)  # parsed once, both versions scored on the same items
        (c_res, _, c_pred), (h_res, _, h_pred) = (evaluate_records(f"models:/{name}/{v}", records, errors)
                                                  for v in (cand_v, champ_v))  # fmt: skip
        values = [_metric_from_evaluation(r["evaluation"], metric) for r in (c_res, h_res)]
        where = f"on {len(data)} given input path(s)"
        paired = _paired(c_pred, h_pred, metric)
        seen = {"candidate": c_res["overlap"], "champion": h_res["overlap"]}
    else:
        paired, seen = None, None
        (c_val, c_dig), (h_val, h_dig) = _logged_metric(client, cand, metric), _logged_metric(client, champ, metric)
        if c_val is None or h_val is None:
            raise ValueError(f"metric {metric!r} was not logged by both runs (candidate {c_val}, champion {h_val}); "
                             "pass --data to evaluate both on the same letters")  # fmt: skip
        if c_dig != h_dig:
            return Promotion(False, "candidate and champion were evaluated on different items "
                             f"(digest {str(c_dig)[:12]} vs {str(h_dig)[:12]}); pass --data to compare them on the same letters",
                             metric, cand_v, champ_v, c_val, h_val)  # fmt: skip
        values, where = [c_val, h_val], "on the same held-out items (logged)"
    ok = _better_or_equal(metric, values[0], values[1], tolerance)
    verdict = "at least as good as" if ok else "worse than"
    reason = f"candidate v{cand_v} {metric}={values[0]:.4f} is {verdict} champion v{champ_v} {values[1]:.4f} {where}"
    if paired is not None:
        low, high = paired["difference_ci95"]
        noise = "inside the noise" if low <= 0 <= high else "outside the noise"
        reason += (f"; paired difference {paired['difference']:+.4f} [{low:+.4f}, {high:+.4f}] over "
                   f"{paired['n_resamples'] - paired['n_dropped']} letter resamples: {noise}")  # fmt: skip
    elif not data:
        reason += "; no interval: pass --data to pair both versions on the same letters"
    for role, check in (seen or {}).items():
        if check.get("warning"):
            reason += f"; WARNING ({role}): {check['warning']}"
    if ok:
        client.set_registered_model_alias(name, CHAMPION, cand_v)
    return Promotion(ok, reason, metric, cand_v, champ_v, values[0], values[1], paired, seen)


def _paired(cand: dict, champ: dict, metric: str) -> dict | None:
    """Candidate − champion on `metric` over the same letter resamples (predictions from `evaluate_records`);
    None for a metric without intervals (guideline metrics) or when the two versions read different items."""
    key = _bare_metric(metric)
    if key not in OUTCOME_INTERVALS or len(cand["y"]) == 0 or list(cand["y"]) != list(champ["y"]):
        return None
    return paired_difference(cand["y"], champ["p"], cand["p"], cand["groups"], key,
                             threshold_a=champ["threshold"], threshold_b=cand["threshold"])  # fmt: skip
