"""Optional parts of the package (pip extras) and the one-line error a missing one gives.

The core install parses letters, trains, scores and predicts. Three heavy parts are extras:

- ``[spark]``: pyspark, for ``imr score --engine spark`` (`imr_model.spark`);
- ``[onnx]``: onnx, onnxruntime, onnxscript, for ``--backend onnx`` (`imr_model.onnx_backend`);
- ``[serve]``: fastapi, fastapi-offline, uvicorn, python-multipart, for ``imr serve`` (`imr_model.serving`);
- ``[all]``: the three.

Modules import them through `require`, where they are used, so ``import imr_model.cli`` and every
core command work without them.
"""

from __future__ import annotations

import importlib
from types import ModuleType

PACKAGE = "imr-model"
_DISTRIBUTIONS = {"python_multipart": "python-multipart", "fastapi_offline": "fastapi-offline"}  # import name → pip name


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the pip extra that installs it."""

    def __init__(self, module: str, extra: str, feature: str):
        self.module, self.extra, self.feature = module, extra, feature
        top = module.split(".")[0]
        super().__init__(f"{feature} needs {_DISTRIBUTIONS.get(top, top)}: pip install '{PACKAGE}[{extra}]'", name=module)


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import and return `module`, or raise `MissingExtraError` saying which extra installs it.

    `feature` is what the user asked for, as they would recognise it: ``"imr score --engine spark"``.
    Only a missing module is translated; an installed package that fails while importing keeps its error.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = getattr(exc, "name", None)
        top = module.split(".")[0]
        # ModuleNotFoundError for the module itself or its top package, or the ImportError that a
        # `sys.modules[name] = None` entry gives: the package is absent. Anything else is a broken install.
        if missing is not None and (missing == module or missing == top or module.startswith(missing + ".")):
            raise MissingExtraError(module, extra, feature) from None
        raise
