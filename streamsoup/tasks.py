"""The per-tensor task: load -> delta -> spectrum -> reweight -> write, fused.

One task per tensor keeps every intermediate on the worker that made it: only the
small TensorResult travels back (dask holds a finished task's output until its
dependents run, so separate load/compute tasks would pile up whole tensors).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import writer
from .checkpoint import read_tensor
from .errors import InputError
from .monosoup import EPS, Coefficients, coefficients, relative_update, reweigh, update_is_significant
from .options import MergeOptions
from .plan import COPY, EDIT, TensorJob
from .spectral import UpdatePair, compute_spectrum

log = logging.getLogger(__name__)


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
    seconds: float = 0.0
    nbytes: int = 0
    crc32c: int = 0
    attempt: int = 0  # which run of the merge computed it (1 = the first)
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


def merge_tensor(job: TensorJob, options: MergeOptions, folder: str, committed: dict | None = None) -> TensorResult:
    """Produce one output tensor in its slot, or confirm that an earlier attempt already did.

    `committed` is the report row of an earlier attempt's marker: if the slot still holds
    bytes with its checksum, nothing is recomputed; a torn or lost write is redone.
    """
    if committed is not None:
        if writer.slot_crc(Path(folder), job.placement) == committed["crc32c"]:
            return TensorResult.from_dict(committed, resumed=True)
        log.warning("%s: stored bytes do not match the recorded checksum; recomputing", job.name)
    start = time.perf_counter()
    if options.threads:
        torch.set_num_threads(options.threads)
    ref = job.finetuned
    row = dict(name=job.name, shape=ref.shape, dtype=ref.dtype, nbytes=ref.nbytes)
    if job.action == COPY:
        crc = writer.copy_tensor(ref, Path(folder), job.placement)
        return TensorResult(action=COPY, reason=job.reason, crc32c=crc, seconds=time.perf_counter() - start, **row)
    assert job.action == EDIT and job.base is not None
    w1, w0 = read_tensor(ref), read_tensor(job.base)
    pair = UpdatePair(w0, w1)
    try:
        dw_norm, w0_norm = pair.norms()
    except FloatingPointError:
        culprit = ref if not bool(torch.isfinite(w1).all()) else job.base
        raise InputError(
            f"{culprit.path}: tensor {job.name!r} contains NaN or Inf; MonoSoup cannot edit it "
            "(fix or drop the tensor, then rerun with --fresh)"
        ) from None
    rel = relative_update(dw_norm, w0_norm)
    reason = ""
    if not update_is_significant(dw_norm, w0_norm, options.min_rel_update):
        reason = f"relative update {rel:.3g} below --min-rel-update {options.min_rel_update:g}"
    elif dw_norm**2 < EPS:
        reason = "update energy below eps: the fine-tune's values are kept"
    if reason:
        del w0, w1, pair
        crc = writer.copy_tensor(ref, Path(folder), job.placement)
        return TensorResult(
            action=COPY, reason=reason, rel_update=rel, crc32c=crc, seconds=time.perf_counter() - start, **row
        )
    spectrum = compute_spectrum(pair, options.spectral)
    coef = coefficients(spectrum.s, options.rank_rule, options.energy)
    out = torch.empty(ref.shape, dtype=w1.dtype)
    _reweigh_blocks(pair, spectrum, coef, out)
    crc = writer.write_tensor(Path(folder), job.placement, out)
    return TensorResult(
        action=EDIT,
        reason=f"rank {coef.k} of {coef.rank} ({options.rank_rule})",
        rel_update=rel,
        spectral=spectrum.path,
        seconds=time.perf_counter() - start,
        crc32c=crc,
        singular_values=spectrum.s.numpy(),
        **_coef_fields(coef),
        **row,
    )


def _reweigh_blocks(pair: UpdatePair, spectrum, coef: Coefficients, out: torch.Tensor) -> None:
    """W = W0 + lam_low dW + (lam_high - lam_low) dW_high, in float64 row block by row block."""
    tall = pair.tall_view(out)
    for rows in pair.blocks():
        x = pair.delta(rows)
        high = spectrum.high_part(x, coef.k)
        tall[rows] = reweigh(pair.base(rows), x, high, coef).to(out.dtype)


def _coef_fields(c: Coefficients) -> dict:
    return dict(k=c.k, rank=c.rank, P_k=c.p_k, rho=c.rho, lambda_high=c.lambda_high, lambda_low=c.lambda_low)
