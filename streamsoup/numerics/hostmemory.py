"""The host's malloc: freed memory goes back to the OS, so the process's RSS follows its working set."""

from __future__ import annotations

import ctypes


def configure_process() -> None:
    """Make freed memory go back to the OS, so RSS follows the working set.

    glibc raises its mmap threshold after large frees and then serves tensors up to
    32 MiB from arenas it never returns; a fixed threshold keeps big buffers mmapped.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 1 << 20)
        libc.mallopt(m_trim_threshold, 16 << 20)
    except (OSError, AttributeError):
        pass


def release_memory() -> None:
    """Give freed heap pages back after a task (glibc only)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
