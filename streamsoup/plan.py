"""Pair the tensors of two checkpoints and decide what happens to each, from headers alone."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .checkpoint import Checkpoint, TensorRef
from .dtypes import is_float
from .layout import Placement, ShardLayout, TensorSpec
from .options import MergeOptions
from .preflight import check_not_adapter, check_pairing

EDIT, COPY, DROP = "edit", "copy", "drop"


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: where it comes from, what to do with it, and where it goes."""

    index: int
    name: str
    finetuned: TensorRef
    base: TensorRef | None
    action: str  # EDIT candidates may still turn into COPY once the update's norm is known
    reason: str
    placement: Placement

    @property
    def key(self) -> str:
        return f"tensor-{self.index:06d}"


@dataclass(frozen=True)
class MergePlan:
    base: Checkpoint
    finetuned: Checkpoint
    options: MergeOptions
    jobs: tuple[TensorJob, ...]
    dropped: tuple[str, ...]  # tensors only in the base
    layout: ShardLayout
    warnings: tuple[str, ...] = ()  # said once, before the run (plan and merge alike)

    @property
    def edits(self) -> list[TensorJob]:
        return [j for j in self.jobs if j.action == EDIT]

    @property
    def bytes_to_write(self) -> int:
        return self.layout.total_size


def pair_action(ft: TensorRef, base: TensorRef | None) -> tuple[str, str]:
    """MonoSoup edits float matrices present in both checkpoints with equal shapes; all else is copied."""
    if base is None:
        return COPY, "not in base"
    if base.shape != ft.shape:
        return COPY, f"shape {list(ft.shape)} differs from base {list(base.shape)}"
    if len(ft.shape) < 2:
        return COPY, f"{len(ft.shape)}-D tensor (only matrices and kernels are edited)"
    if ft.numel == 0:
        return COPY, "empty tensor"
    if not (is_float(ft.dtype) and is_float(base.dtype)):
        return COPY, f"dtype {ft.dtype}/{base.dtype} is not a float type MonoSoup edits"
    return EDIT, ""


def plan_merge(base: str | Path | Checkpoint, finetuned: str | Path | Checkpoint, options: MergeOptions) -> MergePlan:
    """Pair, decide and lay out from headers; refuse inputs that cannot make a right model (preflight.py)."""
    base_ckpt = base if isinstance(base, Checkpoint) else Checkpoint.from_path(base, "BASE")
    ft_ckpt = finetuned if isinstance(finetuned, Checkpoint) else Checkpoint.from_path(finetuned, "FINETUNED")
    for ckpt, role in ((base_ckpt, "BASE"), (ft_ckpt, "FINETUNED")):
        check_not_adapter(ckpt, role)
    layout = ShardLayout.plan((TensorSpec(r.name, r.dtype, r.shape) for r in ft_ckpt.values()), options.shard_size)
    jobs = []
    for i, ref in enumerate(ft_ckpt.values()):
        action, reason = pair_action(ref, base_ckpt.get(ref.name))
        jobs.append(TensorJob(i, ref.name, ref, base_ckpt.get(ref.name), action, reason, layout.placements[ref.name]))
    dropped = tuple(name for name in base_ckpt if name not in ft_ckpt)
    warning = check_pairing(base_ckpt, ft_ckpt, sum(j.action == EDIT for j in jobs))
    return MergePlan(base_ckpt, ft_ckpt, options, tuple(jobs), dropped, layout, (warning,) if warning else ())
