"""The `imr` command line: one subcommand per pipeline stage. Each command is a thin wrapper over a library call."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

app = typer.Typer(
    name="imr",
    help="IMR letters → per-item outcome and guideline predictions.",
    no_args_is_help=True,
)
err_console = Console(stderr=True)


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
    from imr_model.letters import iter_letter_files, parse_many
    from imr_model.progress import progress_bar

    paths = iter_letter_files(inputs)
    if not paths:
        err_console.print(f"[red]No letter files found in: {', '.join(inputs)}[/red]")
        raise typer.Exit(code=2)
    output.parent.mkdir(parents=True, exist_ok=True)
    n_letters = n_items = n_errors = 0
    start = time.perf_counter()
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
    elapsed = max(time.perf_counter() - start, 1e-9)
    err_console.print(
        f"{n_letters} letters, {n_items} items, {n_errors} errors "
        f"in {elapsed:.1f}s ({len(paths) / elapsed:.0f} letters/s) → {output}"
    )


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point usable from code and tests: `main(["parse", ...])`."""
    app(args=argv if argv is not None else sys.argv[1:], prog_name="imr")
