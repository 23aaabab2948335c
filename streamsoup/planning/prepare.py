"""The schedule of a merge: its plan, the budget it runs under and how each tensor runs, with the refusals that
need the budget (memory, lanes) or OUT's place (disk space). `streamsoup plan` formats it; a merge executes it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..io import store
from ..io.checkpoint import staged_bytes
from .budget import Budget
from .planner import MergePlan
from .preflight import (
    DiskNeed,
    check_disk_space,
    output_needs,
    small_side,
    state_needs,
)
from .schedule import Execution, execution_for


@dataclass(frozen=True)
class Target:
    """Where a merge writes: OUT.partial, the resume state, and whether what OUT.partial holds is resumed."""

    partial: Path
    state_path: Path
    resume: bool


@dataclass(frozen=True)
class Schedule:
    """A merge decided before it runs; nothing in it reads tensor data again."""

    plan: MergePlan
    budget: Budget
    executions: Mapping[str, Execution]  # job key -> how it runs

    @property
    def streamed(self) -> int:
        return sum(e.streamed for e in self.executions.values())


def prepare(plan: MergePlan, budget: Budget, target: Target | None = None) -> Schedule:
    """How every tensor of `plan` runs under `budget` (this machine's or a cluster's, budget.py).

    With a `target` (a merge, not `plan`) the free space on disk is checked too.
    """
    schedule = Schedule(plan, budget, {job.key: execution_for(job, budget) for job in plan.jobs})
    if target is not None:
        check_space(schedule, target)
    return schedule


def check_space(schedule: Schedule, target: Target) -> None:
    """Room for what remains to write on OUT's and the state's filesystems."""
    plan = schedule.plan
    streamed = [small_side(j.finetuned) for j in plan.edits if schedule.executions[j.key].streamed]
    widths = [small_side(j.finetuned) for j in plan.edits]
    existing = target.partial if target.partial.exists() and target.resume else target.partial / ".none"
    needs = {target.partial: output_needs(plan.layout, existing, plan.side_roots, widths)}
    state = state_needs(widths, streamed, schedule.budget.lanes.total, len(plan.jobs))
    needs[target.state_path] = needs[target.state_path] + state if target.state_path in needs else state
    staged = sorted((staged_bytes(j) for j in plan.jobs), reverse=True)[: schedule.budget.lanes.total]
    if sum(staged) and not schedule.budget.cluster:  # a cluster's workers stage under their own TMPDIR
        need = DiskNeed(sum(staged), len(staged))
        root = store.stage_root()
        needs[root] = needs[root] + need if root in needs else need
    check_disk_space(needs)
