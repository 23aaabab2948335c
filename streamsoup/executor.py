"""Run a merge graph on dask.distributed: the embedded local cluster by default.

Tasks are submitted one by one (``client.submit`` keeps per-task priority and
resources, which graph optimisation can drop from annotations), each asking for
one "lane": a lane holds one tensor's working set, so lanes bound the memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError
from contextlib import contextmanager

import torch
from distributed import Client, LocalCluster, as_completed

from .errors import RunError, StreamsoupError, UsageError
from .graph import RAM, GraphTask
from .resources import DevicePool, Lanes, to_mib
from .schedule import Budget
from .tasks import TensorResult

log = logging.getLogger(__name__)


def quiet_dask_logs() -> None:
    """Task failures reach the user as our own one-line errors; dask's logs only with -v."""
    level = logging.WARNING if logging.getLogger().getEffectiveLevel() <= logging.INFO else logging.CRITICAL
    names = [n for n in logging.root.manager.loggerDict if n.startswith(("distributed", "tornado"))]
    for name in {"distributed", "distributed.client", "distributed.worker", "distributed.scheduler", *names}:
        logging.getLogger(name).setLevel(level)  # dask's config gives child loggers levels of their own


@contextmanager
def local_client(budget: Budget) -> Iterator[Client]:
    """An in-process cluster: one worker, a thread per lane, resources for lanes and RAM.

    No dask memory manager: admission by the "ram" resource is our budget, and the
    nanny's RSS-based pausing would misread our deliberate working sets.
    """
    quiet_dask_logs()
    torch.set_num_threads(budget.lanes.threads)
    DevicePool.configure(budget.lanes.devices)
    cluster = LocalCluster(processes=False, n_workers=1, threads_per_worker=budget.lanes.total, memory_limit=0,
                           dashboard_address=None, resources=worker_capacity(budget))  # fmt: skip
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


@contextmanager
def cluster_client(address: str) -> Iterator[Client]:
    """A client of an existing dask.distributed cluster; a dead address is a clear error."""
    quiet_dask_logs()
    try:
        client = Client(address, timeout="20s")
    except (OSError, TimeoutError) as exc:
        raise UsageError(f"--scheduler {address}: cannot reach a dask scheduler there ({exc})") from None
    try:
        quiet_dask_logs()  # again: connecting created more loggers
        yield client
    finally:
        client.close()


def dashboard(client: Client) -> str | None:
    """The scheduler's dashboard address, when it serves one."""
    services = client.scheduler_info().get("services") or {}
    return client.dashboard_link if "dashboard" in services else None


def cluster_budget(client: Client, opts) -> Budget:
    """Lanes and memory from what the workers declare: resources cpu=N (CPU lanes), device=N (GPU lanes)
    and ram=MiB (memory for streamsoup's tasks on that worker)."""
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    declared = [w.get("resources") or {} for w in workers]
    if not declared or not any(r.get(RAM) for r in declared):
        raise UsageError(
            f"--scheduler {opts.scheduler}: no worker declares streamsoup's resources; start workers with e.g. "
            '`dask worker ADDR --nthreads 2 --resources "cpu=2,ram=8192"` (ram in MiB; GPU workers: device=1)'
        )
    cpu = int(sum(r.get("cpu", 0) for r in declared))
    devices = ("cuda",) * int(sum(r.get("device", 0) for r in declared))
    task_ram = int(min(r[RAM] for r in declared if r.get(RAM))) * 2**20
    lanes = Lanes(cpu=cpu, devices=devices, threads=opts.threads)
    return Budget(max_ram=task_ram, task_ram=task_ram, max_vram=opts.max_vram or 16 * 2**30, lanes=lanes)


def client_capacity(client: Client) -> dict[str, float]:
    """The most of each resource that one worker offers (a task must fit on some worker)."""
    caps: dict[str, float] = {}
    for w in client.scheduler_info(n_workers=-1)["workers"].values():
        for name, amount in (w.get("resources") or {}).items():
            caps[name] = max(caps.get(name, 0), amount)
    return caps


def check_capacity(tasks: list[GraphTask], capacity: dict[str, float]) -> None:
    """A task asking more than any worker has would wait forever, silently: refuse it now."""
    for task in tasks:
        for name, amount in task.resources.items():
            if amount > capacity.get(name, 0):
                raise RunError(f"tensor {task.name!r} needs {amount:g} {name} but workers offer "
                               f"{capacity.get(name, 0):g}; raise the budget")  # fmt: skip


def worker_capacity(budget: Budget) -> dict[str, float]:
    """What the embedded worker offers (see local_client)."""
    return {"cpu": budget.lanes.cpu, "device": len(budget.lanes.devices), RAM: to_mib(budget.task_ram)}


def run_graph(
    client: Client,
    tasks: list[GraphTask],
    on_done: Callable[[GraphTask, TensorResult], None],
    capacity: dict[str, float],
) -> None:
    """Submit every task and call `on_done` as each finishes; the first failure cancels the rest."""
    check_capacity(tasks, capacity)
    by_key = {}
    futures = []
    for task in tasks:
        func, *args = task.call
        fut = client.submit(func, *args, key=task.key, priority=task.priority, resources=task.resources, pure=False)
        by_key[fut.key] = task
        futures.append(fut)
    try:
        for fut in as_completed(futures):
            task = by_key[fut.key]
            try:
                result = fut.result()
            except StreamsoupError:
                raise
            except CancelledError as exc:
                raise RunError(
                    "lost the dask cluster (scheduler or workers gone); the work done so far is kept: "
                    "rerun the same command, on this or another cluster or locally, to resume"
                ) from exc
            except OSError as exc:
                raise RunError(f"tensor {task.name!r}: I/O error: {exc}") from exc
            except Exception as exc:
                raise RunError(f"tensor {task.name!r} failed: {type(exc).__name__}: {exc}") from exc
            on_done(task, result)
    except BaseException:
        client.cancel(futures)
        raise
