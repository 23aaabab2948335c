"""`streamsoup report`: read a finished output, or the state of a run still going or interrupted."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UsageError
from ..io import writer
from ..io.runlock import RunLock
from ..io.state import RunState, find_state
from ..paths import expand_path
from .figure import save_figure
from .record import (
    REPORT_NAME,
    SPECTRA_NAME,
    Outcome,
    assemble,
    read_report,
    read_spectra,
    report_damaged,
    short_digest,
)
from .summary import format_report


@dataclass
class RunReport:
    """What `streamsoup.report` returns: the report document and the spectra; ``str()`` is the CLI's summary."""

    document: dict[str, Any]
    spectra: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def state(self) -> str:
        return self.document["state"]

    @property
    def modules(self) -> dict[str, dict[str, Any]]:
        return self.document["modules"]

    @property
    def summary(self) -> dict[str, Any]:
        return self.document["summary"]

    def as_dict(self) -> dict[str, Any]:
        return self.document

    @classmethod
    def from_dict(cls, document: dict[str, Any]) -> RunReport:
        return cls(document)

    def save_png(self, path: str | Path, force: bool = False) -> Path:
        """One figure: k/rank and lambdas per layer and module kind, and a few spectra (needs matplotlib);
        an existing file is replaced only with `force`."""
        return save_figure(self.document, self.spectra, expand_path(path, "--png").absolute(), force)

    def __str__(self) -> str:
        return format_report(self.document)


def read_run(path: str | Path) -> RunReport:
    """OUT (finished), OUT.partial or OUT itself of a run not finished, or the --work-dir state folder."""
    path = expand_path(path, "OUT").absolute()
    if (path / REPORT_NAME).exists():
        return _finished(path)
    if path.name.endswith(".partial") and path.is_dir():
        return _from_state(find_state(path), path, path.with_name(path.name[: -len(".partial")]))
    if (path / "zarr.json").exists():  # a --work-dir state folder
        return _from_state(path, None, None)
    partial = writer.partial_dir(path)
    if partial.exists():
        return _from_state(find_state(partial), partial, path)
    if path.exists():
        raise UsageError(
            f"{path} is not a streamsoup output (no {REPORT_NAME}, and no {partial.name} of an "
            "interrupted run beside it)"
        )
    raise UsageError(f"no merge at {path}: neither {path.name} nor {partial.name} exists")


def _finished(out: Path) -> RunReport:
    doc = read_report(out)
    try:  # the rows and fields beyond what read_report checks, as the summary formats them
        document = _rebuilt(doc, out)
        format_report(document)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as exc:
        raise report_damaged(out / REPORT_NAME, f"a field is missing or of the wrong type: {exc!r}"[:200]) from None
    return RunReport(document, read_spectra(out / SPECTRA_NAME))


def _rebuilt(doc: dict[str, Any], out: Path) -> dict[str, Any]:
    """The document `report` shows, assembled again from a finished report as from a state."""
    head = {
        "inputs": doc.get("inputs") or _inputs_of_old_report(doc),
        "options": doc["options"],
        "jobs": [r["name"] for r in doc["tensors"]],
        "dropped": [d["name"] for d in doc.get("dropped", [])],
        "output_bytes": doc["summary"]["output_bytes"],
    }
    attempts = [{**a, "started_at": _epoch(a["started_at"])} for a in (doc.get("run") or {}).get("attempts", [])]
    finished = (doc.get("run") or {}).get("finished_at")
    outcome = Outcome(
        "complete", out, doc["summary"]["seconds"], _epoch(finished) if finished else None, doc.get("fingerprint")
    )
    document = assemble(head, attempts, doc["tensors"], outcome)
    document["streamsoup"] = doc["streamsoup"]  # the version that made OUT, not the one reading it
    return document


def _from_state(state_path: Path, partial: Path | None, out: Path | None) -> RunReport:
    if not state_path.exists():
        where = partial or state_path
        raise UsageError(f"{where} has no progress recorded yet (the run stopped before its first tensor)")
    try:
        state = RunState.read(state_path)
        head = state.head
    except Exception as exc:  # not a zarr group of ours
        raise UsageError(
            f"{state_path} is not a streamsoup run state ({type(exc).__name__}); pass OUT, "
            "OUT.partial or the --work-dir folder"
        ) from None
    if head is None:
        raise UsageError(
            f"{state_path} was written by a streamsoup older than this one and does not record its "
            "inputs; `streamsoup status` still shows its progress"
        )
    out = out or Path(head.get("out", state_path))
    partial = partial or writer.partial_dir(out)
    markers = sorted(state.committed().items())
    rows = [{**m.row, "committed_at": m.committed_at} for _, m in markers]
    spectra = state.spectra([m for _, m in markers])[0]  # a damaged one is left out: the rerun recomputes it
    running = partial.exists() and RunLock.holder(partial) is not None
    outcome = Outcome("running" if running else "interrupted", out, state.elapsed(), None, state.fingerprint)
    document = assemble(head, state.attempts, rows, outcome)
    return RunReport(document, spectra)


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def _inputs_of_old_report(doc: dict[str, Any]) -> dict[str, Any]:
    """Reports of streamsoup < 0.3 name the inputs only by path."""
    fp = doc.get("fingerprint") or {}
    return {
        role: {"path": doc[role], "kind": "checkpoint", "fingerprint": short_digest(fp.get(role))}
        for role in ("base", "finetuned")
    }
