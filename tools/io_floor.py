#!/usr/bin/env python3
"""The I/O floor of a merge: read both checkpoints once and write the output's size, no compute.

    python tools/io_floor.py BASE FINETUNED SCRATCH_DIR

Same bounded pread/pwrite and fdatasync discipline as streamsoup, so the ratio merge / floor
is the cost of the math and the scheduling.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

CHUNK = 64 * 2**20


def read_all(folder: Path, buf: np.ndarray) -> int:
    """Read every shard of `folder` once (page cache dropped after); returns the bytes read."""
    total = 0
    for f in sorted(folder.glob("*.safetensors")):
        size = f.stat().st_size
        fd = os.open(f, os.O_RDONLY)
        for off in range(0, size, CHUNK):
            os.preadv(fd, [memoryview(buf)[: min(CHUNK, size - off)]], off)
        os.posix_fadvise(fd, 0, size, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        total += size
    return total


def write_scratch(scratch: Path, out_bytes: int, buf: np.ndarray) -> None:
    """Write `out_bytes` to a scratch file with fdatasync, then remove it."""
    scratch.mkdir(parents=True, exist_ok=True)
    fd = os.open(scratch / "floor.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for off in range(0, out_bytes, CHUNK):
        os.pwrite(fd, memoryview(buf)[: min(CHUNK, out_bytes - off)], off)
    os.fdatasync(fd)
    os.posix_fadvise(fd, 0, out_bytes, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    os.unlink(scratch / "floor.bin")


def main() -> None:
    base, ft, scratch = (Path(a) for a in sys.argv[1:4])
    buf = np.empty(CHUNK, dtype=np.uint8)
    read_all(base, buf)
    write_scratch(scratch, read_all(ft, buf), buf)


if __name__ == "__main__":
    main()
