"""Where the network runs and in which precision: one place for every stage (train, pretrain, score, serve).

A device spec is `auto`, `cpu`, `cuda`, `cuda:N` or `mps` (`train.device` in a config; `--device` on `imr
train`, `pretrain`, `score`, `explain`, `serve`; `device=` in `predict`, `load_model`, `score`).
`resolve_device` turns it into a `torch.device`: `auto` is CUDA when `torch.cuda.is_available()`, else MPS
when available, else the CPU. A device that is not there (`cuda` without a GPU, `cuda:3` on a 2-GPU
machine, `mps` off Apple silicon) fails with `DeviceError` (a ValueError) saying what is available.

Precision is tied to the device, not configured: on CUDA the forward passes run under autocast, bf16 where
the GPU supports it (`torch.cuda.is_bf16_supported()`), else fp16, whose training steps go through a
`GradScaler`; on the CPU and MPS everything stays fp32 and autocast is off, so CPU results are exactly what
they were before devices existed. Attributions always run in fp32 (their convergence delta is the check of
their quality; half precision would inflate it). Weights are always saved from the CPU and loaded onto the
CPU first (safetensors), so a model directory written on a GPU loads on a machine without one.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from typing import Callable, ContextManager, Sequence

import torch

DEVICE_SPECS = "auto, cpu, cuda, cuda:N or mps"
_SPEC = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class DeviceError(ValueError):
    """A device spec that is malformed or names a device this machine does not have."""


def check_device_spec(spec: str) -> str:
    """`spec` normalised (stripped, lower case) if it is one of `DEVICE_SPECS`; DeviceError naming it otherwise.

    Only the syntax is checked (configs are validated on machines that will not run them)."""
    text = str(spec).strip().lower() if spec is not None else ""
    if not _SPEC.match(text):
        raise DeviceError(f"device {spec!r} is not one of {DEVICE_SPECS}")
    return text


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The `torch.device` for a spec (None = `auto`); DeviceError when the device is not available here."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = check_device_spec("auto" if spec is None else spec)
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        if not _mps_available():
            raise DeviceError("device 'mps' is not available on this machine (no Apple-silicon GPU, or torch was "
                              "built without MPS); use --device cpu or auto")  # fmt: skip
        return torch.device("mps")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise DeviceError(f"device {text!r}: no CUDA GPU is available (torch.cuda.is_available() is False with torch "
                          f"{torch.__version__}); use --device cpu or auto")  # fmt: skip
    index = int(text.split(":", 1)[1]) if ":" in text else torch.cuda.current_device()
    if index >= count:
        raise DeviceError(f"device {text!r}: this machine has {count} CUDA device{'s' if count != 1 else ''} "
                          f"(cuda:0{f' .. cuda:{count - 1}' if count > 1 else ''})")  # fmt: skip
    return torch.device("cuda", index)


def precision(device: torch.device | str) -> str:
    """`fp32`, `bf16` or `fp16`: what the forward passes on `device` run in (see the module docstring)."""
    device = torch.device(device)
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def autocast(device: torch.device | str, mode: str | None = None) -> ContextManager:
    """Autocast to the device's half precision on CUDA (`precision`), a no-op context elsewhere or for `fp32`."""
    device = torch.device(device)
    mode = precision(device) if mode is None else mode
    if mode not in PRECISIONS:
        raise ValueError(f"precision {mode!r} is not one of {', '.join(PRECISIONS)}")
    if device.type != "cuda" or mode == "fp32":
        return nullcontext()
    return torch.autocast(device_type="cuda", dtype=_DTYPES[mode])


def grad_scaler(device: torch.device | str, mode: str | None = None) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 training on CUDA (bf16 and fp32 need none); None otherwise."""
    device = torch.device(device)
    mode = precision(device) if mode is None else mode
    return torch.amp.GradScaler("cuda") if device.type == "cuda" and mode == "fp16" else None


def describe(device: torch.device | str) -> dict:
    """What a run records about where it ran: {"device", "precision", "name"} (the GPU's name on CUDA)."""
    device = torch.device(device)
    name = "cpu"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    elif device.type == "mps":
        name = "Apple MPS"
    return {"device": str(device), "precision": precision(device), "name": name}


def cpu_streams(device: torch.device | str) -> int:
    """How many batches inference runs at once on `device`: on the CPU one per torch thread
    (`torch.get_num_threads()`), each batch on a single thread; elsewhere 1.

    Small batches on one thread each keep the CPU busier than one batch at a time on all threads: on the shared
    letters' 1,566 distinct sentence windows (2 CPUs, AVX2) the torch network took 7.9 s as two single-thread
    streams of 512-token batches against 11.3 s as one two-thread stream of 4,096-token batches, and the int8 ONNX
    session 5.6 s against 8.3 s (docs/experiments.md, "Session 18")."""
    return max(1, torch.get_num_threads()) if torch.device(device).type == "cpu" else 1


def run_streams(work: Callable[[object], None], jobs: Sequence, streams: int) -> None:
    """`work(job)` for every job, up to `streams` at a time in threads whose torch ops run on one thread each; in
    the calling thread when `streams` is 1 or there is one job. A job's exception is raised here, once the running
    jobs have finished.

    torch's thread count is per thread (OpenMP), but a thread's first parallel op takes it from a process-wide
    default, which `torch.set_num_threads` also sets: the pool threads set 1 for themselves, and the calling
    thread's count, which it never changes, is made the default again afterwards."""
    if min(streams, len(jobs)) <= 1:
        for job in jobs:
            work(job)
        return
    threads = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(min(streams, len(jobs)), thread_name_prefix="imr-forward",
                                initializer=torch.set_num_threads, initargs=(1,)) as pool:  # fmt: skip
            list(pool.map(work, jobs))  # list(): re-raises a job's exception
    finally:
        torch.set_num_threads(threads)


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())
