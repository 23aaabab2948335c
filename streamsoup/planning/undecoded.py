"""Weights streamsoup cannot decode yet, refused by name before any work: quantized checkpoints, experts
stacked in one tensor.

Editing such bytes as if they were one float matrix, or copying them past an edited neighbour,
gives a wrong model with exit 0; a refusal that names the format and the way out does not.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..errors import InputError
from ..io.checkpoint import Checkpoint, TensorRef
from .preflight import model_config

#: tensor name endings that only quantized checkpoints have, and the format they belong to
QUANTIZED_SUFFIXES: dict[str, str] = {
    ".qweight": "GPTQ/AWQ packed weights",
    ".qzeros": "GPTQ/AWQ packed weights",
    ".g_idx": "GPTQ packed weights",
    "weight_scale_inv": "FP8 block-scaled weights",
    ".weight_scale": "FP8 scaled weights",
    ".input_scale": "FP8 scaled activations",
    ".absmax": "bitsandbytes 4-bit weights",
    ".quant_map": "bitsandbytes 4-bit weights",
    ".SCB": "bitsandbytes 8-bit weights",
    "_blocks": "MXFP4 weights",
}
#: 8-bit float dtypes: quantized weights that need their scales
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
#: config keys that give a mixture-of-experts model's expert count
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
DEQUANTIZE = ("streamsoup edits float weights (F32, F16, BF16, F64) and would otherwise copy these unedited; "
              "dequantize it to bf16 first (e.g. load it with transformers and save_pretrained the bf16 model)")


def _walk(config: Any) -> Iterator[dict]:
    """The config and the configs nested in it (a multimodal model keeps its text model's in text_config)."""
    if isinstance(config, dict):
        yield config
        for value in config.values():
            yield from _walk(value)


def quantization(ckpt: Checkpoint) -> str | None:
    """What marks the checkpoint as quantized, in words; None for plain float weights."""
    config = model_config(ckpt)
    if isinstance(config.get("quantization_config"), dict):
        method = config["quantization_config"].get("quant_method", "unnamed")
        return f"config.json has a quantization_config, quant_method {method!r}"
    for ref in ckpt.values():
        what = next((fmt for end, fmt in QUANTIZED_SUFFIXES.items() if ref.name.endswith(end)), None)
        if what is not None and not _plain_lookalike(ref):
            return f"{what}: tensor {ref.name!r}"
        if ref.dtype in FP8_DTYPES and len(ref.shape) >= 2:
            return f"FP8 weights: tensor {ref.name!r} is {ref.dtype}"
    return None


def _plain_lookalike(ref: TensorRef) -> bool:
    """A float tensor whose name merely ends like a quantized one (`_blocks` of a model's own naming)."""
    return ref.name.endswith("_blocks") and ref.dtype not in ("U8", "I8")


def expert_count(ckpt: Checkpoint) -> int | None:
    """The number of experts config.json declares (any nesting), None for a dense model."""
    for config in _walk(model_config(ckpt)):
        for key in EXPERT_KEYS:
            if isinstance(config.get(key), int) and config[key] > 1:
                return config[key]
    return None


def stacked_experts(ckpt: Checkpoint) -> TensorRef | None:
    """The first tensor that holds several experts' matrices stacked ([experts, in, out]), from name and config."""
    experts = expert_count(ckpt)
    for ref in ckpt.values():
        if len(ref.shape) != 3 or "experts" not in ref.name.split("."):
            continue
        if experts is None or ref.shape[0] == experts:
            return ref
    return None


def check_decodable(ckpt: Checkpoint, role: str) -> None:
    """Refuse quantized weights and stacked experts, naming the format, a tensor and what to do."""
    found = quantization(ckpt)
    if found is not None:
        raise InputError(f"{role} {ckpt.root} is quantized ({found}): {DEQUANTIZE}")
    ref = stacked_experts(ckpt)
    if ref is not None:
        experts = expert_count(ckpt)
        said = f" (config.json: {experts} experts)" if experts else ""
        raise InputError(
            f"{role} {ckpt.root}: tensor {ref.name!r} {list(ref.shape)} stacks {ref.shape[0]} experts' matrices in "
            f"one tensor{said}; streamsoup does not edit stacked experts one by one yet, and as one matrix the "
            "result would not be MonoSoup of any weight: refused. Save the experts as separate 2-D tensors (as "
            "Mixtral's checkpoints do) to merge it"
        )
