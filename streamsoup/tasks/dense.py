"""The dense paths of the per-tensor task: dW = W1 - W0 whole in memory, or streamed in row blocks from disk.

In memory: one Gram pass, one eigensolve (or a full SVD), one projection pass, one write.
Streamed (the working set passes the budget): the same passes over row blocks read from
disk, with the Gram, then the basis and every written block saved now and then, so a kill
resumes mid-tensor from what verifies.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator

import torch

from ..faults import fault_point
from ..io import writer
from ..io.checkpoint import matrix_shape, read_block, read_tensor
from ..io.dtypes import tensor_has_nonfinite, torch_dtype
from ..io.layout import Placement
from ..io.records import StateDamaged
from ..io.tensorprogress import TensorProgress
from ..numerics.lowrank import materialize, row_blocks
from ..numerics.monosoup import Coefficients, coefficients, reweigh
from ..numerics.spectral import (
    DiskRows,
    GramEigen,
    GramSums,
    MemoryRows,
    RowSource,
    Spectrum,
    accumulate,
    eigh_spectrum,
    svd_spectrum,
)
from ..options import EditOptions
from ..planning.planner import COPY, TensorJob
from ..planning.schedule import Execution
from .result import Edit, Stopwatch, TaskContext, TensorResult, copied, edited
from .rules import copied_as_is, nonfinite_copy, nonfinite_inputs, skip_reason

log = logging.getLogger(__name__)


def merge_dense(
    job: TensorJob, options: EditOptions, files: writer.OutputFiles, device: str, watch: Stopwatch
) -> TensorResult:
    """The whole tensor in memory: W1 read from the fine-tune, or computed from an adapter (DoRA) in float64."""
    watch.on(device)
    with watch("read"):
        w0 = read_tensor(job.base)
        w1 = materialize(job.lora, w0) if job.lora is not None else read_tensor(job.edit_source)
    if job.action == COPY:  # kept unedited by --exclude / --only: an adapter's W1, as peft makes it
        with watch("write"):
            crc = _write_fine_tune(job, files, w1, not options.allow_nonfinite)
        return copied(job, watch, job.reason, crc)
    src = MemoryRows(w0, w1, device)
    sums = gram_pass(src, options.spectral, watch)
    reason, rel = decide(sums, options, job)
    if reason:
        del w0, src, sums
        with watch("write"):
            crc = _write_fine_tune(job, files, w1, not options.allow_nonfinite)
        return copied(job, watch, reason, crc, rel)
    spectrum, coef = spectrum_of(src, sums, options, watch)
    del sums
    out = reweighed(src, spectrum, coef, torch_dtype(job.out_dtype), watch)
    with watch("write"):
        crc = write_edited(files, job, out)
    return edited(job, options, watch, Edit(coef, spectrum.s, spectrum.path, crc, rel, device))


def write_edited(files: writer.OutputFiles, job: TensorJob, out: torch.Tensor) -> int:
    """The edited tensor into its slot, followed (a resized vocabulary) by the fine-tune's added rows."""
    if not job.shared_rows:
        return writer.write_tensor(files, job.placement, out)
    slot = writer.SlotWriter(files, job.placement)
    try:
        slot.write(out)
        for block in _added_rows(job):
            slot.write(block)
        return slot.close()
    except writer.NonFiniteOutput:
        slot.abort()
        raise nonfinite_copy(job) from None  # the edit is finite: the added rows do not fit the output dtype
    except BaseException:
        slot.abort()
        raise


def _added_rows(job: TensorJob) -> Iterator[torch.Tensor]:
    """The fine-tune's rows past the base's, in row blocks, in the output dtype."""
    added = job.added_rows
    assert added is not None
    for row, stop in row_blocks(*matrix_shape(added.shape)):
        yield read_block(added, row, stop, False).to(torch_dtype(job.out_dtype))


def write_added_rows(files: writer.OutputFiles, job: TensorJob) -> None:
    """A streamed edit's added rows, after its edited blocks (the slot's checksum is read back whole)."""
    added = job.added_rows
    if added is None:
        return
    edited_bytes = job.placement.nbytes // job.finetuned.shape[0] * job.shared_rows
    where = Placement(job.placement.file, job.placement.offset + edited_bytes, job.placement.nbytes - edited_bytes)
    slot = writer.SlotWriter(files, where)
    try:
        for block in _added_rows(job):
            slot.write(block)
        slot.close()
    except writer.NonFiniteOutput:
        slot.abort()
        raise nonfinite_copy(job) from None
    except BaseException:
        slot.abort()
        raise


def decide(sums: GramSums, options: EditOptions, job: TensorJob) -> tuple[str, float | None]:
    """Why an edit candidate is copied after all ("" when it is edited), and its relative update."""
    if not (math.isfinite(sums.dw_sq) and math.isfinite(sums.w0_sq)):
        culprit = job.base if not math.isfinite(sums.w0_sq) else job.finetuned  # dW = W1 - W0 with W0 finite
        return nonfinite_inputs(job, culprit, options), None
    return skip_reason(sums.dw_sq, sums.w0_sq, options)


def _write_fine_tune(job: TensorJob, files: writer.OutputFiles, w1: torch.Tensor, check_finite: bool) -> int:
    """The fine-tune's tensor unchanged: its bytes, or (an adapter's W1 in another dtype) rounded once."""
    if job.shared_rows:  # `w1` holds only the rows the base has
        return copy_fine_tune(job, files, check_finite)
    if job.lora is None and job.out_dtype == job.finetuned.dtype and not job.finetuned.decoded:
        return writer.copy_tensor(job.finetuned, files, job.placement, check_finite)
    out = w1.to(torch_dtype(job.out_dtype))
    if check_finite and tensor_has_nonfinite(out):
        raise copied_as_is(job)
    return writer.write_tensor(files, job.placement, out, finite=check_finite)


def copy_fine_tune(job: TensorJob, files: writer.OutputFiles, check_finite: bool) -> int:
    """The fine-tune's tensor unchanged, in bounded memory: its bytes, or converted (decoded) row block by row
    block."""
    ref = job.finetuned
    if job.out_dtype == ref.dtype and not ref.decoded:
        return writer.copy_tensor(ref, files, job.placement, check_finite)
    slot = writer.SlotWriter(files, job.placement, finite=check_finite)
    try:
        for row, stop in row_blocks(*matrix_shape(ref.shape)):
            block = read_block(ref, row, stop, False)
            if check_finite and tensor_has_nonfinite(block):
                raise copied_as_is(job)
            slot.write(block.to(torch_dtype(job.out_dtype)))
        return slot.close()
    except writer.NonFiniteOutput:
        slot.abort()
        raise nonfinite_copy(job) from None
    except BaseException:
        slot.abort()
        raise


def gram_pass(src: RowSource, spectral: str, watch: Stopwatch) -> GramSums:
    """One pass over the update: its norms, and its Gram matrix unless the full-SVD path is asked for."""
    with watch("gram"):
        return accumulate(src, with_gram=spectral != "svd")


def spectrum_of(
    src: MemoryRows, sums: GramSums, options: EditOptions, watch: Stopwatch
) -> tuple[Spectrum, Coefficients]:
    """The singular values, k, and the eigenvectors of the side of the split that the projection uses."""
    with watch("eigh"):
        full = svd_spectrum(src) if options.spectral == "svd" else eigh_spectrum(sums.gram)
        return split(full, options)


def split(full: GramEigen | Spectrum, options: EditOptions) -> tuple[Spectrum, Coefficients]:
    coef = coefficients(full.s, options.rank_rule, options.energy)
    return full.keep_needed(coef.k), coef


def reweighed(
    src: MemoryRows, spectrum: Spectrum, coef: Coefficients, dtype: torch.dtype, watch: Stopwatch
) -> torch.Tensor:
    """The MonoSoup tensor, micro block by micro block, in the original shape and the output dtype."""
    with watch("project"):
        out = torch.empty(src.shape, dtype=dtype)
        tall = src.tall_view(out)
        for block in src.read_blocks():
            for rows in src.micro_blocks(block):
                tall[rows].copy_(_reweighed(src, rows, spectrum, coef))  # rounds to the output dtype once
    return out


def _reweighed(src: RowSource, rows: slice, spectrum: Spectrum, coef: Coefficients) -> torch.Tensor:
    """W = W0 + lam_low dW + (lam_high - lam_low) dW_high for one micro block, in float64 (src's workspace)."""
    w0, x = src.read(rows)
    return reweigh(w0, x, spectrum.high_part(x, coef.k, src), coef, out=src.buffer("out", x.shape[0]))


def merge_streamed(
    job: TensorJob,
    options: EditOptions,
    ctx: TaskContext,
    files: writer.OutputFiles,
    execution: Execution,
    device: str,
    watch: Stopwatch,
) -> TensorResult:
    """Row blocks from disk: Gram pass (saved now and then), eigh once, then project and write block by block.

    Saved progress counts only once it verifies: the Gram and the basis against their crc32c, and
    every block of rows written before a kill against the crc32c recorded when it was written.
    """
    ref = job.edit_source
    shape, dtype = matrix_shape(ref.shape), torch_dtype(job.out_dtype)
    watch.on(device)
    src = DiskRows(job.base, ref, execution.block_rows, device, watch)
    progress = TensorProgress(ctx.state_path, job.key)
    saved = _verified_progress(progress, files, job, shape, src.transposed)
    if saved.get("phase") != "project":
        with watch("gram"):
            sums = _gram_pass(src, progress, saved, ctx.checkpoint_seconds)
        src.release()
        reason, rel = decide(sums, options, job)
        if reason:
            with watch("write"):
                crc = copy_fine_tune(job, files, not options.allow_nonfinite)
            return copied(job, watch, reason, crc, rel, blocks=src.n_blocks)
        with watch("eigh"):
            spectrum, coef = split(eigh_spectrum(sums.gram), options)
        del sums
        info = {"k": coef.k, "rel": rel, "coef": coef.as_dict(), "kept": spectrum.kept}
        progress.save_basis(spectrum.s.numpy(), spectrum.basis.cpu().numpy(), info)
        saved = progress.attrs
    s, basis = progress.load_basis(saved)
    coef = Coefficients(**saved["coef"])
    spectrum = Spectrum(torch.from_numpy(s), torch.from_numpy(basis).to(device), "gram", saved["kept"])
    for block in src.read_blocks(saved["next_row"]):
        src.load(block)
        with watch("project"):
            out = torch.empty(block.stop - block.start, src.cols, dtype=dtype)
            for rows in src.micro_blocks(block):
                out[rows.start - block.start : rows.stop - block.start].copy_(_reweighed(src, rows, spectrum, coef))
        with watch("write"):
            crc = writer.write_block(files, job.placement, shape, block.start, out, src.transposed)
        del out  # before the next block's buffer exists
        saved = progress.save_progress(saved, block.start, block.stop, crc)
        fault_point("block")
    src.release()
    with watch("write"):
        write_added_rows(files, job)
        crc = writer.slot_crc(files.folder, job.placement)
    return edited(job, options, watch, Edit(coef, s, "gram", crc, saved["rel"], device, src.n_blocks))


def _verified_progress(
    progress: TensorProgress, files: writer.OutputFiles, job: TensorJob, shape: tuple[int, int], transposed: bool
) -> dict:
    """The saved progress with everything it names checked; a projection resumes after its last good block."""
    saved = progress.attrs
    try:
        if saved.get("phase") == "gram":
            progress.load_gram(saved)
        elif saved.get("phase") == "project":
            progress.load_basis(saved)
            good = []
            for begin, stop, crc in saved["written"]:
                if writer.block_crc(files.folder, job.placement, shape, begin, stop, transposed) != crc:
                    log.warning(
                        "%s: rows %d:%d written before the interruption changed on disk; rewriting from there",
                        job.name,
                        begin,
                        stop,
                    )
                    break
                good.append([begin, stop, crc])
            if len(good) < len(saved["written"]):
                saved = {**saved, "written": good, "next_row": good[-1][1] if good else 0}
    except StateDamaged as exc:
        progress.damaged(str(exc))
        return {}
    return saved


def _gram_pass(src: DiskRows, progress: TensorProgress, saved: dict, every: float) -> GramSums:
    sums = None
    if saved.get("phase") == "gram":
        gram = torch.from_numpy(progress.load_gram(saved)).to(src.device)
        sums = GramSums(gram, saved["dw_sq"], saved["w0_sq"], saved["next_row"])
    last = time.monotonic()

    def checkpoint(acc: GramSums) -> None:
        nonlocal last
        if time.monotonic() - last >= every and acc.next_row < src.rows:
            progress.save_gram(acc.gram.cpu().numpy(), acc.next_row, acc.dw_sq, acc.w0_sq)
            last = time.monotonic()
            fault_point("gram")

    return accumulate(src, with_gram=True, sums=sums, on_block=checkpoint)
