"""Where a task computes: the process's device lanes, CUDA warm-up and streams.

The planning layer decides how many lanes there are; this module hands them out to the
tasks that run on them.
"""

from __future__ import annotations

import contextlib
import queue
import threading

import torch

from ..planning.budget import GPU_SLOTS


class DevicePool:
    """Device lanes of this process: a task takes a free device and gives it back.

    dask admits at most as many device tasks as there are device lanes, so a free
    device always exists when a task asks.
    """

    _queue: queue.SimpleQueue[str] | None = None

    @classmethod
    def configure(cls, devices: tuple[str, ...]) -> None:
        cls._queue = queue.SimpleQueue()
        for d in devices:
            cls._queue.put(d)
        warm_up(devices)

    _warm_lock = threading.Lock()

    @classmethod
    def acquire(cls) -> str:
        if cls._queue is None:  # a cluster worker: the GPUs visible to it, two lanes each (see run/clients.py)
            with cls._warm_lock:
                if cls._queue is None:
                    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
                    visible = tuple(f"cuda:{i}" for i in range(gpus)) or ("cpu",)
                    cls.configure(tuple(d for d in visible for _ in range(GPU_SLOTS)))
        return cls._queue.get(timeout=600)

    @classmethod
    def release(cls, device: str) -> None:
        if cls._queue is not None:
            cls._queue.put(device)


def warm_up(devices: tuple[str, ...]) -> None:
    """Initialise CUDA's solver libraries once, from one thread: torch's lazy linalg loader is not
    thread-safe ("lazy wrapper should be called at most once" when two lanes race on it)."""
    for d in dict.fromkeys(devices):
        if d.startswith("cuda"):
            a = torch.eye(4, dtype=torch.float64, device=d)
            torch.linalg.eigh(a)
            torch.linalg.svd(a, driver="gesvd")
            torch.cuda.synchronize(d)


def device_stream(device: str):
    """A CUDA stream of the task's own, so the lanes sharing a GPU overlap; nothing on the CPU."""
    if device.startswith("cuda"):
        return torch.cuda.stream(torch.cuda.Stream(device=device))
    return contextlib.nullcontext()
