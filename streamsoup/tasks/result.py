"""What a task gives back: its timing, and the one builder of the report row every path uses.

Only the small TensorResult travels back to the driver (see dispatch.py); it becomes one row
of the report and, with its singular values, one committed marker of the state.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from ..errors import RunError
from ..io.runlock import Fence
from ..numerics.monosoup import Coefficients
from ..options import EditOptions
from ..planning.planner import COPY, EDIT, TensorJob

PHASES = ("read", "gram", "eigh", "project", "write")


def task_failed(name: str, exc: BaseException) -> RunError:
    """A tensor's task failed for a reason that is not ours (a bug or the machine): one line naming it."""
    if isinstance(exc, OSError):
        return RunError(f"tensor {name!r}: I/O error: {exc}")
    return RunError(f"tensor {name!r} failed: {type(exc).__name__}: {exc}")


class Stopwatch:
    """Seconds per phase of one tensor (read, gram, eigh, project, write), and since the task began.

    Phases nest (a streamed tensor reads inside its Gram pass): a phase's time excludes the
    phases timed inside it. On a GPU (`on`) each phase ends with a synchronize, so its time is its own.
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.start = time.perf_counter()
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.on(device)
        self._inner: list[float] = []

    def on(self, device: str | torch.device) -> None:
        """The device the phases from now on run on."""
        self.cuda = str(device).startswith("cuda")

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

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self.seconds.items()}


@dataclass(frozen=True)
class TaskContext:
    """Where a task writes (the output folder, the state for mid-tensor progress) and the threads it computes with."""

    folder: str
    state_path: str
    checkpoint_seconds: float = 60.0
    threads: int = 0  # torch threads of its lane; 0: the worker's own setting (a cluster run not given --threads)
    fence: Fence | None = None  # checked before each write: the attempt still holds OUT.partial


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
    expert: list[int] | None = None  # [expert, experts]: crc32c covers that slice of the stacked tensor outputs[0]
    singular_values: np.ndarray | None = field(default=None, repr=False, compare=False)
    resumed: bool = False  # committed by an earlier attempt and verified on disk

    def as_dict(self) -> dict:
        """The report row (dataclasses.asdict deep-copies every value: a tenth of a small tensor's cost)."""
        out = {name: getattr(self, name) for name in ROW_FIELDS}
        out["shape"] = list(self.shape)
        if self.phases is not None:
            out["phases"] = dict(self.phases)
        if self.outputs is not None:
            out["outputs"] = list(self.outputs)
        if self.expert is not None:
            out["expert"] = list(self.expert)
        return out

    @classmethod
    def from_dict(cls, row: dict, resumed: bool = False) -> TensorResult:
        return cls(**{**row, "shape": tuple(row["shape"]), "resumed": resumed})


#: the fields of a report row: all but what only the state (spectrum) or this run (resumed) needs
ROW_FIELDS = tuple(f.name for f in fields(TensorResult) if f.name not in ("singular_values", "resumed"))


@dataclass(frozen=True)
class Edit:
    """What MonoSoup did to one edited tensor, beyond what every row has."""

    coef: Coefficients
    singular_values: np.ndarray | torch.Tensor
    spectral: str  # "gram", "svd" or "lowrank"
    crc32c: int
    rel_update: float | None
    device: str = "cpu"
    blocks: int = 0


def copied(
    job: TensorJob, watch: Stopwatch, reason: str, crc32c: int, rel_update: float | None = None, blocks: int = 0
) -> TensorResult:
    """The row of a tensor whose output is the fine-tune's own values."""
    return _row(job, watch, COPY, reason, crc32c=crc32c, rel_update=rel_update, blocks=blocks)


def edited(job: TensorJob, options: EditOptions, watch: Stopwatch, edit: Edit) -> TensorResult:
    """The row of a MonoSoup-edited tensor: k, the coefficients and the spectrum it was decided from."""
    c = edit.coef
    reason = f"k={c.k} of rank {c.rank} ({options.rank_rule} rule)"
    if edit.spectral == "lowrank":
        reason += f", LoRA rank {job.lora.rank}"
    if job.shared_rows:
        added = job.finetuned.shape[0] - job.shared_rows
        reason += f"; edited rows 0:{job.shared_rows} (the base's), {added} added rows kept as the fine-tune's"
    return _row(
        job,
        watch,
        EDIT,
        reason,
        k=c.k,
        rank=c.rank,
        P_k=c.p_k,
        rho=c.rho,
        lambda_high=c.lambda_high,
        lambda_low=c.lambda_low,
        rel_update=edit.rel_update,
        spectral=edit.spectral,
        crc32c=edit.crc32c,
        singular_values=np.asarray(edit.singular_values),
        device=str(edit.device),
        blocks=edit.blocks,
    )


def _row(job: TensorJob, watch: Stopwatch, action: str, reason: str, **fields) -> TensorResult:
    return TensorResult(
        name=job.name,
        shape=job.shape,
        dtype=job.out_dtype,
        nbytes=job.placement.nbytes,
        action=action,
        reason=reason,
        seconds=watch.elapsed(),
        phases=watch.as_dict(),
        outputs=list(job.outputs) or None,
        expert=list(job.part) if job.part else None,
        **fields,
    )
