"""Preallocated output shards written in place, then published atomically.

Shards are created from their precomputed headers at full size (sparse), each
tensor is pwritten at its fixed offset, and the folder is renamed to OUT only
once every byte is durable.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from ..errors import AS_IS, RunError, nonfinite
from . import rawio
from .checkpoint import TensorRef, read_raw_block
from .dtypes import has_nonfinite, tensor_has_nonfinite
from .layout import Placement, ShardLayout
from .runlock import Fence


def partial_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def preallocate(layout: ShardLayout, folder: Path) -> None:
    """Create every shard with its final header and size; an existing correct one is kept."""
    folder.mkdir(parents=True, exist_ok=True)
    for shard in layout.shards:
        path = folder / shard.file
        if path.exists() and path.stat().st_size == shard.size:
            with open(path, "rb") as f:
                if f.read(len(shard.header)) == shard.header:
                    continue
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            rawio.pwrite_all(fd, memoryview(shard.header), 0)
            rawio.reserve(fd, shard.size)
            os.ftruncate(fd, shard.size)
            os.fsync(fd)
        finally:
            os.close(fd)
    rawio.fsync_dir(folder)


class OutputFiles:
    """OUT.partial's shard files as one task writes them.

    Each slot is made durable as it is written; a task of many small tensors (`together`) keeps every shard
    file it writes open instead, and `sync` makes them durable with one fdatasync per file, not per tensor,
    which is most of the cost of a small tensor. Used as a context manager: synced on success, closed always.
    """

    def __init__(self, folder: Path, together: bool = False, fence: Fence | None = None) -> None:
        self.folder = folder
        self.together = together
        self.fence = fence
        self._held: dict[str, int] = {}

    def still_ours(self) -> None:
        """Checked before each write (a block, a chunk): the task's attempt still holds OUT.partial (runlock.Fence)."""
        if self.fence is not None:
            self.fence.check()

    def open(self, placement: Placement) -> int:
        """The slot's file, to write it (the fence checked first)."""
        self.still_ours()
        path = str(self.folder / placement.file)
        if not self.together:
            return os.open(path, os.O_WRONLY)
        if path not in self._held:
            self._held[path] = os.open(path, os.O_WRONLY)
        return self._held[path]

    def done(self, fd: int, sync: bool = True) -> None:
        """A slot is written: make its bytes durable and let go of its file, or leave both to `sync`."""
        if self.together:
            return
        try:
            if sync:
                os.fdatasync(fd)
        finally:
            os.close(fd)

    def sync(self) -> None:
        for fd in self._held.values():
            os.fdatasync(fd)

    def close(self) -> None:
        held, self._held = self._held, {}
        for fd in held.values():
            os.close(fd)

    def __enter__(self) -> OutputFiles:
        return self

    def __exit__(self, kind: object, *rest: object) -> None:
        try:
            if kind is None:
                self.sync()
        finally:
            self.close()


def write_tensor(files: OutputFiles, placement: Placement, tensor: torch.Tensor, finite: bool = True) -> int:
    """Write a tensor's bytes at its placement and make them durable; returns their crc32c.

    `finite`: refuse NaN/Inf (NonFiniteOutput); False only for a copy --allow-nonfinite lets through.
    """
    return write_blocks(files, placement, [tensor], finite)


def write_blocks(files: OutputFiles, placement: Placement, blocks: Iterable[torch.Tensor], finite: bool = True) -> int:
    """Consecutive blocks filling a placement, made durable at the end; returns the slot's crc32c. A failure
    while the blocks are made or written lets go of the slot's file (its bytes are never committed)."""
    slot = SlotWriter(files, placement, finite)
    try:
        for block in blocks:
            slot.write(block)
    except BaseException:
        slot.abort()
        raise
    return slot.close()  # it lets go of the file itself when the slot is not full


def copy_tensor(source: TensorRef, files: OutputFiles, placement: Placement, check_finite: bool = True) -> int:
    """Byte-for-byte copy of a tensor of the fine-tune into its output slot; returns its crc32c.

    NaN/Inf are looked for in each chunk on its way through (no second read of the tensor).
    """

    def finite(chunk: memoryview) -> None:
        if has_nonfinite(chunk, source.dtype):
            raise nonfinite(source.path, f"tensor {source.name!r} contains", AS_IS)

    def each(chunk: memoryview) -> None:
        files.still_ours()
        if check_finite:
            finite(chunk)

    if source.stride is not None:
        return _copy_view(source, files, placement, each)
    src = os.open(source.path, os.O_RDONLY)
    try:
        dst = files.open(placement)
        ok = False
        try:
            crc = rawio.copy_range(src, source.offset, dst, placement.offset, source.nbytes, each)
            ok = True
        finally:
            files.done(dst, ok)
    finally:
        os.close(src)
    return crc


def _copy_view(
    source: TensorRef, files: OutputFiles, placement: Placement, inspect: Callable[[memoryview], None]
) -> int:
    """A non-contiguous view copied in row blocks of about one IO chunk, row-major as safetensors stores it."""
    row_bytes = max(source.nbytes // max(source.shape[0], 1), 1)
    step = max(1, rawio.IO_CHUNK // row_bytes)
    dst = files.open(placement)
    ok = False
    try:
        crc, written = 0, 0
        for start in range(0, source.shape[0], step):
            part = memoryview(read_raw_block(source, start, min(start + step, source.shape[0])).reshape(-1))
            inspect(part)
            rawio.pwrite_all(dst, part, placement.offset + written)
            crc = rawio.crc_of(part, crc)
            written += len(part)
        ok = True
    finally:
        files.done(dst, ok)
    return crc


def slot_crc(folder: Path, placement: Placement) -> int:
    """crc32c of what is stored in a tensor's slot now (to detect torn or lost writes)."""
    fd = os.open(folder / placement.file, os.O_RDONLY)
    try:
        return rawio.crc_range(fd, placement.offset, placement.nbytes)
    finally:
        os.close(fd)


def write_json(path: Path, data: object) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def write_text(path: Path, text: str) -> None:
    """Write-then-rename with fsync, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def publish(partial: Path, out: Path) -> bool:
    """Make OUT appear, complete, in one atomic rename that never replaces anything (False: OUT exists)."""
    for path in partial.rglob("*"):
        if path.is_dir() and not path.is_symlink():
            rawio.fsync_dir(path)
    rawio.fsync_dir(partial)
    if not rawio.rename_noreplace(partial, out):
        return False
    rawio.fsync_dir(out.parent)
    return True


def write_block(
    files: OutputFiles, placement: Placement, shape: tuple[int, int], start: int, block: torch.Tensor, transposed: bool
) -> int:
    """Write rows start:.. of the 2-D output (or, transposed, those columns) into the slot, durably.

    Returns the crc32c of the bytes written, in file order (what `block_crc` reads back).
    """
    check_finite(block)
    m, n = shape
    item = placement.nbytes // max(m * n, 1)
    fd = files.open(placement)
    ok = False
    try:
        if not transposed:
            data = memoryview(block.contiguous().view(-1).view(torch.uint8).numpy())
            rawio.pwrite_all(fd, data, placement.offset + start * n * item)
            crc = rawio.crc_of(data)
        else:
            rows = block.T.contiguous().view(torch.uint8).numpy()  # [m, width * item]
            crc = 0
            for row in range(m):
                rawio.pwrite_all(fd, memoryview(rows[row]), placement.offset + (row * n + start) * item)
                crc = rawio.crc_of(memoryview(rows[row]), crc)
        ok = True
    finally:
        files.done(fd, ok)
    return crc


def block_crc(
    folder: Path, placement: Placement, shape: tuple[int, int], start: int, stop: int, transposed: bool
) -> int:
    """crc32c of what the slot holds now for rows start:stop (or, transposed, those columns), as `write_block`."""
    m, n = shape
    item = placement.nbytes // max(m * n, 1)
    fd = os.open(folder / placement.file, os.O_RDONLY)
    try:
        if not transposed:
            return rawio.crc_range(fd, placement.offset + start * n * item, (stop - start) * n * item)
        crc, width = 0, (stop - start) * item
        for row in range(m):
            crc = rawio.crc_of(memoryview(os.pread(fd, width, placement.offset + (row * n + start) * item)), crc)
        return crc
    finally:
        os.close(fd)


class NonFiniteOutput(RunError):
    """A tensor about to be written holds NaN or Inf (the task names the tensor and the cause)."""


def check_finite(tensor: torch.Tensor) -> None:
    """No output tensor may hold NaN/Inf, except a copy that --allow-nonfinite lets through unchecked."""
    if tensor_has_nonfinite(tensor):
        raise NonFiniteOutput("the values to write contain NaN or Inf")


class SlotWriter:
    """Consecutive row blocks of one tensor written into its slot, made durable once at the end.

    Blocks must come in order: the crc32c of the whole slot is chained on the way (no re-read).
    """

    def __init__(self, files: OutputFiles, placement: Placement, finite: bool = True) -> None:
        self.files = files
        self.placement = placement
        self.finite = finite
        self.written = 0
        self.crc = 0
        self.fd = files.open(placement)

    def write(self, block: torch.Tensor) -> None:
        self.files.still_ours()
        if self.finite:
            check_finite(block)
        data = memoryview(block.contiguous().view(-1).view(torch.uint8).numpy())
        if self.written + len(data) > self.placement.nbytes:
            raise AssertionError("block overflows its tensor's slot")
        rawio.pwrite_all(self.fd, data, self.placement.offset + self.written)
        self.crc = rawio.crc_of(data, self.crc)
        self.written += len(data)

    def close(self) -> int:
        """fdatasync and close; returns the slot's crc32c (every byte must have been written)."""
        try:
            if self.written != self.placement.nbytes:
                raise AssertionError(f"wrote {self.written} of the slot's {self.placement.nbytes} bytes")
        except BaseException:
            self.files.done(self.fd, sync=False)
            raise
        self.files.done(self.fd)
        return self.crc

    def abort(self) -> None:
        self.files.done(self.fd, sync=False)
