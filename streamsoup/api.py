"""The Python API: ``streamsoup.merge(base, finetuned, out, **options)``; the CLI is a thin layer over it.

A merge is: plan (headers only) -> lock OUT.partial -> open or resume the state ->
preallocate shards -> run the graph, committing each tensor as it lands -> publish.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

from distributed import Client
from tqdm import tqdm

from . import __version__, writer
from .errors import Interrupted, RunError, UsageError
from .executor import (
    client_capacity,
    cluster_budget,
    cluster_client,
    dashboard,
    local_client,
    run_graph,
    worker_capacity,
)
from .faults import fault_point
from .graph import GraphTask, build_graph
from .layout import INDEX_NAME
from .options import MergeOptions, format_size
from .plan import MergePlan, plan_merge
from .report import REPORT_NAME, MergeSummary, build_report, write_report
from .resources import check_budget, configure_process, default_max_ram, default_max_vram, process_rss, resolve_lanes
from .schedule import Budget, schedule
from .signals import MESSAGE, InterruptGuard
from .state import LOCK_NAME, POINTER_NAME, STATE_NAME, RunLock, RunState
from .tasks import Execution, TaskContext, TensorResult

log = logging.getLogger(__name__)


def merge(
    base: str | Path,
    finetuned: str | Path,
    out: str | Path,
    *,
    config: str | Path | None = None,
    fresh: bool = False,
    work_dir: str | Path | None = None,
    progress: bool = False,
    **options: Any,
) -> MergeSummary:
    """MonoSoup-edit FINETUNED against BASE into the new folder OUT; returns a summary.

    `options` are the fields of MergeOptions (``rank_rule="energy"``, ``shard_size="2GB"``, ...),
    layered over the YAML file `config`. OUT appears only when complete; until then the
    work lives in ``OUT.partial/`` and rerunning the same call resumes it.
    """
    start = time.perf_counter()
    opts = MergeOptions.create(config, **options)
    out = Path(out).absolute()
    plan = plan_merge(base, finetuned, opts)
    fingerprint = run_fingerprint(plan)
    if out.exists():
        return finish_cleanup(out, fingerprint)
    check_output(out, plan)
    try:
        return _run(plan, out, opts, fingerprint, fresh, work_dir, progress, start)
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        raise RunError(
            f"I/O error{where}: {exc.strerror or exc}; the work done so far is kept: "
            "fix the cause (disk space, permissions) and rerun the same command to resume"
        ) from exc


def _run(
    plan: MergePlan,
    out: Path,
    opts: MergeOptions,
    fingerprint: dict[str, Any],
    fresh: bool,
    work_dir: str | Path | None,
    progress: bool,
    start: float,
) -> MergeSummary:
    with ExitStack() as stack:
        client = stack.enter_context(cluster_client(opts.scheduler)) if opts.scheduler else None
        budget = cluster_budget(client, opts) if client else make_budget(opts)
        runs = schedule(plan, budget)
        announce(budget, opts, runs, dashboard(client) if client else None, progress and sys.stderr.isatty())
        opts = replace(opts, threads=budget.lanes.threads)
        return _locked_run(plan, out, opts, fingerprint, fresh, work_dir, progress, start, budget, runs, client)


def _locked_run(plan, out, opts, fingerprint, fresh, work_dir, progress, start, budget, runs, client) -> MergeSummary:
    partial = writer.partial_dir(out)
    state_path = Path(work_dir).absolute() if work_dir else partial / STATE_NAME
    with RunLock(partial) as lock, InterruptGuard() as guard:
        if fresh or not state_path.exists():
            discard(partial, state_path)  # bytes without a state are not trusted
        state = RunState.open(state_path, fingerprint)
        if work_dir:
            (partial / POINTER_NAME).write_text(str(state_path) + "\n")
        resumed = len(state.committed())
        log.info("planned %d tensors (%d to edit), %d already done", len(plan.jobs), len(plan.edits), resumed)
        writer.preallocate(plan.layout, partial)
        ctx = TaskContext(str(partial), str(state_path), opts.checkpoint_seconds)
        results = execute(plan, ctx, opts, runs, budget, state, guard, progress, client)
        with guard.critical():
            finish(plan, partial, out, results, state.elapsed())
            cleanup(out, state_path if work_dir else None)
            lock.release()
    edited = sum(r.action == "edit" for r in results)
    return MergeSummary(
        out,
        len(results),
        edited,
        len(results) - edited,
        len(plan.dropped),
        plan.bytes_to_write,
        time.perf_counter() - start,
        out / REPORT_NAME,
        resumed=resumed,
    )


def run_fingerprint(plan: MergePlan) -> dict[str, Any]:
    """Everything that decides the output bytes: input shards, output options, version."""
    return {
        "streamsoup": __version__,
        "options": plan.options.output_fingerprint(),
        "base": plan.base.fingerprint(),
        "finetuned": plan.finetuned.fingerprint(),
    }


def check_output(out: Path, plan: MergePlan) -> None:
    """OUT must not sit inside either input (we never write into an input)."""
    target = out.resolve()
    for role, ckpt in (("BASE", plan.base), ("FINETUNED", plan.finetuned)):
        root = ckpt.root.resolve()
        if target == root or (root.is_dir() and root in target.parents):
            raise UsageError(f"OUT {out} is inside {role} {ckpt.root}; write the merged model elsewhere")


def discard(partial: Path, state_path: Path) -> None:
    """Empty OUT.partial (keeping our lock) and the state: start over."""
    if partial.exists():
        for entry in partial.iterdir():
            if entry.name == LOCK_NAME:
                continue
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    if state_path.exists():
        shutil.rmtree(state_path)


def make_budget(opts: MergeOptions) -> Budget:
    """Lanes and memory budgets of this run; the RAM left for tasks is what the process does not use already."""
    configure_process()
    lanes = resolve_lanes(opts.devices, opts.lanes, opts.threads)
    max_ram = opts.max_ram or default_max_ram()
    task_ram = check_budget(max_ram, process_rss())
    return Budget(max_ram, task_ram, opts.max_vram or default_max_vram(lanes.devices), lanes)


def announce(budget: Budget, opts: MergeOptions, runs: dict[str, Execution], link: str | None, show: bool) -> None:
    """The budget in force, on the terminal (like the progress bar) and in the -v log."""
    if opts.scheduler:
        workers = f"{budget.lanes.cpu} CPU lane(s), {len(budget.lanes.devices)} GPU lane(s)"
        line = f"cluster {opts.scheduler}: {workers}, up to {format_size(budget.task_ram)} per task"
        line += f"; dashboard {link}" if link else ""
    else:
        source = "" if opts.max_ram else " (default: 70% of available memory; set --max-ram)"
        streamed = sum(r.streamed for r in runs.values())
        extra = f", {streamed} tensor(s) streamed in row blocks" if streamed else ""
        line = f"max-ram {format_size(budget.max_ram)}{source}; {budget.lanes.describe()}{extra}"
    log.info(line)
    if show:
        sys.stderr.write(f"streamsoup: {line}\n")


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
    committed = {key: m.row for key, m in state.committed().items()}
    tasks = build_graph(plan, ctx, opts, runs, committed)
    results: dict[str, TensorResult] = {}
    with tqdm(
        total=plan.bytes_to_write,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="merging",
        disable=None if progress else True,
        dynamic_ncols=True,
    ) as bar:

        def on_done(task: GraphTask, result: TensorResult) -> None:
            if not result.resumed:
                fault_point("commit")
                result = replace(result, attempt=state.attempt)
                with guard.critical():
                    state.commit(task.key, result.crc32c, result.as_dict(), result.singular_values)
            results[task.key] = result
            bar.update(task.nbytes)
            bar.set_postfix_str(f"{len(results)}/{len(tasks)} tensors", refresh=False)

        try:
            if client is not None:
                run_graph(client, tasks, on_done, capacity=client_capacity(client))
            else:
                with local_client(budget) as local:
                    run_graph(local, tasks, on_done, capacity=worker_capacity(budget))
        except KeyboardInterrupt:
            raise Interrupted(MESSAGE) from None
    return [results[job.key] for job in plan.jobs]


def finish(plan: MergePlan, partial: Path, out: Path, results: list[TensorResult], seconds: float) -> None:
    """Side files, index, report; then the atomic rename that makes OUT appear."""
    if plan.finetuned.root.is_dir():
        writer.copy_side_files(plan.finetuned.root, partial)
    index = plan.layout.index_json()
    if index is not None:
        writer.write_json(partial / INDEX_NAME, index)
    write_report(partial, build_report(plan, results, seconds))
    fault_point("publish.before-rename")
    writer.publish(partial, out)
    fault_point("publish.after-rename")


def cleanup(out: Path, external_state: Path | None) -> None:
    """Remove the run's bookkeeping from a published OUT (a kill here is finished by a rerun)."""
    if external_state is not None and external_state.exists():
        shutil.rmtree(external_state)
    for name in (STATE_NAME, POINTER_NAME, LOCK_NAME):
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def finish_cleanup(out: Path, fingerprint: dict[str, Any]) -> MergeSummary:
    """OUT exists: if it is this very merge, killed after its publish, finish the cleanup; else refuse."""
    pointer = out / POINTER_NAME
    state_path = Path(pointer.read_text().strip()) if pointer.exists() else out / STATE_NAME
    same = False
    if state_path.exists() and (out / REPORT_NAME).exists():
        try:
            same = RunState.read(state_path).fingerprint == fingerprint
        except Exception:
            same = False
    if not same:
        raise UsageError(f"OUT {out} already exists; streamsoup never overwrites: choose a new folder or remove it")
    cleanup(out, state_path if pointer.exists() else None)
    return MergeSummary.from_report(out)


def estimate(base: str | Path, finetuned: str | Path, *, config: str | Path | None = None, **options: Any):
    """What `merge` would do with these options: counts, bytes, memory and a time estimate; no tensor data read."""
    from .estimate import calibrate, summarize

    opts = MergeOptions.create(config, **options)
    plan = plan_merge(base, finetuned, opts)
    budget = make_budget(opts)
    runs = schedule(plan, budget)
    return summarize(plan, budget, runs, calibrate(budget, Path.cwd()))
