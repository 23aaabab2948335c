"""Imported by the fork server of helpers.forkserver only, after the CLI: what its forked processes start from.

A forked process's RSS does not yet count the file-backed pages (the libraries' code and data) its parent had
mapped: Linux copies a parent's anonymous pages' mappings at fork, and maps file pages again only when the
child touches them. A new `python -m streamsoup.cli` counts them from its imports on, and streamsoup's budget
(--max-ram, less what the process itself uses) is measured from that RSS. So the server lists its resident
file-backed pages once, and each forked process touches them before it runs (~20,000 pages in ~30 ms): its RSS
is then the RSS of a new interpreter that imported the CLI.
"""

from __future__ import annotations

import ctypes
import os
import struct

import streamsoup.cli  # noqa: F401  (what a new interpreter imports before it measures itself)


def resident_file_pages() -> list[int]:
    """Addresses of this process's readable file-backed pages that are resident (/proc/self/pagemap, bit 63)."""
    size = os.sysconf("SC_PAGE_SIZE")
    pages = []
    with open("/proc/self/maps") as maps, open("/proc/self/pagemap", "rb") as pagemap:
        for line in maps:
            fields = line.split()
            if len(fields) < 6 or not fields[5].startswith("/") or fields[1][0] != "r":
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            pagemap.seek(start // size * 8)
            entries = pagemap.read((end - start) // size * 8)
            pages += [start + i * size for i, (e,) in enumerate(struct.iter_unpack("<Q", entries)) if e >> 63]
    return pages


RESIDENT = resident_file_pages()


def map_parents_pages() -> None:
    """Touch each page the server had resident: this process's RSS then counts it, as a new interpreter's does."""
    for address in RESIDENT:
        ctypes.string_at(address, 1)
