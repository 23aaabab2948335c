"""Input files bound by identity: what a rewrite, a replacement or a re-export into the same folder changes.

A merge reads its inputs over hours and may be resumed days later. Its content fingerprint samples
bytes; the identity below changes with any write through the filesystem (mtime and ctime; ctime
cannot be set back by a user), with a replacement (inode) and with a resize, so a run refuses to
mix tensors of an input's old and new contents: at resume, and again just before it publishes.
Each identity is taken before the file is first read, so a change while it is read counts too.

A binding: role -> {"folder": the input's folder, "files": {name in that folder: identity, or None
when the file is gone}}. Names, not paths: the same files reached through another path (a symlink,
`~` against `/home/...`) are the same inputs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from . import store


def identity_of(info: os.stat_result) -> dict[str, int]:
    """The stat fields that bind a file: a change in any of them means its contents may have changed."""
    return {
        "size": info.st_size,
        "mtime_ns": info.st_mtime_ns,
        "ctime_ns": info.st_ctime_ns,
        "inode": info.st_ino,
        "device": info.st_dev,
    }


def file_identity(path: str | Path) -> dict[str, int] | None:
    """The identity of one input file now (a symlink's target: what is read; an object's: store.py); None when it
    is gone."""
    if store.is_url(path):
        return store.identity(str(path))
    try:
        return identity_of(os.stat(path))
    except FileNotFoundError:
        return None


def same_file(old: object, new: dict[str, int] | None) -> bool:
    """One file is still the one bound. Only the device may differ: a remount after a crash renumbers it
    (NFS, btrfs), while the inode and both times, to the nanosecond, stay those of the same file."""
    if not isinstance(old, dict) or new is None:
        return False
    return not changed_fields(old, new)


def changed_fields(old: dict, new: dict) -> list[str]:
    """The fields of a bound identity (a file's, or an object's: size and version) that differ now."""
    return [f for f in dict.fromkeys([*new, *old]) if f != "device" and old.get(f) != new.get(f)]


def changed_files(old: object, new: dict[str, Any]) -> list[str]:
    """'ROLE file PATH (what changed)' for every bound file that is gone, new, or not the same file now."""
    old = old if isinstance(old, dict) else {}
    lines = []
    for role, side in new.items():
        before = old.get(role, {}).get("files", {}) if isinstance(old.get(role), dict) else {}
        files = side["files"]
        for name in sorted(set(before) | set(files)):
            path = store.joined(side["folder"], name)
            now = files.get(name)
            if name not in files:
                lines.append(f"{role.upper()} file {path} is no longer read")
            elif now is None:
                lines.append(f"{role.upper()} file {path} was removed")
            elif name not in before:
                lines.append(f"{role.upper()} file {path} is new")
            elif not same_file(before[name], now):
                fields = changed_fields(before[name] if isinstance(before[name], dict) else {}, now)
                lines.append(f"{role.upper()} file {path} was modified or replaced ({', '.join(fields)} changed)")
    return lines
