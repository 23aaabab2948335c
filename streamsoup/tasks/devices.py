"""Where a task computes: the process's device lanes, CUDA warm-up and streams.

The planning layer decides how many lanes there are; this module hands them out to the
tasks that run on them.
"""

from __future__ import annotations

import contextlib
import queue
from collections.abc import Iterator

import torch
from distributed import get_worker
from distributed.diagnostics.plugin import WorkerPlugin

from ..planning.budget import GPU_SLOTS

PLUGIN_NAME = "streamsoup-devices"


class DevicePool:
    """The device lanes of one worker process: a task takes a free device and gives it back.

    dask admits at most as many device tasks as there are device lanes, so a free device always
    exists when a task asks.
    """

    def __init__(self, devices: tuple[str, ...]) -> None:
        self._free: queue.SimpleQueue[str] = queue.SimpleQueue()
        for d in devices:
            self._free.put(d)
        warm_up(devices)

    @contextlib.contextmanager
    def lane(self) -> Iterator[str]:
        device = self._free.get(timeout=600)
        try:
            yield device
        finally:
            self._free.put(device)


class DeviceLanes(WorkerPlugin):
    """Gives each worker its DevicePool: a local merge's device lanes, or (a cluster's worker) the GPUs it sees,
    GPU_SLOTS lanes each; a task finds it on its worker (`device_pool`)."""

    name = PLUGIN_NAME

    def __init__(self, devices: tuple[str, ...] | None = None) -> None:
        self.devices = devices
        self.pool: DevicePool | None = None

    def setup(self, worker: object) -> None:
        if self.devices is None:
            gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
            visible = tuple(f"cuda:{i}" for i in range(gpus)) or ("cpu",)
            self.devices = tuple(d for d in visible for _ in range(GPU_SLOTS))
        self.pool = DevicePool(self.devices)


def device_pool() -> DevicePool:
    """The device lanes of the worker this task runs on."""
    plugin = get_worker().plugins.get(PLUGIN_NAME)
    if not isinstance(plugin, DeviceLanes) or plugin.pool is None:
        raise RuntimeError("a device task ran on a worker without streamsoup's device lanes")
    return plugin.pool


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
