"""The dask task graph of a merge: a fused chain per tensor, small tensors many to a task, nothing shipped
but metadata.

Each task is a dask task tuple ``(func, *args)`` with its key, priority and worker
resources; the executor submits them to the embedded local cluster or to a
dask.distributed cluster. Higher priority goes to the longer tasks (`arithmetic_cost`, ties in plan order):
longest first keeps every lane busy to the end.
A task's fixed cost (scheduling, a result on the wire, a file opened and synced) is a few
milliseconds: a checkpoint of 90,000 small tensors would pay minutes of it one tensor a task.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from ..options import EditOptions
from ..planning.budget import RAM, to_mib
from ..planning.planner import MergePlan, TensorJob
from ..planning.schedule import GROUP_BYTES, GROUP_TENSORS, Execution, arithmetic_cost, groupable
from ..tasks.dispatch import TensorTask, merge_tensors
from ..tasks.result import TaskContext


@dataclass(frozen=True)
class Member:
    """One tensor of a task."""

    key: str
    name: str  # the tensor's name, for messages
    nbytes: int  # output bytes, for progress


@dataclass(frozen=True)
class GraphTask:
    key: str
    members: tuple[Member, ...]  # in the order of the results the call returns
    call: tuple[Any, ...]  # (func, *args): the dask task tuple
    priority: int
    resources: dict[str, float]  # dask worker resources it holds while it runs

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.members)

    @property
    def name(self) -> str:
        """The tensor a message names: the task's only one, or the first of its small tensors."""
        more = len(self.members) - 1
        return self.members[0].name + (f" (and {more} small tensor(s) in its task)" if more else "")


def build_graph(
    plan: MergePlan,
    ctx: TaskContext,
    options: EditOptions,
    executions: Mapping[str, Execution],
    committed: Mapping[str, dict] | None = None,
) -> list[GraphTask]:
    """A task per tensor, small tensors in plan order many to a task; a tensor committed by an earlier attempt
    only has its bytes re-checked."""
    committed = committed or {}
    tasks: list[GraphTask] = []
    costs: list[int] = []
    group: list[TensorJob] = []

    def add(jobs: list[TensorJob]) -> None:
        items = [TensorTask(job, executions[job.key], committed.get(job.key)) for job in jobs]
        members = tuple(Member(job.key, job.name, job.placement.nbytes) for job in jobs)
        lane = items[0].execution.lane
        ram = max(item.execution.ram for item in items)  # one tensor at a time: the largest working set
        key = jobs[0].key if len(jobs) == 1 else f"{jobs[0].key}+{len(jobs) - 1}"
        call = (merge_tensors, items, options, ctx)
        costs.append(sum(arithmetic_cost(job) for job in jobs))
        tasks.append(GraphTask(key, members, call, 0, {lane: 1, RAM: to_mib(ram)}))

    for job in plan.jobs:
        if not groupable(job, executions[job.key]):
            add([job])
            continue
        group.append(job)
        if len(group) >= GROUP_TENSORS or sum(j.placement.nbytes for j in group) >= GROUP_BYTES:
            add(group)
            group = []
    if group:
        add(group)
    order = sorted(range(len(tasks)), key=lambda i: (-costs[i], i))  # longest first
    return [replace(tasks[i], priority=len(order) - rank) for rank, i in enumerate(order)]
