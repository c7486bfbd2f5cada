"""MLflow pyfunc wrapper, logged with models-from-code: MLflow stores this file, not a pickled object.

`tracking.log_model` passes this file as `python_model` and the saved model directory as the
artifact `model_dir`; `mlflow.pyfunc.load_model` runs the file (which calls `set_model`) and then
`load_context`. `predict` takes one row per item, either the item fields (`request`, `rationale`,
`case_summary`; a missing column or null counts as "") or a ready model-input `text` column (used as
is, for rows where it is non-empty), applies the model's text view and returns one row per input
row: `outcome` (Upheld/Overturned), `p_overturned` (calibrated), `guideline_labels` (predicted
label ids) and `guidelines` (JSON object label → probability).
"""

from __future__ import annotations

import json

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

MODEL_DIR_ARTIFACT = "model_dir"
INPUT_COLUMNS = ("request", "rationale", "case_summary", "text")
OUTPUT_COLUMNS = ("outcome", "p_overturned", "guideline_labels", "guidelines")


def frame_to_texts(frame: pd.DataFrame, view: str, context_view: str | None = None) -> list[str]:
    """Model-input texts for each row: `text` when given (a ready model input, `views.model_input`), else the
    item fields in the model's view (and context view)."""
    from imr_model.views import model_input

    unknown = [c for c in frame.columns if c not in INPUT_COLUMNS]
    usable = [c for c in frame.columns if c in INPUT_COLUMNS]
    if not usable:
        raise ValueError(
            f"input has columns {list(frame.columns)}; expected some of {list(INPUT_COLUMNS)}"
            + (f" (unknown: {unknown})" if unknown else "")
        )
    texts = []
    for row in frame.to_dict(orient="records"):
        ready = row.get("text")
        if isinstance(ready, str) and ready.strip():
            texts.append(ready)
            continue
        record = {k: ("" if row.get(k) is None or (isinstance(row.get(k), float) and pd.isna(row.get(k))) else str(row[k]))
                  for k in ("request", "rationale", "case_summary")}  # fmt: skip
        texts.append(model_input(record, view, context_view))
    return texts


class IMRPyfuncModel(PythonModel):
    """Item rows in, one prediction row per item out."""

    def load_context(self, context) -> None:
        from imr_model.modeling import IMRClassifier

        self.classifier = IMRClassifier.from_pretrained(context.artifacts[MODEL_DIR_ARTIFACT])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        clf = self.classifier
        batch_size = int((params or {}).get("batch_size", 32))
        texts = frame_to_texts(model_input, clf.config.text_view, clf.config.context_view)
        p, P = clf.predict_proba(texts, batch_size=batch_size)
        outcomes, labels = clf.decide(p, P)
        return pd.DataFrame(
            {
                "outcome": outcomes,
                "p_overturned": [float(x) for x in p],
                "guideline_labels": labels,
                "guidelines": [json.dumps(dict(zip(clf.label_names, map(float, row)))) for row in P],
            },
            columns=list(OUTPUT_COLUMNS),
        )


mlflow.models.set_model(IMRPyfuncModel())
