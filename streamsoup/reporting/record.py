"""What a merge writes about itself: streamsoup_report.json (every tensor, and why) and the spectra beside it.

The report records what a later reader needs to trust it: version, inputs (absolute paths or
Hugging Face repo ids, with fingerprints), all options, the machine and device configuration
of every attempt, start and end times. The singular values the state holds go into
streamsoup_spectra.npz, so `streamsoup report` can draw them once the state is gone.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from .._version import __version__
from ..errors import InputError
from ..io import store, writer
from ..io.jsonfile import REPORT_LIMIT, JsonFileError, read_json
from ..planning.planner import MergePlan
from ..sources.hub import cache_repo_id
from ..units import format_duration, format_size
from .summary import build_document

REPORT_NAME = "streamsoup_report.json"
SPECTRA_NAME = "streamsoup_spectra.npz"
METHOD = "MonoSoup (arXiv 2602.09689)"


@dataclass(frozen=True)
class MergeSummary:
    """What `merge` returns: where the model is and what happened."""

    out: Path
    tensors: int
    edited: int
    copied: int
    dropped: int
    output_bytes: int
    seconds: float
    report: Path
    resumed: int = 0  # tensors an earlier attempt had already committed
    already_complete: bool = False  # OUT held this very merge already: nothing was done
    warnings: tuple[str, ...] = ()
    estimated_seconds: float | None = None  # what the start line said this merge would take
    output_tensors: int = 0  # the tensors OUT holds, when not one per edited or copied matrix (an adapter's A and B)

    @classmethod
    def from_report(cls, out: Path, already_complete: bool = False) -> MergeSummary:
        """The summary of a finished merge, read back from its report."""
        s = read_report(out)["summary"]
        return cls(
            out,
            s["tensors"],
            s["edited"],
            s["copied"],
            s["dropped"],
            s["output_bytes"],
            s["seconds"],
            out / REPORT_NAME,
            resumed=s["tensors"],
            already_complete=already_complete,
            output_tensors=s.get("output_tensors", 0),
        )

    @property
    def counted(self) -> str:
        """'147 tensors', or '28 matrices into 56 tensors' where a matrix's result is several tensors (`verify`
        counts OUT's tensors)."""
        if not self.output_tensors or self.output_tensors == self.tensors:
            return f"{self.tensors} tensors"
        return f"{self.tensors} matrices into {self.output_tensors} tensors"

    def line(self) -> str:
        if self.already_complete:
            return (
                f"{self.out} is already complete (the same merge: same inputs and options): nothing to do; "
                f"{self.counted}, {self.edited} edited"
            )
        resumed = f", {self.resumed} resumed from an earlier run" if self.resumed else ""
        said = "" if self.estimated_seconds is None else f" (estimated ~{format_duration(self.estimated_seconds)})"
        return (
            f"merged {self.counted} ({self.edited} edited, {self.copied} copied, "
            f"{self.dropped} dropped{resumed}) in {self.seconds:.1f} s{said} -> {self.out} "
            f"({format_size(self.output_bytes)})"
        )

    __str__ = line


def iso_time(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def short_digest(fingerprint: Any) -> str:
    """A 12-hex digest of an input's fingerprint: two reports of one input show the same one."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12]


def describe_input(root: Path, fingerprint: dict | None, kind: str) -> dict[str, Any]:
    """An input as a later reader can find it again: its absolute path, or the repo id and commit of a
    Hugging Face cache snapshot (``.../models--org--name/snapshots/<commit>``)."""
    root = root if store.is_url(root) else root.absolute()
    info: dict[str, Any] = {"path": str(root), "kind": kind}
    if fingerprint is not None:  # `plan` reads no tensor data, so it has none
        info["fingerprint"] = short_digest(fingerprint)
    cached = cache_repo_id(root)
    if cached is not None:
        info["repo"], info["commit"] = cached
    return info


def describe_inputs(plan: MergePlan, fingerprint: dict | None = None) -> dict[str, Any]:
    """Both inputs of a plan; with the run's fingerprint, each with its digest."""
    fp = fingerprint or {}
    ft_kind = "LoRA adapter" if plan.adapter is not None else "checkpoint"
    return {
        "base": describe_input(plan.base.root, fp.get("base"), "checkpoint"),
        "finetuned": describe_input((plan.adapter or plan.finetuned).root, fp.get("finetuned"), ft_kind),
    }


def run_head(plan: MergePlan, fingerprint: dict, out: Path) -> dict[str, Any]:
    """What is known before the first tensor: stored in the state, so an interrupted run can be reported."""
    return {
        "out": str(out),
        "inputs": describe_inputs(plan, fingerprint),
        "options": plan.options.as_dict(),
        "jobs": [j.name for j in plan.jobs],
        "dropped": list(plan.dropped),
        "output_bytes": plan.bytes_to_write,
    }


@dataclass(frozen=True)
class Outcome:
    """Where a run stands, for its report: what the state or a finished OUT says of it."""

    state: str  # "complete", "running" or "interrupted"
    out: Path
    seconds: float
    finished_at: float | None
    fingerprint: dict | None


def assemble(head: dict, attempts: list[dict], rows: list[dict], outcome: Outcome) -> dict[str, Any]:
    """The report document of a finished or interrupted run (the same structure for both)."""
    state, out, seconds, finished_at, fingerprint = (
        outcome.state,
        outcome.out,
        outcome.seconds,
        outcome.finished_at,
        outcome.fingerprint,
    )
    stamped = [{**a, "started_at": iso_time(a["started_at"])} for a in attempts]
    last_commit = max((r.get("committed_at", 0.0) for r in rows), default=0.0)
    doc: dict[str, Any] = {
        "streamsoup": __version__,
        "document": "report",
        "method": METHOD,
        "state": state,
        "out": str(out),
        "base": head["inputs"]["base"]["path"],
        "finetuned": head["inputs"]["finetuned"]["path"],
        "inputs": head["inputs"],
        "options": head["options"],
        "machine": (attempts[-1].get("machine") if attempts else None) or {},
        "run": {
            "started_at": stamped[0]["started_at"] if stamped else None,
            "finished_at": iso_time(finished_at) if finished_at else None,
            "last_commit_at": iso_time(last_commit) if last_commit else None,
            "attempts": stamped,
        },
    }
    if fingerprint is not None:
        doc["fingerprint"] = fingerprint
    rows = [{k: v for k, v in r.items() if k != "committed_at"} for r in rows]
    return build_document(doc, rows, head["jobs"], head["dropped"], head["output_bytes"], seconds)


def read_report(out: Path) -> dict[str, Any]:
    """OUT's report, parsed within bounds and checked for what `merge`, `verify`, `status` and `report` read
    from it: a damaged one (truncated, edited, another program's) is one line, never a KeyError in a reader.
    OSError as is."""
    path = out / REPORT_NAME
    try:
        doc = read_json(path, REPORT_LIMIT)
    except JsonFileError as exc:
        raise report_damaged(path, str(exc)) from None
    problem = report_problem(doc)
    if problem:
        raise report_damaged(path, problem)
    return doc


def report_damaged(path: Path, problem: str) -> InputError:
    """The one wording for a report streamsoup cannot read."""
    return InputError(
        f"{path} is damaged ({problem}); OUT cannot be checked or described without it: restore it "
        "from a copy, or merge again into a new folder"
    )


def report_problem(doc: Any) -> str | None:
    """What a report lacks of the structure its readers take (the fields every merge has written since 0.4)."""
    if not isinstance(doc, dict):
        return "not a JSON object"
    for key, kind in (
        ("streamsoup", str),
        ("base", str),
        ("finetuned", str),
        ("options", dict),
        ("summary", dict),
        ("tensors", list),
    ):
        if not isinstance(doc.get(key), kind):
            return f"no {key!r} {'text' if kind is str else 'object' if kind is dict else 'list'}"
    for key in ("tensors", "edited", "copied", "dropped", "output_bytes"):
        if not _count(doc["summary"].get(key)):
            return f"summary.{key} is not a count"
    if not _number(doc["summary"].get("seconds")):
        return "summary.seconds is not a number"
    for i, row in enumerate(doc["tensors"]):
        if not isinstance(row, dict) or not isinstance(row.get("name"), str):
            return f"tensors[{i}] has no name"
        if len(row["name"]) > 1000:
            return f"tensors[{i}] has a name of {len(row['name'])} characters"
        if not _count(row.get("crc32c")):
            return f"tensors[{i}] ({row['name']}) has no crc32c"
        outputs, expert = row.get("outputs"), row.get("expert")
        if outputs is not None and not (
            isinstance(outputs, list) and outputs and all(isinstance(o, str) for o in outputs)
        ):
            return f"tensors[{i}] ({row['name']}) has outputs that are not a list of names"
        if expert is not None and not (
            isinstance(expert, list) and len(expert) == 2 and all(map(_count, expert)) and expert[0] < expert[1]
        ):
            return f"tensors[{i}] ({row['name']}) has an expert that is not [index, count]"
    for key, kind in (("inputs", dict), ("run", dict), ("fingerprint", dict), ("shards", dict), ("dropped", list)):
        if key in doc and doc[key] is not None and not isinstance(doc[key], kind):
            return f"{key!r} is not {'an object' if kind is dict else 'a list'}"
    if any(not isinstance(s, dict) for s in (doc.get("shards") or {}).values()):
        return "a shard of 'shards' is not an object"
    return None


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def _number(value: Any) -> bool:
    return _count(value) or isinstance(value, float) and math.isfinite(value)


def write_report(folder: Path, report: dict) -> Path:
    path = folder / REPORT_NAME
    writer.write_json(path, report)
    return path


def write_spectra(folder: Path, spectra: dict[str, np.ndarray]) -> Path:
    """The singular values of every edited tensor (float64, by tensor name), durable before the publish.

    An .npz (np.load reads it) written with fixed member timestamps: the same merge gives the same bytes.
    """
    path = folder / SPECTRA_NAME
    with open(path, "wb") as f:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as archive:
            for name, s in sorted(spectra.items()):  # by name, not by which lane finished first
                info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                with archive.open(info, "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asarray(s, dtype=np.float64), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    return path


def read_spectra(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        return {}
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}
