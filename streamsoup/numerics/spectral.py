"""Exact spectra of a weight update, computed block by block in float64 on any torch device.

Every path works on the *tall* orientation X of the update (X = dW, or dW^T when
dW is wide), so the small side has c = X.shape[1] columns and

    s^2 = eig(X^T X)            dW_high = X V_k V_k^T = X - X V_c V_c^T

(V_c: the trailing directions, used when that is the cheaper side). The Gram matrix
is a sum over row blocks (docs/DESIGN.md, "The math"), so X never exists whole in float64:
its blocks come from tensors in memory or straight from disk. Only its upper triangle
is the matrix (on the host, ~half the flops of a full GEMM: `gram_update`).

Paths:  gram  float64 Gram + eigh (exact, the default)
        svd   float64 full SVD of X (the reference; needs the whole update in memory)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..io.checkpoint import TensorRef, matrix_shape, read_block
from .hostlinalg import HostEigen, matmul, syrk_update

#: elements of one float64 micro block (see micro_rows)
BLOCK_ELEMENTS = 512 * 1024
#: fewer rows per Gram update than this and the c x c update is memory-bound
MIN_MICRO_ROWS = 256


def micro_rows(cols: int) -> int:
    """Rows per float64 step. A function of the shape alone, so every budget, read-block size and
    resume point sums in the same order and gives the same bits."""
    return max(MIN_MICRO_ROWS, BLOCK_ELEMENTS // max(cols, 1))


class RowSource:
    """Row blocks of X as float64 (W0 block, dW block) pairs on `device`.

    Two levels: *read blocks* (what is fetched at once; a multiple of the micro block) and
    *micro blocks* (what each float64 operation sees; fixed by the shape).
    """

    rows: int
    cols: int
    transposed: bool
    block_rows: int
    device: torch.device

    @property
    def micro(self) -> int:
        return micro_rows(self.cols)

    def read_blocks(self, first_row: int = 0) -> Iterator[slice]:
        """Read blocks from `first_row` on. Progress is kept in rows, not block numbers: the block
        size follows the budget, which may differ between a run and its resume."""
        for start in range(first_row, self.rows, self.block_rows):
            yield slice(start, min(start + self.block_rows, self.rows))

    def micro_blocks(self, rows: slice) -> Iterator[slice]:
        for start in range(rows.start, rows.stop, self.micro):
            yield slice(start, min(start + self.micro, rows.stop))

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.rows / self.block_rows)

    def load(self, rows: slice) -> None:
        """Fetch a read block (a no-op for tensors in memory)."""

    def native(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    _workspace: dict[str, torch.Tensor] | None = None

    def buffer(self, name: str, rows: int, cols: int | None = None) -> torch.Tensor:
        """A float64 [rows, cols] view of one micro block's scratch buffer `name`, reused by every micro block.

        Allocating the float64 temporaries of each micro block afresh costs a page-faulted mmap each
        (big buffers are kept out of glibc's arenas so RSS follows the working set: numerics/hostmemory.py),
        a large share of the compute at GEMM rate (docs/benchmarks.md, "Behind the code"). A buffer is valid
        until the next call that asks for the same name.
        """
        if self._workspace is None:
            self._workspace = {}
        flat = self._workspace.get(name)
        if flat is None:
            flat = self._workspace[name] = torch.empty(self.micro * self.cols, dtype=torch.float64, device=self.device)
        return flat[: rows * (cols or self.cols)].view(rows, cols or self.cols)

    def read(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact float64 W0 and W1 - W0 of rows inside the loaded block (never subtracted in bf16).

        Both live in this source's workspace: use them before the next `read`.
        """
        w0n, w1n = self.native(rows)
        n = rows.stop - rows.start
        w0, dw = self.buffer("w0", n), self.buffer("dw", n)
        w0.copy_(w0n, non_blocking=True)  # widening to float64 is exact, like .to(float64)
        dw.copy_(w1n, non_blocking=True)
        dw.sub_(w0)
        return w0, dw


class MemoryRows(RowSource):
    """W0 and W1 held whole in host memory, seen as tall matrices."""

    def __init__(self, w0: torch.Tensor, w1: torch.Tensor, device: str | torch.device = "cpu") -> None:
        self.shape = tuple(w1.shape)  # the tensor's own shape (a conv kernel stays 4-D)
        m, n = matrix_shape(self.shape)
        w0, w1 = w0.reshape(m, n), w1.reshape(m, n)
        self.transposed = n > m
        self.w0 = w0.T if self.transposed else w0
        self.w1 = w1.T if self.transposed else w1
        self.rows, self.cols = self.w1.shape
        self.block_rows = self.micro
        self.device = torch.device(device)

    def native(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        return self.w0[rows], self.w1[rows]

    def tall_view(self, out: torch.Tensor) -> torch.Tensor:
        """`out` (the original shape) seen in the same orientation as X."""
        m, n = matrix_shape(tuple(out.shape))
        out2d = out.reshape(m, n)
        return out2d.T if self.transposed else out2d


class DiskRows(RowSource):
    """W0 and W1 streamed from their files one read block at a time (tensors bigger than the budget)."""

    def __init__(
        self, base: TensorRef, finetuned: TensorRef, block_rows: int, device: str | torch.device = "cpu", watch=None
    ):
        self.watch = watch  # a tasks.Stopwatch: reads are timed as their own phase
        m, n = matrix_shape(finetuned.shape)
        self.base, self.finetuned = base, finetuned
        self.transposed = n > m
        self.rows, self.cols = (n, m) if self.transposed else (m, n)
        self.block_rows = min(max(self.micro, block_rows // self.micro * self.micro), self.rows)
        self.device = torch.device(device)
        self._loaded: tuple[slice, torch.Tensor, torch.Tensor] | None = None

    def load(self, rows: slice) -> None:
        self._loaded = None  # drop the previous block before reading the next: one block in memory, not two
        with self.watch("read") if self.watch is not None else contextlib.nullcontext():
            self._loaded = (
                rows,
                read_block(self.base, rows.start, rows.stop, self.transposed),
                read_block(self.finetuned, rows.start, rows.stop, self.transposed),
            )

    def release(self) -> None:
        self._loaded = None

    def native(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        block, w0, w1 = self._loaded
        part = slice(rows.start - block.start, rows.stop - block.start)
        return w0[part], w1[part]


def gram_update(gram: torch.Tensor, x: torch.Tensor) -> None:
    """gram += X^T X on its upper triangle (what is below the diagonal is not kept).

    On the host a symmetric rank-k update (`hostlinalg.syrk_update`: half a GEMM's flops; torch has
    no syrk). On a GPU the full GEMM stays (not measured there yet: docs/benchmarks-gpu.md).
    """
    if gram.device.type == "cpu":
        syrk_update(gram, x)
    else:
        gram.addmm_(x.T, x)


def gram_flops(rows: int, c: int, device: str) -> int:
    """Flops of a Gram of `rows` x `c` as `gram_update` computes it."""
    return rows * c * (c + 1) if torch.device(device).type == "cpu" else 2 * rows * c * c


@dataclass
class GramSums:
    """What one pass over the row blocks accumulates; resumable from `next_row` (a micro-block boundary)."""

    gram: torch.Tensor | None
    dw_sq: float = 0.0
    w0_sq: float = 0.0
    next_row: int = 0


def accumulate(
    src: RowSource,
    with_gram: bool,
    sums: GramSums | None = None,
    on_block: Callable[[GramSums], None] | None = None,
) -> GramSums:
    """One pass: squared norms, and the Gram X^T X (its upper triangle) if asked; continues `sums` where it stopped."""
    if sums is None:
        gram = torch.zeros(src.cols, src.cols, dtype=torch.float64, device=src.device) if with_gram else None
        sums = GramSums(gram)
    for block in src.read_blocks(sums.next_row):
        src.load(block)
        for rows in src.micro_blocks(block):
            w0, x = src.read(rows)
            dw_sq = float(torch.dot(x.view(-1), x.view(-1)))  # sums of squares without a temporary
            sums.dw_sq += dw_sq
            sums.w0_sq += float(torch.dot(w0.view(-1), w0.view(-1)))
            if sums.gram is not None and dw_sq != 0.0:  # an unchanged block (a frozen part) adds nothing
                gram_update(sums.gram, x)
        sums.next_row = block.stop
        if on_block is not None:
            on_block(sums)
    return sums


@dataclass
class Spectrum:
    """Descending singular values and the matching right singular vectors of X (columns of `basis`)."""

    s: torch.Tensor  # float64 [r], on the host
    basis: torch.Tensor  # float64 [cols, r] on the compute device; or only the columns `kept`
    path: str
    kept: str = "all"  # "all" (the SVD's), or "top" / "complement": only those columns of V are in `basis`

    @staticmethod
    def side(k: int, r: int) -> str:
        """Which side of the split needs vectors: the top-k, or its complement when that is smaller."""
        return "top" if k <= r - k else "complement"

    def high_part(self, x: torch.Tensor, k: int, src: RowSource | None = None) -> torch.Tensor:
        """X_block V_k V_k^T, through whichever of the top-k or its complement is smaller: the basis must
        hold that side's columns (`keep_needed(k)`).

        With `src`, the result and the intermediate X V live in its workspace (no allocation).
        """
        r = self.s.numel()
        n = x.shape[0]
        out = src.buffer("high", n) if src is not None else torch.empty_like(x)
        if k >= r:
            return out.copy_(x)
        side, v = self.side(k, r), self.basis
        if self.kept != side:
            raise ValueError(f"the basis holds the {self.kept!r} columns, the split at k={k} needs {side!r}")
        xv = src.buffer("xv", n, v.shape[1]) if src is not None else None
        if xv is None:
            xv = torch.empty(n, v.shape[1], dtype=x.dtype, device=x.device)
        matmul(x, v, xv)
        matmul(xv, v, out, transpose_b=True)
        return out if side == "top" else out.neg_().add_(x)  # x - X V V^T, the same rounding

    def keep_needed(self, k: int) -> Spectrum:
        """Only the columns the split needs (what a streamed tensor saves for its resume)."""
        side = self.side(k, self.s.numel())
        cols = self.basis[:, :k] if side == "top" else self.basis[:, k:]
        return Spectrum(self.s, cols.contiguous(), self.path, side)


class GramEigen:
    """The Gram's eigenvalues as descending singular values `s`; eigenvectors only once k is known.

    On the host the back-transformation of the eigenvectors is most of an eigensolve's cost past the
    tridiagonal reduction, so it is done for the side of the split that needs it (`keep_needed`).
    On a GPU, cuSOLVER's eigh gives all of them at once.
    """

    def __init__(self, gram: torch.Tensor) -> None:
        if gram.device.type == "cpu":
            self._host = HostEigen(gram)
            evals = self._host.evals
        else:
            self._host = None
            evals, self._evecs = torch.linalg.eigh(gram, UPLO="U")  # the Gram's convention: upper triangle
        self.r = evals.numel()
        self.s = evals.flip(0).where(evals.flip(0) > noise_floor(evals), 0.0).sqrt().cpu()

    def keep_needed(self, k: int) -> Spectrum:
        """The Spectrum with only the eigenvectors the split at k needs, in descending order of s."""
        side, r = Spectrum.side(k, self.r), self.r
        lo, hi = (r - k, r) if side == "top" else (0, r - min(k, r))  # ascending indices of that side
        if self._host is not None:
            cols = self._host.vectors(lo, hi)
        else:
            cols = self._evecs[:, lo:hi]
        return Spectrum(self.s, cols.flip(1).contiguous(), "gram", side)


def noise_floor(evals: torch.Tensor) -> float:
    """The Gram's eigenvalues at or below this are rounding, not directions: forming X^T X and solving it in
    float64 leaves each eigenvalue off by about c * eps * the largest. An update of exact rank k (rows a
    fine-tune never touched) then has a tail of exact zeros, as its SVD has, so P_k = 1 and lambda_low = 0
    instead of ~1e-8 from sqrt(1 - P_k) of noise. Relative to the largest: the same for c * dW, any c > 0."""
    if evals.numel() == 0:
        return 0.0
    return float(evals.max()) * evals.numel() * torch.finfo(torch.float64).eps


def eigh_spectrum(gram: torch.Tensor) -> GramEigen:
    """s^2 = eig(X^T X) in float64, from the Gram's upper triangle; on the host the Gram is consumed."""
    return GramEigen(gram)


def svd_spectrum(src: MemoryRows) -> Spectrum:
    """Reference path: one float64 SVD of the whole update (gesvd on CUDA: gesvdj fails on big inputs)."""
    x = torch.cat([src.read(rows)[1].clone() for block in src.read_blocks() for rows in src.micro_blocks(block)])
    driver = "gesvd" if x.is_cuda else None
    _, s, vh = torch.linalg.svd(x, full_matrices=False, driver=driver)
    return Spectrum(s.cpu(), vh.T.contiguous(), "svd")
