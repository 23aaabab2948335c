"""Run a merge graph on dask.distributed: the embedded local cluster by default.

Tasks are submitted one by one (``client.submit`` keeps per-task priority and
resources, which graph optimisation can drop from annotations), each asking for
one "lane": a lane holds one tensor's working set, so lanes bound the memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from distributed import Client, LocalCluster, as_completed

from .errors import RunError, StreamsoupError
from .graph import RAM, GraphTask
from .resources import DevicePool, to_mib
from .schedule import Budget
from .tasks import TensorResult

log = logging.getLogger(__name__)


def quiet_dask_logs() -> None:
    """Task failures reach the user as our own one-line errors; dask's logs only with -v."""
    level = logging.WARNING if logging.getLogger().getEffectiveLevel() <= logging.INFO else logging.CRITICAL
    for name in ("distributed", "distributed.worker", "distributed.scheduler", "distributed.nanny"):
        logging.getLogger(name).setLevel(level)


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
            except OSError as exc:
                raise RunError(f"tensor {task.name!r}: I/O error: {exc}") from exc
            except Exception as exc:
                raise RunError(f"tensor {task.name!r} failed: {type(exc).__name__}: {exc}") from exc
            on_done(task, result)
    except BaseException:
        client.cancel(futures)
        raise
