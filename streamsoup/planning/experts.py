"""Experts stacked in one tensor ([experts, in, out]: gpt-oss, Llama 4): each expert is a weight matrix.

MonoSoup edits weight matrices; seen as one [experts, in*out] matrix, a stacked tensor has rank
<= experts and its result is MonoSoup of no weight. Each expert's slice becomes a job of its own
(its spectrum, k and lambdas), written into its part of the output tensor, whose layout is unchanged.
Stacked tensors are found from the name and config.json's expert count, never from a shape alone
(a conv1d kernel [out, in, k] is a matrix [out, in*k]).
"""

from __future__ import annotations

from ..errors import InputError
from ..io.checkpoint import Checkpoint, TensorRef
from .preflight import config_tree

#: config keys that give a mixture-of-experts model's expert count
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
#: the module name under which MoE models keep their experts
EXPERTS = "experts"


def expert_count(config: dict) -> int | None:
    """The number of experts config.json declares (any nesting), None for a dense model."""
    for c in config_tree(config):
        for key in EXPERT_KEYS:
            if isinstance(c.get(key), int) and c[key] > 1:
                return c[key]
    return None


def under_experts(ref: TensorRef) -> bool:
    return EXPERTS in ref.name.split(".")


def stacked(ref: TensorRef, experts: int | None) -> bool:
    """[experts, in, out]: one matrix per expert."""
    return experts is not None and len(ref.shape) == 3 and under_experts(ref) and ref.shape[0] == experts


def stacked_vectors(ref: TensorRef, experts: int | None) -> bool:
    """[experts, out]: one bias (a 1-D tensor, copied) per expert, not a matrix."""
    return experts is not None and len(ref.shape) == 2 and under_experts(ref) and ref.shape[0] == experts


def check_stacking_known(ckpt: Checkpoint, config: dict, role: str) -> int | None:
    """The expert count (`config`: the checkpoint's config.json); a 3-D tensor under `experts` that it does not
    explain is refused."""
    experts = expert_count(config)
    for ref in ckpt.values():
        if len(ref.shape) == 3 and under_experts(ref) and not stacked(ref, experts):
            said = f"config.json declares {experts} experts" if experts else "config.json declares no expert count"
            raise InputError(
                f"{role} {ckpt.root}: tensor {ref.name!r} {list(ref.shape)} looks like experts stacked in one tensor "
                f"but {said} ({', '.join(EXPERT_KEYS[:2])}, ...): streamsoup edits each expert's matrix only when "
                "it knows how many there are; put the model's config.json beside its weights"
            )
    return experts
