"""The lock on OUT.partial: one merge writes an OUT at a time."""

from __future__ import annotations

import fcntl
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..errors import RunError, UsageError

LOCK_NAME = ".streamsoup.lock"


def held_by(holder: str, folder: Path) -> UsageError:
    """The one line for an OUT.partial another merge is writing."""
    return UsageError(
        f"another streamsoup merge ({holder}) is writing {folder}; wait for it to finish or stop it first"
    )


class RunLock:
    """An exclusive flock on OUT.partial: a second merge of the same OUT is refused at once.

    The kernel drops the lock when the process dies, however it dies, so no stale lock
    outlives a crash.
    """

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise held_by(holder, self.path.parent) from None
        os.ftruncate(fd, 0)
        self.line = f"pid {os.getpid()} on {socket.gethostname()}, attempt {uuid.uuid4().hex[:12]}\n"
        os.pwrite(fd, self.line.encode(), 0)
        os.fsync(fd)  # workers on other hosts read it (the fence): on NFS, what is not flushed they may not see
        self.fd = fd
        return self

    def fence(self) -> Fence:
        return Fence(str(self.path.parent), self.line)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    @staticmethod
    def holder(folder: Path) -> str | None:
        """Who holds the lock of `folder` now (None: nobody is running)."""
        path = folder / LOCK_NAME
        if not path.exists():
            return None
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            return os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        finally:
            os.close(fd)


@dataclass(frozen=True)
class Fence:
    """What a task checks before each write to OUT.partial or the state: the lock still names its attempt.

    A worker frozen mid-task and taken out of the cluster may wake up after its merge has ended and
    another has begun (a rerun with other options, say): its writes would land in that merge's
    files. The lock's line is new with each attempt, so such a task finds another line, or none.
    """

    folder: str
    line: str

    def check(self) -> None:
        try:
            with open(os.path.join(self.folder, LOCK_NAME), encoding="utf-8", errors="replace") as f:
                now = f.read(len(self.line) + 1)
        except OSError:
            now = ""
        if now != self.line:
            raise RunError(
                f"this task's merge attempt ({self.line.strip()}) is over ({self.folder} is written by another, or "
                "gone): it wrote nothing more"
            )
