"""The Python API: ``streamsoup.merge(base, finetuned, out, **options)`` and friends; the CLI is a thin layer over it.

Each function turns its arguments into MergeOptions and hands over to the layer that does
the work: the merge driver (run/driver.py), the planner and its schedule (planning/), the audit, the report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .options import MergeOptions
from .paths import expand_path
from .planning.budget import LoadMark, make_budget
from .planning.cost import calibrate, estimate
from .planning.planner import plan_merge
from .planning.prepare import prepare
from .reporting import MergeSummary, RunReport, read_run
from .reporting.audit import RunStatus, VerifyResult, run_status, verify_output
from .reporting.figure import check_png_path, require_matplotlib
from .reporting.preview import PlanSummary, summarize
from .run.driver import run_merge
from .synthetic import write_demo


def merge(
    base: str | Path,
    finetuned: str | Path,
    out: str | Path,
    *,
    config: str | Path | None = None,
    fresh: bool = False,
    progress: bool = False,
    **options: Any,
) -> MergeSummary:
    """MonoSoup-edit FINETUNED against BASE into the new folder OUT; returns a summary.

    `options` are the fields of MergeOptions (``rank_rule="energy"``, ``shard_size="2GB"``,
    ``work_dir="~/state"``, ...), layered over the YAML file `config`. OUT appears only when
    complete; until then the work lives in ``OUT.partial/`` and rerunning the same call resumes
    it. Called again once OUT is complete, it does nothing and says so (``already_complete``).
    `fresh` is the CLI's ``--fresh``. A library writes nothing to stderr unless asked, so the default
    is the CLI's ``-q``; ``progress=True`` prints the start line and the progress the command shows.
    """
    opts = MergeOptions.create(config, **options)
    return run_merge(base, finetuned, expand_path(out, "OUT").absolute(), opts, fresh=fresh, progress=progress)


def plan(base: str | Path, finetuned: str | Path, *, config: str | Path | None = None, **options: Any) -> PlanSummary:
    """What `merge` would do with these options: counts, bytes, memory and a time estimate; no tensor data read.

    ``str()`` of the result is what `streamsoup plan` prints, ``.as_dict()`` what `plan --json` prints.
    Options that only a merge uses (``scheduler``, ``work_dir``, ...) are refused by name.
    """
    load = LoadMark.now()
    merge_plan = plan_merge(base, finetuned, MergeOptions.for_plan(config, **options))
    schedule = prepare(merge_plan, make_budget(merge_plan.options, merge_plan.adapter is not None, since=load))
    return summarize(schedule, estimate(schedule, calibrate(schedule.budget, Path.cwd())))


def status(out: str | Path) -> RunStatus:
    """Progress of a finished, running or interrupted merge (``str()``: what `streamsoup status` prints)."""
    return run_status(out)


def verify(out: str | Path, *, progress: bool = False) -> VerifyResult:
    """Re-read a finished OUT against the checksums of its report; ``.ok`` is False on any mismatch.

    ``progress=True`` shows the bar the command shows (its ``-q`` is this function's default).
    """
    return verify_output(out, progress=progress)


def report(out: str | Path, *, png: str | Path | None = None, force: bool = False) -> RunReport:
    """What MonoSoup did to OUT (finished, or the OUT.partial / --work-dir of an unfinished run).

    ``str()`` is the terminal summary of `streamsoup report`, ``.as_dict()`` its ``--json``;
    `png` (or ``.save_png(path)``) draws the figure (needs matplotlib: ``streamsoup[report]``) into a new
    file; ``force=True`` lets it replace an existing one.
    """
    if png is not None:
        require_matplotlib()
        check_png_path(expand_path(png, "--png").absolute(), force)
    result = read_run(out)
    if png is not None:
        result.save_png(png, force)
    return result


def demo(folder: str | Path, *, preset: str = "small") -> tuple[Path, Path]:
    """A small Llama-shaped (base, fine-tune) pair in FOLDER/base and FOLDER/finetuned, and the example configs in
    FOLDER/configs: what the quick start merges, from the installed package alone. Returns (base, finetuned)."""
    return write_demo(expand_path(folder, "DIR").absolute(), preset)
