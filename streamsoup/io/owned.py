"""Folders streamsoup made itself, proven by a marker inside them: the only folders it ever deletes.

A folder is ours when it is a real directory (never a symlink) holding the marker file that
`create` wrote when it made it, naming the run's identity (the absolute OUT path) and its role
("partial" for OUT.partial, "state" for a resume state). `clear` and `remove` delete only the
entries its role writes in a folder that is ours: a user's folder is never touched, and files a
user put into one of ours stay (with the folder), whatever a pointer file or an option says.
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
    marker = {
        "out": str(out),
        "role": role,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "created_at": time.time(),
    }
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


def remove(path: Path, out: Path, role: str, expected: Callable[[str], bool]) -> list[str] | None:
    """Delete a folder that is ours. When it also holds entries its role does not write (a user's), only what
    streamsoup wrote goes, marker included: the folder and those entries stay, and are returned.
    None: the folder is not ours, nothing was touched."""
    if not owned(path, out, role):
        return None
    kept = clear(path, out, role, expected)
    if kept:
        (path / MARKER).unlink()  # it holds a user's files now: never ours to delete again
        return kept
    shutil.rmtree(path)  # rmtree unlinks symlinks inside, never follows them
    return []


def clear(path: Path, out: Path, role: str, expected: Callable[[str], bool]) -> list[str]:
    """Empty a folder that is ours of what its role writes (its marker stays): start its work over. Entries the
    role does not write are a user's: kept, and returned so that the caller says so."""
    assert owned(path, out, role), path
    for entry in os.listdir(path):
        if entry == MARKER or not expected(entry):
            continue
        full = path / entry
        shutil.rmtree(full) if is_dir(full) else full.unlink()
    return strangers(path, expected)
