"""The dask task graph of a merge: one fused chain per tensor, nothing shipped but metadata.

The graph is a plain dask graph (``{key: (func, *args)}``), so it can run on the
embedded local scheduler, on a dask.distributed cluster, or with ``dask.get`` for
debugging. Higher priority goes to earlier tensors so shards fill in file order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .options import MergeOptions
from .plan import MergePlan
from .tasks import merge_tensor


@dataclass(frozen=True)
class GraphTask:
    key: str
    name: str  # the tensor's name, for messages
    call: tuple[Any, ...]  # (func, *args): the dask task tuple
    priority: int
    nbytes: int  # output bytes, for progress


def build_graph(
    plan: MergePlan, folder: Path, options: MergeOptions, committed: Mapping[str, dict] | None = None
) -> list[GraphTask]:
    """One task per tensor; a tensor committed by an earlier attempt only has its bytes re-checked."""
    committed = committed or {}
    return [
        GraphTask(
            job.key,
            job.name,
            (merge_tensor, job, options, str(folder), committed.get(job.key)),
            -job.index,
            job.placement.nbytes,
        )
        for job in plan.jobs
    ]


def as_dask_graph(tasks: list[GraphTask]) -> dict[str, tuple[Any, ...]]:
    return {t.key: t.call for t in tasks}
