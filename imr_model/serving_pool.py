"""A pool of model worker processes whose timed-out jobs are killed, so a 504 frees what it held.

Each worker (`serving_worker.main`) loads the model itself and runs one job at a time; the server
process only parses HTTP, validates and waits. `WorkerPool.run` is blocking (call it from a thread):
it takes an idle worker — waiting at most until the job's deadline, which the caller counts from
the request's arrival — sends the job and waits for the reply until the same deadline. A job that
passes it gets `JobTimeout`; its worker is SIGKILLed at once and a replacement started in the
background. Workers come from a fork server that has `imr_model.serving_worker` (torch,
transformers, the package) preloaded, so a replacement is ready in about the model's load time
(0.1-1 s) instead of a fresh interpreter's ~10 s; where there is no fork server, spawn.

Worker count: `default_workers` — 2 on a 2-core machine, each with ``cpus // workers`` = 1 torch
thread, so one slow request leaves the other worker free for light ones (1 on 1 core, half the
CPUs beyond 4, at most 4). Every worker holds its own copy of the model
(~0.55 GB resident for the tiny test model, torch and transformers included).

Temporary files (PDF uploads) go to a private directory per worker, created here with mkdtemp
and removed when the worker is killed or the pool closes.
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from imr_model.inference import ModelNotFoundError

WORKER_MODULE = "imr_model.serving_worker"
START_TIMEOUT_S = 600.0  # loading a model from an MLflow registry may download it first
_RESPAWN_BACKOFF_S = (0.5, 1, 2, 5, 10, 30, 60)


class JobTimeout(Exception):
    """The job did not finish (or did not get a worker) before its deadline."""


class PoolBusy(Exception):
    """Too many requests are already waiting for a worker."""


class WorkerCrashed(Exception):
    """The worker died while running the job (killed by the OS, a segfault in a native library...)."""


class JobFailed(Exception):
    """The job raised: `status` and `detail` for the HTTP response (detail never holds letter text)."""

    def __init__(self, status: int, detail: str):
        super().__init__(status, detail)
        self.status, self.detail = status, detail


def default_workers(cpus: int | None = None) -> int:
    """The service's default worker count for `cpus` usable CPUs (default: this machine's).

    1 → 1, 2-4 → 2 (so one slow request cannot block light ones), then half the CPUs, at most 4:
    each worker holds a model copy, and more processes than cores only add memory and contention.
    """
    cpus = usable_cpus() if cpus is None else cpus
    return min(4, max(1, min(cpus, 2) if cpus <= 4 else cpus // 2))


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _context():
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        # Only takes effect if the fork server is not running yet; otherwise workers import on start.
        ctx.set_forkserver_preload([WORKER_MODULE])
        return ctx
    return mp.get_context("spawn")


def _worker_entry(conn, spec: dict) -> None:
    """Process target (picklable by reference, light to import): run the worker module's main."""
    from imr_model.serving_worker import main

    main(conn, spec)


@dataclass(eq=False)
class _Worker:
    proc: object  # multiprocessing Process
    conn: object  # parent end of the pipe
    tmpdir: str
    info: dict = field(default_factory=dict)
    jobs: int = 0


class WorkerPool:
    """`workers` model processes; `run(kind, payload, deadline)` runs one job on one of them."""

    def __init__(self, model: str, *, backend: str = "torch", workers: int = 1, threads: int | None = None,
                 max_queue: int = 16, start_timeout_s: float = START_TIMEOUT_S, device: str | None = None):  # fmt: skip
        if workers < 1 or max_queue < 0:
            raise ValueError(f"workers ({workers}) must be >= 1 and max_queue ({max_queue}) >= 0")
        self.size, self.max_queue = workers, max_queue
        self.threads = threads or max(1, usable_cpus() // workers)
        # device: the spec each worker loads the model onto (None = auto, resolved in the worker)
        self._spec = {"model": str(model), "backend": backend, "threads": self.threads, "device": device}
        self._ctx = _context()
        self._root = tempfile.mkdtemp(prefix="imr-serve-")
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._lock = threading.Lock()
        self._live: set[_Worker] = set()
        self._pending = 0  # admitted jobs not finished (waiting for a worker or running)
        self._starting = 0
        self._closed = False
        self.restarts = 0
        self.timeouts = 0
        self.info: dict = {}
        # One waiting thread per admitted job, so waits never queue behind each other or the app's threads.
        self.executor = ThreadPoolExecutor(max_workers=workers + max_queue, thread_name_prefix="imr-pool")
        self._finalizer = weakref.finalize(self, _shutdown, self._live, self._lock, self._root, self.executor)
        atexit.register(self._finalizer)
        started = [self._start() for _ in range(workers)]
        try:
            for w in started:
                self._await_ready(w, time.monotonic() + start_timeout_s)
        except BaseException:
            self.close()
            raise
        self.info = started[0].info
        # Replacements load exactly what the first worker loaded (an alias may move meanwhile).
        self._spec["model"] = self.info.get("resolved_uri") or self._spec["model"]
        for w in started:
            self._idle.put(w)

    # ------------------------------------------------------------------ lifecycle

    def _start(self) -> _Worker:
        tmpdir = tempfile.mkdtemp(prefix="worker-", dir=self._root)
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=_worker_entry, args=(child, {**self._spec, "tmpdir": tmpdir}),
                                 name="imr-model-worker")  # fmt: skip
        proc.start()
        child.close()
        w = _Worker(proc, parent, tmpdir)
        with self._lock:
            self._live.add(w)
        return w

    def _await_ready(self, w: _Worker, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not w.conn.poll(remaining):
            self._kill(w)
            raise RuntimeError("model worker did not start in time")
        try:
            msg = w.conn.recv()
        except (EOFError, OSError):
            w.proc.join(timeout=5)
            code = w.proc.exitcode
            self._kill(w)
            raise RuntimeError(f"model worker exited during start-up (exit code {code})") from None
        if msg[0] != "ready":
            self._kill(w)
            _, names, message = msg  # the exception's class names, most derived first
            if "ModelNotFoundError" in names:
                raise ModelNotFoundError(message)
            if "ValueError" in names or "FileNotFoundError" in names:
                raise ValueError(message)
            raise RuntimeError(f"model worker failed to start: {names[0]}: {message}")
        w.info = msg[1]

    def _kill(self, w: _Worker) -> None:
        with self._lock:
            self._live.discard(w)
        _kill_worker(w)

    def _replace(self, w: _Worker) -> None:
        """Kill `w` and start a replacement in the background (retrying with back-off while it fails)."""
        with self._lock:  # counted as starting before it is gone, so /health never sees zero of both
            closed = self._closed
            if not closed:
                self._starting += 1
                self.restarts += 1
        self._kill(w)
        if not closed:
            threading.Thread(target=self._respawn, name="imr-pool-respawn", daemon=True).start()

    def _respawn(self) -> None:
        attempt = 0
        try:
            while not self._closed:
                try:
                    w = self._start()
                    self._await_ready(w, time.monotonic() + START_TIMEOUT_S)
                except Exception as exc:  # noqa: BLE001 - keep trying; /health shows the reduced capacity
                    print(f"imr serve: replacing a model worker failed ({type(exc).__name__}); retrying", file=sys.stderr)
                    time.sleep(_RESPAWN_BACKOFF_S[min(attempt, len(_RESPAWN_BACKOFF_S) - 1)])
                    attempt += 1
                    continue
                if self._closed:
                    self._kill(w)
                else:
                    self._idle.put(w)
                return
        finally:
            with self._lock:
                self._starting -= 1

    def close(self) -> None:
        """Kill every worker and remove the temporary directory (idempotent)."""
        with self._lock:
            self._closed = True
        self._finalizer()

    # ------------------------------------------------------------------ jobs

    def admit(self) -> None:
        """Count one more job in; `PoolBusy` when `workers + max_queue` are already in (call `release` after)."""
        with self._lock:
            if self._closed or self._pending >= self.size + self.max_queue:
                raise PoolBusy()
            self._pending += 1

    def release(self) -> None:
        with self._lock:
            self._pending -= 1

    def run(self, kind: str, payload: dict, deadline: float):
        """Run one job (blocking) and return its result; see the module doc for the exceptions."""
        w = self._take(deadline)
        try:
            w.conn.send((kind, payload))
            remaining = deadline - time.monotonic()
            ready = remaining > 0 and w.conn.poll(remaining)
            msg = w.conn.recv() if ready else None
        except (EOFError, OSError, ValueError):
            self._replace(w)
            raise WorkerCrashed() from None
        if msg is None:
            with self._lock:
                self.timeouts += 1
            self._replace(w)
            raise JobTimeout()
        w.jobs += 1
        self._idle.put(w)
        if msg[0] == "ok":
            return msg[1]
        if msg[0] == "http":
            raise JobFailed(msg[1], msg[2])
        raise JobFailed(500, f"internal error ({msg[1]})")

    def _take(self, deadline: float) -> _Worker:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise JobTimeout()
            try:
                w = self._idle.get(timeout=remaining)
            except queue.Empty:
                raise JobTimeout() from None
            if w.proc.is_alive():
                return w
            self._replace(w)  # died while idle (OOM killer...): start another, keep waiting

    def stats(self) -> dict:
        with self._lock:
            live = len(self._live)
            return {"configured": self.size, "alive": live, "idle": self._idle.qsize(), "starting": self._starting,
                    "pending": self._pending, "threads_per_worker": self.threads, "restarts": self.restarts,
                    "timeouts": self.timeouts}  # fmt: skip

    def pids(self) -> list[int]:
        with self._lock:
            return [w.proc.pid for w in self._live]


def _kill_worker(w: _Worker) -> None:
    try:
        if w.proc.is_alive():
            w.proc.kill()
        w.proc.join(timeout=10)
    except (OSError, ValueError, AssertionError):
        pass
    for closer in (w.conn.close, getattr(w.proc, "close", None)):
        try:
            if closer:
                closer()
        except (OSError, ValueError):
            pass
    shutil.rmtree(w.tmpdir, ignore_errors=True)


def _shutdown(live: set, lock: threading.Lock, root: str, executor: ThreadPoolExecutor) -> None:
    with lock:
        workers = list(live)
        live.clear()
    for w in workers:
        _kill_worker(w)
    executor.shutdown(wait=False, cancel_futures=True)
    shutil.rmtree(root, ignore_errors=True)
