"""Label review (`imr review`): which given outcome and guideline labels are most likely wrong.

Grouped (by letter) K-fold cross-validation (`experiment.cross_validate`: every item is scored by models that
never saw its letter) gives out-of-fold probabilities; cleanlab's confident learning ranks and flags the items:

- outcome: `cleanlab.rank.get_label_quality_scores` (self-confidence: the out-of-fold probability of the given
  outcome) ranks, and `cleanlab.filter.find_label_issues` (prune by noise rate) flags;
- guidelines: `cleanlab.multilabel_classification` scores (`get_label_quality_scores`, one-vs-rest
  self-confidence aggregated per item) and flags (`find_label_issues`); the labels named per item are the given
  labels the model does not decide ("doubted") and the labels it decides that were not given ("missing"), each
  with the model's probability.

Evidence words: each item's TF-IDF terms that push the fold's out-of-fold TF-IDF baseline hardest towards the
outcome the model predicts (`evidence_for`). They are the baseline's, not the transformer's (whose encoder is not
linear in words): cheap, exact for that model, and a pointer to what the text says. Words are only written to the
output file the user asked for; nothing here logs them.
"""

from __future__ import annotations

import html
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from cleanlab.filter import find_label_issues
from cleanlab.multilabel_classification import filter as ml_filter
from cleanlab.multilabel_classification import rank as ml_rank
from cleanlab.rank import get_label_quality_scores

from imr_model.config import TrainConfig, load_config
from imr_model.experiment import check_labels, cross_validate, load_training_records
from imr_model.splits import label_matrix
from imr_model.taxonomy import LABELS
from imr_model.types import OVERTURNED, UPHELD

logger = logging.getLogger(__name__)
RANK_BY = ("outcome", "guidelines", "any")
N_EVIDENCE = 6
COLUMNS = (
    "rank", "letter_id", "item_index", "case_number", "request", "given_outcome", "predicted_outcome",
    "p_overturned", "outcome_quality", "flagged_outcome", "given_guidelines", "guideline_quality",
    "flagged_guidelines", "guidelines_doubted", "guidelines_missing", "flagged", "evidence_for", "evidence_words",
)  # fmt: skip


@dataclass
class ReviewResult:
    """Every item, ranked (rank 1 = the label most likely wrong), and what the review was run with."""

    rows: pd.DataFrame  # COLUMNS, one row per item
    config: str
    text_view: str
    k: int
    seed: int
    rank_by: str
    metrics: dict = field(default_factory=dict)  # the model's pooled out-of-fold AUROC / AUPRC / guideline micro-F1

    @property
    def n_flagged(self) -> int:
        return int(self.rows["flagged"].sum())


def review(cfg: TrainConfig, records: Sequence[dict], *, k: int = 5, seed: int | None = None, rank_by: str = "outcome",
           quiet: bool = False, on_fold=None) -> ReviewResult:  # fmt: skip
    """Cross-validate `cfg` on `records` (grouped by letter, `k` folds, `seed` or the config's) and rank the items
    by how likely their given labels are wrong (`rank_by`: outcome, guidelines, or any = the lower of the two).

    `on_fold(fold)` is called after each fold (a progress bar)."""
    if rank_by not in RANK_BY:
        raise ValueError(f"rank_by must be one of {list(RANK_BY)}, got {rank_by!r}")
    records = list(records)
    if seed is not None:
        cfg = cfg.model_copy(update={"seed": int(seed)})
    label_names = list(LABELS)
    y = np.array([int(r.get("decision") == OVERTURNED) for r in records])
    check_labels(y, "the reviewed items")
    evidence: dict[int, tuple[list[str], list[str]]] = {}

    def fold_done(fold, te, models, test) -> None:
        evidence.update(zip(te.tolist(), _evidence_terms(models["tfidf"], test.texts)))
        if on_fold is not None:
            on_fold(fold)

    oof = cross_validate(cfg, records, k, label_names, quiet=quiet, on_fold=fold_done)
    row = oof["model"]
    rows = rank_items(records, row["_probabilities"], row["_threshold"], row["_guideline_probabilities"],
                      row["_decided"], [evidence.get(i, ([], [])) for i in range(len(records))], label_names,
                      rank_by=rank_by)  # fmt: skip
    metrics = {"auroc": row["outcome"]["auroc"], "auprc": row["outcome"]["auprc"],
               "guideline_micro_f1": row["guidelines"]["micro_f1"]}  # fmt: skip
    result = ReviewResult(rows, cfg.name, cfg.model.text_view, k, cfg.seed, rank_by, metrics)
    logger.info("label review: %d items, %d flagged (%d outcome, %d guidelines)", len(rows), result.n_flagged,
                int(rows["flagged_outcome"].sum()), int(rows["flagged_guidelines"].sum()))  # counts only, never text
    return result


def rank_items(records: Sequence[dict], p: np.ndarray, threshold: np.ndarray, P: np.ndarray, decided: np.ndarray,
               evidence: Sequence[tuple[list[str], list[str]]], label_names: Sequence[str], *,
               rank_by: str = "outcome") -> pd.DataFrame:  # fmt: skip
    """Out-of-fold probabilities → the ranked review table (all items; see COLUMNS and docs/usage.md)."""
    p, P, decided = np.asarray(p, dtype=float), np.asarray(P, dtype=float), np.asarray(decided).astype(bool)
    y = np.array([int(r.get("decision") == OVERTURNED) for r in records])
    Y = label_matrix(records, label_names).astype(bool)
    pred_probs = np.column_stack([1 - p, p])
    outcome_quality = get_label_quality_scores(y, pred_probs, method="self_confidence")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="May not flag all label issues", category=UserWarning)
        flagged_outcome = find_label_issues(y, pred_probs, filter_by="prune_by_noise_rate", n_jobs=1)
    present = Y.any(axis=0) & ~Y.all(axis=0)  # cleanlab scores a label only where both of its values occur
    given = [np.flatnonzero(row[present]).tolist() for row in Y]
    if present.sum() >= 2:
        guideline_quality = ml_rank.get_label_quality_scores(given, P[:, present])
        with warnings.catch_warnings():  # a label given once cannot be doubted by noise rates; cleanlab says so per label
            warnings.filterwarnings("ignore", message="May not flag all label issues", category=UserWarning)
            flagged_guidelines = ml_filter.find_label_issues(given, P[:, present], n_jobs=1)
    else:
        guideline_quality, flagged_guidelines = np.ones(len(y)), np.zeros(len(y), dtype=bool)
    key = {"outcome": outcome_quality, "guidelines": guideline_quality,
           "any": np.minimum(outcome_quality, guideline_quality)}[rank_by]  # fmt: skip
    # ties (e.g. bounded probabilities) by the other score, then item order: the ranking is deterministic
    order = np.lexsort((np.arange(len(y)), guideline_quality if rank_by == "outcome" else outcome_quality, key))
    predicted = np.asarray(p) >= np.asarray(threshold)
    out = []
    for rank, i in enumerate(order, start=1):
        rec = records[i]
        doubted = [(label_names[j], P[i, j]) for j in np.flatnonzero(Y[i] & ~decided[i])]
        missing = [(label_names[j], P[i, j]) for j in np.flatnonzero(decided[i] & ~Y[i])]
        towards_overturned, towards_upheld = evidence[i]
        out.append({
            "rank": rank, "letter_id": str(rec.get("letter_id") or ""), "item_index": int(rec.get("item_index") or 1),
            "case_number": str(rec.get("case_number") or ""), "request": str(rec.get("request") or ""),
            "given_outcome": OVERTURNED if y[i] else UPHELD, "predicted_outcome": OVERTURNED if predicted[i] else UPHELD,
            "p_overturned": round(float(p[i]), 4), "outcome_quality": round(float(outcome_quality[i]), 4),
            "flagged_outcome": bool(flagged_outcome[i]),
            "given_guidelines": "; ".join(label_names[j] for j in np.flatnonzero(Y[i])),
            "guideline_quality": round(float(guideline_quality[i]), 4),
            "flagged_guidelines": bool(flagged_guidelines[i]),
            "guidelines_doubted": _with_probabilities(doubted), "guidelines_missing": _with_probabilities(missing),
            "flagged": bool(flagged_outcome[i] or flagged_guidelines[i]),
            "evidence_for": OVERTURNED if predicted[i] else UPHELD,
            "evidence_words": "; ".join(towards_overturned if predicted[i] else towards_upheld),
        })  # fmt: skip
    return pd.DataFrame(out, columns=list(COLUMNS))


def _with_probabilities(labels: list[tuple[str, float]]) -> str:
    return "; ".join(f"{name} ({prob:.2f})" for name, prob in labels)


def _evidence_terms(baseline, texts: Sequence[str], n: int = N_EVIDENCE) -> list[tuple[list[str], list[str]]]:
    """Per text: the `n` terms with the largest contribution x_j·w_j to the baseline's outcome logit towards
    Overturned (positive) and towards Upheld (negative)."""
    X = baseline.features(list(texts)).tocsr()
    coef, vocab = np.asarray(baseline.outcome_coef), baseline.vocabulary
    out = []
    for i in range(X.shape[0]):
        cols, vals = X.indices[X.indptr[i]:X.indptr[i + 1]], X.data[X.indptr[i]:X.indptr[i + 1]]
        contrib = vals * coef[cols]
        up, down = np.argsort(-contrib), np.argsort(contrib)
        out.append(([vocab[cols[j]] for j in up[:n] if contrib[j] > 0],
                    [vocab[cols[j]] for j in down[:n] if contrib[j] < 0]))  # fmt: skip
    return out


# --------------------------------------------------------------------------- output


def write_review(result: ReviewResult, path: str | Path) -> Path:
    """The ranked table as CSV (`.csv`) or a self-contained HTML table (`.html`/`.htm`), by suffix."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".html", ".htm"):
        raise ValueError(f"{path}: the review output must end in .csv or .html")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".csv":
        result.rows.to_csv(path, index=False)
    else:
        path.write_text(review_html(result), encoding="utf-8")
    return path


_STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 6px;vertical-align:top;text-align:left}th{background:#eee;position:sticky;top:0}
tr.flagged td{background:#fff3cd}td.num{text-align:right;font-variant-numeric:tabular-nums}"""
_NUMERIC = {"rank", "item_index", "p_overturned", "outcome_quality", "guideline_quality"}


def review_html(result: ReviewResult) -> str:
    """A self-contained page (inline CSS, no script): every cell escaped with `html.escape`."""
    e = html.escape
    head = "".join(f"<th>{e(c)}</th>" for c in result.rows.columns)
    body = []
    for rec in result.rows.to_dict("records"):
        cells = "".join(f'<td class="num">{e(str(v))}</td>' if c in _NUMERIC else f"<td>{e(str(v))}</td>"
                        for c, v in rec.items())  # fmt: skip
        body.append(f'<tr class="flagged">{cells}</tr>' if rec["flagged"] else f"<tr>{cells}</tr>")
    summary = (f"{len(result.rows)} items, {result.n_flagged} flagged; config {result.config}, view {result.text_view}, "
               f"grouped {result.k}-fold CV (seed {result.seed}), ranked by {result.rank_by} label quality; "
               + ", ".join(f"{k} {v:.3f}" for k, v in result.metrics.items() if v is not None))  # fmt: skip
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>IMR label review</title>"
            f"<style>{_STYLE}</style></head><body><h1>IMR label review</h1><p>{e(summary)}</p>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></body></html>\n")  # fmt: skip


def summary_lines(result: ReviewResult, top: int = 10) -> list[tuple[str, ...]]:
    """The rows of the console summary (header first): ids, labels and numbers only (no request text, no evidence
    words). Guideline issues read `-DOUBTED +MISSING`."""
    rows = [("rank", "letter_id", "item", "given", "p_overt", "flagged", "guidelines")]
    for rec in result.rows.head(top).to_dict("records"):
        doubted = [f"-{x.split(' (')[0]}" for x in rec["guidelines_doubted"].split("; ") if x]
        missing = [f"+{x.split(' (')[0]}" for x in rec["guidelines_missing"].split("; ") if x]
        rows.append((str(rec["rank"]), rec["letter_id"], str(rec["item_index"]), rec["given_outcome"],
                     f"{rec['p_overturned']:.3f}", "yes" if rec["flagged"] else "",
                     " ".join(doubted + missing)))  # fmt: skip
    return rows


def review_from_config(config: str | Path, data: Sequence[str], overrides: Sequence[str] = (), *, k: int = 5,
                       seed: int | None = None, rank_by: str = "outcome", quiet: bool = False,
                       on_fold=None) -> ReviewResult:  # fmt: skip
    """What `imr review` runs: the config (a path or a name in configs/) with overrides, the labelled items of
    `data` (letters or item tables), then `review`."""
    if not isinstance(k, int) or k < 2:
        raise ValueError(f"--folds must be >= 2, got {k}")
    if rank_by not in RANK_BY:
        raise ValueError(f"--rank-by must be one of {list(RANK_BY)}, got {rank_by!r}")
    cfg = load_config(config, list(overrides))
    records, _ = load_training_records(data)
    return review(cfg, records, k=k, seed=seed, rank_by=rank_by, quiet=quiet, on_fold=on_fold)
