"""An independent float64 MonoSoup, written from the paper's equations with numpy's SVD.

Shares no code with streamsoup: the package uses Gram eigendecompositions in torch,
this uses LAPACK's SVD through numpy, so agreement means the math is right.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Expected:
    edited: bool
    values: np.ndarray | None  # float64, original shape (None when copied)
    k: int | None = None
    rank: int | None = None
    lambda_high: float | None = None
    dw_norm: float = 0.0


def to_f64(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float64).numpy()


def svd_of(dw: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    """The singular values of dW and the singular vectors of its small side ("right": V^T's rows; "left": U's
    columns), from an SVD of the R of a QR of its long side: dW = QR shares R's singular values and right vectors
    (LAPACK's own first step for a tall matrix; numpy's SVD of a wide one is several times slower than this)."""
    m, n = dw.shape
    if m >= n:
        _, s, vt = np.linalg.svd(np.linalg.qr(dw, mode="r"))
        return s, vt, "right"
    u, s, _ = np.linalg.svd(np.linalg.qr(dw.T, mode="r").T)  # dW = R^T Q^T: dW's left vectors are R^T's
    return s, u, "left"


def monosoup_reference(
    w0: torch.Tensor, w1: torch.Tensor, rule: str = "entropy", energy: float = 0.8, min_rel_update: float = 1e-6
) -> Expected:
    shape = tuple(w1.shape)
    if tuple(w0.shape) != shape or len(shape) < 2 or w1.numel() == 0:
        return Expected(False, None)
    if not (w0.is_floating_point() and w1.is_floating_point()):
        return Expected(False, None)
    a0 = to_f64(w0).reshape(shape[0], -1)
    dw = to_f64(w1).reshape(shape[0], -1) - a0
    dnorm, n0 = np.linalg.norm(dw), np.linalg.norm(a0)
    # the package's edit threshold (relative; any update of an all-zero W0); the paper's formulas have no epsilon
    if dnorm == 0 or (n0 > 0 and dnorm / n0 < min_rel_update):
        return Expected(False, None, dw_norm=dnorm)
    s, vectors, side = svd_of(dw)
    r = len(s)
    if rule == "entropy":
        p = s / s.sum()
        h = -np.sum(p[p > 0] * np.log(p[p > 0]))  # 0 log 0 = 0
        k = min(max(math.ceil(math.exp(h)), 1), r)
    else:
        cum = np.cumsum(s**2) / np.sum(s**2)
        k = min(int(np.argmax(cum >= energy)) + 1, r)
    rest = np.sum(s[k:] ** 2) / np.sum(s**2)  # 1 - P_k, evaluated without cancelling two numbers near 1
    rho = 0.0 if k == r else (s[k] / s[0]) ** 2
    lam_low = rho + (1 - rho) * math.sqrt(min(max(rest, 0.0), 1.0))
    lam_high = min(max(1 - lam_low, 0.0), 1.0)
    lam_low = min(max(lam_low, 0.0), 1.0)
    v = vectors[:, :k] if side == "left" else vectors[:k].T  # the top-k singular vectors of the small side
    high = v @ (v.T @ dw) if side == "left" else (dw @ v) @ v.T  # U_k S_k V_k^T = U_k U_k^T dW = dW V_k V_k^T
    w = a0 + lam_high * high + lam_low * (dw - high)
    return Expected(True, w.reshape(shape), k=k, rank=r, lambda_high=lam_high, dw_norm=dnorm)


def ordered_bits(t: torch.Tensor) -> torch.Tensor:
    """Map 16-bit floats to integers whose difference counts ulps (sign-magnitude -> ordered)."""
    bits = t.view(torch.int16).to(torch.int32)
    return torch.where(bits < 0, -32768 - bits, bits)


def assert_within_rounding(out: torch.Tensor, expected: Expected, name: str) -> None:
    """bf16/fp16: within 1 ulp of the float64 result rounded; fp32/fp64: within 3e-5 of ||dW||."""
    ref = torch.from_numpy(expected.values)
    if out.dtype in (torch.bfloat16, torch.float16):
        ulps = (ordered_bits(out) - ordered_bits(ref.to(out.dtype))).abs().max().item()
        assert ulps <= 1, f"{name}: {ulps} ulps from the float64 reference"
    else:
        tol = 3e-5 if out.dtype == torch.float32 else 1e-10
        err = float(np.linalg.norm(to_f64(out) - expected.values))
        assert err <= tol * expected.dw_norm, f"{name}: error {err:.3g} vs ||dW|| {expected.dw_norm:.3g}"
