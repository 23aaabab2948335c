"""The run's durable state: a Zarr group in the work dir, plus the lock on OUT.partial.

    attrs.fingerprint        inputs (shard sizes, header hashes), output options, version
    attrs.run_id             random, made with the state: every record below is sealed with it
    attrs.runs               one entry per attempt: when it started
    tensors/<key>/s          singular values of an edited tensor (float64, crc32c codec)
    tensors/<key> attrs      {"marker": {crc32c, s_crc32c, attempt, committed_at, row, digest}}: the
                             done marker, written in one atomic attrs.put (attrs.update writes key by key)
    batches/<id>/s           the singular values of many small tensors committed together, end to end
    batches/<id> attrs       {"markers": {key: sealed marker with s_offset, s_len}}: one attrs.put for all;
                             a Zarr operation costs ~1 ms, so 100,000 tiny tensors commit in batches

One writer (the driver) commits a marker only after the task has made the tensor's
bytes durable, so a marker always describes bytes that are on disk. Markers are
group attributes, not "chunk exists" tests: zarr skips chunks equal to the fill value.
Nothing read back is trusted unchecked: a marker's digest covers every field and the
run's id, the spectrum has its crc32c in the marker, a streamed tensor's saved Gram,
basis and written row blocks have theirs in its sealed progress record. A record that
does not verify is reported, dropped and its tensor recomputed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from ..errors import InputError, RunError, UsageError
from . import owned, rawio
from .binding import changed_files

log = logging.getLogger(__name__)

STATE_NAME = ".streamsoup-state.zarr"
POINTER_NAME = ".streamsoup-workdir"  # in OUT.partial when --work-dir is elsewhere
LOCK_NAME = ".streamsoup.lock"
#: what a state folder holds (besides its owner marker): anything else means it is not only ours
STATE_ENTRIES = ("zarr.json", "tensors", "batches")
BATCHES = "batches"


#: zarr's temporary name for a zarr.json being written (LocalStore: the suffix replaced by .<uuid4 hex>.partial)
ZARR_TEMP = re.compile(r"zarr\.[0-9a-f]{32}\.partial")


def is_state_entry(name: str) -> bool:
    return name in STATE_ENTRIES or ZARR_TEMP.fullmatch(name) is not None


def kept_line(folder: Path, kept: list[str], done: str) -> str:
    """The one line that says a user's files were left where streamsoup cleaned up."""
    shown = ", ".join(kept[:5]) + (f" and {len(kept) - 5} more" if len(kept) > 5 else "")
    return f"{done}; kept {folder} and what streamsoup did not write in it: {shown}"


class StateDamaged(Exception):
    """A record of the state did not verify; its work is redone."""


def seal(run_id: str, record: dict[str, Any]) -> dict[str, Any]:
    """`record` plus a digest of it and of the run: an edited, truncated or foreign record no longer verifies."""
    return {**record, "digest": _digest(run_id, record)}


def unseal(run_id: str, record: object) -> dict[str, Any]:
    """The record without its digest; StateDamaged unless the digest matches."""
    if not isinstance(record, dict) or "digest" not in record:
        raise StateDamaged("record without a digest")
    body = {k: v for k, v in record.items() if k != "digest"}
    if record["digest"] != _digest(run_id, body):
        raise StateDamaged("record digest mismatch")
    return body


def _digest(run_id: str, record: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps([run_id, record], sort_keys=True).encode()).hexdigest()


def array_crc(value: np.ndarray) -> int:
    raw = np.ascontiguousarray(value, dtype=np.float64).view(np.uint8).reshape(-1)  # no copy; empty arrays too
    return rawio.crc_of(memoryview(raw))


def read_array(group: zarr.Group, name: str, crc: int) -> np.ndarray:
    """A float64 array of the state, checked against the crc32c recorded when it was written."""
    try:
        value = group[name][...]
    except Exception as exc:  # a damaged chunk (crc32c codec), a missing array, a torn zarr.json
        raise StateDamaged(f"{name} unreadable ({type(exc).__name__})") from None
    if array_crc(value) != crc:
        raise StateDamaged(f"{name} checksum mismatch")
    return value


def put_array(group: zarr.Group, name: str, value: np.ndarray) -> int:
    """Store a float64 array (chunks of <= 64 MiB, crc32c codec); returns the crc32c of its values."""
    value = np.asarray(value, dtype=np.float64)
    rows = max(1, min(value.shape[0] if value.ndim else 1, (64 * 2**20) // max(8 * math.prod(value.shape[1:]), 1)))
    chunks = (rows, *value.shape[1:]) if value.ndim else ()
    arr = group.create_array(
        name,
        shape=value.shape,
        dtype="float64",
        chunks=chunks or (1,) * value.ndim,
        compressors=[Crc32cCodec()],
        fill_value=0.0,
        overwrite=True,
    )
    arr[...] = value
    return array_crc(value)


@dataclass(frozen=True)
class Commit:
    """One tensor to record: its key, the crc32c of its durable bytes, its report row, its singular values."""

    key: str
    crc: int
    row: dict[str, Any]
    singular_values: np.ndarray | None


@dataclass(frozen=True)
class Marker:
    """A committed tensor: its bytes are durable and their checksum is known."""

    key: str
    crc32c: int
    attempt: int
    committed_at: float
    row: dict[str, Any]  # the report row
    s_crc32c: int | None = None  # of its singular values, when it has them
    batch: str | None = None  # committed with others in batches/<batch>: its spectrum is s[s_offset:+s_len] there
    s_offset: int = 0
    s_len: int = 0


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
            kind = "shard" if name.endswith((".safetensors", ".bin", ".pt", ".pth")) else "file"
            if name not in after:
                changes.append(f"{role.upper()} {kind} {name} is gone")
            elif name not in before:
                changes.append(f"{role.upper()} has a new {kind} {name}")
            elif before[name] != after[name]:
                changes.append(f"{role.upper()} {kind} {name} changed")
    return changes


def check_bound(old: object, new: dict[str, Any], when: str) -> None:
    """Refuse a run whose input files are not the ones bound (`when` they changed), naming them."""
    changed = changed_files(old, new)
    if changed:
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise InputError(
            f"{'; '.join(changed[:3])}{more} {when}: the tensors done so far read the old contents "
            "and are not mixed with the new; rerun with --fresh to merge the files as they are now, "
            "or put the original files back"
        )


class RunState:
    """Read and commit the durable progress of one merge."""

    def __init__(self, path: Path, group: zarr.Group, attempt: int) -> None:
        self.path = path
        self.group = group
        self.attempt = attempt
        self._spectra_cache: dict[str, np.ndarray] = {}
        self._batch_of: dict[str, str] = {}  # a damaged marker's batch, for `forget`
        self.run_id = str(group.attrs.get("run_id", ""))

    @classmethod
    def open(
        cls,
        path: Path,
        out: Path,
        fingerprint: dict[str, Any],
        head: dict[str, Any] | None = None,
        machine: dict[str, Any] | None = None,
        binding: dict[str, Any] | None = None,
    ) -> RunState:
        """Open the state of an interrupted run, or start a new one; refuse a different run's state, or the same
        run's whose input files are not the ones it read (`binding`: io/binding.py's).

        `head` (inputs, options, planned tensors) and each attempt's `machine` let `streamsoup report`
        describe an interrupted run. The folder is made here and marked as this run's (owned.py).
        """
        if os.path.lexists(path):
            if not owned.owned(path, out, "state"):
                raise UsageError(
                    f"{path} exists but is not a resume state streamsoup made for {out}; streamsoup "
                    "never writes into or deletes a folder it did not make: remove it, or choose "
                    "another --work-dir"
                )
            try:
                group = zarr.open_group(str(path), mode="a")
                old = group.attrs.get("fingerprint")
                if not isinstance(group.attrs.get("run_id"), str):
                    old = None
            except Exception:  # unreadable: treated like no state (nothing is trusted)
                old = None
            if old is not None and old != fingerprint:
                changes = "; ".join(describe_changes(old, fingerprint)) or "the fingerprint differs"
                raise UsageError(
                    f"{path.parent if path.name == STATE_NAME else path} holds an interrupted run of a different "
                    f"merge ({changes}); rerun it with its original inputs and options, or add --fresh to discard it"
                )
            if old is not None and binding is not None:
                check_bound(group.attrs.get("binding"), binding, "since this merge started")
            if old is None:
                kept = owned.clear(path, out, "state", is_state_entry)
                done = f"the resume state {path} is unreadable (damaged); everything is recomputed"
                log.warning(kept_line(path, kept, done) if kept else done)
        else:
            owned.create(path, out, "state")
        group = zarr.open_group(str(path), mode="a")
        if "fingerprint" not in group.attrs:
            group.create_group("tensors", overwrite=True)
            group.attrs.put(
                {"fingerprint": fingerprint, "binding": binding or {}, "runs": [], "run_id": uuid.uuid4().hex}
            )
        runs = list(group.attrs.get("runs", []))
        runs.append(
            {"started_at": time.time(), "host": socket.gethostname(), "pid": os.getpid(), "machine": machine or {}}
        )
        group.attrs["runs"] = runs
        if head is not None:
            group.attrs["head"] = head
        return cls(path, group, len(runs))

    @classmethod
    def read(cls, path: Path) -> RunState:
        """The state for looking at (status, report); a damaged root is one clear line, not a traceback."""
        try:
            group = zarr.open_group(str(path), mode="r")
            runs = group.attrs.get("runs", [])
            return cls(path, group, len(runs) if isinstance(runs, list) else 0)
        except Exception as exc:
            raise UsageError(
                f"the resume state {path} is damaged ({type(exc).__name__}); rerunning the same "
                "`streamsoup merge` command recomputes what it covered"
            ) from None

    @property
    def runs(self) -> list[dict[str, Any]]:
        runs = self.group.attrs.get("runs", [])
        return [r for r in runs if isinstance(r, dict) and isinstance(r.get("started_at"), (int, float))]

    @property
    def head(self) -> dict[str, Any] | None:
        head = self.group.attrs.get("head")
        return dict(head) if isinstance(head, dict) else None

    def spectrum(self, marker: Marker) -> np.ndarray | None:
        """The committed singular values of a tensor, checked against its marker (StateDamaged if not)."""
        if marker.s_crc32c is None:
            return None
        if marker.batch is not None:
            s = self._batch_spectra(marker.batch)[marker.s_offset : marker.s_offset + marker.s_len]
            if len(s) != marker.s_len or array_crc(s) != marker.s_crc32c:
                raise StateDamaged("spectrum checksum mismatch")
            return s
        try:
            group = self.group["tensors"][marker.key]
        except Exception as exc:
            raise StateDamaged(f"record unreadable ({type(exc).__name__})") from None
        return read_array(group, "s", marker.s_crc32c)

    def _batch_spectra(self, batch: str) -> np.ndarray:
        """The end-to-end singular values of a batch, read once per batch (each slice is checked by its marker)."""
        if batch not in self._spectra_cache:
            try:
                self._spectra_cache[batch] = self.group[BATCHES][batch]["s"][...]
            except Exception as exc:
                raise StateDamaged(f"batch {batch} unreadable ({type(exc).__name__})") from None
        return self._spectra_cache[batch]

    @property
    def fingerprint(self) -> dict[str, Any]:
        return dict(self.group.attrs["fingerprint"])

    def committed(self) -> dict[str, Marker]:
        """The markers that verify (digest over every field and this run's id); see `damaged`."""
        return self.scan()[0]

    def scan(self) -> tuple[dict[str, Marker], dict[str, str]]:
        """(key -> verified marker, key -> why its record is damaged); tensors in progress have neither."""
        good: dict[str, Marker] = {}
        bad: dict[str, str] = {}
        folder = self.path / "tensors"
        keys = sorted(e for e in os.listdir(folder) if owned.is_dir(folder / e)) if owned.is_dir(folder) else []
        for key in keys:
            try:
                raw = self.group["tensors"][key].attrs.get("marker")
            except Exception as exc:  # a truncated or deleted zarr.json
                bad[key] = f"record unreadable ({type(exc).__name__})"
                continue
            if raw is None:
                continue
            try:
                m = unseal(self.run_id, raw)
                good[key] = Marker(
                    key, int(m["crc32c"]), int(m["attempt"]), float(m["committed_at"]), dict(m["row"]), m["s_crc32c"]
                )
            except (StateDamaged, KeyError, TypeError, ValueError) as exc:
                bad[key] = str(exc) if isinstance(exc, StateDamaged) else "record incomplete"
        self._scan_batches(good, bad)
        return good, bad

    def _scan_batches(self, good: dict[str, Marker], bad: dict[str, str]) -> None:
        """Markers committed in batches; a batch that does not verify is bad as a whole (``batches/<id>``).

        A tensor recommitted later (its bytes were found torn) has two markers: the later one counts.
        """
        folder = self.path / BATCHES
        names = sorted(e for e in os.listdir(folder) if owned.is_dir(folder / e)) if owned.is_dir(folder) else []
        for name in names:
            try:
                records = dict(self.group[BATCHES][name].attrs.get("markers") or {})
            except Exception as exc:  # a truncated or deleted zarr.json: every tensor of the batch
                bad[f"{BATCHES}/{name}"] = f"batch record unreadable ({type(exc).__name__})"
                continue
            found = {}
            for key, raw in records.items():  # an empty batch: killed after its spectra, before its markers
                try:
                    m = unseal(self.run_id, raw)
                    found[key] = Marker(
                        key,
                        int(m["crc32c"]),
                        int(m["attempt"]),
                        float(m["committed_at"]),
                        dict(m["row"]),
                        m["s_crc32c"],
                        name,
                        int(m["s_offset"]),
                        int(m["s_len"]),
                    )
                except (StateDamaged, KeyError, TypeError, ValueError) as exc:
                    bad[key] = str(exc) if isinstance(exc, StateDamaged) else "record incomplete"
                    self._batch_of[key] = name
            for key, marker in found.items():
                if key not in good or good[key].committed_at < marker.committed_at:
                    good[key] = marker

    def spectra(self, markers: list[Marker]) -> tuple[dict[str, np.ndarray], list[str]]:
        """(tensor name -> its verified singular values, keys whose spectrum does not verify)."""
        good, bad = {}, []
        self._spectra_cache = {}  # each batch's array is read once for all its tensors
        for marker in markers:
            try:
                s = self.spectrum(marker)
            except StateDamaged:
                bad.append(marker.key)
                continue
            if s is not None:
                good[marker.row["name"]] = s
        self._spectra_cache = {}
        return good, bad

    def usable(self) -> tuple[dict[str, Marker], dict[str, str]]:
        """Like `scan`, with every committed spectrum re-read and checked too (the driver, on resume)."""
        good, bad = self.scan()
        for key in self.spectra(list(good.values()))[1]:
            if key not in good:  # its batch went already, with an earlier key of it
                continue
            batch = good[key].batch
            if batch is None:
                bad[key] = "spectrum does not verify"
                del good[key]
                continue
            bad[f"{BATCHES}/{batch}"] = f"the spectrum of {key} does not verify"  # the batch goes as a whole
            for other in [k for k, m in good.items() if m.batch == batch]:
                del good[other]
        return good, bad

    def forget(self, keys: list[str]) -> None:
        """Drop damaged records (inside our own state folder): their tensors are recomputed."""
        for key in keys:
            if key in self._batch_of:  # one damaged marker of a batch: the batch keeps the others
                group = self.group[BATCHES][self._batch_of.pop(key)]
                group.attrs.put({"markers": {k: v for k, v in dict(group.attrs["markers"]).items() if k != key}})
                continue
            folder = self.path / key if key.startswith(f"{BATCHES}/") else self.path / "tensors" / key
            if owned.is_dir(folder):
                shutil.rmtree(folder)
            elif os.path.lexists(folder):
                folder.unlink()

    def commit(self, key: str, crc: int, row: dict[str, Any], singular_values: np.ndarray | None) -> None:
        """Record a tensor whose bytes are already durable; the marker (attrs) is written last."""
        try:
            tensors = self.group["tensors"]
            group = tensors.require_group(key)
            group.attrs.put({})  # a recomputed tensor (torn write) loses its old marker first
            s_crc = put_array(group, "s", singular_values) if singular_values is not None else None
            record = {
                "crc32c": int(crc),
                "s_crc32c": s_crc,
                "attempt": self.attempt,
                "committed_at": time.time(),
                "row": row,
            }
            group.attrs.put({"marker": seal(self.run_id, record)})
            if "partial" in group:  # mid-tensor progress of a streamed tensor: no longer needed
                del group["partial"]
        except OSError as exc:
            raise RunError(
                f"cannot record progress in {self.path}: {exc.strerror or exc}; "
                "free space or fix the disk, then rerun the same command to resume"
            ) from exc

    def commit_many(self, items: list[Commit]) -> None:
        """Record many tensors whose bytes are already durable, in one batch group: spectra first, markers last."""
        if not items:
            return
        try:
            group = self.group.require_group(BATCHES).create_group(uuid.uuid4().hex[:16])
            spectra = [
                np.asarray(c.singular_values, dtype=np.float64).reshape(-1)
                for c in items
                if c.singular_values is not None
            ]
            if spectra:
                put_array(group, "s", np.concatenate(spectra))
            records, offset, now = {}, 0, time.time()
            for c in items:
                s = None if c.singular_values is None else np.asarray(c.singular_values, dtype=np.float64).reshape(-1)
                record = {
                    "crc32c": int(c.crc),
                    "s_crc32c": None if s is None else array_crc(s),
                    "s_offset": offset,
                    "s_len": 0 if s is None else len(s),
                    "attempt": self.attempt,
                    "committed_at": now,
                    "row": c.row,
                }
                offset += record["s_len"]
                records[c.key] = seal(self.run_id, record)
            group.attrs.put({"markers": records})
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
    phase "project": the eigenbasis columns in use and the coefficients; rows [0, next_row) written,
                     with the crc32c of each written block of rows ("written": [[start, stop, crc], ...])

    The attrs are sealed with the run's id and hold the crc32c of every array they name: whatever
    does not verify reads as no progress (`attrs` is then {}), and the tensor starts over.
    """

    def __init__(self, state_path: str | Path, key: str) -> None:
        root = zarr.open_group(str(state_path), mode="a")
        self.run_id = str(root.attrs.get("run_id", ""))
        self.key = key
        self.group = root["tensors"].require_group(key).require_group("partial")

    @property
    def attrs(self) -> dict[str, Any]:
        """The saved progress, or {} when there is none or it does not verify."""
        raw = dict(self.group.attrs)
        if not raw:
            return {}
        try:
            return unseal(self.run_id, raw)
        except StateDamaged as exc:
            self.damaged(str(exc))
            return {}

    def damaged(self, why: str) -> None:
        """Say it once and forget the progress: the tensor starts over."""
        log.warning("%s: saved mid-tensor progress is damaged (%s); recomputing the tensor", self.key, why)
        self.group.attrs.put({})

    def _put(self, record: dict[str, Any]) -> None:
        self.group.attrs.put(seal(self.run_id, record))

    def save_gram(self, gram: np.ndarray, next_row: int, dw_sq: float, w0_sq: float) -> None:
        slot = 1 - int(self.attrs.get("slot", 1))
        crc = put_array(self.group, f"gram_{slot}", gram)
        self._put({"phase": "gram", "slot": slot, "next_row": next_row, "dw_sq": dw_sq, "w0_sq": w0_sq, "crc": crc})

    def load_gram(self, saved: dict[str, Any]) -> np.ndarray:
        return read_array(self.group, f"gram_{saved['slot']}", saved["crc"])

    def save_basis(self, s: np.ndarray, basis: np.ndarray, info: dict[str, Any]) -> None:
        crcs = {"s_crc": put_array(self.group, "s", s), "basis_crc": put_array(self.group, "basis", basis)}
        self._put({"phase": "project", "next_row": 0, "written": [], **info, **crcs})

    def load_basis(self, saved: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        return read_array(self.group, "s", saved["s_crc"]), read_array(self.group, "basis", saved["basis_crc"])

    def save_progress(self, saved: dict[str, Any], start: int, stop: int, crc: int) -> dict[str, Any]:
        """Rows start:stop are durable in the slot with this crc32c; returns the new record."""
        record = {**saved, "next_row": stop, "written": [*saved["written"], [start, stop, crc]]}
        self._put(record)
        return record
