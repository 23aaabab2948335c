"""The dense paths of the per-tensor task: dW = W1 - W0 whole in memory, or streamed in row blocks from disk.

In memory: one Gram pass, one eigensolve (or a full SVD), one projection pass, one write.
Streamed (the working set passes the budget): the same passes over row blocks read from
disk, with the Gram, then the basis and every written block saved now and then, so a kill
resumes mid-tensor from what verifies.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Iterator

import torch

from ..faults import fault_point
from ..io import writer
from ..io.checkpoint import TensorRef, matrix_shape, read_block, read_tensor
from ..io.dtypes import rounded, torch_dtype
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
        crc = write_edited(files, job, out, options.allow_nonfinite)
    return edited(job, options, watch, Edit(coef, spectrum.s, spectrum.path, crc, rel, device))


def write_edited(files: writer.OutputFiles, job: TensorJob, out: torch.Tensor, allow_nonfinite: bool) -> int:
    """The edited tensor into its slot, followed (a resized vocabulary) by the fine-tune's added rows."""
    if not job.shared_rows:
        return writer.write_tensor(files, job.placement, out)
    writer.check_finite(out)  # the edit's own values; the added rows are the fine-tune's (converted)
    return writer.write_blocks(files, job.placement, itertools.chain([out], _added_rows(job, allow_nonfinite)), False)


def edited_rows_slot(job: TensorJob) -> Placement:
    """Where the edited matrix's bytes go: the slot, or (a resized vocabulary) its first rows."""
    if not job.shared_rows:
        return job.placement
    edited_bytes = job.placement.nbytes // job.finetuned.shape[0] * job.shared_rows
    return Placement(job.placement.file, job.placement.offset, edited_bytes)


def _added_rows(job: TensorJob, allow_nonfinite: bool) -> Iterator[torch.Tensor]:
    """The fine-tune's rows past the base's, in row blocks, converted to the output dtype."""
    assert job.added_rows is not None
    yield from _converted(job, job.added_rows, allow_nonfinite)


def write_added_rows(files: writer.OutputFiles, job: TensorJob, allow_nonfinite: bool) -> None:
    """A streamed edit's added rows, after its edited blocks (the slot's checksum is read back whole)."""
    if job.added_rows is None:
        return
    edited = edited_rows_slot(job)
    where = Placement(job.placement.file, edited.offset + edited.nbytes, job.placement.nbytes - edited.nbytes)
    writer.write_blocks(files, where, _added_rows(job, allow_nonfinite), finite=False)


def converted(job: TensorJob, values: torch.Tensor, allow_nonfinite: bool) -> torch.Tensor:
    """The fine-tune's values in the output dtype, converted once. NaN/Inf among them is refused unless
    --allow-nonfinite lets them through; a finite value the dtype cannot hold (fp16 above 65504) always is."""
    dtype = torch_dtype(job.out_dtype)
    bad = int((~torch.isfinite(values)).sum()) if values.is_floating_point() else 0
    if bad and not allow_nonfinite:
        raise copied_as_is(job)
    out = rounded(values, dtype)
    if out.is_floating_point() and int((~torch.isfinite(out)).sum()) > bad:
        raise nonfinite_copy(job)
    return out


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
    return writer.write_tensor(files, job.placement, converted(job, w1, not check_finite), finite=False)


def copy_fine_tune(job: TensorJob, files: writer.OutputFiles, check_finite: bool) -> int:
    """The fine-tune's tensor unchanged, in bounded memory: its bytes, or converted (decoded, or --dtype) row
    block by row block."""
    ref = job.finetuned
    if job.out_dtype == ref.dtype and not ref.decoded:
        return writer.copy_tensor(ref, files, job.placement, check_finite)
    return writer.write_blocks(files, job.placement, _converted(job, ref, not check_finite), finite=False)


def _converted(job: TensorJob, ref: TensorRef, allow_nonfinite: bool) -> Iterator[torch.Tensor]:
    """A tensor's values in the output dtype, row block by row block (a 0-d or 1-d one whole: it is small)."""
    if len(ref.shape) < 2:
        yield converted(job, read_tensor(ref).reshape(-1), allow_nonfinite)
        return
    for row, stop in row_blocks(*matrix_shape(ref.shape)):
        yield converted(job, read_block(ref, row, stop, False), allow_nonfinite)


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
                tall[rows].copy_(_reweighed(src, rows, spectrum, coef, dtype))
    return out


def _reweighed(src: RowSource, rows: slice, spectrum: Spectrum, coef: Coefficients, dtype: torch.dtype) -> torch.Tensor:
    """W = W0 + lam_low dW + (lam_high - lam_low) dW_high for one micro block: computed in float64 (src's
    workspace), rounded once to `dtype`."""
    w0, x = src.read(rows)
    return rounded(reweigh(w0, x, spectrum.high_part(x, coef.k, src), coef, out=src.buffer("out", x.shape[0])), dtype)


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
    progress = TensorProgress(ctx.state_path, job.key, ctx.fence)
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
                out[rows.start - block.start : rows.stop - block.start].copy_(
                    _reweighed(src, rows, spectrum, coef, dtype)
                )
        with watch("write"):
            crc = writer.write_block(files, edited_rows_slot(job), shape, block.start, out, src.transposed)
        del out  # before the next block's buffer exists
        saved = progress.save_progress(saved, block.start, block.stop, crc)
        fault_point("block")
    src.release()
    with watch("write"):
        write_added_rows(files, job, options.allow_nonfinite)
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
                if writer.block_crc(files.folder, edited_rows_slot(job), shape, begin, stop, transposed) != crc:
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
