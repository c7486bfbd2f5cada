"""The worker side of the HTTP service: one process that loads the model and runs request jobs.

`serving_pool.WorkerPool` starts these processes (forkserver context, this module preloaded into
the fork server so a replacement worker starts in well under a second), sends each one job at a
time over a pipe and kills the process when a job passes its deadline. Everything that costs CPU
for a request — base64 decoding, PDF text extraction, letter parsing, tokenisation, the forward
pass, attributions — runs here, never in the server's process.

Jobs get plain dicts (validated request fields) and return plain JSON-ready dicts. Expected
failures raise `JobError(status, detail)`; details never quote letter text. Nothing here logs
letter text: an unexpected exception is reported by type name and code location only.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import os
import signal
import sys
import tempfile
import traceback
from pathlib import Path

# Imported at module level on purpose: the fork server preloads this module, so every worker
# forked from it starts with torch, transformers and the package already imported (~8 s saved).
import imr_model.attribution
import imr_model.letters_2013
import imr_model.modeling
import imr_model.tracking
import imr_model.views  # noqa: F401
from imr_model.inference import Predictor, load_model, text_records
from imr_model.letters import parse_many
from imr_model.types import LetterError

try:  # the encoder class the shipped backbones use; transformers imports it lazily otherwise
    import transformers.models.bert.modeling_bert  # noqa: F401
except ImportError:  # pragma: no cover - a transformers without BERT
    pass

WARMUP_TEXT = "The request for physical therapy is medically necessary."


class JobError(Exception):
    """An expected failure of one job, sent to the client as `status` with `detail` (no letter text)."""

    def __init__(self, status: int, detail: str):
        super().__init__(status, detail)
        self.status, self.detail = status, detail


# --------------------------------------------------------------------------- jobs


def _records(letter: dict, tmpdir: str) -> list[dict]:
    """Item records of one input; bad input → JobError(422) naming the problem (never quoting the text)."""
    try:
        if letter.get("text"):
            return text_records(letter["text"], letter_id=letter.get("letter_id"))
        return _pdf_records(letter.get("pdf_base64") or "", letter.get("letter_id"), tmpdir)
    except (LetterError, ValueError) as exc:
        reason = exc.reason if isinstance(exc, LetterError) else str(exc)
        raise JobError(422, f"cannot read the letter: {reason}") from None


def _pdf_records(b64: str, letter_id: str | None, tmpdir: str) -> list[dict]:
    """Parse a base64 PDF. The bytes go to a fixed-pattern temporary file (mkstemp in the worker's
    private directory); no part of any path comes from the request."""
    try:
        data = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("pdf_base64 is not valid base64") from None
    if not data.startswith(b"%PDF-"):
        raise ValueError("pdf_base64 does not decode to a PDF (no %PDF- header)")
    fd, name = tempfile.mkstemp(prefix="upload-", suffix=".pdf", dir=tmpdir)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        # In a parse worker under the parse budget (RLIMIT_AS, time): a 1 MB flate bomb inflating to GBs
        # costs one 422, not this model worker (which has no memory limit of its own).
        (letter,) = parse_many([Path(name)])
        if isinstance(letter, LetterError):
            raise LetterError("upload.pdf", letter.reason)
    finally:
        try:
            os.unlink(name)
        except OSError:
            pass
    records = letter.item_records()
    for r in records:
        r["source"], r["letter_id"] = "<upload>", letter_id or "upload"
    return records


def _predict(predictor: Predictor, records: list[dict], opts: dict) -> list[dict]:
    if not records:
        return []
    try:
        preds = predictor.predict_records(records, attributions=opts["attributions"], target=opts["target"],
                                          n_steps=opts["n_steps"])  # fmt: skip
    except ValueError as exc:  # e.g. an unknown attribution target; the message lists valid ones
        raise JobError(422, str(exc)) from None
    out = []
    for p in preds:
        d = p.to_dict(include_text=opts["attributions"])
        d.setdefault("warnings", [])
        out.append(d)
    return out


def run_single(predictor: Predictor, req: dict, tmpdir: str) -> dict:
    records = _records(req, tmpdir)
    preds = _predict(predictor, records, req)
    return {"letter_id": records[0]["letter_id"], "model": predictor.identity(), "items": preds}


def run_batch(predictor: Predictor, req: dict, tmpdir: str) -> dict:
    results: list[dict] = []
    groups: list[list[dict]] = []
    for i, letter in enumerate(req["letters"]):
        try:
            groups.append(_records(letter, tmpdir))
            results.append({"letter_id": groups[-1][0]["letter_id"], "items": [], "error": None})
        except JobError as exc:
            groups.append([])
            results.append({"letter_id": letter.get("letter_id") or f"#{i}", "items": [], "error": exc.detail})
    preds = _predict(predictor, [r for g in groups for r in g], req)
    pos = 0
    for result, group in zip(results, groups):
        result["items"] = preds[pos : pos + len(group)]
        pos += len(group)
    return {"model": predictor.identity(), "results": results}


JOBS = {"predict": run_single, "batch": run_batch}


# --------------------------------------------------------------------------- process main


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the parent (the fork server, which exits with the service) dies."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def _where(exc: BaseException) -> str:
    """'file.py:123' of the innermost frame: enough to find a bug, with no message that could hold text."""
    frames = traceback.extract_tb(exc.__traceback__)
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"


def main(conn, spec: dict) -> None:
    """Worker process entry: load the model, report ("ready", info), then serve jobs until EOF."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the whole group; the parent stops us
    try:
        import torch

        torch.set_num_threads(max(1, int(spec.get("threads") or 1)))
        predictor = load_model(spec["model"], backend=spec["backend"], device=spec.get("device"))
        predictor.predict_records([{"letter_id": "warmup", "item_index": 1, "request": "", "rationale": WARMUP_TEXT,
                                    "case_summary": WARMUP_TEXT}])  # fmt: skip
        info = {
            "metadata": predictor.metadata(),
            "identity": predictor.identity(),
            "resolved_uri": predictor.info.get("resolved_uri", predictor.uri),
            "backend": predictor.backend,
            "pid": os.getpid(),
        }
    except Exception as exc:  # noqa: BLE001 - report any start-up failure to the parent, which raises it
        conn.send(("error", [c.__name__ for c in type(exc).__mro__], str(exc)))
        conn.close()
        return
    conn.send(("ready", info))
    tmpdir = spec["tmpdir"]
    while True:
        try:
            kind, payload = conn.recv()
        except (EOFError, OSError):
            break
        try:
            reply = ("ok", JOBS[kind](predictor, payload, tmpdir))
        except JobError as exc:
            reply = ("http", exc.status, exc.detail)
        except Exception as exc:  # noqa: BLE001 - never crash the worker on one bad request
            where = _where(exc)
            print(f"imr worker {os.getpid()}: {kind} job failed with {type(exc).__name__} at {where}", file=sys.stderr)
            reply = ("failed", type(exc).__name__, where)
        try:
            conn.send(reply)
        except (OSError, ValueError):
            break
