"""The safetensors dtype table: names, item sizes and the torch dtypes we can compute with."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InputError

#: safetensors dtype name -> item size in bytes (every dtype the format defines that we can copy).
ITEM_SIZE: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}

#: dtypes MonoSoup edits; every other dtype is copied byte for byte.
FLOAT_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}

#: dtypes read as stored, to be decoded with their scales (io/quantized.py)
STORED_DTYPES: dict[str, torch.dtype] = {
    **FLOAT_DTYPES,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "U8": torch.uint8,
}


def item_size(dtype: str, where: str) -> int:
    try:
        return ITEM_SIZE[dtype]
    except KeyError:
        raise InputError(f"{where}: unknown safetensors dtype {dtype!r}") from None


def torch_dtype(dtype: str) -> torch.dtype:
    return STORED_DTYPES[dtype]


def is_float(dtype: str) -> bool:
    return dtype in FLOAT_DTYPES


#: dtype -> (unsigned view, mask): a value is NaN or Inf when all its exponent bits are set
#: (F8_E4M3 has no Inf; its NaN is the all-ones pattern below the sign bit).
NONFINITE_MASK: dict[str, tuple[type, int]] = {
    "F64": (np.uint64, 0x7FF0000000000000),
    "F32": (np.uint32, 0x7F800000),
    "F16": (np.uint16, 0x7C00),
    "BF16": (np.uint16, 0x7F80),
    "F8_E5M2": (np.uint8, 0x7C),
    "F8_E4M3": (np.uint8, 0x7F),
}


def has_nonfinite(data: memoryview | np.ndarray, dtype: str) -> bool:
    """NaN or Inf among the raw values (whole elements); integer dtypes never hold them."""
    if dtype not in NONFINITE_MASK:
        return False
    view, mask = NONFINITE_MASK[dtype]
    bits = np.frombuffer(data, dtype=view)
    # the largest exponent field: all ones only where a value is NaN or Inf (one pass, ~10x torch.isfinite on bf16)
    return bits.size > 0 and int(np.bitwise_and(bits, view(mask)).max()) == mask


#: elements checked at a time (scratch of a few MiB, never a copy of the whole tensor)
FINITE_CHUNK = 1 << 22
_NAMES = {dtype: name for name, dtype in STORED_DTYPES.items()}


def tensor_has_nonfinite(tensor: torch.Tensor) -> bool:
    """NaN or Inf in a host tensor of any stored float dtype, by its bits, chunk by chunk."""
    name = _NAMES.get(tensor.dtype)
    if name is None or name not in NONFINITE_MASK:
        return False
    flat = tensor.detach().cpu().reshape(-1)  # a view when the tensor is contiguous and on the host
    for start in range(0, flat.numel(), FINITE_CHUNK):
        if has_nonfinite(flat[start : start + FINITE_CHUNK].view(torch.uint8).numpy(), name):
            return True
    return False


#: per 16-bit dtype: the float32 bits below its last kept one, their pattern at a midpoint of its grid, and the
#: float32 bits (sign cleared) below which its grid is subnormal and no longer float32's bits (fp16 only)
_MIDPOINT = {torch.bfloat16: (0xFFFF, 0x8000, 0), torch.float16: (0x1FFF, 0x1000, 0x38800000)}
#: values rounded at a time: the temporaries take ~11 bytes per value of this, not of a whole tensor
ROUNDING_CHUNK = 1 << 20


def rounded(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`values` in `dtype`, rounded once to nearest, ties to even.

    torch converts a float64 to bf16 or fp16 through float32, rounding twice: a value just past a midpoint of
    the 16-bit grid lands on it in float32 and then goes to the even neighbour, the wrong one. Only values whose
    float32 lies on a midpoint (or in fp16's subnormal range) can go wrong; those are rounded to odd in float32
    (the float32 below them in magnitude, its last bit set where inexact), after which the second rounding is
    the correct one (float32 keeps more than two bits beyond bf16's and fp16's: Boldo and Melquiond, "When
    double rounding is odd", 2005).
    """
    if values.dtype != torch.float64 or dtype not in _MIDPOINT:
        return values.to(dtype)
    if values.numel() <= ROUNDING_CHUNK:
        return _rounded(values, dtype)
    out = torch.empty(values.shape, dtype=dtype, device=values.device)
    flat, into = values.reshape(-1), out.view(-1)
    for start in range(0, flat.numel(), ROUNDING_CHUNK):
        into[start : start + ROUNDING_CHUNK] = _rounded(flat[start : start + ROUNDING_CHUNK], dtype)
    return out


def _rounded(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    near = values.to(torch.float32)  # to nearest
    out = near.to(dtype)
    below, midpoint, subnormal = _MIDPOINT[dtype]
    bits = near.view(torch.int32)
    suspect = (bits & below) == midpoint
    if subnormal:
        suspect |= (bits & 0x7FFFFFFF) < subnormal
    where = suspect.nonzero(as_tuple=True)
    if where[0].numel():
        out[where] = _to_odd(values[where], near[where]).to(dtype)
    return out


def _to_odd(values: torch.Tensor, near: torch.Tensor) -> torch.Tensor:
    """float64 `values` rounded to odd in float32, from their float32 rounding to nearest `near`."""
    wide = near.to(torch.float64)
    bits = near.view(torch.int32)
    bits = torch.where(wide.abs() > values.abs(), bits - 1, bits)  # one step toward zero: sign-magnitude bits
    bits = torch.where((wide != values) & ~values.isnan(), bits | 1, bits)
    return bits.view(torch.float32)
