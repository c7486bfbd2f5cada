"""The `imr` command line: one subcommand per pipeline stage. Each command is a thin wrapper over a library call."""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer
from rich.console import Console

# Light modules only at the top: each command imports the stage it runs inside its function, so `imr --help`
# and `imr parse` start in ~0.1 s instead of loading torch, transformers and MLflow (~4 s).
from imr_model.extras import MissingExtraError
from imr_model.letters import iter_letter_files, parse_many
from imr_model.logs import log_to_stderr
from imr_model.progress import progress_bar

app = typer.Typer(
    name="imr",
    help="IMR letters → per-item outcome and guideline predictions.",
    no_args_is_help=True,
)
err_console = Console(stderr=True, highlight=False)


def _say(text: str, style: str | None = None) -> None:
    """Print to stderr as plain text (file names and messages may hold [brackets]); long lines are not wrapped."""
    err_console.print(text, style=style, markup=False, soft_wrap=True)


@app.callback()
def _root() -> None:
    """IMR letters → per-item outcome and guideline predictions. Run `imr COMMAND --help` for details."""


@app.command()
def parse(
    inputs: Annotated[list[str], typer.Argument(help="Letter files (PDF/TXT), folders (recursive) or globs.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output JSONL, one object per item.")],
    workers: Annotated[int, typer.Option(help="Parallel worker processes (0 = one per core).")] = 0,
) -> None:
    """Parse letters into one JSON object per disputed item; failures become {"source", "error"} records."""

    paths = iter_letter_files(inputs)
    if not paths:
        _say(f"No letter files found in: {', '.join(inputs)}", "red")
        raise typer.Exit(code=2)
    n_letters = n_items = n_errors = 0
    start = time.perf_counter()
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with output.open("w", encoding="utf-8") as out, progress_bar("parsing", total=len(paths), unit="letters") as bar:
            for result in parse_many(paths, workers=workers):
                if isinstance(result, Exception):
                    n_errors += 1
                    out.write(json.dumps({"source": result.source, "error": result.reason}) + "\n")
                else:
                    n_letters += 1
                    for rec in result.item_records():
                        n_items += 1
                        out.write(json.dumps(rec, ensure_ascii=False) + "\n")
                bar.advance()
    except OSError as exc:
        _fail(OSError(f"cannot write {output}: {exc.strerror or exc}"))
    _say(
        f"{n_letters} letters, {n_items} items, {n_errors} errors in {_rate(n_letters, 'letters', start)} → {output}"
    )
    if n_letters == 0:
        _say(f"no input could be parsed ({n_errors} errors); see the error records in {output}", "red")
        raise typer.Exit(code=1)


def _rate(n: int, unit: str, start: float) -> str:
    """'12.3s (45 letters/s)'; no rate for a run too short to measure (never divides by zero)."""
    elapsed = time.perf_counter() - start
    if n == 0 or elapsed < 1e-3:
        return f"{elapsed:.1f}s"
    return f"{elapsed:.1f}s ({n / elapsed:.1f} {unit}/s)"


data_app = typer.Typer(help="Datasets: synthetic demo letters, public data downloads, train/validation/test builds.")
download_app = typer.Typer(help="Download public datasets.")
data_app.add_typer(download_app, name="download")
app.add_typer(data_app, name="data")


@download_app.command("dmhc")
def data_download_dmhc(
    url: Annotated[Optional[str], typer.Option(help="CSV URL (default: the CHHS open data portal resource).")] = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="Destination CSV.")] = Path(
        "data/raw/dmhc/imr-determinations.csv"
    ),
    timeout: Annotated[float, typer.Option(help="Network timeout in seconds.")] = 60.0,
) -> None:
    """Download the California DMHC health-plan IMR determinations CSV (checked, then moved into place)."""
    from imr_model.tabular import DEFAULT_DMHC_URL, DatasetDownloadError, download_dmhc, load_dmhc

    try:
        path = download_dmhc(output, url or DEFAULT_DMHC_URL, timeout=timeout)
    except DatasetDownloadError as exc:
        _say(f"Download failed: {exc}", "red")
        raise typer.Exit(code=1) from None
    records = load_dmhc(path)
    n_over = sum(r["decision"] == "Overturned" for r in records)
    _say(f"{len(records)} DMHC cases ({n_over} overturned) → {path}")


@data_app.command("demo")
def data_demo(
    n: Annotated[int, typer.Argument(min=1, help="Number of synthetic letters.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder.")] = Path("data/demo"),
    seed: Annotated[int, typer.Option(help="Random seed (same seed → same letters).")] = 0,
    fmt: Annotated[str, typer.Option("--format", help="txt or pdf.")] = "txt",
) -> None:
    """Write synthetic demo letters (marked SYNTHETIC, case numbers CM99-...)."""
    from imr_model.demo import FORMATS, write_demo_letters

    if fmt not in FORMATS:
        _say(f"--format must be one of {list(FORMATS)}, got {fmt!r}", "red")
        raise typer.Exit(code=2)
    paths = write_demo_letters(output, n, seed=seed, fmt=fmt)
    _say(f"{len(paths)} synthetic letters → {output}")


@data_app.command("build")
def data_build(
    inputs: Annotated[list[str], typer.Argument(help="Letters (files/folders/globs) and/or .csv/.jsonl/.parquet tables.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output dataset folder (save_to_disk).")],
    seed: Annotated[int, typer.Option(help="Split seed.")] = 0,
    val_size: Annotated[float, typer.Option(help="Validation fraction.")] = 0.15,
    test_size: Annotated[float, typer.Option(help="Test fraction.")] = 0.15,
    text_column: Annotated[Optional[str], typer.Option(help="Text column of tables.")] = None,
    label_column: Annotated[Optional[str], typer.Option(help="Label column of tables.")] = None,
    near_duplicates: Annotated[bool, typer.Option("--near-duplicates/--no-near-duplicates",
                                                  help="Report near-duplicate rationales across splits (exact "
                                                       "TF-IDF cosine >= 0.9; slow on very large templated corpora).")] = True,
) -> None:
    """Build train/validation/test (grouped by letter, stratified) with the three text views, and save it."""
    from imr_model.dataset import build_dataset, iter_records, save_dataset

    errors: list = []
    try:  # records stream from the parser and the tables into the build: memory stays bounded
        records = iter_records(inputs, errors=errors, text_column=text_column, label_column=label_column)
        dd = build_dataset(records, seed=seed, val_size=val_size, test_size=test_size,
                           dedup_threshold=0.9 if near_duplicates else None)  # fmt: skip
    except (ValueError, FileNotFoundError) as exc:
        _say(f"{exc}", "red")
        raise typer.Exit(code=2) from None
    save_dataset(dd, output)
    for err in errors:
        _say(f"skipped {err}", "yellow")
    _say(json.dumps({k: dd.report[k] for k in ("sizes", "overturn_rate", "masked_sentences")}))
    dups = dd.report["near_duplicates"]
    _say(f"near-duplicate pairs across splits: {'not checked' if dups.get('skipped') else dups['pairs']} → {output}")


# --------------------------------------------------------------------------- inference (score / explain / serve)
_MODEL_HELP = "Model directory or MLflow URI; default $IMR_MODEL_URI, then models:/imr-classifier@champion, then newest ./models/*."
_DEVICE_HELP = ("auto | cpu | cuda | cuda:N | mps (auto: CUDA if available, else MPS, else CPU; CUDA autocasts to "
                "bf16/fp16; imr_model/devices.py).")


def _fail(exc: BaseException, uri: str | None = None) -> None:
    """Print one line saying what went wrong (and what to do) and exit 2; never a traceback for expected errors."""
    if isinstance(exc, (KeyError, IndexError)):  # LookupErrors that are bugs, not user errors: keep the traceback
        raise exc
    if _is_mlflow_error(exc):
        from imr_model.tracking import registry_error_message

        message = registry_error_message(uri or "", exc) if uri and str(uri).startswith("models:/") else _one_line(exc)
        _say(f"MLflow: {message}", "red")
    else:
        _say(f"{type(exc).__name__}: {_one_line(exc)}", "red")
    raise typer.Exit(code=2)


def _one_line(exc: BaseException) -> str:
    """The message on one line: its lines joined (a config error lists every bad key on lines of its own)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    text = " ".join(lines) if lines else type(exc).__name__
    return text if len(text) <= 2000 else text[:2000] + " …"


def _is_mlflow_error(exc: BaseException) -> bool:
    return type(exc).__module__.startswith("mlflow")


# Errors a user can cause and fix (a wrong path, alias, output or input); anything else is a bug and keeps its traceback.
_EXPECTED = (LookupError, ValueError, OSError)


@contextmanager
def _one_line_errors(uri: str | None = None) -> Iterator[None]:
    """Expected errors and MLflow's own exception types inside the block → `_fail` (one line, exit 2)."""
    try:
        yield
    except _EXPECTED as exc:
        _fail(exc, uri)
    except Exception as exc:  # noqa: BLE001 - MLflow raises its own exception types
        if not _is_mlflow_error(exc):
            raise
        _fail(exc, uri)


def _load_reported(model: str | None, backend: str = "torch", device: str | None = None):
    """Resolve and load the model, then say which one it is (URI, version, training data) on stderr.

    Warns when the model was trained on the synthetic demo letters, or when no model was named and the
    newest directory under ./models was taken.
    """
    from imr_model.inference import CHAMPION_URI, MODEL_ENV, load_model, resolve_model_uri

    with _one_line_errors(model):
        uri = resolve_model_uri(model)
    with _one_line_errors(uri):
        predictor = load_model(uri, backend=backend, device=device)
    if model:
        how = "--model"
    elif os.environ.get(MODEL_ENV, "").strip():
        how = f"${MODEL_ENV}"
    elif uri == CHAMPION_URI:
        how = "registry alias champion"
    else:
        how = "fallback: newest directory under ./models (no --model, no $IMR_MODEL_URI, no champion alias)"
    cfg = predictor.classifier.config
    resolved = predictor.info.get("resolved_uri")
    source = getattr(cfg, "data_source", "") or "unknown (saved before training sources were recorded)"
    _say(
        f"model: {uri}{f' = {resolved}' if resolved and resolved != uri else ''} [{how}]; "
        f"version {cfg.version or '?'}; {predictor.backend} backend on {predictor.device}; trained on {source}"
    )
    if source.startswith("demo:"):
        _say(
            "warning: this model was trained on the synthetic demo letters; its predictions say nothing "
            "about real letters. Pass --model (a directory or models:/imr-classifier@champion) or set "
            f"${MODEL_ENV}.",
            "yellow",
        )
    elif how.startswith("fallback"):
        _say(f"warning: no model was named; using {predictor.path}", "yellow")
    return predictor


@contextmanager
def _extras_needed(engine: str = "local", backend: str = "torch") -> Iterator[None]:
    """Check the optional parts `engine`/`backend` need; a missing one (`MissingExtraError`, here or inside the
    block) → its message on one line (it names the extra to install) and exit 1."""

    try:
        if engine == "spark":
            from imr_model.spark import require_pyspark

            require_pyspark()
        elif backend == "onnx":
            from imr_model.onnx_backend import require_onnx

            require_onnx()
        yield
    except MissingExtraError as exc:
        _say(_one_line(exc), "red")
        raise typer.Exit(code=1) from None


@app.command()
def score(
    inputs: Annotated[list[str], typer.Argument(help="Letter files, folders, globs, or item tables (.csv/.jsonl/.parquet).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="OUT.jsonl, OUT.csv or OUT.parquet; rerun to resume.")],
    model: Annotated[Optional[str], typer.Option(help=_MODEL_HELP)] = None,
    attributions: Annotated[bool, typer.Option("--attributions", help="Add word attributions of the outcome logit.")] = False,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass; letters are scored and written atomically "
                                                 "in chunks of about 4x this many items.")] = 32,
    backend: Annotated[str, typer.Option(help="torch | onnx (int8 ONNX Runtime; extra imr-model\\[onnx]).")] = "torch",
    engine: Annotated[str, typer.Option(help="local | spark (mlflow.pyfunc.spark_udf; needs an MLflow model URI; "
                                                   "extra imr-model\\[spark]).")] = "local",
    n_steps: Annotated[int, typer.Option(help="Integration steps for --attributions.")] = 32,
    device: Annotated[Optional[str], typer.Option(help=_DEVICE_HELP + " Engine local only.")] = None,
) -> None:
    """Score letters into one row per item (outcome, p_overturned, guidelines); resumable and crash-safe."""
    from imr_model.score_output import lock_output, output_format

    if engine not in ("local", "spark"):
        _fail(ValueError(f"unknown engine {engine!r}; valid: local, spark"))
    try:
        output_format(output)  # a bad output name fails before the model is loaded
    except _EXPECTED as exc:
        _fail(exc)
    start = time.perf_counter()
    with _extras_needed(engine, backend):  # a missing extra fails before the model is loaded
        if engine == "spark":
            from imr_model.inference import resolve_model_uri
            from imr_model.spark import score_files

            try:
                uri = resolve_model_uri(model)
                _say(f"model: {uri} (spark engine)")
                summary = score_files(inputs, output, model_uri=uri)
            except _EXPECTED as exc:
                _fail(exc, model)
        else:
            from imr_model.scoring import score as score_letters

            try:  # a locked, read-only or full output is refused before the model loads
                lock = lock_output(output)
            except _EXPECTED as exc:
                _fail(exc)
            try:
                predictor = _load_reported(model, backend, device)
                summary = score_letters(inputs, output, model=predictor, attributions=attributions, batch_size=batch_size,
                                        backend=backend, n_steps=n_steps, lock=lock)  # fmt: skip
            except _EXPECTED as exc:
                _fail(exc, model)
            finally:
                lock.release()
    err_console.print(
        f"{summary.letters} letters, {summary.items} items, {summary.errors} errors, {summary.skipped} already done "
        f"in {_rate(summary.items, 'items', start)} → {output}"
    )
    if getattr(summary, "drift", None) is not None:
        from imr_model.drift import summary_line

        _say(summary_line(summary.drift), "yellow" if summary.drift["drifted"] else None)
    elif engine == "spark":
        _say("drift: not computed with --engine spark (run imr drift on the same inputs)")
    if summary.letters == 0 and summary.skipped == 0:
        _say(f"no input could be scored ({summary.errors} errors); see the error rows in {output}", "red")
        raise typer.Exit(code=1)


@app.command()
def drift(
    inputs: Annotated[list[str], typer.Argument(help="Letter files, folders, globs, or item tables (.csv/.jsonl/.parquet).")],
    model: Annotated[Optional[str], typer.Option(help=_MODEL_HELP)] = None,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Write the report: REPORT.json or REPORT.html.")] = None,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 32,
) -> None:
    """Did this batch drift from the model's training items, and on what? Exit 1 when it did (docs/usage.md, Drift)."""
    from imr_model.drift import report_lines, write_report
    from imr_model.scoring import drift_report

    if output is not None and output.suffix.lower() not in (".json", ".html", ".htm"):
        _fail(ValueError(f"--output {output}: use a .json or .html name"))
    predictor = _load_reported(model)
    with _one_line_errors(model):
        report = drift_report(inputs, model=predictor, batch_size=batch_size)
        if output is not None:
            write_report(report, output)
    typer.echo("\n".join(report_lines(report)))
    if output is not None:
        _say(f"report → {output}")
    if report["drifted"]:
        raise typer.Exit(code=1)


@app.command()
def explain(
    letter: Annotated[str, typer.Argument(help="A letter file (PDF/TXT).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="HTML report to write.")],
    model: Annotated[Optional[str], typer.Option(help=_MODEL_HELP)] = None,
    target: Annotated[str, typer.Option(help="'outcome' or a guideline label id.")] = "outcome",
    n_steps: Annotated[int, typer.Option(help="Integration steps.")] = 32,
    top_k: Annotated[int, typer.Option(help="Rows of the top-words table per item.")] = 10,
    device: Annotated[Optional[str], typer.Option(help=_DEVICE_HELP + " Attributions run in fp32.")] = None,
) -> None:
    """Write a self-contained HTML report: each item's prediction with its words shaded by attribution."""
    from imr_model.report import explain as explain_letter

    if not Path(letter).is_file():
        _fail(FileNotFoundError(f"{letter}: no such file"))
    predictor = _load_reported(model, device=device)
    try:
        path = explain_letter(Path(letter), output, model=predictor, target=target, n_steps=n_steps, top_k=top_k)
    except _EXPECTED as exc:
        _fail(exc)
    _say(f"report → {path}")


@app.command()
def serve(
    model: Annotated[Optional[str], typer.Option(help=_MODEL_HELP)] = None,
    host: Annotated[str, typer.Option(help="Interface to bind (127.0.0.1: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.")] = 8080,
    backend: Annotated[str, typer.Option(help="torch | onnx (extra imr-model\\[onnx]).")] = "torch",
    timeout: Annotated[float, typer.Option(help="Per-request deadline in seconds, queueing included (504 beyond; "
                                                "the worker is killed and replaced).")] = 60.0,
    max_body_mb: Annotated[float, typer.Option(help="Request body limit in MB (413 beyond).")] = 5.0,
    workers: Annotated[Optional[int], typer.Option(help="Prediction worker processes (default: 2 on 2 cores, "
                                                        "half the cores above 4, at most 4).")] = None,
    max_queue: Annotated[int, typer.Option(help="Requests waiting for a worker before 503.")] = 16,
    body_timeout: Annotated[float, typer.Option(help="Seconds to receive a request body (408 beyond).")] = 30.0,
    header_timeout: Annotated[float, typer.Option(help="Seconds to receive the request line and headers.")] = 10.0,
    device: Annotated[Optional[str], typer.Option(help=_DEVICE_HELP + " Every worker loads its own copy there.")] = None,
) -> None:
    """Serve predictions over HTTP (FastAPI + uvicorn: extra imr-model\\[serve]); $IMR_API_TOKEN requires a bearer token."""
    import gc

    from imr_model.inference import clear_cache

    with _extras_needed(backend=backend):  # [serve] (and [onnx] for --backend onnx) before the model loads
        from imr_model.serving import serve as run_server

    predictor = _load_reported(model, backend, "cpu")  # a bad model fails here, before a port is bound (a bad
    # device fails in create_app, before a worker starts); this check copy never goes to the GPU
    uri = predictor.uri
    del predictor
    clear_cache()  # the workers load their own copy; this process only answers HTTP
    gc.collect()
    try:
        run_server(uri, host=host, port=port, backend=backend, timeout_s=timeout,
                   max_body_bytes=int(max_body_mb * 1024 * 1024), workers=workers, max_queue=max_queue,
                   body_timeout_s=body_timeout, header_timeout_s=header_timeout, device=device)  # fmt: skip
    except _EXPECTED as exc:
        _fail(exc, uri)


# --------------------------------------------------------------------------- training (train / evaluate / promote / pretrain)
_DATA_HELP = "Letters (PDF/TXT files, folders, globs) or item tables (.csv/.jsonl/.parquet)."


@app.command()
def train(
    config: Annotated[str, typer.Option("--config", "-c", help="YAML path or a name in configs/ (default, masked, forecast, tiny).")] = "default",
    data: Annotated[Optional[list[str]], typer.Option("--data", help=_DATA_HELP + " Repeatable; required (demo letters: `imr data demo`).")] = None,
    overrides: Annotated[Optional[list[str]], typer.Option("--set", help="Override a config value: --set train.epochs=3 (repeatable).")] = None,
    cv: Annotated[int, typer.Option("--cv", help="Also run grouped K-fold cross-validation with pooled out-of-fold metrics (K >= 2).")] = 0,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write all metrics to this JSON file.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
    device: Annotated[Optional[str], typer.Option(help=_DEVICE_HELP + " Default: the config's train.device.")] = None,
) -> None:
    """Train the TF-IDF baseline and the transformer, evaluate both, log to MLflow and register the model."""
    from imr_model.experiment import result_lines, train_from_config

    log_to_stderr()
    with _one_line_errors():
        result = train_from_config(config, data, _with_device(overrides, device), cv=cv, json_out=json_out, quiet=quiet)
    typer.echo("\n".join(result_lines(result)))


@app.command()
def evaluate(
    model: Annotated[str, typer.Option("--model", help="Model directory or MLflow URI (models:/imr-classifier@champion).")],
    data: Annotated[list[str], typer.Option("--data", help=_DATA_HELP + " Repeatable.")],
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the metrics to this JSON file.")] = None,
    batch_size: Annotated[int, typer.Option(help="Items per model batch.")] = 32,
    slices: Annotated[bool, typer.Option("--slices", help="Also print the model's metrics per slice (docs/usage.md, Slices).")] = False,
) -> None:
    """Print majority / TF-IDF / model metrics on labelled letters; optionally write them as JSON."""
    from imr_model.evaluation import evaluate_model, format_slices

    with _one_line_errors(model):
        result, table = evaluate_model(model, data, batch_size=batch_size)
    typer.echo(table)
    if slices:
        typer.echo("\n" + format_slices(result["slices"]))
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2, default=float), encoding="utf-8")
        _say(f"metrics → {json_out}")


@app.command()
def promote(
    metric: Annotated[str, typer.Option(help="Metric that decides, e.g. test_auprc, test_f1, cv_auroc, test_guideline_micro_f1.")] = "test_auprc",
    data: Annotated[Optional[list[str]], typer.Option("--data", help="Score both versions on these letters instead of comparing logged metrics.")] = None,
    name: Annotated[str, typer.Option(help="Registered model name.")] = "imr-classifier",
    tolerance: Annotated[float, typer.Option(help="Allowed shortfall of the candidate.")] = 0.0,
) -> None:
    """Move alias `champion` to the `candidate` version if it is at least as good on METRIC on the same data."""
    from imr_model.registry import promote as promote_model

    with _one_line_errors(f"models:/{name}@candidate"):
        result = promote_model(name, metric, data, tolerance=tolerance)
    typer.echo(("promoted: " if result.promoted else "not promoted: ") + result.reason)
    if not result.promoted and result.champion_version is not None and result.candidate_version != result.champion_version:
        raise typer.Exit(code=1)


@app.command()
def card(
    model_dir: Annotated[Path, typer.Argument(help="A model directory (models/<config>-<timestamp>).")],
) -> None:
    """(Re)write MODEL_DIR/README.md, the model card, from its config.json and metrics.json (training writes it too)."""
    from imr_model.modelcard import write_card

    with _one_line_errors():
        path = write_card(model_dir)
    typer.echo(f"model card → {path}")


@app.command()
def pretrain(
    config: Annotated[str, typer.Option("--config", "-c", help="Config whose model.backbone is adapted.")] = "default",
    data: Annotated[Optional[list[str]], typer.Option("--data", help=_DATA_HELP + " Repeatable; required; labels are not used.")] = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="Backbone directory to write (use it as model.backbone).")] = Path("models/backbone-mlm"),
    overrides: Annotated[Optional[list[str]], typer.Option("--set", help="Override a config value (repeatable).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
    device: Annotated[Optional[str], typer.Option(help=_DEVICE_HELP + " Default: the config's train.device.")] = None,
) -> None:
    """Continue masked-LM pretraining of the backbone on letter text; reports held-out perplexity before/after."""
    from imr_model.experiment import pretrain_from_config, pretrain_report_lines

    log_to_stderr()
    with _one_line_errors():
        report = pretrain_from_config(config, data, output, _with_device(overrides, device), quiet=quiet)
    typer.echo("\n".join(pretrain_report_lines(report, output)))


def _with_device(overrides: Optional[list[str]], device: Optional[str]) -> list[str]:
    """--set overrides plus `train.device=DEVICE` for --device (validated with the config, like any override)."""
    return [*(overrides or []), *([f"train.device={device}"] if device is not None else [])]


@app.command()
def review(
    data: Annotated[list[str], typer.Option("--data", help=_DATA_HELP + " Repeatable; required.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="review.csv or review.html: every item, ranked.")],
    config: Annotated[str, typer.Option("--config", "-c", help="YAML path or a name in configs/ (review: rationale "
                                        "view, probe recipe).")] = "review",
    overrides: Annotated[Optional[list[str]], typer.Option("--set", help="Override a config value (repeatable).")] = None,
    folds: Annotated[int, typer.Option("--folds", help="Grouped (by letter) cross-validation folds.")] = 5,
    seed: Annotated[Optional[int], typer.Option(help="Fold seed (default: the config's seed).")] = None,
    rank_by: Annotated[str, typer.Option("--rank-by", help="outcome | guidelines | any (the lower label quality).")] = "outcome",
    top: Annotated[int, typer.Option(help="Rows of the printed summary.")] = 10,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
) -> None:
    """Rank items by how likely their given outcome / guideline labels are wrong (out-of-fold cleanlab review)."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    from imr_model.review import review_from_config, summary_lines, write_review

    if output.suffix.lower() not in (".csv", ".html", ".htm"):
        _fail(ValueError(f"{output}: the review output must end in .csv or .html"))
    log_to_stderr()
    with _one_line_errors(), progress_bar("cross-validating", total=folds, unit="folds", disable=quiet) as bar:
        result = review_from_config(config, data, overrides or [], k=folds, seed=seed, rank_by=rank_by, quiet=quiet,
                                    on_fold=lambda fold: bar.advance())  # fmt: skip
    with _one_line_errors():
        path = write_review(result, output)
    header, *rows = summary_lines(result, top)
    table = Table(title=f"first {len(rows)} of {len(result.rows)} items ({result.n_flagged} flagged)", box=box.SIMPLE_HEAD)
    for name in header:  # the ids stay whole; the guideline issues (-doubted +missing) wrap
        table.add_column(name, no_wrap=name != "guidelines", overflow="fold")
    for row in rows:
        table.add_row(*(Text(v) for v in row))
    Console().print(table)
    typer.echo(f"{len(result.rows)} items, {result.n_flagged} flagged ({int(result.rows['flagged_outcome'].sum())} "
               f"outcome, {int(result.rows['flagged_guidelines'].sum())} guidelines); config {result.config}, view "
               f"{result.text_view}, {result.k}-fold grouped CV → {path}")  # fmt: skip


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point usable from code and tests: `main(["parse", ...])`."""
    app(args=argv if argv is not None else sys.argv[1:], prog_name="imr")
