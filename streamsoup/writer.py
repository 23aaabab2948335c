"""Preallocated output shards written in place, then published atomically.

Shards are created from their precomputed headers at full size (sparse), each
tensor is pwritten at its fixed offset, and the folder is renamed to OUT only
once every byte is durable.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from . import rawio
from .checkpoint import TensorRef
from .dtypes import has_nonfinite
from .errors import InputError
from .layout import Placement, ShardLayout

#: files of a model folder that are weights (never copied from the fine-tune: we write our own)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


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


def _open_for_write(folder: Path, placement: Placement) -> int:
    return os.open(folder / placement.file, os.O_WRONLY)


def write_tensor(folder: Path, placement: Placement, tensor: torch.Tensor) -> int:
    """Write a tensor's bytes at its placement and make them durable; returns their crc32c."""
    slot = SlotWriter(folder, placement)
    try:
        slot.write(tensor)
    except BaseException:
        slot.abort()
        raise
    return slot.close()


def copy_tensor(source: TensorRef, folder: Path, placement: Placement, check_finite: bool = True) -> int:
    """Byte-for-byte copy of a tensor of the fine-tune into its output slot; returns its crc32c.

    NaN/Inf are looked for in each chunk on its way through (no second read of the tensor).
    """

    def finite(chunk: memoryview) -> None:
        if has_nonfinite(chunk, source.dtype):
            raise InputError(f"{source.path}: tensor {source.name!r} contains NaN or Inf and would be copied into "
                             "the output as is; fix the checkpoint, or rerun with --allow-nonfinite to copy it "
                             "unchanged")  # fmt: skip

    src = os.open(source.path, os.O_RDONLY)
    try:
        dst = _open_for_write(folder, placement)
        try:
            crc = rawio.copy_range(src, source.offset, dst, placement.offset, source.nbytes,
                                   finite if check_finite else None)  # fmt: skip
            os.fdatasync(dst)
        finally:
            os.close(dst)
    finally:
        os.close(src)
    return crc


def slot_crc(folder: Path, placement: Placement) -> int:
    """crc32c of what is stored in a tensor's slot now (to detect torn or lost writes)."""
    fd = os.open(folder / placement.file, os.O_RDONLY)
    try:
        return rawio.crc_range(fd, placement.offset, placement.nbytes)
    finally:
        os.close(fd)


def write_json(path: Path, data: object) -> None:
    """Write-then-rename with fsync, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def is_weight_file(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES) or name in WEIGHT_INDEXES


def copy_side_files(source: Path, folder: Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Copy config, tokenizer and other non-weight files of the fine-tune (dotfiles and `skip` names left out)."""
    copied = []
    if not source.is_dir():
        return copied
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file() or is_weight_file(path.name):
            continue
        if path.name in skip:
            continue
        dst = folder / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dst)
        with open(dst, "rb+") as f:
            os.fsync(f.fileno())
        copied.append(str(rel))
    return copied


def publish(partial: Path, out: Path) -> None:
    """Make OUT appear, complete, in one atomic rename."""
    for path in partial.rglob("*"):
        if path.is_dir():
            rawio.fsync_dir(path)
    rawio.fsync_dir(partial)
    os.replace(partial, out)
    rawio.fsync_dir(out.parent)


def write_block(folder: Path, placement: Placement, shape: tuple[int, int], start: int, block: torch.Tensor,
                transposed: bool) -> None:  # fmt: skip
    """Write rows start:.. of the 2-D output (or, transposed, those columns) into the slot."""
    m, n = shape
    item = placement.nbytes // max(m * n, 1)
    fd = _open_for_write(folder, placement)
    try:
        if not transposed:
            data = block.contiguous().view(-1).view(torch.uint8).numpy()
            rawio.pwrite_all(fd, memoryview(data), placement.offset + start * n * item)
        else:
            rows = block.T.contiguous().view(torch.uint8).numpy()  # [m, width * item]
            for row in range(m):
                rawio.pwrite_all(fd, memoryview(rows[row]), placement.offset + (row * n + start) * item)
        os.fdatasync(fd)
    finally:
        os.close(fd)


class SlotWriter:
    """Consecutive row blocks of one tensor written into its slot, made durable once at the end.

    Blocks must come in order: the crc32c of the whole slot is chained on the way (no re-read).
    """

    def __init__(self, folder: Path, placement: Placement) -> None:
        self.placement = placement
        self.written = 0
        self.crc = 0
        self.fd = _open_for_write(folder, placement)

    def write(self, block: torch.Tensor) -> None:
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
            os.fdatasync(self.fd)
        finally:
            os.close(self.fd)
        return self.crc

    def abort(self) -> None:
        os.close(self.fd)
