"""Quantized checkpoints: FP8 (block-scaled or per-channel) and MXFP4 experts are decoded, every other format is
refused by name before any work.

Editing quantized bytes as if they were floats, or copying them past an edited neighbour, gives a
wrong model with exit 0. Decoded, each weight is read as float64 (q times its scale, io/quantized.py)
and its scale tensors are consumed: they are part of the weight, not tensors of their own.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ..errors import InputError
from ..io import quantized
from ..io.checkpoint import Checkpoint, TensorRef
from ..io.dtypes import is_float

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
#: quantization_config.quant_method values whose tensors are decoded here
DECODED_METHODS = ("fp8", "fbgemm_fp8", "mxfp4")
#: FP8 scale tensor endings, after the weight's own name (DeepSeek/Qwen3: weight_scale_inv; FBGEMM: weight_scale)
FP8_SCALES = ("_scale_inv", "_scale")
#: scales of activations: meaningful only to a quantized runtime, consumed with the weights
ACTIVATION_SCALES = (".input_scale",)
#: DeepSeek-V3's block when config.json does not say
DEFAULT_BLOCK = (128, 128)
MX_BLOCKS, MX_SCALES = "_blocks", "_scales"
DEQUANTIZE = (
    "streamsoup edits float weights (F32, F16, BF16, F64) and decodes FP8 (with its scales) and MXFP4 "
    "experts, not this; dequantize it to bf16 first (e.g. load it with transformers and save_pretrained "
    "the bf16 model)"
)


@dataclass(frozen=True)
class Decoded:
    """A checkpoint as MonoSoup sees it: quantized weights decoded, their scales consumed."""

    ckpt: Checkpoint
    format: str | None  # "FP8 block-scaled [128, 128]", "MXFP4 experts", ...; None for plain float weights
    consumed: frozenset[str] = frozenset()  # stored names read as part of another weight


def decode(ckpt: Checkpoint, role: str, config: dict) -> Decoded:
    """Decode FP8 and MXFP4 weights (`config`: the checkpoint's config.json); refuse, naming the format, a tensor
    and what to do, anything else quantized."""
    qc = config.get("quantization_config")
    method = qc.get("quant_method", "unnamed") if isinstance(qc, dict) else None
    if method is not None and method not in DECODED_METHODS:
        raise InputError(
            f"{role} {ckpt.root} is quantized (config.json has a quantization_config, quant_method "
            f"{method!r}): {DEQUANTIZE}"
        )
    block = _config_block(qc) if isinstance(qc, dict) else None
    refs: dict[str, TensorRef] = {}
    consumed: set[str] = set()
    formats: list[str] = []
    for name, ref in ckpt.items():
        if name in consumed:
            continue
        if ref.dtype in FP8_DTYPES and len(ref.shape) >= 2:
            refs[name], scale, words = _fp8(ckpt, ref, block, role)
            consumed.add(scale)
            formats.append(words)
        elif name.endswith(MX_BLOCKS) and ref.dtype == "U8":
            decoded = _mxfp4(ckpt, ref, role)
            refs[decoded.name] = decoded
            consumed.update((name, decoded.name + MX_SCALES))
            formats.append("MXFP4 experts")
        else:
            refs[name] = ref
    if method is None and not formats:
        _refuse_leftovers(ckpt, role)
        return Decoded(ckpt, None)
    consumed.update(n for n in ckpt if n.endswith(ACTIVATION_SCALES))
    for name in consumed:
        refs.pop(name, None)
    decoded = Checkpoint(ckpt.root, ckpt.shards, refs, ckpt.config_identity)
    _refuse_leftovers(decoded, role)
    words = ", ".join(dict.fromkeys(formats)) or f"config.json quant_method {method!r}"
    return Decoded(decoded, words, frozenset(consumed))


def _config_block(qc: dict[str, Any]) -> tuple[int, int] | None:
    block = qc.get("weight_block_size")
    if isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block):
        return block[0], block[1]
    return None


def _fp8(ckpt: Checkpoint, ref: TensorRef, block: tuple[int, int] | None, role: str) -> tuple[TensorRef, str, str]:
    """The decoded ref, its scale's name, and the format in words."""
    scale = next((ckpt[ref.name + end] for end in FP8_SCALES if ref.name + end in ckpt), None)
    where = f"{role} {ckpt.root}: FP8 tensor {ref.name!r} {list(ref.shape)}"
    if scale is None or not is_float(scale.dtype) or ref.stride is not None:
        raise InputError(
            f"{where} has no float scale tensor ({ref.name}_scale_inv or {ref.name}_scale) to decode it "
            f"with: {DEQUANTIZE}"
        )
    *lead, m, n = ref.shape
    if scale.numel == 1 and not lead:
        rows_cols, words = (m, n), "FP8 per-tensor scaled"
    elif tuple(scale.shape) in ((*lead, m), (*lead, m, 1)):
        rows_cols, words = (1, n), "FP8 per-channel scaled"
    else:
        br, bc = block or DEFAULT_BLOCK
        if tuple(scale.shape) != (*lead, -(-m // br), -(-n // bc)):
            raise InputError(
                f"{where}: its scale {scale.name!r} {list(scale.shape)} fits no [{br}, {bc}] block "
                f"grid (config.json quantization_config.weight_block_size): {DEQUANTIZE}"
            )
        rows_cols, words = (br, bc), f"FP8 block-scaled [{br}, {bc}]"
    return replace(ref, encoding=quantized.FP8, scale=scale, block=rows_cols), scale.name, words


def _mxfp4(ckpt: Checkpoint, ref: TensorRef, role: str) -> TensorRef:
    """gpt-oss's experts: `P_blocks` [experts, out, in/32, 16] and `P_scales` [experts, out, in/32] are the
    weight `P` [experts, in, out] (transformers' dequantization transposes each expert)."""
    name = ref.name[: -len(MX_BLOCKS)]
    if name in ckpt:  # the decoded weight would replace it: one of the two would be dropped unsaid
        raise InputError(
            f"{role} {ckpt.root}: holds both {name!r} and its MXFP4 encoding {ref.name!r}, so which "
            "is the weight is ambiguous: save the checkpoint with one of them"
        )
    scales = ckpt.get(name + MX_SCALES)
    shape = ref.shape
    if (
        scales is None
        or scales.dtype != "U8"
        or len(shape) != 4
        or shape[-1] != quantized.MX_BYTES
        or tuple(scales.shape) != shape[:-1]
        or ref.stride is not None
    ):
        raise InputError(
            f"{role} {ckpt.root}: MXFP4 tensor {ref.name!r} {list(shape)} has no matching "
            f"{name + MX_SCALES!r} [experts, rows, groups] (gpt-oss's layout): {DEQUANTIZE}"
        )
    experts, rows, groups, _ = shape
    return replace(
        ref, name=name, shape=(experts, groups * quantized.MX_GROUP, rows), encoding=quantized.MXFP4, scale=scales
    )


def _refuse_leftovers(ckpt: Checkpoint, role: str) -> None:
    found = quantization(ckpt)
    if found is not None:
        raise InputError(f"{role} {ckpt.root} is quantized ({found}): {DEQUANTIZE}")


def quantization(ckpt: Checkpoint) -> str | None:
    """What marks the (decoded) checkpoint as holding weights still quantized, in words; None for none."""
    for ref in ckpt.values():
        if ref.decoded:
            continue
        what = next((fmt for end, fmt in QUANTIZED_SUFFIXES.items() if ref.name.endswith(end)), None)
        if what is not None and not _plain_lookalike(ref):
            return f"{what}: tensor {ref.name!r}"
        if ref.dtype in FP8_DTYPES and len(ref.shape) >= 2:
            return f"FP8 weights: tensor {ref.name!r} is {ref.dtype}"
    return None


def _plain_lookalike(ref: TensorRef) -> bool:
    """A float tensor whose name merely ends like a quantized one (`_blocks` of a model's own naming)."""
    return ref.name.endswith("_blocks") and ref.dtype not in ("U8", "I8")
