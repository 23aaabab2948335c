"""The per-tensor task when dW comes from LoRA factors: spectrum from the factors, then one pass over W0.

No eigensolve of a big matrix anywhere: the factors give the exact SVD (numerics/lowrank.py), and
the merged tensor W0 + U diag(lam s) V^T is written row block by row block while W0 streams
through once, so a merged model costs what reading the base and writing the output cost.
With --save adapter the base is not read at all: the task writes the reweighed factors.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import torch

from ..faults import fault_point
from ..io import writer
from ..io.checkpoint import matrix_shape, read_block, read_tensor
from ..io.dtypes import rounded, torch_dtype
from ..numerics.lowrank import LowRankSVD, factors, finite, lowrank_svd, reweighed_factors, row_blocks, weights
from ..numerics.monosoup import Coefficients, coefficients
from ..options import EditOptions
from ..planning.planner import COPY, TensorJob
from .dense import merge_dense
from .result import Edit, Stopwatch, TensorResult, copied, edited
from .rules import nonfinite_bias, nonfinite_inputs, skip_reason


def merge_lowrank(job: TensorJob, options: EditOptions, files: writer.OutputFiles, watch: Stopwatch) -> TensorResult:
    update = job.lora
    assert update is not None and job.base is not None
    with watch("read"):
        left, right = factors(update, job.base.shape)
    if not finite(left, right):
        reason = nonfinite_inputs(job, update.a, options)
        _, crc = _write_merged(job, files, (left, right), watch, finite=False)  # W1 = W0 + c B A, as peft has it
        return copied(job, watch, reason, crc)
    with watch("eigh"):
        svd = lowrank_svd(left, right)
    del left, right
    m, n = matrix_shape(job.base.shape)
    spectrum = svd.padded(min(m, n))
    dw_sq = float(spectrum.square().sum())
    kept = job.action == COPY  # --exclude / --only: the fine-tune's update, unweighed
    coef = coefficients(spectrum, options.rank_rule, options.energy) if dw_sq > 0 and not kept else None
    if job.factors_out:
        return _write_factors(job, options, files, svd, coef, watch)
    if update.base_copy is not None and not _same_values(job):
        return merge_dense(job, options, files, "cpu", watch)  # W0 of the fine-tune is not BASE: dense path
    w0_sq, crc = _write_merged(job, files, _product(svd, coef), watch)
    rel = None
    if not math.isfinite(w0_sq):
        reason = nonfinite_inputs(job, job.base, options)
    elif kept:
        reason = job.reason
    else:
        reason, rel = skip_reason(dw_sq, w0_sq, options)
        if not reason:
            return edited(job, options, watch, Edit(coef, spectrum, "lowrank", crc, rel))
    if coef is not None:  # the MonoSoup tensor was written: the fine-tune's own values W0 + c B A instead
        _, crc = _write_merged(job, files, _product(svd, None), watch)
    return copied(job, watch, reason, crc, rel)


def _product(svd: LowRankSVD, coef: Coefficients | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, R) with L @ R = U diag(lam s) V^T (lam = 1 without `coef`: dW itself)."""
    return svd.u * weights(svd, coef), svd.v.T.contiguous()


def _write_merged(
    job: TensorJob,
    files: writer.OutputFiles,
    product: tuple[torch.Tensor, torch.Tensor],
    watch: Stopwatch,
    finite: bool = True,
) -> tuple[float, int]:
    """W0 + L @ R row block by row block, into the tensor's slot (`finite`: refuse NaN/Inf from finite W0).

    Reads run one block ahead and writes one block behind on two I/O threads, so the disk keeps
    busy while the GEMM runs: the tensor costs about its I/O. Returns ||W0||^2, taken on the
    way (the edit threshold needs it), and the slot's crc32c.
    """
    ref = job.base
    m, n = matrix_shape(ref.shape)
    dtype = torch_dtype(job.out_dtype)
    # A 16-bit output takes the product in float32: its error (~2^-24 relative, r terms) is ~2^-15 of the
    # output's rounding step, so every value stays within one rounding of the float64 result, for less CPU
    # (docs/benchmarks.md, "Behind the code").
    wide = torch.float32 if dtype.itemsize <= 2 else torch.float64
    left, right = (t.to(wide) for t in product)
    blocks = row_blocks(m, n)
    work = torch.empty(blocks[0][1], n, dtype=wide)  # reused: no page faults per block
    slot = writer.SlotWriter(files, job.placement, finite=False)  # checked below, knowing whether W0 is finite
    w0_sq = 0.0
    try:
        with ThreadPoolExecutor(2, thread_name_prefix="streamsoup-io") as io:
            reading, writing = io.submit(read_block, ref, *blocks[0], False), None
            for i, (row, stop) in enumerate(blocks):
                with watch("read"):  # only the time the GEMM waited for the disk
                    native = reading.result()
                if i + 1 < len(blocks):
                    reading = io.submit(read_block, ref, *blocks[i + 1], False)
                with watch("project"):
                    x = work[: stop - row]
                    x.copy_(native)  # exact widening
                    w0_sq += float(torch.dot(x.view(-1), x.view(-1)))  # for the edit threshold only
                    out = x.addmm_(left[row:stop], right).to(dtype)  # one rounding to the output dtype
                    if finite and math.isfinite(w0_sq):  # NaN in W0 itself is the caller's to name (or copy)
                        writer.check_finite(out)
                with watch("write"):
                    if writing is not None:
                        writing.result()
                writing = io.submit(slot.write, out)
                fault_point("block")
            with watch("write"):
                writing.result()
        with watch("write"):
            return w0_sq, slot.close()
    except BaseException:
        slot.abort()
        raise


def _same_values(job: TensorJob) -> bool:
    """Is the base copy peft saved beside an embedding LoRA the same as BASE's tensor (in value)?"""
    copy, base = job.lora.base_copy, job.base
    if copy.shape != base.shape:
        return False
    for row, stop in row_blocks(*matrix_shape(base.shape)):
        a = read_block(copy, row, stop, False).to(torch.float64)
        b = read_block(base, row, stop, False).to(torch.float64)
        if not torch.equal(a, b):
            return False
    return True


def _write_factors(
    job: TensorJob,
    options: EditOptions,
    files: writer.OutputFiles,
    svd: LowRankSVD,
    coef: Coefficients | None,
    watch: Stopwatch,
) -> TensorResult:
    """--save adapter: B' = U diag(sqrt(lam s)), A' = diag(sqrt(lam s)) V^T in peft's layout, scaling 1."""
    update = job.lora
    with watch("project"):
        left, right = reweighed_factors(svd, coef, update.rank)
        b_new, a_new = (right.T, left.T) if update.transposed else (left, right)
        parts = [
            rounded(a_new.reshape(update.a.shape), torch_dtype(update.a.dtype)),
            rounded(b_new.reshape(update.b.shape), torch_dtype(update.b.dtype)),
        ]
        if job.bias is not None:  # lora_B.bias, rescaled to the new scaling of 1
            bias = job.bias.bias
            parts.append(rounded(read_tensor(bias).to(torch.float64) * job.bias.scale, torch_dtype(bias.dtype)))
        for part in parts:
            writer.check_finite(part)
        data = torch.cat([p.contiguous().view(-1).view(torch.uint8) for p in parts])
    with watch("write"):
        crc = writer.write_tensor(files, job.placement, data)
    if coef is None:
        return copied(job, watch, job.reason or "update energy below eps: the factors are kept (scaled)", crc)
    spectrum = svd.padded(min(matrix_shape(job.base.shape)))
    return edited(job, options, watch, Edit(coef, spectrum, "lowrank", crc, None))


def write_bias(job: TensorJob, files: writer.OutputFiles, watch: Stopwatch) -> TensorResult:
    """lora_bias: the fine-tune's bias = base bias + scale * lora_B.bias, rounded once to the base's dtype."""
    with watch("read"):
        b0 = read_tensor(job.base).to(torch.float64)
        lb = read_tensor(job.bias.bias).to(torch.float64)
    out = rounded(b0 + job.bias.scale * lb, torch_dtype(job.out_dtype))
    if not bool(torch.isfinite(out).all()):
        raise nonfinite_bias(job)
    with watch("write"):
        crc = writer.write_tensor(files, job.placement, out)
    return copied(job, watch, job.reason, crc)
