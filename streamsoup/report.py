"""streamsoup_report.json: what was done to every tensor, and why."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from . import __version__, writer
from .options import format_size
from .plan import EDIT, MergePlan
from .tasks import TensorResult

REPORT_NAME = "streamsoup_report.json"


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

    @classmethod
    def from_report(cls, out: Path, already_complete: bool = False) -> MergeSummary:
        """The summary of a finished merge, read back from its report."""
        s = json.loads((out / REPORT_NAME).read_text())["summary"]
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
        )

    def line(self) -> str:
        if self.already_complete:
            return (f"{self.out} is already complete (the same merge: same inputs and options): nothing to do; "
                    f"{self.tensors} tensors, {self.edited} edited")  # fmt: skip
        resumed = f", {self.resumed} resumed from an earlier run" if self.resumed else ""
        return (
            f"merged {self.tensors} tensors ({self.edited} edited, {self.copied} copied, "
            f"{self.dropped} dropped{resumed}) in {self.seconds:.1f} s -> {self.out} ({format_size(self.output_bytes)})"
        )


def build_report(plan: MergePlan, results: list[TensorResult], seconds: float, fingerprint: dict) -> dict:
    """The report; its `fingerprint` lets a rerun of the same command tell that OUT is already this merge."""
    edited = sum(r.action == EDIT for r in results)
    return {
        "streamsoup": __version__,
        "method": "MonoSoup (arXiv 2602.09689)",
        "base": str(plan.base.root),
        "finetuned": str((plan.adapter or plan.finetuned).root),
        "options": plan.options.output_fingerprint(),
        "fingerprint": fingerprint,
        "summary": {
            "tensors": len(results),
            "edited": edited,
            "copied": len(results) - edited,
            "dropped": len(plan.dropped),
            "output_bytes": plan.bytes_to_write,
            "seconds": round(seconds, 3),
            "phase_seconds": phase_totals(results),
        },
        "tensors": [r.as_dict() for r in results],
        "dropped": [{"name": n, "action": "drop", "reason": "only in base"} for n in plan.dropped],
    }


def phase_totals(results: list[TensorResult]) -> dict[str, float]:
    """Seconds per phase (read, gram, eigh, project, write) summed over the tensors computed by this run."""
    total: dict[str, float] = {}
    for r in results:
        for phase, sec in (r.phases or {}).items():
            total[phase] = total.get(phase, 0.0) + sec
    return {k: round(v, 3) for k, v in total.items()}


def write_report(folder: Path, report: dict) -> Path:
    path = folder / REPORT_NAME
    writer.write_json(path, report)
    return path
