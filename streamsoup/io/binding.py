"""Input files bound by identity: what a rewrite, a replacement or a re-export into the same folder changes.

A merge reads its inputs over hours and may be resumed days later. Its content fingerprint samples
bytes; the identity below changes with any write through the filesystem (mtime and ctime; ctime
cannot be set back by a user), with a replacement (inode) and with a resize, so a run refuses to
mix tensors of an input's old and new contents: at resume, and again just before it publishes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

#: the stat fields that bind a file; a change in any of them means its contents may have changed
IDENTITY_FIELDS = ("size", "mtime_ns", "ctime_ns", "inode", "device")


def file_identity(path: str) -> dict[str, int]:
    """The identity of one input file (a symlink's target: what is read)."""
    info = os.stat(path)
    return {"size": info.st_size, "mtime_ns": info.st_mtime_ns, "ctime_ns": info.st_ctime_ns,
            "inode": info.st_ino, "device": info.st_dev}  # fmt: skip


def bind(paths: Iterable[str]) -> dict[str, dict[str, int]]:
    """Path -> identity for every file an input is read from."""
    return {os.path.abspath(path): file_identity(path) for path in paths}


def same_file(old: object, new: dict[str, int]) -> bool:
    """One file is still the one bound. Only the device may differ: a remount after a crash renumbers it
    (NFS, btrfs), while the inode and both times, to the nanosecond, stay those of the same file."""
    if not isinstance(old, dict):
        return False
    return all(old.get(field) == new[field] for field in IDENTITY_FIELDS if field != "device")


def changed_files(old: object, new: dict[str, dict[str, dict[str, int]]]) -> list[str]:
    """'ROLE file PATH (what changed)' for every bound file that is gone, new, or not the same file now."""
    old = old if isinstance(old, dict) else {}
    lines = []
    for role, files in new.items():
        before = old.get(role) if isinstance(old.get(role), dict) else {}
        for path in sorted(set(before) | set(files)):
            if path not in files:
                lines.append(f"{role.upper()} file {path} is no longer read")
            elif path not in before:
                lines.append(f"{role.upper()} file {path} is new")
            elif not same_file(before[path], files[path]):
                was = before[path] if isinstance(before[path], dict) else {}
                fields = [f for f in IDENTITY_FIELDS if f != "device" and was.get(f) != files[path][f]]
                lines.append(f"{role.upper()} file {path} was modified or replaced ({', '.join(fields)} changed)")
    return lines
