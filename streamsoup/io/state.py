"""The run's durable state: a Zarr group in the work dir (its lock: runlock.py; a streamed tensor's own progress:
tensorprogress.py; how records and arrays are checked: records.py).

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

import logging
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ..errors import InputError, RunError, UsageError
from . import owned
from .binding import changed_files
from .records import StateDamaged, array_crc, put_array, read_array, seal, unseal

log = logging.getLogger(__name__)

STATE_NAME = ".streamsoup-state.zarr"
POINTER_NAME = ".streamsoup-workdir"  # in OUT.partial when --work-dir is elsewhere
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

    @classmethod
    def of(cls, key: str, record: dict[str, Any], batch: str | None = None) -> Marker:
        """The marker an unsealed record holds (KeyError, TypeError or ValueError: it is incomplete)."""
        where = (batch, int(record["s_offset"]), int(record["s_len"])) if batch is not None else ()
        return cls(
            key,
            int(record["crc32c"]),
            int(record["attempt"]),
            float(record["committed_at"]),
            dict(record["row"]),
            record["s_crc32c"],
            *where,
        )


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
        attempts = list(group.attrs.get("runs", []))
        attempts.append(
            {"started_at": time.time(), "host": socket.gethostname(), "pid": os.getpid(), "machine": machine or {}}
        )
        group.attrs["runs"] = attempts
        if head is not None:
            group.attrs["head"] = head
        return cls(path, group, len(attempts))

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
    def attempts(self) -> list[dict[str, Any]]:
        """One entry per attempt of this merge (stored as attrs.runs): when it started, where, on what machine."""
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
                good[key] = Marker.of(key, unseal(self.run_id, raw))
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
                    found[key] = Marker.of(key, unseal(self.run_id, raw), name)
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
        with self._recording():
            group = self.group["tensors"].require_group(key)
            group.attrs.put({})  # a recomputed tensor (torn write) loses its old marker first
            s_crc = put_array(group, "s", singular_values) if singular_values is not None else None
            group.attrs.put({"marker": seal(self.run_id, self._record(crc, row, s_crc, time.time()))})
            if "partial" in group:  # mid-tensor progress of a streamed tensor: no longer needed
                del group["partial"]

    def commit_many(self, items: list[Commit]) -> None:
        """Record many tensors whose bytes are already durable, in one batch group: spectra first, markers last."""
        if not items:
            return
        with self._recording():
            group = self.group.require_group(BATCHES).create_group(uuid.uuid4().hex[:16])
            spectra = [
                None if c.singular_values is None else np.asarray(c.singular_values, dtype=np.float64).reshape(-1)
                for c in items
            ]
            if any(s is not None for s in spectra):
                put_array(group, "s", np.concatenate([s for s in spectra if s is not None]))
            records, offset, now = {}, 0, time.time()
            for c, s in zip(items, spectra, strict=True):
                s_len = 0 if s is None else len(s)
                s_crc = None if s is None else array_crc(s)
                records[c.key] = seal(self.run_id, self._record(c.crc, c.row, s_crc, now, s_offset=offset, s_len=s_len))
                offset += s_len
            group.attrs.put({"markers": records})

    def _record(self, crc: int, row: dict[str, Any], s_crc: int | None, now: float, **where: int) -> dict[str, Any]:
        """A marker's fields (`where`: its spectrum's place in a batch's array)."""
        record = {"crc32c": int(crc), "s_crc32c": s_crc, **where}
        return {**record, "attempt": self.attempt, "committed_at": now, "row": row}

    @contextmanager
    def _recording(self) -> Iterator[None]:
        """A failed write of the state is one line: the work done so far is kept."""
        try:
            yield
        except OSError as exc:
            raise RunError(
                f"cannot record progress in {self.path}: {exc.strerror or exc}; "
                "free space or fix the disk, then rerun the same command to resume"
            ) from exc

    def elapsed(self) -> float:
        """Seconds of work over every attempt: from each run's start to its last commit."""
        attempts = self.attempts
        last: dict[int, float] = {}
        for marker in self.committed().values():
            last[marker.attempt] = max(last.get(marker.attempt, 0.0), marker.committed_at)
        return sum(max(0.0, last.get(i + 1, r["started_at"]) - r["started_at"]) for i, r in enumerate(attempts))


def find_state(partial: Path) -> Path:
    """The state of the run writing `partial` (OUT.partial): inside it, or where its --work-dir pointer says."""
    pointer = partial / POINTER_NAME
    return Path(pointer.read_text().strip()) if pointer.exists() else partial / STATE_NAME
