"""The dask task graph of a merge: one fused chain per tensor, nothing shipped but metadata.

Each task is a dask task tuple ``(func, *args)`` with its key, priority and worker
resources; the executor submits them to the embedded local cluster or to a
dask.distributed cluster. Higher priority goes to earlier tensors so shards fill in order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..options import MergeOptions
from ..planning.budget import to_mib
from ..planning.planner import MergePlan
from ..planning.schedule import Execution
from ..tasks.dispatch import merge_tensor
from ..tasks.result import TaskContext

RAM = "ram"  # worker resource: MiB of host memory for tasks


@dataclass(frozen=True)
class GraphTask:
    key: str
    name: str  # the tensor's name, for messages
    call: tuple[Any, ...]  # (func, *args): the dask task tuple
    priority: int
    nbytes: int  # output bytes, for progress
    resources: dict[str, float]  # dask worker resources it holds while it runs


def build_graph(
    plan: MergePlan,
    ctx: TaskContext,
    options: MergeOptions,
    runs: Mapping[str, Execution],
    committed: Mapping[str, dict] | None = None,
) -> list[GraphTask]:
    """One task per tensor; a tensor committed by an earlier attempt only has its bytes re-checked."""
    committed = committed or {}
    tasks = []
    for job in plan.jobs:
        run = runs[job.key]
        resources = {run.lane: 1, RAM: to_mib(run.ram)}
        call = (merge_tensor, job, options, ctx, run, committed.get(job.key))
        tasks.append(GraphTask(job.key, job.name, call, -job.index, job.placement.nbytes, resources))
    return tasks
