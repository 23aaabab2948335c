"""The Python API: ``streamsoup.merge(base, finetuned, out, **options)``; the CLI is a thin layer over it.

A merge is: plan (headers only) -> lock OUT.partial -> open or resume the state ->
preallocate shards -> run the graph, committing each tensor as it lands -> publish.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from distributed import Client

from . import __version__, owned, writer
from .audit import RunStatus, VerifyResult, run_status, verify_output
from .cluster import cluster_budget, cluster_client, describe, scheduler_address, worker_resources
from .errors import Interrupted, OptionError, RunError, UsageError
from .estimate import PlanSummary, calibrate, summarize
from .executor import local_client, run_graph, worker_capacity
from .faults import fault_point
from .graph import GraphTask, build_graph
from .layout import INDEX_NAME
from .options import MergeOptions, expand_path, format_size
from .planner import MergePlan, plan_merge
from .preflight import (
    check_adapter_trained,
    check_disk_space,
    check_values_differ,
    output_needs,
    small_side,
    state_bytes,
)
from .progress import Progress
from .reporting import REPORT_NAME, MergeSummary, RunReport, read_run, run_head, write_report, write_spectra
from .reporting.record import assemble
from .resources import (
    check_budget,
    check_max_ram,
    check_max_vram,
    configure_process,
    default_max_ram,
    default_max_vram,
    machine_info,
    physical_ram,
    process_rss,
    resolve_lanes,
)
from .schedule import Budget, schedule
from .sidefiles import SideFile, copy_side_files, side_files
from .signals import MESSAGE, InterruptGuard
from .sources import ADAPTER_CONFIG
from .state import LOCK_NAME, POINTER_NAME, STATE_ENTRIES, STATE_NAME, RunLock, RunState, describe_changes
from .tasks import Execution, TaskContext, TensorResult

log = logging.getLogger(__name__)


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
    """
    start = time.perf_counter()
    opts = MergeOptions.create(config, **options)
    out = expand_path(out).absolute()
    plan = plan_merge(base, finetuned, opts)
    fingerprint = run_fingerprint(plan)
    if out.exists():
        return existing_output(out, fingerprint)
    check_output(out, plan)
    plan_side_files(plan)  # an unreadable or outside side file is found now, not after all the compute
    for warning in plan.warnings:
        log.warning(warning)
    if plan.adapter is not None:
        check_adapter_trained(plan.adapter.root, [j.lora for j in plan.jobs if j.lora is not None])
    else:
        check_values_differ(plan.base, plan.finetuned, [j.name for j in plan.edits])
    try:
        return _run(plan, out, opts, fingerprint, fresh, progress, start)
    except OSError as exc:
        raise io_failure(exc, out) from exc


def io_failure(exc: OSError, out: Path) -> RunError:
    """One line for a failed read or write: which file (the output's folder when the OS names none), and
    whether anything was kept to resume from."""
    partial = writer.partial_dir(out)
    where = exc.filename or (f"the filesystem of {partial}" if exc.errno == errno.ENOSPC else None)
    what = f"I/O error ({where})" if where else "I/O error"
    if owned.owned(partial, out, "partial") and len(os.listdir(partial)) > 2:  # more than our marker and lock
        then = "the work done so far is kept: fix the cause (disk space, permissions) and rerun the same command " \
               "to resume"
    else:
        then = "nothing was written: fix the cause (disk space, permissions, a writable folder for OUT) and rerun"
    return RunError(f"{what}: {exc.strerror or exc}; {then}")


@dataclass(frozen=True)
class RunSetup:
    """One attempt of a merge, decided before its lock is taken."""

    plan: MergePlan
    out: Path
    opts: MergeOptions
    fingerprint: dict[str, Any]
    fresh: bool
    progress: bool
    start: float
    state_path: Path
    budget: Budget
    runs: dict[str, Execution]
    client: Client | None
    machine: dict[str, Any]


def _run(
    plan: MergePlan,
    out: Path,
    opts: MergeOptions,
    fingerprint: dict[str, Any],
    fresh: bool,
    progress: bool,
    start: float,
) -> MergeSummary:
    with ExitStack() as stack:
        on_cluster = bool(opts.scheduler or opts.scheduler_file)
        client = stack.enter_context(cluster_client(opts)) if on_cluster else None
        budget = cluster_budget(client, opts) if client else make_budget(opts, plan.adapter is not None)
        runs = schedule(plan, budget)
        partial = writer.partial_dir(out)
        state_path = state_location(opts.work_dir, out, partial)
        check_space(plan, runs, budget, partial, state_path, fresh)
        line = describe(client, budget, scheduler_address(opts)) if client else describe_local(budget, opts, runs)
        log.info(line)
        if progress:
            sys.stderr.write(f"streamsoup: {line}\n")
        opts = replace(opts, threads=budget.lanes.threads)
        machine = machine_info(budget.lanes, budget.max_ram, budget.max_vram, line)
        setup = RunSetup(plan, out, opts, fingerprint, fresh, progress, start, state_path, budget, runs, client,
                         machine)  # fmt: skip
        return _locked_run(setup)


def _locked_run(run: RunSetup) -> MergeSummary:
    plan, opts, state_path, out = run.plan, run.opts, run.state_path, run.out
    partial = writer.partial_dir(out)
    claim_partial(partial, out)
    try:
        with RunLock(partial) as lock, InterruptGuard() as guard:
            if out.exists():  # another merge of this OUT published while this one planned
                return _published_meanwhile(partial, out, run.fingerprint)
            if run.fresh or not owned.owned(state_path, out, "state"):
                discard(partial, state_path, out)  # bytes without a state are not trusted
            state = RunState.open(state_path, out, run.fingerprint, run_head(plan, run.fingerprint, out), run.machine)
            if opts.work_dir:
                (partial / POINTER_NAME).write_text(str(state_path) + "\n")
            resumed = len(state.committed())
            log.info("planned %d tensors (%d to edit), %d already done", len(plan.jobs), len(plan.edits), resumed)
            writer.preallocate(plan.layout, partial)
            ctx = TaskContext(str(partial), str(state_path), opts.checkpoint_seconds)
            results = execute(plan, ctx, opts, run.runs, run.budget, state, guard, run.progress, run.client)
            with guard.critical():
                if not finish(plan, partial, out, results, state):
                    return _published_meanwhile(partial, out, run.fingerprint)
                cleanup(out, state_path if opts.work_dir else None)
                lock.release()
    except (Interrupted, KeyboardInterrupt):
        raise
    except Exception as exc:  # whatever a task or the state saw, the cause is the folder that is gone
        if not owned.owned(partial, out, "partial") and not out.exists():
            raise RunError(f"{partial} vanished during the run (removed by another process?); nothing was "
                           "published: rerun the same command to start over") from exc  # fmt: skip
        raise
    edited = sum(r.action == "edit" for r in results)
    return MergeSummary(
        out,
        len(results),
        edited,
        len(results) - edited,
        len(plan.dropped),
        plan.bytes_to_write,
        time.perf_counter() - run.start,
        out / REPORT_NAME,
        resumed=resumed,
        warnings=plan.warnings,
    )


def state_location(work_dir: str, out: Path, partial: Path) -> Path:
    """Where the resume state lives: inside OUT.partial, or under --work-dir.

    --work-dir is the state folder itself when streamsoup makes it (absent) or made it for this OUT
    (a rerun); an existing folder of the user's gets a subfolder of its own, so nothing of theirs is
    ever touched, and only that subfolder is removed once OUT is published.
    """
    if not work_dir:
        return partial / STATE_NAME
    root = Path(work_dir).absolute()
    if not os.path.lexists(root) or owned.owned(root, out, "state"):
        return root
    if not owned.is_dir(root.resolve()):
        raise OptionError("work_dir", f"{root} exists and is not a folder; give a folder (new or existing)")
    digest = hashlib.sha256(str(out).encode()).hexdigest()[:8]
    return root / f"streamsoup-state-{out.name}-{digest}"


def claim_partial(partial: Path, out: Path) -> None:
    """Make OUT.partial, marked as this OUT's; an existing one is used only if streamsoup made it for OUT."""
    if not os.path.lexists(partial):
        try:
            owned.create(partial, out, "partial")
            return
        except FileExistsError:  # made by a concurrent merge of this OUT just now: its marker decides
            time.sleep(0.2)
    holder = RunLock.holder(partial) if owned.is_dir(partial) else None
    if holder is not None:
        raise UsageError(f"another streamsoup merge ({holder}) is writing {partial}; wait for it to finish or stop "
                         "it first")  # fmt: skip
    if not owned.owned(partial, out, "partial"):
        what = "a symlink" if partial.is_symlink() else "not a folder" if not partial.is_dir() else \
            f"a folder without streamsoup's marker ({owned.MARKER}) for this OUT"
        raise UsageError(f"{partial} exists and is {what}; streamsoup never writes into or empties what it did "
                         "not make: move it away or remove it, then rerun")  # fmt: skip


def _published_meanwhile(partial: Path, out: Path, fingerprint: dict[str, Any]) -> MergeSummary:
    """OUT appeared while this run held its own OUT.partial: the same merge finished elsewhere, or refused."""
    summary = existing_output(out, fingerprint)  # refuses a different merge, naming the difference
    owned.remove(partial, out, "partial", lambda name: True)  # ours, made by this very run: its work is not needed
    log.warning("%s was published by another run of the same merge meanwhile; this run's work is discarded", out)
    return summary


def run_fingerprint(plan: MergePlan) -> dict[str, Any]:
    """Everything that decides the output bytes: input shards, output options, version."""
    return {
        "streamsoup": __version__,
        "options": plan.options.output_fingerprint(),
        "base": plan.base.fingerprint(),
        "finetuned": (plan.adapter or plan.finetuned).fingerprint(),
    }


def check_output(out: Path, plan: MergePlan) -> None:
    """OUT must not sit inside either input (we never write into an input)."""
    target = out.resolve()
    for role, ckpt in (("BASE", plan.base), ("FINETUNED", plan.adapter or plan.finetuned)):
        root = ckpt.root.resolve()
        if target == root or (root.is_dir() and root in target.parents):
            raise UsageError(f"OUT {out} is inside {role} {ckpt.root}; write the merged model elsewhere")


def discard(partial: Path, state_path: Path, out: Path) -> None:
    """Empty OUT.partial (keeping our lock) and the state: start over. Only folders streamsoup made are touched."""
    owned.clear(partial, out, "partial", keep=(LOCK_NAME,))
    if state_path.parent != partial and owned.owned(state_path, out, "state"):
        owned.clear(state_path, out, "state")


def make_budget(opts: MergeOptions, io_bound: bool = False) -> Budget:
    """Lanes and memory budgets of this run; the RAM left for tasks is what the process does not use already.

    `io_bound` (an adapter merge: each task streams W0 through a thin GEMM): by default one lane per
    core with one thread each, so one tensor's reads, writes and fdatasync overlap another's compute.
    """
    configure_process()
    lanes = resolve_lanes(opts.devices, opts.lanes or ((os.cpu_count() or 1) if io_bound else 1), opts.threads)
    if opts.max_ram:
        check_max_ram(opts.max_ram, physical_ram())
    if opts.max_vram:
        check_max_vram(opts.max_vram, lanes.devices)
    max_ram = opts.max_ram or default_max_ram()
    task_ram = check_budget(max_ram, process_rss())
    return Budget(max_ram, task_ram, opts.max_vram or default_max_vram(lanes.devices), lanes)


def check_space(plan: MergePlan, runs: dict[str, Execution], budget: Budget, partial: Path, state_path: Path,
                fresh: bool) -> None:  # fmt: skip
    """Before any tensor is computed: room for what remains to write on OUT's and the state's filesystems."""
    streamed = [small_side(j.finetuned) for j in plan.edits if runs[j.key].streamed]
    widths = [small_side(j.finetuned) for j in plan.edits]
    existing = partial if partial.exists() and not fresh else partial / ".none"
    needs = {partial: output_needs(plan.layout, existing, plan.side_roots)}
    state = state_bytes(widths, streamed, budget.lanes.total, len(plan.jobs))
    needs[state_path] = needs.get(state_path, 0) + state
    check_disk_space(needs)


def describe_local(budget: Budget, opts: MergeOptions, runs: dict[str, Execution]) -> str:
    """The budget in force, for the terminal, the batch log and the -v log."""
    source = "" if opts.max_ram else " (70% of available memory; set --max-ram)"
    streamed = sum(r.streamed for r in runs.values())
    extra = f", {streamed} tensor(s) streamed in row blocks" if streamed else ""
    return f"max-ram {format_size(budget.max_ram)}{source}; {budget.lanes.describe()}{extra}"


def execute(
    plan: MergePlan,
    ctx: TaskContext,
    opts: MergeOptions,
    runs: dict[str, Execution],
    budget: Budget,
    state: RunState,
    guard: InterruptGuard,
    progress: bool,
    client: Client | None = None,
) -> list[TensorResult]:
    markers, damaged = state.usable()
    if damaged:
        shown = "; ".join(f"{key}: {why}" for key, why in sorted(damaged.items())[:3])
        more = f" and {len(damaged) - 3} more" if len(damaged) > 3 else ""
        log.warning("%d record(s) of the resume state did not verify (%s%s); their tensors are recomputed",
                    len(damaged), shown, more)  # fmt: skip
        state.forget(list(damaged))
    committed = {key: m.row for key, m in markers.items()}
    tasks = build_graph(plan, ctx, opts, runs, committed)
    results: dict[str, TensorResult] = {}
    done = [t for t in tasks if t.key in committed]
    with Progress(len(tasks), plan.bytes_to_write, len(done), sum(t.nbytes for t in done), enabled=progress) as bar:

        def on_done(task: GraphTask, result: TensorResult) -> None:
            if not result.resumed:
                fault_point("commit")
                result = replace(result, attempt=state.attempt)
                with guard.critical():
                    state.commit(task.key, result.crc32c, result.as_dict(), result.singular_values)
            results[task.key] = result
            if task.key not in committed:  # resumed tensors are in the bar's starting count already
                bar.advance(task.nbytes)

        try:
            if client is not None:
                run_graph(client, tasks, on_done, worker_resources(client), watch=True, tick=bar.tick)
            else:
                with local_client(budget) as local:
                    run_graph(local, tasks, on_done, {"local": worker_capacity(budget)}, tick=bar.tick)
        except KeyboardInterrupt:
            raise Interrupted(MESSAGE) from None
    return [results[job.key] for job in plan.jobs]


def finish(plan: MergePlan, partial: Path, out: Path, results: list[TensorResult], state: RunState) -> bool:
    """Side files, index, spectra, report; then the atomic rename that makes OUT appear.

    False: OUT appeared meanwhile (a concurrent run published it), and nothing was replaced.
    """
    copy_side_files(plan_side_files(plan), partial)
    if plan.save == "adapter":
        writer.write_json(partial / ADAPTER_CONFIG, plan.adapter.reweighed_config())
    index = plan.layout.index_json()
    if index is not None:
        writer.write_json(partial / INDEX_NAME, index)
    committed = sorted(state.committed().items())  # in plan order: the same merge writes the same bytes
    spectra, damaged = state.spectra([m for _, m in committed])
    if damaged:
        raise RunError(f"the resume state {state.path} changed during the run (the spectrum of {damaged[0]} does "
                       "not verify); rerun the same command: what does not verify is recomputed")  # fmt: skip
    write_spectra(partial, spectra)
    report = assemble(state.head, state.runs,  # the head this attempt stored when it opened the state
                      [r.as_dict() for r in results], "complete", out, state.elapsed(), time.time(),
                      state.fingerprint)  # fmt: skip
    report["shards"] = plan.layout.records()
    write_report(partial, report)
    fault_point("publish.before-rename")
    if not writer.publish(partial, out):
        return False
    fault_point("publish.after-rename")
    return True


def plan_side_files(plan: MergePlan) -> list[SideFile]:
    """The config and tokenizer files OUT gets (not an adapter's own config in a merged model), all checked."""
    adapter_root = plan.adapter.root if plan.adapter is not None and plan.save == "model" else None
    return [f for root in plan.side_roots
            for f in side_files(root, skip=(ADAPTER_CONFIG, "README.md") if root == adapter_root else ())]  # fmt: skip


def cleanup(out: Path, external_state: Path | None) -> None:
    """Remove the run's bookkeeping from a published OUT (a kill here is finished by a rerun).

    A state folder is removed only when streamsoup made it for this OUT and it holds nothing else.
    """
    for state in (external_state, out / STATE_NAME):
        if state is not None and os.path.lexists(state) and not owned.remove(state, out, "state", is_state_entry):
            log.warning("left %s in place: it is not a resume state streamsoup made for %s (or it holds other "
                        "files)", state, out)  # fmt: skip
    for name in (POINTER_NAME, LOCK_NAME, owned.MARKER):
        path = out / name
        if os.path.lexists(path) and not owned.is_dir(path):
            path.unlink()


def is_state_entry(name: str) -> bool:
    return name in STATE_ENTRIES


def existing_output(out: Path, fingerprint: dict[str, Any]) -> MergeSummary:
    """OUT exists. The same merge (its report records the fingerprint): nothing to do, or only the cleanup a
    kill after the publish rename left. Anything else is refused: streamsoup never overwrites."""
    try:
        recorded = json.loads((out / REPORT_NAME).read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if not isinstance(recorded, dict):
        raise UsageError(f"OUT {out} already exists and is not a streamsoup output; streamsoup never overwrites: "
                         "choose a new folder or remove it")  # fmt: skip
    if recorded != fingerprint:
        changes = "; ".join(describe_changes(recorded, fingerprint)) or "a different fingerprint"
        raise UsageError(f"OUT {out} already holds a different merge ({changes}); streamsoup never overwrites: "
                         "choose a new folder or remove it")  # fmt: skip
    pointer = out / POINTER_NAME
    leftovers = [p for p in (out / STATE_NAME, pointer, out / LOCK_NAME, out / owned.MARKER) if os.path.lexists(p)]
    if leftovers:
        cleanup(out, read_pointer(pointer))
    return MergeSummary.from_report(out, already_complete=not leftovers)


def read_pointer(pointer: Path) -> Path | None:
    """The --work-dir an OUT's pointer names (only a hint: `cleanup` deletes nothing it cannot prove is ours)."""
    try:
        text = pointer.read_text(errors="replace").strip() if pointer.is_file() else ""
    except OSError:
        return None
    return Path(text) if text.startswith("/") and "\0" not in text else None


def plan(base: str | Path, finetuned: str | Path, *, config: str | Path | None = None,
         **options: Any) -> PlanSummary:  # fmt: skip
    """What `merge` would do with these options: counts, bytes, memory and a time estimate; no tensor data read.

    ``str()`` of the result is what `streamsoup plan` prints, ``.as_dict()`` what `plan --json` prints.
    """
    opts = MergeOptions.create(config, **options)
    plan_names = {f.name for f in MergeOptions.plan_fields()}
    unused = [name for name, value in options.items() if value not in (None, "", False) and name not in plan_names]
    if unused:
        raise OptionError(unused[0], "is not used by plan, which plans a merge on this machine from the headers "
                                     "alone; leave it out")  # fmt: skip
    merge_plan = plan_merge(base, finetuned, opts)
    budget = make_budget(opts, merge_plan.adapter is not None)
    runs = schedule(merge_plan, budget)
    return summarize(merge_plan, budget, runs, calibrate(budget, Path.cwd()))


def status(out: str | Path) -> RunStatus:
    """Progress of a finished, running or interrupted merge (``str()``: what `streamsoup status` prints)."""
    return run_status(out)


def verify(out: str | Path, *, progress: bool = False) -> VerifyResult:
    """Re-read a finished OUT against the checksums of its report; ``.ok`` is False on any mismatch."""
    return verify_output(out, progress=progress)


def report(out: str | Path, *, png: str | Path | None = None) -> RunReport:
    """What MonoSoup did to OUT (finished, or the OUT.partial / --work-dir of an unfinished run).

    ``str()`` is the terminal summary of `streamsoup report`, ``.as_dict()`` its ``--json``;
    `png` (or ``.save_png(path)``) draws the figure (needs matplotlib: ``streamsoup[report]``).
    """
    if png is not None:
        from .reporting.figure import check_png_path, require_matplotlib

        require_matplotlib()
        check_png_path(expand_path(png).absolute())
    result = read_run(out)
    if png is not None:
        result.save_png(png)
    return result
