"""Decide, before the run, how each tensor runs under the budgets: which lane, whole or streamed.

Nothing here reads tensor data: the working sets follow from shapes and dtypes
(budget.py), so `streamsoup plan` shows the same decisions the merge will take.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import OptionError, UsageError
from ..io.checkpoint import matrix_shape
from ..io.dtypes import item_size
from ..io.rawio import IO_CHUNK
from ..numerics.lowrank import factor_bytes, rows_per_block
from ..numerics.spectral import gram_flops, micro_rows
from ..units import format_size
from .budget import (
    Budget,
    MiB,
    eigh_bytes,
    fit_block_rows,
    in_memory_bytes,
    streamed_bytes,
)
from .planner import COPY, TensorJob

#: below this many elements a tensor stays on a CPU lane when there is one (transfers would dominate)
DEVICE_MIN_ELEMENTS = 4 * 1024 * 1024


@dataclass(frozen=True)
class Execution:
    """How one tensor runs, decided from the budgets before the run."""

    lane: str = "cpu"  # "cpu" or "device"
    block_rows: int = 0  # > 0: streamed from disk in blocks of this many rows of X
    ram: int = 0  # bytes of host memory admitted for it
    vram: int = 0  # bytes of device memory it may use

    @property
    def streamed(self) -> bool:
        return self.block_rows > 0


#: a tensor this small (output bytes) shares its task with its neighbours in the plan
SMALL_BYTES = 1 * MiB
#: a shared task holds at most this many tensors, and this many output bytes
GROUP_TENSORS = 256
GROUP_BYTES = 8 * MiB


#: an eigensolve of width c costs about this many c^3 of GEMM flops (sytrd + stevd + a half back-transform)
EIGH_FLOPS_PER_C3 = 7


def edit_matrix(job: TensorJob) -> tuple[int, int]:
    """(rows, c) of the tall matrix X an edit works on (an expert's job holds its own 2-D slice)."""
    m, n = matrix_shape(job.edit_source.shape)
    return max(m, n), min(m, n)


def gemm_flops(job: TensorJob, device: str) -> int:
    """The matrix-product flops of an edit (its Gram as `gram_flops` counts it, and a projection of at most
    2 rows c^2) or of an adapter's W0 + L R; 0 for a copy."""
    if job.lowrank:
        m, n = matrix_shape(job.base.shape)
        return 0 if job.factors_out else 2 * m * n * job.lora.rank
    if job.action == COPY:
        return 0
    rows, c = edit_matrix(job)
    return gram_flops(rows, c, device) + 2 * rows * c * c


def arithmetic_cost(job: TensorJob) -> int:
    """A tensor's float64 work in GEMM-equivalent flops, from its shape alone: what orders the tasks longest
    first, so the last lanes to finish are not waiting on one big tensor started late (lm_head is last in a
    plan). The same on every machine; the order never changes a byte."""
    if job.action == COPY and not job.lowrank:  # a copy is I/O (a 0-d or 1-d tensor is always one): ~a flop a byte
        return job.finetuned.nbytes
    eigh = 0 if job.lowrank else EIGH_FLOPS_PER_C3 * edit_matrix(job)[1] ** 3
    return gemm_flops(job, "cpu") + eigh


def groupable(job: TensorJob, execution: Execution) -> bool:
    """Small, in memory, on the host: its fixed cost (milliseconds) would dominate a task of its own."""
    return not execution.streamed and execution.lane == "cpu" and job.placement.nbytes <= SMALL_BYTES


def _elem_bytes(job: TensorJob) -> int:
    """Native bytes per element of one block: base + fine-tune read, output written."""
    n = max(job.edit_source.numel, 1)
    return job.base.held_bytes // n + 2 * (job.edit_source.held_bytes // n)


def lowrank_execution(job: TensorJob, budget: Budget) -> Execution:
    """An adapter's update: factors and their SVD, plus (a merged model) one block of W0 in float64 and its output.

    I/O-bound and on the host whatever the lane; DoRA's W1 is materialized whole (the dense path).
    """
    lane = "cpu" if budget.lanes.cpu else "device"
    m, n = matrix_shape(job.base.shape)
    ram = factor_bytes(job.lora, job.base.shape)
    if job.dense_w1:
        need = in_memory_bytes(max(m, n), min(m, n), job.base.held_bytes + 8 * m * n, job.placement.nbytes)
        if need > budget.task_ram:
            raise OptionError(
                "max_ram",
                f"{format_size(budget.max_ram)} is too small for DoRA tensor {job.name!r}, "
                f"which is merged whole in memory ({format_size(need)}); give at least "
                f"{format_size(budget.max_ram - budget.task_ram + need)}",
            )
        return Execution(lane, 0, need)
    if not job.factors_out:
        block = rows_per_block(n) * n
        # a float64 (or float32) work block, two native blocks (read ahead) and two output blocks (written behind)
        ram += block * (8 + 2 * (job.base.held_bytes // max(m * n, 1) + item_size(job.out_dtype, job.name)))
    return Execution(lane, 0, ram)


def execution_for(job: TensorJob, budget: Budget) -> Execution:
    lanes = budget.lanes
    if job.lora is not None:
        return lowrank_execution(job, budget)
    if job.action == COPY:
        return Execution(lane="cpu" if lanes.cpu else "device", ram=min(IO_CHUNK, max(job.finetuned.held_bytes, 1)))
    m, n = matrix_shape(job.edit_source.shape)
    rows, cols = max(m, n), min(m, n)
    on_device = bool(lanes.devices) and (not lanes.cpu or job.edit_source.numel >= DEVICE_MIN_ELEMENTS)
    gpu = on_device and any(d.startswith("cuda") for d in lanes.devices)
    vram_budget = lanes.vram_share(budget.max_vram)
    if gpu and in_memory_bytes(rows, cols, 0, 0) > vram_budget:  # eigensolve + one micro block on the GPU
        if not lanes.cpu:
            share = max_vram_for(in_memory_bytes(rows, cols, 0, 0), budget)
            raise OptionError(
                "max_vram",
                f"{format_size(budget.max_vram)} is too small for tensor {job.name!r}, which needs "
                f"{format_size(in_memory_bytes(rows, cols, 0, 0))} of GPU memory per lane; give at least "
                f"{format_size(share)} (two lanes share a GPU), or add CPU lanes (--devices auto)",
            )
        on_device = gpu = False
    lane = "device" if on_device else "cpu"
    native = job.base.held_bytes + job.edit_source.held_bytes * 2
    if gpu:  # float64 work lives on the GPU: host RAM holds native bytes only
        vram = in_memory_bytes(rows, cols, 0, 0)
        if native <= budget.task_ram:
            return Execution(lane, 0, native, vram)
        br = fit_block_rows(budget.task_ram + eigh_bytes(cols), rows, cols, _elem_bytes(job))
        return Execution(lane, br, br * cols * _elem_bytes(job), vram)
    need = in_memory_bytes(rows, cols, job.base.held_bytes + job.edit_source.held_bytes, job.edit_source.held_bytes)
    if need <= budget.task_ram:
        return Execution(lane, 0, need)
    br = fit_block_rows(budget.task_ram, rows, cols, _elem_bytes(job))
    if br == 0:
        need = streamed_bytes(micro_rows(cols), cols, _elem_bytes(job))
        if budget.cluster:
            raise UsageError(
                f"tensor {job.name!r} needs {format_size(need)} even streamed in row blocks, more than any "
                f"worker offers ({format_size(budget.task_ram)}); give a worker at least {format_size(need)} "
                '(its --memory-limit, or declare --resources "ram=MiB")'
            )
        raise OptionError(
            "max_ram",
            f"{format_size(budget.max_ram)} is too small for tensor {job.name!r} "
            f"({'x'.join(map(str, job.finetuned.shape))}), which needs {format_size(need)} even streamed in "
            f"row blocks; give at least {format_size(budget.max_ram - budget.task_ram + need)}",
        )
    return Execution(lane, br, streamed_bytes(br, cols, _elem_bytes(job)))


def max_vram_for(per_lane: int, budget: Budget) -> int:
    """The --max-vram that gives every lane of a GPU `per_lane` bytes."""
    return per_lane * max(1, budget.max_vram // max(budget.lanes.vram_share(budget.max_vram), 1))
