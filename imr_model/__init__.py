"""imr-model: California workers' compensation IMR letters → per-item outcome and guideline predictions."""

from imr_model.types import DECISIONS, OVERTURNED, UPHELD, Item, Letter, LetterError

__version__ = "0.1.0"

__all__ = [
    "DECISIONS",
    "OVERTURNED",
    "UPHELD",
    "Item",
    "Letter",
    "LetterError",
    "__version__",
]
