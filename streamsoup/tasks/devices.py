"""Where a task computes: the process's device lanes, CUDA warm-up and streams.

The planning layer decides how many lanes there are; this module hands them out to the
tasks that run on them.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator

import torch
from distributed import get_worker

from ..planning.budget import GPU_SLOTS

#: where a worker keeps its DevicePool (`Worker.extensions`): one per worker process, shared by every merge that
#: runs there (the "device" resource admits that many tasks, whichever merge they belong to), never removed
EXTENSION = "streamsoup-devices"


class DevicePool:
    """The device lanes of one worker process: a task takes a free device and gives it back.

    dask admits at most as many device tasks as there are device lanes, so a free device always
    exists when a task asks. CUDA is initialised at the first task, not before: a worker that never
    runs one never touches its GPUs.
    """

    def __init__(self, devices: tuple[str, ...]) -> None:
        self.devices = devices
        self._free: queue.SimpleQueue[str] = queue.SimpleQueue()
        for d in devices:
            self._free.put(d)
        self._warm = threading.Lock()
        self._warmed = False

    @contextlib.contextmanager
    def lane(self) -> Iterator[str]:
        with self._warm:
            if not self._warmed:
                warm_up(self.devices)
                self._warmed = True
        device = self._free.get(timeout=600)
        try:
            yield device
        finally:
            self._free.put(device)


def visible_lanes() -> tuple[str, ...]:
    """A cluster worker's device lanes: the GPUs it sees, GPU_SLOTS each (declared lanes on a machine without one
    compute on its CPU)."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    visible = tuple(f"cuda:{i}" for i in range(gpus)) or ("cpu",)
    return tuple(d for d in visible for _ in range(GPU_SLOTS))


def install_pool(dask_worker, devices: tuple[str, ...]) -> None:
    """Give a worker the device lanes of a local merge (client.run calls it on the in-process worker)."""
    dask_worker.extensions[EXTENSION] = DevicePool(devices)


def device_pool() -> DevicePool:
    """The device lanes of the worker this task runs on: a local merge's, or made at a cluster worker's first
    device task from the GPUs it sees."""
    extensions = get_worker().extensions
    pool = extensions.get(EXTENSION)
    if pool is None:
        pool = extensions.setdefault(EXTENSION, DevicePool(visible_lanes()))  # two first tasks: one pool kept
    return pool


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
