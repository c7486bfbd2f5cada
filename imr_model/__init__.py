"""imr-model: California workers' compensation IMR letters → per-item outcome and guideline predictions."""

from imr_model.types import DECISIONS, OVERTURNED, UPHELD, Item, Letter, LetterError

__version__ = "0.1.0"

# Inference pulls in torch and Captum; load it on first use so `import imr_model` (and the CLI) stays fast.
_LAZY = {name: "imr_model.inference" for name in ("ItemPrediction", "load_model", "predict", "predict_batch")}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'imr_model' has no attribute {name!r}")


__all__ = [
    "ItemPrediction",
    "load_model",
    "predict",
    "predict_batch",
    "DECISIONS",
    "OVERTURNED",
    "UPHELD",
    "Item",
    "Letter",
    "LetterError",
    "__version__",
]
