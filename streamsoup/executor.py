"""Run a merge graph on dask.distributed: the embedded local cluster by default.

Tasks are submitted one by one (``client.submit`` keeps per-task priority and
resources, which graph optimisation can drop from annotations), each asking for
one "lane": a lane holds one tensor's working set, so lanes bound the memory.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from distributed import Client, LocalCluster, as_completed

from .errors import RunError, StreamsoupError
from .graph import GraphTask
from .tasks import TensorResult

log = logging.getLogger(__name__)
LANE = "lane"


def cpu_threads(lanes: int, threads: int) -> int:
    """torch threads per lane: the cores shared out between lanes unless given."""
    return threads or max(1, (os.cpu_count() or 1) // lanes)


def quiet_dask_logs() -> None:
    """Task failures reach the user as our own one-line errors; dask's logs only with -v."""
    level = logging.WARNING if logging.getLogger().getEffectiveLevel() <= logging.INFO else logging.CRITICAL
    for name in ("distributed", "distributed.worker", "distributed.scheduler", "distributed.nanny"):
        logging.getLogger(name).setLevel(level)


@contextmanager
def local_client(lanes: int, threads: int) -> Iterator[Client]:
    """An in-process cluster: one worker, `lanes` threads, no memory manager (we budget ourselves)."""
    quiet_dask_logs()
    torch.set_num_threads(cpu_threads(lanes, threads))
    cluster = LocalCluster(
        processes=False,
        n_workers=1,
        threads_per_worker=lanes,
        memory_limit=0,
        dashboard_address=None,
        resources={LANE: lanes},
    )
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


def run_graph(client: Client, tasks: list[GraphTask], on_done: Callable[[GraphTask, TensorResult], None]) -> None:
    """Submit every task and call `on_done` as each finishes; the first failure cancels the rest."""
    by_key = {}
    futures = []
    for task in tasks:
        func, *args = task.call
        fut = client.submit(func, *args, key=task.key, priority=task.priority, resources={LANE: 1}, pure=False)
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
