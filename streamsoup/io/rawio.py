"""Bounded positional reads and writes: the page cache never keeps what we touched.

safetensors' own readers either mmap (touched pages pile up in RSS) or read a whole
tensor into a fresh allocation; we pread into our own buffers and drop the cached pages.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable

import crc32c
import numpy as np

#: Linux caps one read/write at just under 2 GiB; stay well below.
IO_CHUNK = 64 * 1024 * 1024


def drop_cache(fd: int, offset: int, length: int) -> None:
    if hasattr(os, "posix_fadvise") and length > 0:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def pread_into(fd: int, buf: memoryview, offset: int, *, uncache: bool = True) -> None:
    """Fill `buf` from `fd` at `offset`; a short file is an EOFError."""
    done, total = 0, len(buf)
    while done < total:
        step = min(IO_CHUNK, total - done)
        got = os.preadv(fd, [buf[done : done + step]], offset + done)
        if got == 0:
            raise EOFError(f"file ends {total - done} bytes early at offset {offset + done}")
        done += got
    if uncache:
        drop_cache(fd, offset, total)


def read_bytes(fd: int, offset: int, length: int) -> np.ndarray:
    buf = np.empty(length, dtype=np.uint8)
    pread_into(fd, memoryview(buf), offset)
    return buf


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of `data` at `offset` (pwrite may write less than asked)."""
    done, total = 0, len(data)
    while done < total:
        step = min(IO_CHUNK, total - done)
        done += os.pwrite(fd, data[done : done + step], offset + done)


def _chunks(length: int) -> tuple[memoryview, range]:
    buf = np.empty(min(IO_CHUNK, max(length, 1)), dtype=np.uint8)
    return memoryview(buf), range(0, length, len(buf))


def copy_range(
    src_fd: int,
    src_off: int,
    dst_fd: int,
    dst_off: int,
    length: int,
    inspect: Callable[[memoryview], None] | None = None,
) -> int:
    """Byte-exact copy of a range between files through one bounded buffer; returns its crc32c.

    `inspect` sees each chunk before it is written (and may raise): checks ride on the one read.
    """
    view, starts = _chunks(length)
    crc = 0
    for done in starts:
        part = view[: min(len(view), length - done)]
        pread_into(src_fd, part, src_off + done)
        if inspect is not None:
            inspect(part)
        pwrite_all(dst_fd, part, dst_off + done)
        crc = crc32c.crc32c(part, crc)
    return crc


def crc_range(fd: int, offset: int, length: int) -> int:
    """crc32c of a byte range, read through one bounded buffer."""
    view, starts = _chunks(length)
    crc = 0
    for done in starts:
        part = view[: min(len(view), length - done)]
        pread_into(fd, part, offset + done)
        crc = crc32c.crc32c(part, crc)
    return crc


def crc_of(data: memoryview, crc: int = 0) -> int:
    return crc32c.crc32c(data, crc)


def reserve(fd: int, length: int) -> bool:
    """Allocate `length` bytes of disk to the file now (Linux fallocate), so no other process can take the
    space mid-run; False where the filesystem cannot (the file is then only extended, sparse)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fallocate = libc.fallocate
    except (OSError, AttributeError):
        return False
    fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    if fallocate(fd, 0, 0, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err))


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def rename_noreplace(src: str | os.PathLike, dst: str | os.PathLike) -> bool:
    """Rename atomically unless `dst` exists (False then, nothing changed): renameat2(RENAME_NOREPLACE).

    os.replace would silently replace an empty directory that a concurrent process made at `dst`.
    Where the kernel or filesystem lacks renameat2, a check before os.rename narrows the race.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is not None:
        if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return True
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            return False
        if err not in (errno.ENOSYS, errno.EINVAL):
            raise OSError(err, os.strerror(err), os.fspath(dst))
    if os.path.lexists(dst):
        return False
    os.rename(src, dst)
    return True
