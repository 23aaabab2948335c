"""A fine-tuning update given as low-rank factors (a LoRA adapter): its exact SVD without the full matrix.

With dW = L @ R (L [m, r], R [r, n], the 2-D view of the stored tensor, scaling folded into L):
L = Q_l R_l, R^T = Q_r R_r, svd(R_l R_r^T) = U' S V'^T, so dW = (Q_l U') S (Q_r V')^T exactly.
The other min(m, n) - r singular values are exactly 0: the spectrum is padded with zeros, so
k, P_k, rho and the lambdas are those of the dense path (docs/DESIGN.md, "A fine-tune given as a LoRA
adapter"). The MonoSoup update is then dW' = U diag(lam_i s_i) V^T, again of rank r.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..io.checkpoint import TensorRef, matrix_shape, read_tensor
from .monosoup import Coefficients


@dataclass(frozen=True)
class LoraUpdate:
    """dW = scale * B @ A of one targeted matrix as peft defines it, in the stored tensor's layout.

    `transposed`: the stored weight is (B @ A)^T (fan_in_fan_out, e.g. GPT-2's Conv1D; embeddings).
    `magnitude`: DoRA's per-output-row magnitude: W1 = m / ||W0 + dW||_row * (W0 + dW), not low rank.
    `base_copy`: the base weights peft saved beside an embedding LoRA; they are the fine-tune's W0.
    """

    module: str
    a: TensorRef
    b: TensorRef
    scale: float
    transposed: bool = False
    magnitude: TensorRef | None = None
    base_copy: TensorRef | None = None

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def refs(self) -> tuple[TensorRef, ...]:
        return tuple(r for r in (self.a, self.b, self.magnitude, self.base_copy) if r is not None)


@dataclass(frozen=True)
class BiasUpdate:
    """peft's lora_bias: the fine-tune's bias is the base bias + scale * lora_B.bias."""

    bias: TensorRef
    scale: float


def factors(update: LoraUpdate, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, R) in float64 with dW = L @ R in the 2-D view [m, n] of a stored tensor of `shape`."""
    m, n = matrix_shape(shape)
    r = update.rank
    a = read_tensor(update.a).to(torch.float64).reshape(r, -1)
    b = read_tensor(update.b).to(torch.float64).reshape(-1, r)  # conv lora_B [out, r, 1, 1]
    left, right = (a.T, b.T) if update.transposed else (b, a)
    left = left * update.scale
    if tuple(left.shape) != (m, r) or tuple(right.shape) != (r, n):
        raise ValueError(f"factors {list(left.shape)} @ {list(right.shape)} do not make {m}x{n}")
    return left, right


def finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


@dataclass
class LowRankSVD:
    """dW = u diag(s) v^T with u [m, q], v [n, q], q = min(r, m, n), s descending (float64)."""

    u: torch.Tensor
    s: torch.Tensor
    v: torch.Tensor

    def padded(self, size: int) -> torch.Tensor:
        """The whole spectrum of the m x n update: s and its exact zeros."""
        out = torch.zeros(size, dtype=torch.float64)
        out[: self.s.numel()] = self.s
        return out


def lowrank_svd(left: torch.Tensor, right: torch.Tensor) -> LowRankSVD:
    """Exact thin SVD of left @ right from two QRs and the SVD of a small core (not square when the rank is
    above min(m, n), which peft allows: then only the thin SVD's factors fit)."""
    q_l, r_l = torch.linalg.qr(left)
    q_r, r_r = torch.linalg.qr(right.T)
    u_c, s, vh_c = torch.linalg.svd(r_l @ r_r.T, full_matrices=False)
    return LowRankSVD(q_l @ u_c, s, q_r @ vh_c.T)


def weights(svd: LowRankSVD, coef: Coefficients | None) -> torch.Tensor:
    """lam_i s_i per direction: lam_high for the top k, lam_low after; s itself when `coef` is None (dW as is)."""
    if coef is None:
        return svd.s.clone()
    lam = torch.full_like(svd.s, coef.lambda_low)
    lam[: coef.k] = coef.lambda_high
    return lam * svd.s


def reweighed_factors(svd: LowRankSVD, coef: Coefficients | None, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L', R') with dW' = L' @ R', each taking sqrt(lam s), padded with zero directions to `rank` columns."""
    root = weights(svd, coef).sqrt()
    m, n, q = svd.u.shape[0], svd.v.shape[0], svd.s.numel()
    left = torch.zeros(m, rank, dtype=torch.float64)
    right = torch.zeros(rank, n, dtype=torch.float64)
    left[:, :q] = svd.u * root
    right[:q] = (svd.v * root).T
    return left, right


def dora_rows(w: torch.Tensor, magnitude: torch.Tensor, transposed: bool) -> torch.Tensor:
    """DoRA's W1 from W = W0 + dW (float64, stored layout): each output row rescaled to its magnitude.

    peft takes the norm of every row of the [out, in] weight; a transposed (fan_in_fan_out) weight
    stores outputs as columns.
    """
    if transposed:
        return w * (magnitude / torch.linalg.vector_norm(w, dim=0))[None, :]
    return w * (magnitude / torch.linalg.vector_norm(w, dim=1))[:, None]


def materialize(update: LoraUpdate, w0: torch.Tensor) -> torch.Tensor:
    """The fine-tune's whole W1 in float64 (DoRA, or an embedding whose saved base differs from BASE)."""
    shape = tuple(w0.shape)
    left, right = factors(update, shape)
    base = read_tensor(update.base_copy) if update.base_copy is not None else w0
    w = base.to(torch.float64).reshape(left.shape[0], -1) + left @ right
    if update.magnitude is not None:
        w = dora_rows(w, read_tensor(update.magnitude).to(torch.float64).reshape(-1), update.transposed)
    return w.reshape(shape)


def rows_per_block(n: int, budget_elements: int = 4 * 2**20) -> int:
    """Rows of the stored view written at once: ~4M elements (32 MiB in float64)."""
    return max(1, budget_elements // max(n, 1))


def row_blocks(m: int, n: int) -> list[tuple[int, int]]:
    """(start, stop) row ranges of an m x n stored view, rows_per_block(n) rows each."""
    step = rows_per_block(n)
    return [(row, min(row + step, m)) for row in range(0, m, step)]


def factor_bytes(update: LoraUpdate, shape: tuple[int, ...]) -> int:
    """float64 bytes of the factors and their SVD (what a low-rank task holds besides its block)."""
    m, n = matrix_shape(shape)
    return 8 * update.rank * (m + n) * 4 + 8 * update.rank**2 * 4
