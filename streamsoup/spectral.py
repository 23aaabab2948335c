"""Exact spectra of a weight update, computed block by block in float64.

Every path works on the *tall* orientation X of the update (X = dW, or dW^T when
dW is wide), so the small side has r = X.shape[1] columns and

    s^2 = eig(X^T X)            dW_high = X V_k V_k^T = X - X V_c V_c^T

(V_c: the r - k trailing directions, used when that is the cheaper side).
The Gram matrix is a sum over row blocks, so X is never materialised in float64.

Paths:  gram  float64 Gram + eigh (exact, the default)
        svd   float64 full SVD of X (the reference; slow and memory-hungry)
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

#: float64 elements per row block (64 MiB): bounds the transient working set
BLOCK_ELEMENTS = 8 * 1024 * 1024
PATHS = ("gram", "svd")


class UpdatePair:
    """W0 and W1 of one tensor seen as tall matrices, yielding float64 row blocks of X = W1 - W0."""

    def __init__(self, w0: torch.Tensor, w1: torch.Tensor) -> None:
        m = w1.shape[0]
        n = w1.numel() // m
        w0, w1 = w0.reshape(m, n), w1.reshape(m, n)
        self.transposed = n > m
        self.w0 = w0.T if self.transposed else w0
        self.w1 = w1.T if self.transposed else w1
        self.rows, self.cols = self.w1.shape
        self.block_rows = max(1, BLOCK_ELEMENTS // self.cols)

    def blocks(self) -> Iterator[slice]:
        for start in range(0, self.rows, self.block_rows):
            yield slice(start, min(start + self.block_rows, self.rows))

    def delta(self, rows: slice) -> torch.Tensor:
        """Exact float64 difference of the stored values (never subtracted in bf16/fp16)."""
        return self.w1[rows].to(torch.float64) - self.w0[rows].to(torch.float64)

    def base(self, rows: slice) -> torch.Tensor:
        return self.w0[rows].to(torch.float64)

    def norms(self) -> tuple[float, float]:
        """||dW||_F and ||W0||_F in float64; NaN or Inf in either input is a FloatingPointError."""
        dw_sq = w0_sq = 0.0
        for rows in self.blocks():
            dw_sq += float(self.delta(rows).square().sum())
            w0_sq += float(self.base(rows).square().sum())
        if not (math.isfinite(dw_sq) and math.isfinite(w0_sq)):
            raise FloatingPointError("NaN or Inf in the base or fine-tuned values")
        return math.sqrt(dw_sq), math.sqrt(w0_sq)

    def tall_view(self, out: torch.Tensor) -> torch.Tensor:
        """`out` (the original shape) seen in the same orientation as X."""
        out2d = out.reshape(self.w1.T.shape if self.transposed else self.w1.shape)
        return out2d.T if self.transposed else out2d


@dataclass
class Spectrum:
    """Descending singular values and the matching right singular vectors of X (columns of `basis`)."""

    s: torch.Tensor  # float64 [r]
    basis: torch.Tensor  # float64 [cols, r]
    path: str

    @property
    def energy(self) -> float:
        return float(self.s.square().sum())

    def high_part(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """X_block V_k V_k^T, through whichever of the top-k or its complement is smaller."""
        r = self.s.numel()
        if k >= r:
            return x.clone()
        if k <= r - k:
            v = self.basis[:, :k]
            return (x @ v) @ v.T
        v = self.basis[:, k:]
        return x - (x @ v) @ v.T


def gram_spectrum(pair: UpdatePair) -> Spectrum:
    """s^2 = eig(X^T X), the Gram accumulated over row blocks in float64."""
    gram = torch.zeros(pair.cols, pair.cols, dtype=torch.float64)
    for rows in pair.blocks():
        x = pair.delta(rows)
        gram.addmm_(x.T, x)
    evals, evecs = torch.linalg.eigh(gram)
    del gram
    s = evals.flip(0).clamp_min(0.0).sqrt()
    return Spectrum(s, evecs.flip(1), "gram")


def svd_spectrum(pair: UpdatePair) -> Spectrum:
    """Reference path: one float64 SVD of the whole update."""
    x = torch.cat([pair.delta(rows) for rows in pair.blocks()])
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    return Spectrum(s, vh.T.contiguous(), "svd")


def compute_spectrum(pair: UpdatePair, path: str) -> Spectrum:
    if path in ("gram", "auto"):
        return gram_spectrum(pair)
    if path == "svd":
        return svd_spectrum(pair)
    raise ValueError(f"unknown spectral path {path!r}")
