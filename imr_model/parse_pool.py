"""Run a function over items in isolated worker processes, each item under a time and memory budget.

`parse_many` uses this so that no single letter can take a batch down: a file that hangs the
parser, exhausts memory (a compressed-stream bomb), or crashes PDFium (a signal) costs one error
result for that file, and the batch goes on with a fresh worker.

How it works (kept deliberately small):

* Each worker is a fresh interpreter (`sys.executable -c ...`, with the parent's `sys.path`): the
  same isolation as multiprocessing's ``spawn`` start method, without re-importing the parent's
  ``__main__`` (a script without a main guard, or one that imports torch at the top) and with the
  worker's exit status and peak memory available to the parent via `os.wait4`. Nothing is forked
  from the parent, so a parent with torch loaded or threads running is safe.
* A worker imports the target function once, sets ``RLIMIT_AS`` (address space) to
  `memory_limit`, says it is ready, then handles one item at a time: the parent writes a
  length-prefixed JSON ``[seq, item]`` to its stdin and reads ``(seq, status, value)`` back from
  a private pipe (the worker's own stdout goes to stderr, so library prints cannot corrupt it).
* The parent keeps at most one item in flight per worker, with a wall-clock deadline. At the
  deadline it SIGKILLs the worker; a worker that dies (signal, abort, exit) is reaped with
  `os.wait4`. Either way the item gets ``on_failure(item, reason)`` and a new worker takes over.
* Results are yielded in input order. Items are read from the input lazily and at most `window`
  of them are in flight or waiting to be yielded, so memory stays bounded however long the input.

Failure reasons (the strings given to `on_failure`):

* ``exceeded the 60 s parse time limit``
* ``exceeded the 1536 MB memory limit`` (a `MemoryError`, or a death by signal once the worker's
  sampled peak resident memory (VmHWM) had reached `MEMORY_DEATH_FRACTION` of the limit: PDFium aborts when an
  allocation fails)
* ``parser process crashed (signal 11, SIGSEGV)``
* ``parser process exited unexpectedly (exit code 3)``
* ``unexpected ValueError in the parser process`` (the target raised)

POSIX only (pipes in `select`, `resource`, `os.wait4`).
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import select
import signal
import struct
import subprocess
import sys
import time
from typing import Any, Callable, Iterable, Iterator

DEFAULT_TIME_LIMIT = 60.0  # s of wall clock per item; a real letter parses in ~5 ms
DEFAULT_MEMORY_LIMIT = 1536 * 2**20  # bytes of address space per worker; a real letter needs < 100 MB
MEMORY_DEATH_FRACTION = 0.4  # a worker killed by a signal with sampled peak RSS ≥ this × limit ran out of memory
START_TIMEOUT = 60.0  # s for a worker to import its target and report ready
HWM_SAMPLE_S = 0.05  # s between samples of a busy worker's peak memory (a real letter is done in ~5 ms)
_HEADER = struct.Struct("!Q")
_END = object()
_BOOT = (
    "import sys, json; sys.path[:] = json.loads(sys.argv[1]); "
    "from imr_model.parse_pool import _worker_main; _worker_main(sys.argv[2])"
)


class WorkerStartError(RuntimeError):
    """A worker process could not start (bad target, broken environment): not the fault of an item."""


# --------------------------------------------------------------------------- parent side


def run_isolated(
    target: str,
    items: Iterable[Any],
    on_failure: Callable[[Any, str], Any],
    *,
    workers: int = 1,
    time_limit: float | None = DEFAULT_TIME_LIMIT,
    memory_limit: int | None = DEFAULT_MEMORY_LIMIT,
    window: int | None = None,
) -> Iterator[Any]:
    """Yield ``fn(item)`` for each item, in input order, computing each in a worker process.

    `target` names the function as ``"package.module:function"`` (importable by a fresh interpreter
    with this process's `sys.path`); items and results must be JSON values (never pickle: the parent
    must not unpickle what a worker that read a hostile file sends). `workers` processes run at once
    (0 = one per core); `time_limit` (seconds) and `memory_limit` (bytes of address space) bound
    each item, None for no bound. An item whose worker is killed or dies yields
    ``on_failure(item, reason)`` instead. Raises `WorkerStartError` when a worker cannot start.
    """
    n_workers = max(1, os.cpu_count() or 1) if workers == 0 else max(1, workers)
    window = window or max(4 * n_workers, 16)
    return _run(target, iter(items), on_failure, n_workers, time_limit, memory_limit, window)


def _run(target, items, on_failure, n_workers, time_limit, memory_limit, window) -> Iterator[Any]:
    config = {"target": target, "memory_limit": memory_limit, "time_limit": time_limit}
    head: tuple[int, Any] | None = None  # the next input item, taken but not yet sent
    exhausted = False
    send_failures = 0
    done: dict[int, Any] = {}  # seq → result, waiting for its turn
    next_seq = 0  # the next result to yield
    taken = 0  # items taken from the input so far
    pool: list[_Worker] = []
    try:
        while True:
            while next_seq in done:
                yield done.pop(next_seq)
                next_seq += 1
            # Hand out items while the window allows: to an idle worker, else start one.
            while True:
                if head is None and not exhausted and taken < next_seq + window:
                    item = next(items, _END)
                    if item is _END:
                        exhausted = True
                    else:
                        head = (taken, item)
                        taken += 1
                if head is None:
                    break
                idle = next((w for w in pool if w.state == "idle"), None)
                if idle is None:
                    if len(pool) < n_workers:
                        pool.append(_Worker(config))
                        continue
                    break
                if idle.send(*head, time_limit):
                    head, send_failures = None, 0
                    continue
                pool.remove(idle)  # it died while idle: the item goes to another worker
                send_failures += 1
                if send_failures >= 3:
                    done[head[0]] = on_failure(head[1], idle.death_reason(memory_limit))
                    head, send_failures = None, 0
            if exhausted and head is None and next_seq >= taken:
                return
            active = [w for w in pool if w.state in ("starting", "busy")]
            if not active:
                continue  # results to yield, or a new worker to start
            deadlines = [w.deadline for w in active if w.deadline is not None]
            timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            if memory_limit and any(w.state == "busy" for w in active):
                timeout = HWM_SAMPLE_S if timeout is None else min(timeout, HWM_SAMPLE_S)
            readable, _, _ = select.select([w.rfd for w in active], [], [], timeout)
            if memory_limit:
                for w in active:
                    if w.state == "busy":
                        w.sample_memory()
            for w in active:
                if w.rfd in readable:
                    _handle_message(w, pool, done, on_failure, memory_limit)
            now = time.monotonic()
            for w in [w for w in active if w in pool and w.deadline is not None and now >= w.deadline]:
                w.kill()
                pool.remove(w)
                if w.task is None:
                    raise WorkerStartError(f"parse worker did not start within {START_TIMEOUT:.0f} s")
                seq, item = w.task
                done[seq] = on_failure(item, f"exceeded the {time_limit:g} s parse time limit")
    finally:
        for w in pool:  # EOF first, so idle workers all exit at once
            if w.state == "idle":
                w._close_fds()
        for w in pool:
            w.close()


def _handle_message(w: _Worker, pool: list, done: dict, on_failure, memory_limit) -> None:
    starting = w.state == "starting"
    msg = w.receive()
    if msg is None:  # the worker died
        pool.remove(w)
        if starting:
            raise WorkerStartError(f"parse worker exited during start-up ({w.death_reason(None)})")
        seq, item = w.task
        done[seq] = on_failure(item, w.death_reason(memory_limit))
        return
    if starting:
        if msg[0] != "ready":
            w.kill()
            pool.remove(w)
            raise WorkerStartError(f"parse worker could not start: {msg[1]}")
        w.state, w.deadline = "idle", None
        return
    seq, status, value = msg
    _, item = w.task
    w.task, w.state, w.deadline = None, "idle", None
    if status == "ok":
        done[seq] = value
    elif status == "memory":
        done[seq] = on_failure(item, _memory_reason(memory_limit))
        w.close()  # it exits by itself: its heap may be in a bad state after a MemoryError
        pool.remove(w)
    else:
        done[seq] = on_failure(item, f"unexpected {value} in the parser process")


def _memory_reason(memory_limit: int | None) -> str:
    return f"exceeded the {memory_limit / 2**20:.0f} MB memory limit" if memory_limit else "ran out of memory"


class _Worker:
    """One worker process and its pipes; `state` is starting → idle ⇄ busy → dead."""

    def __init__(self, config: dict):
        self.rfd, child_w = os.pipe()  # results; the child gets it as its stdout
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _BOOT, json.dumps(sys.path), json.dumps(config)],
                stdin=subprocess.PIPE,
                stdout=child_w,
                stderr=subprocess.DEVNULL,
                close_fds=True,
            )
        except OSError as exc:
            os.close(self.rfd)
            raise WorkerStartError(f"cannot start a parse worker with {sys.executable!r}: {exc}") from None
        except BaseException:
            os.close(self.rfd)
            raise
        finally:
            os.close(child_w)
        self.wfd = self.proc.stdin.fileno()
        self.state = "starting"
        self.deadline: float | None = time.monotonic() + START_TIMEOUT
        self.task: tuple[int, Any] | None = None
        self.status: int | None = None  # wait status once reaped
        self.peak_rss: int | None = None  # bytes, once reaped
        # Peak resident memory of the worker's own address space (VmHWM), sampled while it works on an item.
        # Not wait4's ru_maxrss: Linux carries that across fork + exec, so it counts the parent's memory.
        self.sampled_hwm: int | None = None

    def send(self, seq: int, item: Any, time_limit: float | None) -> bool:
        data = json.dumps([seq, item]).encode("utf-8")
        try:
            _write_all(self.wfd, _HEADER.pack(len(data)) + data)
        except OSError:
            self.kill()
            return False
        self.task, self.state = (seq, item), "busy"
        self.deadline = time.monotonic() + time_limit if time_limit else None
        return True

    def receive(self):
        """The next message, or None when the worker died (it is then reaped)."""
        head = _read_exact(self.rfd, _HEADER.size)
        body = _read_exact(self.rfd, _HEADER.unpack(head)[0]) if head is not None else None
        if body is None:
            self.kill()
            return None
        try:
            return tuple(json.loads(body))  # JSON, not pickle: unpickling a compromised worker's bytes runs code
        except (ValueError, TypeError):
            self.kill()  # not our protocol: treat the worker as dead
            return None

    def death_reason(self, memory_limit: int | None) -> str:
        status = self.status or 0
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            if memory_limit and self.sampled_hwm is not None and self.sampled_hwm >= MEMORY_DEATH_FRACTION * memory_limit:
                return f"{_memory_reason(memory_limit)} (parser process killed by signal {sig}, {_signame(sig)})"
            return f"parser process crashed (signal {sig}, {_signame(sig)})"
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else status
        return f"parser process exited unexpectedly (exit code {code})"

    def sample_memory(self) -> None:
        """Record the worker's VmHWM (Linux /proc); a no-op where /proc is absent."""
        try:
            with open(f"/proc/{self.proc.pid}/status", "rb") as fh:
                for line in fh:
                    if line.startswith(b"VmHWM:"):
                        hwm = int(line.split()[1]) * 1024  # kB
                        self.sampled_hwm = max(self.sampled_hwm or 0, hwm)
                        return
        except (OSError, ValueError, IndexError):
            return

    def kill(self) -> None:
        """SIGKILL the process (if still running), reap it and close the pipes."""
        if self.status is None:
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
            self._reap(0)
        self._close_fds()

    def close(self) -> None:
        """End the worker: an idle one exits on EOF on its stdin; a busy one is killed."""
        if self.status is None and self.state == "idle":
            self._close_fds()  # idempotent
            deadline = time.monotonic() + 2.0
            while self.status is None and time.monotonic() < deadline:
                self._reap(os.WNOHANG)
                if self.status is None:
                    time.sleep(0.002)
        self.kill()

    def _reap(self, flags: int) -> None:
        try:
            pid, status, usage = os.wait4(self.proc.pid, flags)
        except ChildProcessError:  # reaped elsewhere: exit status unknown
            pid, status, usage = self.proc.pid, 0, None
        if pid == 0:
            return  # WNOHANG: still running
        self.status, self.state = status, "dead"
        self.peak_rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024) if usage else None
        self.proc.returncode = os.waitstatus_to_exitcode(status)  # so Popen never waits for it again

    def _close_fds(self) -> None:
        for closer in (self.proc.stdin.close, lambda: os.close(self.rfd)):
            try:
                closer()
            except OSError:
                pass
        self.rfd = -1


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return "unknown signal"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_exact(fd: int, n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        try:
            chunk = os.read(fd, min(n - got, 1 << 20))
        except OSError:
            return None
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


# --------------------------------------------------------------------------- worker side


def _worker_main(config_json: str) -> None:
    """Entry point of a worker process (see the module docstring for the protocol)."""
    out_fd = os.dup(1)
    os.dup2(2, 1)  # prints from libraries go to stderr, never into the result pipe
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it then ends us
    config = json.loads(config_json)
    try:
        module_name, _, func_name = config["target"].partition(":")
        fn = getattr(importlib.import_module(module_name), func_name)
        if config["memory_limit"]:
            _limit_memory(int(config["memory_limit"]))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises
        _send(out_fd, ("failed", f"{type(exc).__name__}: {exc}"))
        return
    _send(out_fd, ("ready", os.getpid()))
    time_limit = config.get("time_limit")
    while True:
        head = _read_exact(0, _HEADER.size)
        body = _read_exact(0, _HEADER.unpack(head)[0]) if head is not None else None
        if body is None:
            return  # the parent closed our stdin (or died)
        seq, item = json.loads(body)
        if time_limit:
            _limit_cpu(time_limit)
        status = "ok"
        try:
            data = json.dumps([seq, status, fn(item)]).encode("utf-8")
        except MemoryError:
            status, data = "memory", None
        except BaseException as exc:  # noqa: BLE001 - the parent turns it into a failure result
            status, data = "error", json.dumps([seq, "error", type(exc).__name__]).encode("utf-8")
        if data is None:
            data = json.dumps([seq, status, None]).encode("utf-8")
        _write_all(out_fd, _HEADER.pack(len(data)) + data)
        if status == "memory":
            return


def _send(fd: int, msg) -> None:
    data = json.dumps(msg).encode("utf-8")
    _write_all(fd, _HEADER.pack(len(data)) + data)


def _limit_memory(limit: int) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    soft = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _limit_cpu(time_limit: float) -> None:
    """A backstop for an orphaned worker (the parent was killed mid-item): CPU time for this item is
    bounded too, at twice the wall-clock limit (the parent kills at the wall-clock limit first)."""
    used = resource.getrusage(resource.RUSAGE_SELF)
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = int(used.ru_utime + used.ru_stime + 2 * time_limit + 10)
    resource.setrlimit(resource.RLIMIT_CPU, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))
