"""Non-contiguous views (a transposed weight, a slice of a fused q/k/v storage) read with bounded preads.

torch.save keeps a view as its whole storage plus (offset, shape, stride). Reading the view's
elements must not mean reading the storage: the view is cut, along its largest stride, into
pieces whose byte span is at most GATHER_SPAN and mostly the view's own bytes; each piece is
read once and scattered into the result. Memory is the result plus one piece, whatever the
storage's size. Strides here are in elements, offsets in bytes.
"""

from __future__ import annotations

import math

import numpy as np

from . import rawio

#: the most bytes one piece's read may cover
GATHER_SPAN = 4 * 1024 * 1024
#: a piece is read whole only when at least this fraction of its span is bytes it needs
DENSITY = 0.5


def span_bytes(shape: tuple[int, ...], strides: tuple[int, ...], item: int) -> int:
    """Bytes from a view's first element to the end of its last (0 for an empty view)."""
    if math.prod(shape) == 0:
        return 0
    return item * (1 + sum((d - 1) * s for d, s in zip(shape, strides, strict=True)))


def collapsed(shape: tuple[int, ...], strides: tuple[int, ...]) -> list[tuple[int, int]]:
    """(size, stride) pairs, size-1 dims dropped and dims that run on in memory merged; row-major order is kept."""
    dims: list[tuple[int, int]] = []
    for size, stride in zip(shape, strides, strict=True):
        if size == 1:
            continue
        if dims and dims[-1][1] == stride * size:
            dims[-1] = (dims[-1][0] * size, stride)
        else:
            dims.append((size, stride))
    return dims


def read_rows(
    fd: int, offset: int, shape: tuple[int, ...], strides: tuple[int, ...], item: int, start: int, stop: int
) -> np.ndarray:
    """Rows start:stop (along dim 0) of a view, row-major, as a (stop - start, row bytes) uint8 array."""
    sub = (stop - start, *shape[1:])
    out = np.empty((*sub, item), dtype=np.uint8)
    fill(fd, offset + start * strides[0] * item, out, strides, item)
    return out.reshape(stop - start, -1)


def read_columns(
    fd: int, offset: int, shape: tuple[int, ...], strides: tuple[int, ...], item: int, start: int, stop: int
) -> np.ndarray:
    """Columns start:stop of the view's [shape[0], rest] matrix, each as one row: (stop - start, m * item) bytes.

    The trailing dims are walked in runs along their innermost (collapsed) dim, each run one strided piece.
    """
    m = shape[0]
    trail = collapsed(shape[1:], strides[1:]) or [(1, 0)]
    sizes = [d for d, _ in trail]
    out = np.empty((stop - start, m, item), dtype=np.uint8)
    col = start
    while col < stop:
        index = np.unravel_index(col, sizes)
        run = min(stop - col, sizes[-1] - int(index[-1]))
        first = offset + item * sum(int(i) * s for i, (_, s) in zip(index, trail, strict=True))
        fill(fd, first, out[col - start : col - start + run], (trail[-1][1], strides[0]), item)
        col += run
    return out.reshape(stop - start, -1)


def fill(fd: int, offset: int, out: np.ndarray, strides: tuple[int, ...], item: int) -> None:
    """Fill `out` (shape: the view's, then `item` bytes; any numpy view) with the view's bytes."""
    if out.size:
        _fill(fd, offset, out, (*(s * item for s in strides), 1))


def _fill(fd: int, offset: int, out: np.ndarray, strides: tuple[int, ...]) -> None:
    span = 1 + sum((d - 1) * s for d, s in zip(out.shape, strides, strict=True))
    if span == out.size and out.flags.c_contiguous and len(collapsed(out.shape, strides)) <= 1:
        rawio.pread_into(fd, memoryview(out.reshape(-1)), offset)  # one run of bytes, read in place
        return
    if span <= GATHER_SPAN and out.size >= DENSITY * span:
        raw = rawio.read_bytes(fd, offset, span)
        out[...] = np.lib.stride_tricks.as_strided(raw, out.shape, strides, writeable=False)
        return
    axis = max((k for k in range(out.ndim) if out.shape[k] > 1), key=lambda k: strides[k])
    rest = span - (out.shape[axis] - 1) * strides[axis]  # the span of one index along `axis`
    step = 1 if span <= GATHER_SPAN or rest >= GATHER_SPAN else (GATHER_SPAN - rest) // strides[axis] + 1
    for first in range(0, out.shape[axis], step):
        index = (slice(None),) * axis + (slice(first, min(first + step, out.shape[axis])),)
        _fill(fd, offset + first * strides[axis], out[index], strides)
