"""Decide, before the run, how each tensor runs under the budgets: which lane, whole or streamed.

Nothing here reads tensor data: the working sets follow from shapes and dtypes
(resources.py), so `streamstoup plan` shows the same decisions the merge will take.
"""

from __future__ import annotations

from dataclasses import dataclass

from .checkpoint import matrix_shape
from .errors import UsageError
from .options import format_size
from .plan import COPY, MergePlan, TensorJob
from .rawio import IO_CHUNK
from .resources import (
    Lanes,
    eigh_bytes,
    fit_block_rows,
    in_memory_bytes,
    streamed_bytes,
)
from .tasks import Execution

#: below this many elements a tensor stays on a CPU lane when there is one (transfers would dominate)
DEVICE_MIN_ELEMENTS = 4 * 1024 * 1024


@dataclass(frozen=True)
class Budget:
    """The memory a run may use: --max-ram for the whole process, what is left of it for tasks, --max-vram."""

    max_ram: int
    task_ram: int
    max_vram: int
    lanes: Lanes


def _elem_bytes(job: TensorJob) -> int:
    """Native bytes per element of one block: base + fine-tune read, output written."""
    n = max(job.finetuned.numel, 1)
    return job.base.nbytes // n + 2 * (job.finetuned.nbytes // n)


def execution_for(job: TensorJob, budget: Budget) -> Execution:
    lanes = budget.lanes
    if job.action == COPY:
        return Execution(lane="cpu" if lanes.cpu else "device", ram=min(IO_CHUNK, max(job.finetuned.nbytes, 1)))
    m, n = matrix_shape(job.finetuned.shape)
    rows, cols = max(m, n), min(m, n)
    on_device = bool(lanes.devices) and (not lanes.cpu or job.finetuned.numel >= DEVICE_MIN_ELEMENTS)
    gpu = on_device and any(d.startswith("cuda") for d in lanes.devices)
    vram_budget = lanes.vram_share(budget.max_vram)
    if gpu and in_memory_bytes(rows, cols, 0, 0) > vram_budget:  # eigensolve + one micro block on the GPU
        if not lanes.cpu:
            raise UsageError(
                f"tensor {job.name!r} needs {format_size(in_memory_bytes(rows, cols, 0, 0))} of GPU memory; "
                f"raise --max-vram (now {format_size(budget.max_vram)}, shared by {len(lanes.devices)} lanes) "
                "or add CPU lanes (--devices auto)"
            )
        on_device = gpu = False
    lane = "device" if on_device else "cpu"
    native = job.base.nbytes + job.finetuned.nbytes * 2
    if gpu:  # float64 work lives on the GPU: host RAM holds native bytes only
        vram = in_memory_bytes(rows, cols, 0, 0)
        if native <= budget.task_ram:
            return Execution(lane, 0, native, vram)
        br = fit_block_rows(budget.task_ram + eigh_bytes(cols), rows, cols, _elem_bytes(job))
        return Execution(lane, br, br * cols * _elem_bytes(job), vram)
    need = in_memory_bytes(rows, cols, job.base.nbytes + job.finetuned.nbytes, job.finetuned.nbytes)
    if need <= budget.task_ram:
        return Execution(lane, 0, need)
    br = fit_block_rows(budget.task_ram, rows, cols, _elem_bytes(job))
    if br == 0:
        raise UsageError(
            f"tensor {job.name!r} ({'x'.join(map(str, job.finetuned.shape))}) needs at least "
            f"{format_size(streamed_bytes(1, cols, _elem_bytes(job)))} even streamed row by row, more than the "
            f"{format_size(budget.task_ram)} --max-ram leaves for tasks; raise --max-ram"
        )
    return Execution(lane, br, streamed_bytes(br, cols, _elem_bytes(job)))


def schedule(plan: MergePlan, budget: Budget) -> dict[str, Execution]:
    return {job.key: execution_for(job, budget) for job in plan.jobs}
