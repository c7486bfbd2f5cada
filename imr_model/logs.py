"""Progress messages on stderr for the command-line entry points (`imr`, `train/*.py`).

imr_model's loggers write counts, timings and metrics only, never letter text.
"""

from __future__ import annotations

import logging
import sys


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record is emitted, not the stream it was when the handler was made
    (as `logging.lastResort` does): a redirected or closed earlier stderr (pytest's capture) is never written to."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def log_to_stderr() -> None:
    """Show imr_model's progress messages on stderr (once per process)."""
    log = logging.getLogger("imr_model")
    if not log.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
