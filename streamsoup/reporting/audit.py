"""Look at a merge from outside: `streamsoup status OUT` and `streamsoup verify OUT`."""

from __future__ import annotations

import os
import shlex
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..errors import InputError, UsageError
from ..io import rawio, writer
from ..io.checkpoint import Checkpoint
from ..io.runlock import RunLock
from ..io.state import RunState, find_state
from ..options import MergeOptions, flag_name
from ..paths import expand_path
from ..units import format_size
from .record import REPORT_NAME, read_report
from .summary import row_outputs


@dataclass(frozen=True)
class RunStatus:
    """What `streamsoup.status` returns: the progress as plain data (``--json``); ``str()`` is the CLI's text."""

    data: dict[str, Any]

    @property
    def state(self) -> str:
        return self.data["state"]

    def as_dict(self) -> dict[str, Any]:
        return self.data

    def __str__(self) -> str:
        return format_status(self.data)


def run_status(out: str | Path) -> RunStatus:
    """Progress of a finished, running or interrupted merge."""
    out = expand_path(out, "OUT").absolute()
    if out.name.endswith(".partial") and not (out / REPORT_NAME).exists():
        out = out.with_name(out.name[: -len(".partial")])  # OUT.partial names its OUT, as `report` takes it
    partial = writer.partial_dir(out)
    if (out / REPORT_NAME).exists():
        summary = read_report(out)["summary"]
        return RunStatus({**summary, "state": "complete", "out": str(out)})
    if not partial.exists():
        if out.exists():
            raise UsageError(
                f"{out} is not a streamsoup output (it has no {REPORT_NAME}, and there is no "
                f"{partial.name} of an interrupted run beside it)"
            )
        raise UsageError(f"no merge at {out}: neither {out.name} nor {partial.name} exists")
    state_path = find_state(partial)
    holder = RunLock.holder(partial)
    if not state_path.exists():
        if not holder:
            raise UsageError(f"{partial} has no progress recorded yet (the run stopped before its first tensor)")
        return RunStatus(
            {
                "state": "running",
                "holder": holder,
                "out": str(out),
                "tensors_done": 0,
                "tensors_total": None,
                "bytes_done": 0,
                "bytes_total": None,
                "remaining": [],
                "attempts": 0,
                "seconds": 0.0,
                "last_commit_age_s": None,
            }
        )  # planning: no state yet
    state = RunState.read(state_path)
    markers = state.committed()
    ckpt = _output_shards(partial)
    done_bytes = sum(m.row["nbytes"] for m in markers.values())
    total = len(ckpt) if ckpt is not None else None
    finished = finished_outputs([m.row for m in markers.values()])
    remaining = [n for n in (ckpt or {}) if n not in finished]
    return RunStatus(
        {
            "state": "running" if holder else "interrupted",
            "holder": holder,
            "out": str(out),
            "tensors_done": len(finished),
            "tensors_total": total,
            "bytes_done": done_bytes,
            "bytes_total": ckpt.total_bytes if ckpt is not None else None,
            "remaining": remaining,
            "attempts": state.attempt,
            "seconds": state.elapsed(),
            "last_commit_age_s": time.time() - max((m.committed_at for m in markers.values()), default=time.time()),
        }
    )


def finished_outputs(rows: list[dict[str, Any]]) -> set[str]:
    """Output tensors whose every row is done (a stacked tensor: all its experts)."""
    parts: dict[str, int] = {}
    done = set()
    for row in rows:
        for name in row_outputs(row):
            if row.get("expert"):
                parts[name] = parts.get(name, 0) + 1
                if parts[name] == row["expert"][1]:
                    done.add(name)
            else:
                done.add(name)
    return done


def _output_shards(partial: Path) -> Checkpoint | None:
    """The output's tensor list, read back from the preallocated shard headers of OUT.partial."""
    try:
        return Checkpoint.from_path(partial, "OUT.partial")
    except InputError:
        return None


def format_status(s: dict[str, Any]) -> str:
    if s["state"] == "complete":
        return (
            f"complete: {s['tensors']} tensors ({s['edited']} edited, {s['copied']} copied, {s['dropped']} dropped), "
            f"{format_size(s['output_bytes'])}, {s['seconds']:.1f} s of work -> {s['out']}"
        )
    head = f"running ({s['holder']})" if s["state"] == "running" else "interrupted"
    total = s["tensors_total"] or 0
    pct = 100.0 * s["bytes_done"] / s["bytes_total"] if s["bytes_total"] else 0.0
    lines = [
        f"{head}: {s['tensors_done']}/{total} tensors, {format_size(s['bytes_done'])} of "
        f"{format_size(s['bytes_total'] or 0)} ({pct:.1f}%), {s['seconds']:.1f} s of work over "
        f"{s['attempts']} attempt(s)",
    ]
    if s["remaining"]:
        shown = ", ".join(s["remaining"][:5]) + (" ..." if len(s["remaining"]) > 5 else "")
        lines.append(f"remaining: {len(s['remaining'])} tensors ({shown})")
    if s["state"] == "interrupted":
        lines.append("rerun the same `streamsoup merge` command to resume")
    return "\n".join(lines)


@dataclass
class VerifyResult:
    """What `streamsoup.verify` returns; ``str()`` is what the CLI prints on stdout."""

    out: Path
    tensors: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)
    #: the commands that write OUT again (move it aside, the same merge): what to do when it is not ok
    repair: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        if self.problems:
            return "\n".join(f"MISMATCH {p}" for p in self.problems)
        return f"verified {self.tensors} tensors ({format_size(self.bytes)}): all checksums match"


def verify_output(out: str | Path, progress: bool = False) -> VerifyResult:
    """Re-read every tensor of a published OUT and compare with the crc32c recorded in its report."""
    out = expand_path(out, "OUT").absolute()
    report_path = out / REPORT_NAME
    if not report_path.exists():
        raise UsageError(f"{out} is not a finished streamsoup output (no {REPORT_NAME})")
    document = read_report(out)
    rows = document["tensors"]
    move = shlex.join(["mv", str(out), f"{out}.damaged"])
    result = VerifyResult(out, repair=f"{move} && {merge_command(document, out)}")
    try:  # every shard parsed and bounded as a loader would: header, offsets, file size exactly
        ckpt = Checkpoint.from_path(out, "OUT")
    except InputError as exc:
        result.problems.append(str(exc))
        return result
    _check_shards(ckpt, document.get("shards"), result)
    listed = {name for row in rows for name in row_outputs(row)}
    for name in sorted(listed - set(ckpt)):
        result.problems.append(f"{name}: in the report but missing from the shards")
    for name in sorted(set(ckpt) - listed):
        result.problems.append(f"{name}: in the shards but not in the report")
    with tqdm(
        total=ckpt.total_bytes,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="verifying",
        disable=None if progress else True,
    ) as bar:
        for row in rows:
            names = row_outputs(row)
            if any(n not in ckpt for n in names):
                continue
            first, last = ckpt[names[0]], ckpt[names[-1]]
            offset, nbytes = first.offset, last.offset + last.nbytes - first.offset
            if row.get("expert"):  # one expert's slice of a stacked tensor
                index, count = row["expert"]
                nbytes //= count
                offset += index * nbytes
            fd = os.open(first.path, os.O_RDONLY)
            try:
                crc = rawio.crc_range(fd, offset, nbytes)
            finally:
                os.close(fd)
            if crc != row["crc32c"]:
                result.problems.append(f"{row['name']} in {Path(first.path).name}: checksum mismatch (bytes changed)")
            result.bytes += nbytes
            bar.update(nbytes)
    result.tensors = len(listed & set(ckpt))
    return result


def merge_command(document: dict[str, Any], out: Path) -> str:
    """The `streamsoup merge` that writes OUT again: its inputs and every option that changes the bytes and is
    not the default (the others only change how fast)."""
    defaults = MergeOptions().as_dict()  # as the report records them (patterns as lists)
    recorded = document.get("options") or {}
    words = ["streamsoup", "merge", str(document["base"]), str(document["finetuned"]), str(out)]
    for f in fields(MergeOptions):
        value = recorded.get(f.name, defaults[f.name])
        if not f.metadata["output"] or value == defaults[f.name]:
            continue
        if f.metadata["patterns"]:  # a repeatable flag
            words += [f"{flag_name(f.name)}={pattern}" for pattern in value]  # a pattern may start with "-"
        else:
            words += [flag_name(f.name)] if value is True else [flag_name(f.name), str(value)]
    return shlex.join(words)


def _check_shards(ckpt: Checkpoint, recorded: dict[str, Any] | None, result: VerifyResult) -> None:
    """Each shard's size and header against what the merge wrote (reports before 0.4 do not record them)."""
    if not isinstance(recorded, dict):
        return
    found = {Path(s.path).name: s for s in ckpt.shards}
    for name in sorted(set(recorded) - set(found)):
        result.problems.append(f"{name}: in the report but missing from OUT")
    for name, shard in sorted(found.items()):
        want = recorded.get(name)
        if want is None:
            result.problems.append(f"{name}: a shard the merge did not write")
        elif shard.size != want.get("size") or shard.header_sha256 != want.get("header_sha256"):
            result.problems.append(f"{name}: header or size changed (header bytes differ from what was written)")
