"""The merge run: plan (headers only) -> lock OUT.partial -> open or resume the state ->
preallocate shards -> run the graph, committing each tensor as it lands -> publish (publish.py).

Everything a run decides before its lock is taken is one Attempt; nothing in OUT.partial is
touched until the lock is held, and a folder streamsoup did not make is never written into.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from distributed import Client

from .._version import __version__
from ..errors import Interrupted, OptionError, RunError, StreamsoupError, UsageError
from ..faults import fault_point
from ..io import owned, store, writer
from ..io.runlock import LOCK_NAME, Fence, RunLock, held_by
from ..io.state import POINTER_NAME, STATE_NAME, Commit, RunState, check_bound, is_state_entry, kept_line
from ..numerics.hostmemory import configure_process
from ..options import MergeOptions
from ..planning.budget import Budget, LoadMark, machine_info, make_budget, usable_cores
from ..planning.cost import calibrate, estimate
from ..planning.planner import MergePlan, check_values, plan_merge
from ..planning.prepare import Schedule, Target, prepare
from ..reporting import REPORT_NAME, MergeSummary, run_head
from ..tasks.result import TaskContext, TensorResult
from ..units import format_duration, format_size
from .clients import (
    cluster_budget,
    cluster_client,
    dashboard_url,
    describe,
    guard_joining_workers,
    local_client,
    scheduler_address,
    worker_capacity,
    worker_resources,
)
from .commits import CommitBatch
from .executor import run_graph
from .graph import Member, build_graph
from .progress import Progress
from .publish import cleanup, existing_output, finish, partial_entry, plan_side_files, published_meanwhile
from .signals import MESSAGE, InterruptGuard
from .workercheck import Expected, check_workers, folders_expected, inputs_expected

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Request:
    """A merge as asked for: its plan, where it goes, and how the caller wants it run."""

    plan: MergePlan
    out: Path
    fingerprint: dict[str, Any]
    binding: dict[str, Any]  # role -> input file -> identity (io/binding.py)
    fresh: bool
    progress: bool
    start: float
    load: LoadMark  # the machine's load is measured from here (planning/budget.py: busy_cores)


@dataclass(frozen=True)
class Attempt:
    """One attempt of a merge, decided before its lock is taken."""

    request: Request
    schedule: Schedule
    state_path: Path
    client: Client | None
    machine: dict[str, Any]
    estimate: float | None = None  # seconds, as `streamsoup plan` would say (merges of ESTIMATE_BYTES or more)
    sees: Expected | None = None  # on a user's cluster: the inputs every worker must see as this machine does


#: a merge writing this much calibrates this machine (~3 s) to say its estimated time at the start
ESTIMATE_BYTES = 1 << 30


def estimated_seconds(schedule: Schedule, out: Path) -> float | None:
    """`plan`'s estimate for a local merge big enough that its ~3 s calibration does not matter; else None."""
    if schedule.plan.bytes_to_write < ESTIMATE_BYTES:
        return None
    return estimate(schedule, calibrate(schedule.budget, out.parent)).seconds


def run_merge(
    base: str | Path, finetuned: str | Path, out: Path, opts: MergeOptions, *, fresh: bool, progress: bool
) -> MergeSummary:
    """Plan, check everything that can be checked before any compute, then run (or find OUT done already)."""
    start, load = time.perf_counter(), LoadMark.now()
    plan = plan_merge(base, finetuned, opts)
    fingerprint = run_fingerprint(plan)
    if out.exists():
        return existing_output(out, fingerprint)
    check_output(out, plan, opts.work_dir)
    check_not_running(writer.partial_dir(out))
    plan_side_files(plan)  # an unreadable or outside side file is found now, not after all the compute
    check_values(plan)
    try:
        return _attempt(Request(plan, out, fingerprint, run_binding(plan), fresh, progress, start, load))
    except OSError as exc:
        raise io_failure(exc, out) from exc


def io_failure(exc: OSError, out: Path) -> RunError:
    """One line for a failed read or write: which file (the output's folder when the OS names none), and
    whether anything was kept to resume from."""
    partial = writer.partial_dir(out)
    where = exc.filename or (f"the filesystem of {partial}" if exc.errno == errno.ENOSPC else None)
    what = f"I/O error ({where})" if where else "I/O error"
    if owned.owned(partial, out, "partial") and len(os.listdir(partial)) > 2:  # more than our marker and lock
        then = (
            "the work done so far is kept: fix the cause (disk space, permissions) and rerun the same command to resume"
        )
    else:
        then = "nothing was written: fix the cause (disk space, permissions, a writable folder for OUT) and rerun"
    return RunError(f"{what}: {exc.strerror or exc}; {then}")


def _attempt(request: Request) -> MergeSummary:
    plan, out, opts = request.plan, request.out, request.plan.options
    sees = None
    with ExitStack() as stack:
        on_cluster = bool(opts.scheduler or opts.scheduler_file)
        client = stack.enter_context(cluster_client(opts)) if on_cluster else None
        partial = writer.partial_dir(out)
        state_path = state_location(opts.work_dir, out, partial)
        threads = opts.threads
        if client:
            budget = cluster_budget(client, opts)
            sees = inputs_expected(request.binding, out)
            check_workers(client, sees)
        else:
            configure_process()
            threads = threads or (0 if request.fresh else earlier_threads(state_path))
            budget = make_budget(opts, plan.adapter is not None, threads, request.load)
        schedule = prepare(plan, budget, Target(partial, state_path, resume=not request.fresh))
        for warning in plan.warnings:  # after the refusals: a refused merge says one line
            log.warning(warning)
        line = describe(client, budget, scheduler_address(opts)) if client else describe_local(schedule)
        estimate = None if client else estimated_seconds(schedule, out)
        if estimate is not None:
            line += f"; estimated ~{format_duration(estimate)} on this machine (as streamsoup plan says)"
        if request.progress:  # the one start line; with progress off (-q, the API's default) it is logged
            sys.stderr.write(f"streamsoup: {line}\n")
        else:
            log.info(line)
        if budget.lanes.busy_cores and budget.lanes.threads > 1 and not threads and not client:
            log.warning(busy_advice(budget))
        machine = machine_info(budget, line)
        return _locked_run(Attempt(request, schedule, state_path, client, machine, estimate, sees))


def _locked_run(attempt: Attempt) -> MergeSummary:
    request, state_path = attempt.request, attempt.state_path
    plan, out, fingerprint = request.plan, request.out, request.fingerprint
    partial = writer.partial_dir(out)
    claim_partial(partial, out)
    try:
        with RunLock(partial) as lock, InterruptGuard() as guard:
            if out.exists():  # another merge of this OUT published while this one planned
                return published_meanwhile(partial, out, fingerprint)
            ours = partial_entry(plan, partial)
            check_partial_entries(partial, ours)  # every run, a resumed one too: OUT.partial becomes OUT
            if request.fresh or not owned.owned(state_path, out, "state"):
                discard(partial, ours, state_path, out)  # bytes without a state are not trusted
            state = RunState.open(
                state_path, out, fingerprint, run_head(plan, fingerprint, out), attempt.machine, request.binding
            )
            if plan.options.work_dir:
                (partial / POINTER_NAME).write_text(str(state_path) + "\n")
            resumed = len(state.committed())
            log.info("planned %d tensors (%d to edit), %d already done", len(plan.jobs), len(plan.edits), resumed)
            writer.preallocate(plan.layout, partial)
            try:
                if attempt.client is not None and attempt.sees is not None:  # do the workers see these folders?
                    made = [partial] if state_path.parent == partial else [partial, state_path]
                    written = [*(partial / shard.file for shard in plan.layout.shards), state_path]
                    folders = folders_expected(made, written, lock.path)
                    check_workers(attempt.client, folders)
                    guard_joining_workers(attempt.client, attempt.sees.merged(folders))
                results = execute(attempt, state, guard, lock.fence())
                check_unchanged(request)
            except StreamsoupError as exc:
                raise kept_work(exc, partial) from exc
            with guard.critical():
                try:
                    published = finish(plan, partial, out, results, state)
                except StreamsoupError as exc:  # a side file in a store gone or changed: OUT.partial holds the work
                    raise kept_work(exc, partial) from exc
                if not published:
                    return published_meanwhile(partial, out, fingerprint)
                cleanup(out, state_path if plan.options.work_dir else None)
                lock.release()
    except (Interrupted, KeyboardInterrupt):
        raise
    except Exception as exc:  # whatever a task or the state saw, the cause is the folder that is gone
        if not owned.owned(partial, out, "partial") and not out.exists():
            raise RunError(
                f"{partial} vanished during the run (removed by another process?); nothing was "
                "published: rerun the same command to start over"
            ) from exc
        raise
    edited = sum(r.action == "edit" for r in results)
    return MergeSummary(
        out,
        len(results),
        edited,
        len(results) - edited,
        len(plan.dropped),
        plan.bytes_to_write,
        time.perf_counter() - request.start,
        out / REPORT_NAME,
        resumed=resumed,
        warnings=plan.warnings,
        estimated_seconds=attempt.estimate,
        output_tensors=len(plan.layout.placements),
    )


def kept_work(exc: StreamsoupError, partial: Path) -> StreamsoupError:
    """The one rule once OUT.partial holds work: a failure exits 1 and keeps it (a bad input found mid-run, an
    input changed meanwhile, as much as an I/O error); exit 2 is only for what is refused before any work."""
    if exc.exit_code != 2:
        return exc
    return RunError(
        f"{exc}; the work done so far is kept in {partial}: rerun the same command once fixed to resume it, or add "
        "--fresh to start over"
    )


def busy_advice(budget: Budget) -> str:
    """Other processes keep cores busy and each lane runs several threads (GPU lanes, or --lanes): say what runs
    faster beside them (the thread count itself stays fixed)."""
    lanes, cores = budget.lanes, usable_cores()
    return (
        f"{lanes.busy_cores} of this machine's {cores} cores are busy with other processes; a merge with "
        f"{lanes.threads} threads per lane waits for them: --lanes {cores} --threads 1 (the CPU default) runs "
        "faster beside them. The thread count does not follow the load, so the same merge always gives "
        "the same bytes"
    )


def earlier_threads(state_path: Path) -> int:
    """The thread count the first attempt of this merge ran with, 0 when there is none (or it had more cores than
    this machine): a resumed merge keeps it, so its remaining tensors are computed as the first attempt's were,
    whatever the load now."""
    if not (state_path / "zarr.json").is_file():
        return 0
    try:
        attempts = RunState.read(state_path).attempts
    except UsageError:  # a damaged state: the run says so and starts it over
        return 0
    threads = attempts[0].get("machine", {}).get("threads") if attempts else None
    return threads if isinstance(threads, int) and 0 < threads <= (os.cpu_count() or 1) else 0


def state_location(work_dir: str, out: Path, partial: Path) -> Path:
    """Where the resume state lives: inside OUT.partial, or under --work-dir.

    --work-dir is the state folder itself when streamsoup makes it (absent) or made it for this OUT
    (a rerun); an existing folder of the user's, or one that will hold OUT, gets a subfolder of its own,
    so nothing of theirs is ever touched, and only that subfolder is removed once OUT is published.
    """
    if not work_dir:
        return partial / STATE_NAME
    root = Path(work_dir).absolute()
    if owned.owned(root, out, "state") or not (os.path.lexists(root) or inside(out, root)):
        return root
    if os.path.lexists(root) and not owned.is_dir(root.resolve()):
        raise OptionError("work_dir", f"{root} exists and is not a folder; give a folder (new or existing)")
    digest = hashlib.sha256(str(out).encode()).hexdigest()[:8]
    return root / f"streamsoup-state-{out.name}-{digest}"


def check_not_running(partial: Path) -> None:
    """Refuse at once while another merge holds OUT.partial (before this one calibrates or says its start line)."""
    holder = RunLock.holder(partial) if owned.is_dir(partial) else None
    if holder is not None:
        raise held_by(holder, partial)


def claim_partial(partial: Path, out: Path) -> None:
    """Make OUT.partial, marked as this OUT's; an existing one is used only if streamsoup made it for OUT."""
    if not os.path.lexists(partial):
        try:
            owned.create(partial, out, "partial")
            return
        except FileExistsError:  # made by a concurrent merge of this OUT just now: its marker decides
            time.sleep(0.2)
    check_not_running(partial)
    if not owned.owned(partial, out, "partial"):
        what = (
            "a symlink"
            if partial.is_symlink()
            else "not a folder"
            if not partial.is_dir()
            else f"a folder without streamsoup's marker ({owned.MARKER}) for this OUT"
        )
        raise UsageError(
            f"{partial} exists and is {what}; streamsoup never writes into or empties what it did "
            "not make: move it away or remove it, then rerun"
        )


def run_fingerprint(plan: MergePlan) -> dict[str, Any]:
    """Everything that decides the output bytes: input shards, output options, version."""
    return {
        "streamsoup": __version__,
        "options": plan.options.output_fingerprint(),
        "base": plan.base.fingerprint(),
        "finetuned": (plan.adapter or plan.finetuned).fingerprint(),
    }


def run_binding(plan: MergePlan, now: bool = False) -> dict[str, Any]:
    """Every input file by identity, as taken before it was read, or `now` (io/binding.py)."""
    return {"base": plan.base.binding(now), "finetuned": (plan.adapter or plan.finetuned).binding(now)}


def check_unchanged(request: Request) -> None:
    """Just before publishing: every input is still the file the run read (its identity was taken before its first
    read, so a change at any moment since counts)."""
    check_bound(request.binding, run_binding(request.plan, now=True), "during this merge")


def inside(path: Path, folder: Path) -> bool:
    """`path` is `folder` or below it (nothing is below a file), links resolved (neither needs to exist)."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or (not folder.is_file() and folder in path.parents)


def check_output(out: Path, plan: MergePlan, work_dir: str) -> None:
    """OUT and --work-dir must not sit inside either input (we never write into an input), and the state not
    inside OUT or OUT.partial (it would be published with the model)."""
    inputs = [
        (role, c.root)
        for role, c in (("BASE", plan.base), ("FINETUNED", plan.adapter or plan.finetuned))
        if not store.is_url(c.root)  # nothing is written into an object store
    ]
    for role, root in inputs:
        if inside(out, root):
            raise UsageError(f"OUT {out} is inside {role} {root}; write the merged model elsewhere")
    if not work_dir:
        return
    work = Path(work_dir).absolute()
    for what, folder in (("OUT", out), ("OUT.partial", writer.partial_dir(out))):
        if inside(work, folder):
            raise OptionError(
                "work_dir",
                f"{work_dir} is inside {what} {folder}: the resume state would be "
                "published with the model; choose a folder outside it",
            )
    for role, root in inputs:
        if inside(work, root):
            raise OptionError(
                "work_dir",
                f"{work_dir} is inside {role} {root}; streamsoup never writes into an "
                "input: choose a folder outside it",
            )


def check_partial_entries(partial: Path, ours: Callable[[str], bool]) -> None:
    """OUT.partial becomes OUT: anything in it that streamsoup does not write (`ours`: publish.partial_entry, which
    takes no symlink, as a write would follow it, for its own) is refused before any work, untouched."""
    foreign = owned.strangers(partial, ours)
    if foreign:
        shown = ", ".join(sorted(foreign)[:5])
        raise UsageError(
            f"{partial} holds {shown}, which streamsoup did not write (or a symlink); it becomes OUT "
            "when the merge is done: move that out of it, then rerun"
        )


def discard(partial: Path, ours: Callable[[str], bool], state_path: Path, out: Path) -> None:
    """Empty OUT.partial (keeping our lock) and the state: start over. Only what streamsoup wrote, in folders it
    made, is removed (check_partial_entries refused anything else first)."""
    owned.clear(partial, out, "partial", lambda name: name != LOCK_NAME and ours(name))
    if state_path.parent != partial and owned.owned(state_path, out, "state"):
        kept = owned.clear(state_path, out, "state", is_state_entry)
        if kept:
            log.warning(kept_line(state_path, kept, f"the resume state of {out} was started over"))


def describe_local(schedule: Schedule) -> str:
    """The budget in force, for the terminal, the batch log and the -v log."""
    budget = schedule.budget
    source = "" if schedule.plan.options.max_ram else " (70% of available memory; set --max-ram)"
    extra = f", {schedule.streamed} tensor(s) streamed in row blocks" if schedule.streamed else ""
    return f"max-ram {format_size(budget.max_ram)}{source}; {budget.lanes.describe()}{extra}"


def execute(attempt: Attempt, state: RunState, guard: InterruptGuard, fence: Fence) -> list[TensorResult]:
    """Run every tensor not committed yet, committing each as it lands; the results in plan order."""
    schedule = attempt.schedule
    plan, opts = schedule.plan, schedule.plan.options
    markers, damaged = state.usable()
    if damaged:
        shown = "; ".join(f"{key}: {why}" for key, why in sorted(damaged.items())[:3])
        more = f" and {len(damaged) - 3} more" if len(damaged) > 3 else ""
        log.warning(
            "%d record(s) of the resume state did not verify (%s%s); their tensors are recomputed",
            len(damaged),
            shown,
            more,
        )
        state.forget(list(damaged))
    committed = {key: m.row for key, m in markers.items()}
    ctx = TaskContext(
        str(writer.partial_dir(attempt.request.out)),
        str(attempt.state_path),
        opts.checkpoint_seconds,
        schedule.budget.lanes.threads,
        fence,
    )
    tasks = build_graph(plan, ctx, opts.edit, schedule.executions, committed)
    results: dict[str, TensorResult] = {}
    done = [job for job in plan.jobs if job.key in committed]
    with Progress(
        len(plan.jobs),
        plan.bytes_to_write,
        len(done),
        sum(job.placement.nbytes for job in done),
        enabled=attempt.request.progress,
    ) as bar:
        commits = CommitBatch(state, guard)

        def on_done(tensor: Member, result: TensorResult) -> None:
            if not result.resumed:
                fault_point("commit", before=commits.flush)  # a kill at the n-th commit: the n-1 before it hold
                result = replace(result, attempt=state.attempt)
                commits.add(
                    Commit(tensor.key, result.crc32c, result.as_dict(), result.singular_values),
                    at_once=result.blocks > 0,
                )
            results[tensor.key] = result
            if tensor.key not in committed:  # resumed tensors are in the bar's starting count already
                bar.advance(tensor.nbytes)

        def tick() -> None:
            bar.tick()
            commits.flush_if_due()

        finished = False
        try:
            if attempt.client is not None:
                run_graph(attempt.client, tasks, on_done, worker_resources(attempt.client), watch=True, tick=tick)
            else:
                with local_client(schedule.budget, opts.dashboard) as local:
                    if opts.dashboard:  # asked for: said even with -q
                        sys.stderr.write(f"streamsoup: dashboard at {dashboard_url(local)}\n")
                    run_graph(local, tasks, on_done, {"local": worker_capacity(schedule.budget)}, tick=tick)
            finished = True
        except KeyboardInterrupt:
            raise Interrupted(MESSAGE) from None
        finally:
            try:
                commits.flush()  # what finished before a failure or Ctrl-C is kept
            except Exception:
                if finished:
                    raise  # otherwise the run's own error is the one to report
    return [results[job.key] for job in plan.jobs]
