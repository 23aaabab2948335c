"""`streamsoup plan`: what a merge will do, how much memory it will take and how long, as the terminal and
`plan --json` show it (the schedule and its cost come from planning/)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from .._version import __version__
from ..planning.cost import Estimate
from ..planning.planner import TensorJob
from ..planning.prepare import Schedule
from ..units import format_duration, format_size
from .record import describe_inputs
from .summary import annotate, module_stats

SPECTRAL_FIELDS = ("k", "rank", "P_k", "rho", "lambda_high", "lambda_low", "rel_update")


@dataclass
class PlanSummary:
    tensors: int
    edit_candidates: int
    copies: int
    dropped: int
    bytes_read: int
    bytes_written: int
    streamed: int
    largest_tensor: str
    largest_working_set: int
    max_ram: int
    task_ram: int
    peak_ram: int
    max_vram: int
    lanes: list[dict]
    estimated_seconds: float
    rates: dict
    warnings: list[str]
    lowrank: int = 0  # adapter updates computed from their factors (no eigensolve)
    save: str = "model"
    inputs: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list, repr=False)  # per tensor, as the report's rows (no spectra yet)

    def as_dict(self) -> dict:
        """`plan --json`: the report's structure (summary, modules, tensors), plus the estimate."""
        rows = [annotate(r) for r in self.rows]
        return {
            "streamsoup": __version__,
            "document": "plan",
            "inputs": self.inputs,
            "options": self.options,
            "summary": {
                "tensors": self.tensors,
                "edit_candidates": self.edit_candidates,
                "edited": None,
                "copied": self.copies,
                "dropped": self.dropped,
                "output_bytes": self.bytes_written,
                "bytes_read": self.bytes_read,
                "streamed": self.streamed,
                "lowrank": self.lowrank,
                "save": self.save,
            },
            "modules": module_stats(rows, planned=True),
            "tensors": rows,
            "estimate": {
                "seconds": self.estimated_seconds,
                "lanes": self.lanes,
                "rates": self.rates,
                "peak_ram": self.peak_ram,
                "max_ram": self.max_ram,
                "task_ram": self.task_ram,
                "max_vram": self.max_vram,
                "largest_tensor": self.largest_tensor,
                "largest_working_set": self.largest_working_set,
            },
            "warnings": self.warnings,
        }

    def __str__(self) -> str:
        return format_plan(self)


def plan_row(job: TensorJob) -> dict:
    """A tensor as the report will list it, with what only the run can tell left empty."""
    return {
        "name": job.name,
        "shape": list(job.shape),
        "dtype": job.out_dtype,
        "action": job.action,
        "reason": job.reason or "edit candidate",
        **dict.fromkeys(SPECTRAL_FIELDS),
    }


def summarize(schedule: Schedule, cost: Estimate) -> PlanSummary:
    """What `plan` shows of a schedule and its estimate."""
    plan, budget = schedule.plan, schedule.budget
    return PlanSummary(
        tensors=len(plan.jobs),
        edit_candidates=len(plan.edits),
        copies=len(plan.jobs) - len(plan.edits),
        dropped=len(plan.dropped),
        bytes_read=cost.bytes_read,
        bytes_written=plan.bytes_to_write,
        streamed=schedule.streamed,
        largest_tensor=cost.largest_tensor,
        largest_working_set=cost.largest_working_set,
        max_ram=budget.max_ram,
        task_ram=budget.task_ram,
        peak_ram=cost.peak_ram,
        max_vram=budget.max_vram,
        lanes=[{"lane": name, "tensors": n, "seconds": round(t, 1)} for name, n, t in cost.lanes],
        estimated_seconds=cost.seconds,
        rates=asdict(cost.rates),
        warnings=list(plan.warnings),
        lowrank=sum(j.lowrank for j in plan.jobs),
        save=plan.save,
        inputs=describe_inputs(plan),
        options=plan.options.as_dict(),
        rows=[plan_row(j) for j in plan.jobs],
    )


def format_plan(s: PlanSummary) -> str:
    r = s.rates
    lines = [
        f"tensors      {s.tensors}: up to {s.edit_candidates} to edit (one whose update is below "
        f"--min-rel-update is copied instead: the data decide), {s.copies} to copy, {s.dropped} dropped (only in base)",
        f"I/O          read {format_size(s.bytes_read)}, write {format_size(s.bytes_written)}",
    ]
    if s.lowrank:
        what = (
            "the reweighed factors are written (BASE is not read)"
            if s.save == "adapter"
            else "W0 + U diag(lam s) V^T is written as W0 streams through"
        )
        lines.append(f"adapter      {s.lowrank} low-rank updates from LoRA factors: no eigensolve; {what}")
    lines += [
        f"largest      {s.largest_tensor}: working set {format_size(s.largest_working_set)}",
        f"memory       peak RAM <= {format_size(s.peak_ram)} (--max-ram {format_size(s.max_ram)}, "
        f"{format_size(s.task_ram)} for tensors); {s.streamed} tensor(s) streamed in row blocks",
    ]
    if s.max_vram:
        lines.append(f"GPU memory   <= {format_size(s.max_vram)} per device")
    lines.append(
        f"calibration  float64 {r['cpu_gflops']:.1f} GFLOP/s CPU"
        + (f", {r['device_gflops']:.1f} GFLOP/s device" if r["device_gflops"] != r["cpu_gflops"] else "")
        + f"; read {format_size(r['read_bps'])}/s, write {format_size(r['write_bps'])}/s"
        + (f" (measured {format_duration(time.time() - r['measured_at'])} ago, reused)" if r["reused"] else "")
    )
    for lane in s.lanes:
        lines.append(f"lane {lane['lane']:<8} {lane['tensors']:>5} tensors  ~{format_duration(lane['seconds'])}")
    lines.append(f"estimate     ~{format_duration(s.estimated_seconds)} on this machine")
    lines += [f"warning      {w}" for w in s.warnings]
    return "\n".join(lines)
