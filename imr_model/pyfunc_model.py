"""MLflow pyfunc wrapper, logged with models-from-code: MLflow stores this file, not a pickled object.

`tracking.log_model` passes this file as `python_model` and the saved model directory as the
artifact `model_dir`; `mlflow.pyfunc.load_model` runs the file (which calls `set_model`) and then
`load_context`. `predict` takes one row per item, either the item fields (`request`, `rationale`,
`case_summary`; a missing column or null counts as "") or a ready model-input `text` column (used as
is, for rows where it is non-empty), applies the model's text view and returns one row per input
row: `outcome` (Upheld/Overturned), `p_overturned` (calibrated), `guideline_labels` (predicted
label ids), `guidelines` (JSON object label → probability) and `warnings` (list of strings, empty when
the row looks like an IMR item the model was trained on; `imr_model.familiarity`: a row is never a
parsed letter, so the structure check reads every row, unless the caller passes the param
`parsed_letters=True` because it built the rows from parsed letters, as the Spark engine does).
"""

from __future__ import annotations

import json
from contextlib import nullcontext

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

from imr_model import familiarity
from imr_model.modeling import IMRClassifier
from imr_model.views import text_view

MODEL_DIR_ARTIFACT = "model_dir"
INPUT_COLUMNS = ("request", "rationale", "case_summary", "text")
OUTPUT_COLUMNS = ("outcome", "p_overturned", "guideline_labels", "guidelines", "warnings")


def frame_to_texts(frame: pd.DataFrame, view: str) -> list[str]:
    """Model-input texts for each row: `text` when given (a ready model input), else the item fields in the
    model's view (`views.text_view`)."""
    return [text for text, _ in _frame_inputs(frame, view)]


def _frame_inputs(frame: pd.DataFrame, view: str) -> list[tuple[str, dict]]:
    """(model-input text, item record) of each row; the record holds the row's fields as strings."""
    unknown = [c for c in frame.columns if c not in INPUT_COLUMNS]
    usable = [c for c in frame.columns if c in INPUT_COLUMNS]
    if not usable:
        raise ValueError(
            f"input has columns {list(frame.columns)}; expected some of {list(INPUT_COLUMNS)}"
            + (f" (unknown: {unknown})" if unknown else "")
        )
    out = []
    for row in frame.to_dict(orient="records"):
        record = {k: ("" if row.get(k) is None or (isinstance(row.get(k), float) and pd.isna(row.get(k))) else str(row[k]))
                  for k in INPUT_COLUMNS}  # fmt: skip
        ready = row.get("text")
        out.append((ready if isinstance(ready, str) and ready.strip() else text_view(record, view), record))
    return out


class IMRPyfuncModel(PythonModel):
    """Item rows in, one prediction row per item out."""

    def load_context(self, context) -> None:
        self.classifier = IMRClassifier.from_pretrained(context.artifacts[MODEL_DIR_ARTIFACT])
        self.profile = familiarity.load_profile(context.artifacts[MODEL_DIR_ARTIFACT])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        clf = self.classifier
        batch_size = int((params or {}).get("batch_size", 32))
        if not 1 <= batch_size <= 4096:
            raise ValueError(f"params.batch_size must be in 1..4096, got {batch_size}")
        inputs = _frame_inputs(model_input, clf.config.text_view)
        texts, records = [t for t, _ in inputs], [r for _, r in inputs]
        if (params or {}).get("parsed_letters"):  # the caller built these rows from parsed letters (the Spark engine)
            records = [{**dict.fromkeys(familiarity.LETTER_RECORD_FIELDS), **r} for r in records]
        p, P, warnings = predict_with_warnings(clf, getattr(self, "profile", None), records, texts, batch_size)
        outcomes, labels = clf.decide(p, P)
        return pd.DataFrame(
            {
                "outcome": outcomes,
                "p_overturned": [float(x) for x in p],
                "guideline_labels": labels,
                "guidelines": [json.dumps(dict(zip(clf.label_names, map(float, row)))) for row in P],
                "warnings": [list(w) for w in warnings],
            },
            columns=list(OUTPUT_COLUMNS),
        )


def predict_with_warnings(clf, profile, records: list[dict], texts: list[str], batch_size: int = 32):
    """`clf.predict_proba(texts)` and each item's warnings (`familiarity.check`), from one forward pass."""
    windows = clf.make_windows(texts)
    with familiarity.capture_window_vectors(clf) if profile is not None else nullcontext() as cap:
        o, g = clf.window_item_logits(windows, texts, batch_size=batch_size)
    p, P = clf.probabilities(o, g)
    vectors = None if cap is None else familiarity.item_vectors(windows, cap.window_vectors(windows), len(texts))
    return p, P, familiarity.check(records, texts, profile, vectors)


mlflow.models.set_model(IMRPyfuncModel())
