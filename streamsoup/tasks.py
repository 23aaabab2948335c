"""The per-tensor task: load -> delta -> spectrum -> reweigh -> write, fused.

One task per tensor keeps every intermediate on the worker that made it: only the
small TensorResult travels back (dask holds a finished task's output until its
dependents run, so separate load/compute tasks would pile up whole tensors).
A tensor runs either whole in memory or, when its working set passes the budget,
streamed in row blocks from disk, with its progress saved so a kill resumes mid-tensor.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import writer
from .checkpoint import matrix_shape, read_block, read_tensor
from .dtypes import torch_dtype
from .errors import InputError, RunError
from .faults import fault_point
from .hostlinalg import set_threads
from .lowrank import materialize, row_blocks
from .monosoup import EPS, Coefficients, coefficients, relative_update, reweigh, update_is_significant
from .options import MergeOptions
from .planner import COPY, EDIT, TensorJob
from .resources import DevicePool, device_stream, release_memory
from .sources import ADAPTER_CONFIG
from .spectral import (
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
from .state import PartialTensor, StateDamaged

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Execution:
    """How one tensor runs, decided from the budgets before the run (see schedule.py)."""

    lane: str = "cpu"  # "cpu" or "device"
    block_rows: int = 0  # > 0: streamed from disk in blocks of this many rows of X
    ram: int = 0  # bytes of host memory admitted for it
    vram: int = 0  # bytes of device memory it may use

    @property
    def streamed(self) -> bool:
        return self.block_rows > 0


PHASES = ("read", "gram", "eigh", "project", "write")


class Stopwatch:
    """Seconds per phase of one tensor (read, gram, eigh, project, write): where a merge's time goes.

    Phases nest (a streamed tensor reads inside its Gram pass): a phase's time excludes the
    phases timed inside it. On a GPU each phase ends with a synchronize, so its time is its own.
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.cuda = str(device).startswith("cuda")
        self._inner: list[float] = []

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        self._inner.append(0.0)
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            elapsed, inner = time.perf_counter() - t0, self._inner.pop()
            self.seconds[phase] += elapsed - inner
            if self._inner:
                self._inner[-1] += elapsed

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self.seconds.items()}


@dataclass(frozen=True)
class TaskContext:
    """Where a task writes: the output folder and the state (for mid-tensor progress)."""

    folder: str
    state_path: str
    checkpoint_seconds: float = 60.0


@dataclass(frozen=True)
class TensorResult:
    """One row of the report, plus what the state keeps: checksum and spectrum."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    action: str
    reason: str
    k: int | None = None
    rank: int | None = None
    P_k: float | None = None  # noqa: N815 - the paper's name
    rho: float | None = None
    lambda_high: float | None = None
    lambda_low: float | None = None
    rel_update: float | None = None
    spectral: str | None = None
    device: str = "cpu"
    blocks: int = 0  # > 0: streamed from disk in this many row blocks
    seconds: float = 0.0
    phases: dict[str, float] | None = None  # seconds per phase (see Stopwatch)
    nbytes: int = 0
    crc32c: int = 0
    attempt: int = 0  # which run of the merge computed it (1 = the first)
    outputs: list[str] | None = None  # the output tensors covered by crc32c, when not just `name` (adapter output)
    singular_values: np.ndarray | None = field(default=None, repr=False, compare=False)
    resumed: bool = False  # committed by an earlier attempt and verified on disk

    def as_dict(self) -> dict:
        out = asdict(self)
        out["shape"] = list(self.shape)
        del out["singular_values"], out["resumed"]
        return out

    @classmethod
    def from_dict(cls, row: dict, resumed: bool = False) -> TensorResult:
        return cls(**{**row, "shape": tuple(row["shape"]), "resumed": resumed})


def merge_tensor(
    job: TensorJob, options: MergeOptions, ctx: TaskContext, run: Execution, committed: dict | None = None
) -> TensorResult:
    """Produce one output tensor in its slot, or confirm that an earlier attempt already did.

    `committed` is the report row of an earlier attempt's marker: if the slot still holds
    bytes with its checksum, nothing is recomputed; a torn or lost write is redone.
    """
    try:
        return _merge_tensor(job, options, ctx, run, committed)
    except writer.NonFiniteOutput:
        raise nonfinite_edit(job) from None


def nonfinite_edit(job: TensorJob) -> RunError:
    """An edit of finite inputs that gives NaN/Inf: name the tensor and what made it overflow."""
    if job.lora is not None:
        cause = (f"the adapter scales this module's update by {job.lora.scale:g} (lora_alpha / r in "
                 f"{ADAPTER_CONFIG}), which overflows {job.out_dtype}: fix lora_alpha")  # fmt: skip
    else:
        cause = f"the edited values overflow {job.out_dtype}"
    return RunError(f"tensor {job.name!r}: the result would contain NaN or Inf ({cause}); nothing was "
                    "published")  # fmt: skip


def _merge_tensor(job: TensorJob, options: MergeOptions, ctx: TaskContext, run: Execution,
                  committed: dict | None) -> TensorResult:  # fmt: skip
    folder = Path(ctx.folder)
    if committed is not None:
        if writer.slot_crc(folder, job.placement) == committed["crc32c"]:
            return TensorResult.from_dict(committed, resumed=True)
        log.warning("%s: stored bytes do not match the recorded checksum; recomputing", job.name)
    start = time.perf_counter()
    if options.threads:
        set_threads(options.threads)
    if job.bias is not None and not job.factors_out:
        from .lowrank_tasks import write_bias

        return write_bias(job, folder, start)
    if job.action == COPY:
        watch = Stopwatch()
        with watch("write"):
            crc = writer.copy_tensor(job.finetuned, folder, job.placement, not options.allow_nonfinite)
        return _result(job, COPY, job.reason, start, watch, crc32c=crc)
    assert job.action == EDIT and job.base is not None
    if job.lowrank:
        from .lowrank_tasks import merge_lowrank  # I/O-bound: on the host, whatever the lane

        return merge_lowrank(job, options, ctx, start)
    device = DevicePool.acquire() if run.lane == "device" else "cpu"
    try:
        with device_stream(device):
            if run.streamed:
                return _merge_streamed(job, options, ctx, run, device, start)
            return merge_dense(job, options, folder, device, start)
    finally:
        DevicePool.release(device) if run.lane == "device" else None
        release_memory()


def _result(job: TensorJob, action: str, reason: str, start: float, watch: Stopwatch | None = None,
            **fields) -> TensorResult:  # fmt: skip
    phases = watch.as_dict() if watch is not None else None
    return TensorResult(name=job.name, shape=job.shape, dtype=job.out_dtype, nbytes=job.placement.nbytes,
                        action=action, reason=reason, seconds=time.perf_counter() - start, phases=phases,
                        outputs=list(job.outputs) or None, **fields)  # fmt: skip


def _nonfinite(job: TensorJob, sums: GramSums) -> InputError:
    """Name the checkpoint at fault from the sums already taken: no second read of the tensor."""
    culprit = job.base if not math.isfinite(sums.w0_sq) else job.finetuned  # dW = W1 - W0 with W0 finite
    return InputError(f"{culprit.path}: tensor {job.name!r} contains NaN or Inf; MonoSoup cannot edit it: fix "
                      "the checkpoint, or rerun with --allow-nonfinite to copy the fine-tune's tensor unchanged")


NONFINITE_COPIED = "NaN or Inf in BASE or FINETUNED: the fine-tune's tensor copied unchanged (--allow-nonfinite)"


def _skip_reason(sums: GramSums, options: MergeOptions, job: TensorJob) -> tuple[str, float | None]:
    """Why an edit candidate is copied after all ("" when it is edited), and its relative update."""
    try:
        dw_norm, w0_norm = sums.norms
    except FloatingPointError:
        if options.allow_nonfinite:
            return NONFINITE_COPIED, None
        raise _nonfinite(job, sums) from None
    rel = relative_update(dw_norm, w0_norm)
    if not update_is_significant(dw_norm, w0_norm, options.min_rel_update):
        return f"relative update {rel:.3g} below --min-rel-update {options.min_rel_update:g}", rel
    if dw_norm**2 < EPS:
        return "update energy below eps: the fine-tune's values are kept", rel
    return "", rel


def _edited(job, options, start, watch, coef, spectrum_s, path, rel, crc, device, blocks=0) -> TensorResult:
    return _result(job, EDIT, f"k={coef.k} of rank {coef.rank} ({options.rank_rule} rule)", start, watch,
                   rel_update=rel, spectral=path, crc32c=crc, singular_values=np.asarray(spectrum_s),
                   device=str(device), blocks=blocks, **_coef_fields(coef))  # fmt: skip


def merge_dense(job: TensorJob, options: MergeOptions, folder: Path, device: str, start: float) -> TensorResult:
    """The whole tensor in memory: W1 read from the fine-tune, or computed from an adapter (DoRA) in float64."""
    watch = Stopwatch(device)
    with watch("read"):
        w0 = read_tensor(job.base)
        w1 = materialize(job.lora, w0) if job.lora is not None else read_tensor(job.finetuned)
    src = MemoryRows(w0, w1, device)
    sums = gram_pass(src, options.spectral, watch)
    reason, rel = _skip_reason(sums, options, job)
    if reason:
        del w0, src, sums
        with watch("write"):
            crc = _write_fine_tune(job, folder, w1, not options.allow_nonfinite)
        return _result(job, COPY, reason, start, watch, rel_update=rel, crc32c=crc)
    spectrum, coef = spectrum_of(src, sums, options, watch)
    del sums
    out = reweighed(src, spectrum, coef, torch_dtype(job.out_dtype), watch)
    with watch("write"):
        crc = writer.write_tensor(folder, job.placement, out)
    return _edited(job, options, start, watch, coef, spectrum.s, spectrum.path, rel, crc, device)


def _write_fine_tune(job: TensorJob, folder: Path, w1: torch.Tensor, check_finite: bool) -> int:
    """The fine-tune's tensor unchanged: its bytes, or (an adapter's W1 in another dtype) rounded once."""
    if job.lora is None and job.out_dtype == job.finetuned.dtype:
        return writer.copy_tensor(job.finetuned, folder, job.placement, check_finite)
    out = w1.to(torch_dtype(job.out_dtype))
    if check_finite and out.is_floating_point() and not bool(torch.isfinite(out).all()):
        raise _nonfinite_output(job)
    return writer.write_tensor(folder, job.placement, out, finite=check_finite)


def _nonfinite_output(job: TensorJob) -> InputError:
    return InputError(f"{job.finetuned.path}: tensor {job.name!r} contains NaN or Inf and would be written into "
                      "the output as is; fix the input, or rerun with --allow-nonfinite")  # fmt: skip


def _stream_fine_tune(job: TensorJob, folder: Path, check_finite: bool) -> int:
    """The fine-tune's tensor unchanged, too big for memory: its bytes, or converted row block by row block."""
    ref = job.finetuned
    if job.out_dtype == ref.dtype:
        return writer.copy_tensor(ref, folder, job.placement, check_finite)
    slot = writer.SlotWriter(folder, job.placement, finite=check_finite)
    try:
        for row, stop in row_blocks(*matrix_shape(ref.shape)):
            block = read_block(ref, row, stop, False)
            if check_finite and not bool(torch.isfinite(block).all()):
                raise _nonfinite_output(job)
            slot.write(block.to(torch_dtype(job.out_dtype)))
        return slot.close()
    except BaseException:
        slot.abort()
        raise


def gram_pass(src: RowSource, spectral: str, watch: Stopwatch) -> GramSums:
    """One pass over the update: its norms, and its Gram matrix unless the full-SVD path is asked for."""
    with watch("gram"):
        return accumulate(src, with_gram=spectral != "svd")


def spectrum_of(src: MemoryRows, sums: GramSums, options: MergeOptions,
                watch: Stopwatch) -> tuple[Spectrum, Coefficients]:  # fmt: skip
    """The singular values, k, and the eigenvectors of the side of the split that the projection uses."""
    with watch("eigh"):
        full = svd_spectrum(src) if options.spectral == "svd" else eigh_spectrum(sums.gram)
        return split(full, options)


def split(full: GramEigen | Spectrum, options: MergeOptions) -> tuple[Spectrum, Coefficients]:
    coef = coefficients(full.s, options.rank_rule, options.energy)
    return full.keep_needed(coef.k), coef


def reweighed(src: MemoryRows, spectrum: Spectrum, coef: Coefficients, dtype: torch.dtype,
              watch: Stopwatch) -> torch.Tensor:  # fmt: skip
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


def _merge_streamed(
    job: TensorJob, options: MergeOptions, ctx: TaskContext, run: Execution, device: str, start: float
) -> TensorResult:
    """Row blocks from disk: Gram pass (saved now and then), eigh once, then project and write block by block.

    Saved progress counts only once it verifies: the Gram and the basis against their crc32c, and
    every block of rows written before a kill against the crc32c recorded when it was written.
    """
    folder, ref = Path(ctx.folder), job.finetuned
    shape, dtype = matrix_shape(ref.shape), torch_dtype(job.out_dtype)
    watch = Stopwatch(device)
    src = DiskRows(job.base, ref, run.block_rows, device, watch)
    partial = PartialTensor(ctx.state_path, job.key)
    saved = _verified_progress(partial, folder, job, shape, src.transposed)
    if saved.get("phase") != "project":
        with watch("gram"):
            sums = _gram_pass(src, partial, saved, ctx.checkpoint_seconds)
        src.release()
        reason, rel = _skip_reason(sums, options, job)
        if reason:
            with watch("write"):
                crc = _stream_fine_tune(job, folder, not options.allow_nonfinite)
            return _result(job, COPY, reason, start, watch, rel_update=rel, crc32c=crc, blocks=src.n_blocks)
        with watch("eigh"):
            spectrum, coef = split(eigh_spectrum(sums.gram), options)
        del sums
        info = {"k": coef.k, "rel": rel, "coef": coef.as_dict(), "kept": spectrum.kept}
        partial.save_basis(spectrum.s.numpy(), spectrum.basis.cpu().numpy(), info)
        saved = partial.attrs
    s, basis = partial.load_basis(saved)
    coef = Coefficients(**saved["coef"])
    spectrum = Spectrum(torch.from_numpy(s), torch.from_numpy(basis).to(device), "gram", saved["kept"])
    for block in src.read_blocks(saved["next_row"]):
        src.load(block)
        with watch("project"):
            out = torch.empty(block.stop - block.start, src.cols, dtype=dtype)
            for rows in src.micro_blocks(block):
                out[rows.start - block.start : rows.stop - block.start].copy_(_reweighed(src, rows, spectrum, coef))
        with watch("write"):
            crc = writer.write_block(folder, job.placement, shape, block.start, out, src.transposed)
        del out  # before the next block's buffer exists
        saved = partial.save_progress(saved, block.start, block.stop, crc)
        fault_point("block")
    src.release()
    with watch("write"):
        crc = writer.slot_crc(folder, job.placement)
    return _edited(job, options, start, watch, coef, s, "gram", saved["rel"], crc, device, blocks=src.n_blocks)


def _verified_progress(partial: PartialTensor, folder: Path, job: TensorJob, shape: tuple[int, int],
                       transposed: bool) -> dict:  # fmt: skip
    """The saved progress with everything it names checked; a projection resumes after its last good block."""
    saved = partial.attrs
    try:
        if saved.get("phase") == "gram":
            partial.load_gram(saved)
        elif saved.get("phase") == "project":
            partial.load_basis(saved)
            good = []
            for begin, stop, crc in saved["written"]:
                if writer.block_crc(folder, job.placement, shape, begin, stop, transposed) != crc:
                    log.warning("%s: rows %d:%d written before the interruption changed on disk; rewriting from "
                                "there", job.name, begin, stop)  # fmt: skip
                    break
                good.append([begin, stop, crc])
            if len(good) < len(saved["written"]):
                saved = {**saved, "written": good, "next_row": good[-1][1] if good else 0}
    except StateDamaged as exc:
        partial.damaged(str(exc))
        return {}
    return saved


def _gram_pass(src: DiskRows, partial: PartialTensor, saved: dict, every: float) -> GramSums:
    sums = None
    if saved.get("phase") == "gram":
        gram = torch.from_numpy(partial.load_gram(saved)).to(src.device)
        sums = GramSums(gram, saved["dw_sq"], saved["w0_sq"], saved["next_row"])
    last = time.monotonic()

    def checkpoint(acc: GramSums) -> None:
        nonlocal last
        if time.monotonic() - last >= every and acc.next_row < src.rows:
            partial.save_gram(acc.gram.cpu().numpy(), acc.next_row, acc.dw_sq, acc.w0_sq)
            last = time.monotonic()
            fault_point("gram")

    return accumulate(src, with_gram=True, sums=sums, on_block=checkpoint)


def _coef_fields(c: Coefficients) -> dict:
    return dict(k=c.k, rank=c.rank, P_k=c.p_k, rho=c.rho, lambda_high=c.lambda_high, lambda_low=c.lambda_low)
