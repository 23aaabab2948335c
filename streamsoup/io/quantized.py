"""Quantized weights as float64: FP8 with block or per-channel scales, MXFP4 experts (gpt-oss).

Pure arithmetic on bytes already read (io/checkpoint.py reads them, bounded, block by block):
every value is exact in float64 (an FP8 or FP4 value times a float32 or power-of-two scale).
"""

from __future__ import annotations

import torch

#: FP8 E4M3 weights times their scales, block by block (DeepSeek's weight_scale_inv, FBGEMM's weight_scale)
FP8 = "fp8"
#: 4-bit E2M1 values, 32 to a power-of-two scale (OCP MX), two to a byte; gpt-oss stores [experts, out, in/32, 16]
MXFP4 = "mxfp4"
#: elements sharing one MXFP4 scale, and bytes holding them
MX_GROUP, MX_BYTES = 32, 16
#: the 16 values of an E2M1 nibble
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
#: an E8M0 scale byte s means 2 ** (s - MX_BIAS)
MX_BIAS = 127


def fp8_dequantized(
    q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], first: tuple[int, int] = (0, 0)
) -> torch.Tensor:
    """W = q * scale for rows/cols of q starting at `first` of the whole matrix; `scale` holds the scales of the
    blocks they touch (its first row and column are those of `first`'s block); `block` = (rows, cols) per scale."""
    (br, bc), (r0, c0) = block, first
    s = scale.to(torch.float64).reshape(scale.shape[0], -1)
    cols = (torch.arange(c0, c0 + q.shape[1]) // bc) - c0 // bc
    out = q.to(torch.float64)
    for i in range(s.shape[0]):  # one row of blocks at a time: no full-size copy of the scales
        lo, hi = max(0, (r0 // br + i) * br - r0), min(q.shape[0], (r0 // br + i + 1) * br - r0)
        if lo < hi:
            out[lo:hi].mul_(s[i, cols])
    return out


def mxfp4_dequantized(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """[rows, groups, 16] packed bytes and [rows, groups] scale bytes -> [rows, groups * 32] float64.

    The low nibble of a byte is the even element, the high nibble the odd one (transformers'
    convert_moe_packed_tensors reads gpt-oss's checkpoints so).
    """
    lut = torch.tensor(FP4_VALUES, dtype=torch.float64)
    rows, groups = scales.shape
    b = blocks.reshape(rows, groups, MX_BYTES).to(torch.int64)
    out = torch.empty(rows, groups, MX_BYTES, 2, dtype=torch.float64)
    out[..., 0] = lut[b & 0x0F]
    out[..., 1] = lut[b >> 4]
    exponent = scales.to(torch.int64) - MX_BIAS
    return torch.ldexp(out.reshape(rows, groups, MX_GROUP), exponent.unsqueeze(-1).to(torch.float64)).reshape(rows, -1)
