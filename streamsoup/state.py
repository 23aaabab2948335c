"""The run's durable state: a Zarr group in the work dir, plus the lock on OUT.partial.

    attrs.fingerprint        inputs (shard sizes, header hashes), output options, version
    attrs.runs               one entry per attempt: when it started
    tensors/<key>/s          singular values of an edited tensor (float64, crc32c codec)
    tensors/<key> attrs      {"marker": {crc32c, attempt, committed_at, row}}: the done marker,
                             written in one atomic attrs.put (attrs.update writes key by key)

One writer (the driver) commits a marker only after the task has made the tensor's
bytes durable, so a marker always describes bytes that are on disk. Markers are
group attributes, not "chunk exists" tests: zarr skips chunks equal to the fill value.
"""

from __future__ import annotations

import fcntl
import math
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from .errors import RunError, UsageError

STATE_NAME = ".streamsoup-state.zarr"
POINTER_NAME = ".streamsoup-workdir"  # in OUT.partial when --work-dir is elsewhere
LOCK_NAME = ".streamsoup.lock"


@dataclass(frozen=True)
class Marker:
    """A committed tensor: its bytes are durable and their checksum is known."""

    key: str
    crc32c: int
    attempt: int
    committed_at: float
    row: dict[str, Any]  # the report row


def describe_changes(old: dict, new: dict) -> list[str]:
    """Human words for what differs between two fingerprints (flags by their CLI names)."""
    changes = []
    if old.get("streamsoup") != new.get("streamsoup"):
        changes.append(f"streamsoup version {old.get('streamsoup')} -> {new.get('streamsoup')}")
    old_opts, new_opts = old.get("options", {}), new.get("options", {})
    for key in sorted(set(old_opts) | set(new_opts)):
        if old_opts.get(key) != new_opts.get(key):
            changes.append(f"--{key.replace('_', '-')} {old_opts.get(key)} -> {new_opts.get(key)}")
    for role in ("base", "finetuned"):
        before, after = old.get(role, {}), new.get(role, {})
        for name in sorted(set(before) | set(after)):
            if name not in after:
                changes.append(f"{role.upper()} shard {name} is gone")
            elif name not in before:
                changes.append(f"{role.upper()} has a new shard {name}")
            elif before[name] != after[name]:
                changes.append(f"{role.upper()} shard {name} changed")
    return changes


class RunState:
    """Read and commit the durable progress of one merge."""

    def __init__(self, path: Path, group: zarr.Group, attempt: int) -> None:
        self.path = path
        self.group = group
        self.attempt = attempt

    @classmethod
    def open(cls, path: Path, fingerprint: dict[str, Any], head: dict[str, Any] | None = None,
             machine: dict[str, Any] | None = None) -> RunState:  # fmt: skip
        """Open the state of an interrupted run, or start a new one; refuse a different run's state.

        `head` (inputs, options, planned tensors) and each attempt's `machine` let `streamsoup report`
        describe an interrupted run.
        """
        if path.exists():
            try:
                group = zarr.open_group(str(path), mode="a")
                old = group.attrs.get("fingerprint")
            except Exception:  # unreadable: treated like no state (nothing is trusted)
                old = None
            if old is not None and old != fingerprint:
                changes = "; ".join(describe_changes(old, fingerprint)) or "the fingerprint differs"
                raise UsageError(
                    f"{path.parent if path.name == STATE_NAME else path} holds an interrupted run of a different "
                    f"merge ({changes}); rerun it with its original inputs and options, or add --fresh to discard it"
                )
            if old is None:
                shutil.rmtree(path)
        if not path.exists():
            group = zarr.open_group(str(path), mode="w")
            group.create_group("tensors")
            group.attrs.put({"fingerprint": fingerprint, "runs": []})
        runs = list(group.attrs.get("runs", []))
        runs.append({"started_at": time.time(), "host": socket.gethostname(), "pid": os.getpid(),
                     "machine": machine or {}})  # fmt: skip
        group.attrs["runs"] = runs
        if head is not None:
            group.attrs["head"] = head
        return cls(path, group, len(runs))

    @classmethod
    def read(cls, path: Path) -> RunState:
        group = zarr.open_group(str(path), mode="r")
        return cls(path, group, len(group.attrs.get("runs", [])))

    @property
    def runs(self) -> list[dict[str, Any]]:
        return list(self.group.attrs.get("runs", []))

    @property
    def head(self) -> dict[str, Any] | None:
        head = self.group.attrs.get("head")
        return dict(head) if isinstance(head, dict) else None

    def spectrum(self, key: str) -> np.ndarray | None:
        group = self.group["tensors"][key]
        return group["s"][...] if "s" in group else None

    @property
    def fingerprint(self) -> dict[str, Any]:
        return dict(self.group.attrs["fingerprint"])

    def committed(self) -> dict[str, Marker]:
        out = {}
        for key, group in self.group["tensors"].groups():
            m = group.attrs.get("marker")
            if isinstance(m, dict) and {"crc32c", "attempt", "committed_at", "row"} <= set(m):
                out[key] = Marker(key, m["crc32c"], m["attempt"], m["committed_at"], m["row"])
        return out

    def commit(self, key: str, crc: int, row: dict[str, Any], singular_values: np.ndarray | None) -> None:
        """Record a tensor whose bytes are already durable; the marker (attrs) is written last."""
        try:
            tensors = self.group["tensors"]
            group = tensors.require_group(key)
            group.attrs.put({})  # a recomputed tensor (torn write) loses its old marker first
            if singular_values is not None:
                s = np.asarray(singular_values, dtype=np.float64)
                arr = group.create_array(
                    "s",
                    shape=s.shape,
                    dtype="float64",
                    chunks=s.shape or (1,),
                    compressors=[Crc32cCodec()],
                    fill_value=0.0,
                    overwrite=True,
                )
                arr[:] = s
            marker = {"crc32c": int(crc), "attempt": self.attempt, "committed_at": time.time(), "row": row}
            group.attrs.put({"marker": marker})
            if "partial" in group:  # mid-tensor progress of a streamed tensor: no longer needed
                del group["partial"]
        except OSError as exc:
            raise RunError(
                f"cannot record progress in {self.path}: {exc.strerror or exc}; "
                "free space or fix the disk, then rerun the same command to resume"
            ) from exc

    def elapsed(self) -> float:
        """Seconds of work over every attempt: from each run's start to its last commit."""
        runs = self.runs
        last: dict[int, float] = {}
        for marker in self.committed().values():
            last[marker.attempt] = max(last.get(marker.attempt, 0.0), marker.committed_at)
        return sum(max(0.0, last.get(i + 1, r["started_at"]) - r["started_at"]) for i, r in enumerate(runs))


def find_state(partial: Path) -> Path:
    """The state of the run writing `partial` (OUT.partial): inside it, or where its --work-dir pointer says."""
    pointer = partial / POINTER_NAME
    return Path(pointer.read_text().strip()) if pointer.exists() else partial / STATE_NAME


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
            raise UsageError(
                f"another streamsoup merge ({holder}) is writing {self.path.parent}; "
                "wait for it to finish or stop it first"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self.fd = fd
        return self

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


class PartialTensor:
    """Mid-tensor progress of one streamed tensor, in ``tensors/<key>/partial`` (written by its task only).

    phase "gram":    the Gram sums of rows [0, next_row), double-buffered (gram_0 / gram_1):
                     a kill while one buffer is written leaves the other, named by the attrs, intact
    phase "project": the eigenbasis columns in use and the coefficients; rows [0, next_row) written
    """

    def __init__(self, state_path: str | Path, key: str) -> None:
        root = zarr.open_group(str(state_path), mode="a")
        self.group = root["tensors"].require_group(key).require_group("partial")

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    def _put_array(self, name: str, value: np.ndarray) -> None:
        chunks = (max(1, min(value.shape[0], (64 * 2**20) // max(8 * math.prod(value.shape[1:]), 1))),
                  *value.shape[1:])  # fmt: skip
        arr = self.group.create_array(name, shape=value.shape, dtype="float64", chunks=chunks,
                                      compressors=[Crc32cCodec()], fill_value=0.0, overwrite=True)  # fmt: skip
        arr[...] = value

    def save_gram(self, gram: np.ndarray, next_row: int, dw_sq: float, w0_sq: float) -> None:
        slot = 1 - int(self.attrs.get("slot", 1))
        self._put_array(f"gram_{slot}", gram)
        self.group.attrs.put({"phase": "gram", "slot": slot, "next_row": next_row, "dw_sq": dw_sq, "w0_sq": w0_sq})

    def load_gram(self) -> np.ndarray:
        return self.group[f"gram_{self.attrs['slot']}"][...]

    def save_basis(self, s: np.ndarray, basis: np.ndarray, info: dict[str, Any]) -> None:
        self._put_array("s", s)
        self._put_array("basis", basis)
        self.group.attrs.put({"phase": "project", "next_row": 0, **info})

    def load_basis(self) -> tuple[np.ndarray, np.ndarray]:
        return self.group["s"][...], self.group["basis"][...]

    def save_progress(self, next_row: int) -> None:
        self.group.attrs.put({**self.attrs, "next_row": next_row})
