"""The per-tensor task: load -> delta -> spectrum -> reweigh -> write, fused; this module picks its path.

One task per tensor keeps every intermediate on the worker that made it: only the
small TensorResult travels back (dask holds a finished task's output until its
dependents run, so separate load/compute tasks would pile up whole tensors).
A tensor runs whole in memory or streamed in row blocks (dense.py), from LoRA factors
(lora.py), or is copied; a tensor committed by an earlier attempt is only re-checked.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

from ..errors import StreamsoupError
from ..faults import fault_point
from ..io import writer
from ..numerics.hostlinalg import set_threads
from ..numerics.hostmemory import release_memory
from ..options import EditOptions
from ..planning.planner import COPY, TensorJob
from ..planning.schedule import Execution
from .dense import copy_fine_tune, merge_dense, merge_streamed
from .devices import device_pool, device_stream
from .lora import merge_lowrank, write_bias
from .result import Stopwatch, TaskContext, TensorResult, copied, task_failed
from .rules import nonfinite_edit
from .staging import staged

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorTask:
    """One tensor of a task: its job, how it runs, and the report row of an earlier attempt's marker (if any)."""

    job: TensorJob
    execution: Execution
    committed: dict | None = None


def merge_tensors(items: list[TensorTask], options: EditOptions, ctx: TaskContext) -> list[TensorResult]:
    """One task: one tensor, or many small ones in a row, their bytes made durable together before any result
    leaves (a result is committed, so its bytes must be on disk); a failure names its tensor."""
    fault_point("task")  # a worker that dies under every task it starts (killed for memory, a crashing library)
    if ctx.threads:
        set_threads(ctx.threads)
    named = len(items) > 1  # alone in its task, a tensor is named by the driver
    try:  # a streamed tensor records row blocks as they become durable: alone, each slot is synced as written
        with writer.OutputFiles(Path(ctx.folder), together=named, fence=ctx.fence) as files:
            results = [named_resumed(i, files, named) for i in items]  # before any input is staged: none read
            todo = [i for i, done in zip(items, results, strict=True) if done is None]
            with staged(todo) as local:
                made = iter([merge_tensor(i.job, options, ctx, files, i.execution, named=named) for i in local])
            return [done if done is not None else next(made) for done in results]
    finally:
        release_memory()


def named_resumed(item: TensorTask, files: writer.OutputFiles, named: bool) -> TensorResult | None:
    """`resumed`, a failure named after its tensor in a task of many."""
    try:
        return resumed(item, files)
    except Exception as exc:
        if not named or isinstance(exc, StreamsoupError):
            raise
        raise task_failed(item.job.name, exc) from exc


def resumed(item: TensorTask, files: writer.OutputFiles) -> TensorResult | None:
    """The result an earlier attempt committed, when its slot still holds bytes with its checksum; a torn or lost
    write is redone (None)."""
    if item.committed is None:
        return None
    if writer.slot_crc(files.folder, item.job.placement) == item.committed["crc32c"]:
        return TensorResult.from_dict(item.committed, resumed=True)
    log.warning("%s: stored bytes do not match the recorded checksum; recomputing", item.job.name)
    return None


def merge_tensor(
    job: TensorJob,
    options: EditOptions,
    ctx: TaskContext,
    files: writer.OutputFiles,
    execution: Execution,
    *,
    named: bool = False,
) -> TensorResult:
    """Produce one output tensor in its slot (one an earlier attempt committed is kept: `resumed`)."""
    try:
        return _merge_tensor(job, options, ctx, files, execution)
    except writer.NonFiniteOutput:
        raise nonfinite_edit(job) from None
    except StreamsoupError:
        raise
    except Exception as exc:
        if not named:  # alone in its task: the driver names it
            raise
        raise task_failed(job.name, exc) from exc


def _merge_tensor(
    job: TensorJob,
    options: EditOptions,
    ctx: TaskContext,
    files: writer.OutputFiles,
    execution: Execution,
) -> TensorResult:
    watch = Stopwatch()
    if job.bias is not None and not job.factors_out:
        return write_bias(job, files, watch)
    if job.action == COPY and job.lora is None:
        with watch("write"):
            crc = copy_fine_tune(job, files, not options.allow_nonfinite)
        return copied(job, watch, job.reason, crc)
    assert job.base is not None  # an edit, or an adapter's module that --exclude / --only keep
    if job.lowrank:
        return merge_lowrank(job, options, files, watch)  # I/O-bound: on the host, whatever the lane
    with device_pool().lane() if execution.lane == "device" else contextlib.nullcontext("cpu") as device:
        with device_stream(device):
            if execution.streamed:
                return merge_streamed(job, options, ctx, files, execution, device, watch)
            return merge_dense(job, options, files, device, watch)
