"""The safetensors dtype table: names, item sizes and the torch dtypes we can compute with."""

from __future__ import annotations

import torch

from .errors import InputError

#: safetensors dtype name -> item size in bytes (every dtype the format defines that we can copy).
ITEM_SIZE: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip

#: dtypes MonoSoup edits; every other dtype is copied byte for byte.
FLOAT_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}

TORCH_TO_NAME: dict[torch.dtype, str] = {v: k for k, v in FLOAT_DTYPES.items()}


def item_size(dtype: str, where: str) -> int:
    try:
        return ITEM_SIZE[dtype]
    except KeyError:
        raise InputError(f"{where}: unknown safetensors dtype {dtype!r}") from None


def torch_dtype(dtype: str) -> torch.dtype:
    return FLOAT_DTYPES[dtype]


def is_float(dtype: str) -> bool:
    return dtype in FLOAT_DTYPES
