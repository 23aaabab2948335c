"""Folders streamsoup made itself, proven by a marker inside them: the only folders it ever deletes.

A folder is ours when it is a real directory (never a symlink) holding the marker file that
`create` wrote when it made it, naming the run's identity (the absolute OUT path) and its role
("partial" for OUT.partial, "state" for a resume state). `remove` deletes a folder only when it is
ours and holds nothing but the names its role writes: a user's folder, or one a user put files
into, is never deleted, whatever a pointer file or an option says.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path

MARKER = ".streamsoup-owner.json"


def create(path: Path, out: Path, role: str) -> None:
    """Make `path` (its parents as needed, which stay the user's) and mark it as this run's `role`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkdir(path)  # FileExistsError when anything is there already: that is never ours
    marker = {"out": str(out), "role": role, "host": socket.gethostname(), "pid": os.getpid(),
              "created_at": time.time()}  # fmt: skip
    fd = os.open(path / MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, json.dumps(marker).encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def is_dir(path: Path) -> bool:
    """A real directory (a symlink to one is not)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def owned(path: Path, out: Path, role: str) -> bool:
    """Did streamsoup make `path` for the run writing `out`, as `role`?"""
    if not is_dir(path):
        return False
    marker = path / MARKER
    try:
        if not stat.S_ISREG(os.lstat(marker).st_mode) or os.lstat(marker).st_size > 4096:
            return False
        data = json.loads(marker.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and data.get("out") == str(out) and data.get("role") == role


def strangers(path: Path, expected: Callable[[str], bool]) -> list[str]:
    """Entries of `path` that its role does not write (the marker aside)."""
    return sorted(e for e in os.listdir(path) if e != MARKER and not expected(e))


def remove(path: Path, out: Path, role: str, expected: Callable[[str], bool]) -> bool:
    """Delete `path` if it is ours and holds only what its role writes; False (nothing touched) otherwise."""
    if not owned(path, out, role) or strangers(path, expected):
        return False
    shutil.rmtree(path)  # rmtree unlinks symlinks inside, never follows them
    return True


def clear(path: Path, out: Path, role: str, keep: tuple[str, ...] = ()) -> None:
    """Empty a folder that is ours (the marker and `keep` stay): start its work over."""
    assert owned(path, out, role), path
    for entry in os.listdir(path):
        if entry == MARKER or entry in keep:
            continue
        full = path / entry
        shutil.rmtree(full) if is_dir(full) else full.unlink()
