"""Run a merge graph on a dask.distributed client (clients.py makes it: the embedded cluster or the user's).

Tasks are submitted one by one (``client.submit`` keeps per-task priority and
resources, which graph optimisation can drop from annotations), each asking for
one "lane": a lane holds one tensor's working set, so lanes bound the memory.

On a user's cluster the loop also watches the workers. Tasks stranded in state no-worker (a
worker died and came back, its resources restored only after the scheduler's rescheduling pass)
are resubmitted; a tensor lost with its worker more often than dask's `allowed-failures` stops
the run (a worker killed for memory again and again); a worker holding our tasks that sends no
heartbeat for dask's `worker-ttl` (stopped, or stuck on a hung filesystem) is taken out of the
cluster so its tensors run elsewhere; if no worker can take the tasks for long, the run stops.
"""

from __future__ import annotations

import logging
import queue
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import CancelledError
from dataclasses import dataclass

from distributed import Client, Future
from distributed.scheduler import KilledWorker, heartbeat_interval

from ..errors import RunError, StreamsoupError
from ..planning.budget import RAM, MiB
from ..tasks.result import TensorResult, task_failed
from ..units import format_size
from . import remote
from .clients import ClusterLook, fits, look_at_cluster, problem_of
from .graph import GraphTask, Member

log = logging.getLogger(__name__)

#: seconds between looks at the scheduler for stranded tasks and silent workers (user clusters only)
WATCH_SECONDS = 2.0
#: how long tasks may wait for a worker that can run them before the run stops (state kept)
STRANDED_LIMIT_S = 600.0
#: the longest the loop waits for a finished task before it ticks (progress lines, stranded tasks)
TICK_SECONDS = 0.25
#: what the run stops with, once a tensor is lost too often or waits too long
KEPT = "the work done so far is kept"


#: a task running this many times longer than this run's tasks take by their size is said to be stalled
STALL_FACTOR = 20


def check_capacity(tasks: list[GraphTask], offers: dict[str, dict[str, float]]) -> None:
    """A task no single worker can hold would wait forever, silently: refuse it now."""
    for task in tasks:
        if not fits(task.resources, offers):
            best = max(offers.values(), key=lambda o: o.get(RAM, 0), default={})
            raise RunError(
                f"tensor {task.name!r} needs {task.resources} but no worker offers that (the largest "
                f"offers {best}); raise the budget"
            )


@dataclass
class GraphRun:
    """The futures of one graph run; a resubmitted task gets a new key, its old future is ignored.

    Every dask key carries this run's own token: a scheduler hands a client the result of any task with the
    key it asks for, so two merges on one cluster (two users of a lab's cluster) must never share a key.
    """

    client: Client
    watch: bool
    tick: Callable[[], None]

    def __post_init__(self) -> None:
        self.finished: queue.SimpleQueue[Future] = queue.SimpleQueue()  # fed by dask's callback thread
        self.tasks: dict[str, GraphTask] = {}  # live future key -> task
        self.futures: dict[str, Future] = {}
        self.resubmits = 0
        self.losses: Counter[str] = Counter()  # task key (without attempt) -> times its worker died under it
        self.stranded_since: float | None = None
        self.last_watch = time.monotonic()
        self.workers: set[str] | None = None  # the cluster's workers at the last look
        self.heard: dict[str, tuple[float, float]] = {}  # worker -> (its last heartbeat, when we saw it change)
        self.dropped: set[str] = set()
        self.joined: set[str] = set()  # workers that joined since the start, until say_unfit looked at them
        self.limits: dict[str, int] = {}
        self.running: dict[str, float] = {}  # live key -> when a look first saw it run
        self.rates: list[float] = []  # bytes per second of the tasks seen running, then finished
        self.stalled: set[str] = set()
        self.silent_s: float | None = None  # the scheduler's worker-ttl (None: off), read at the first look
        self.allowed = 3  # the scheduler's allowed-failures, likewise
        self.token = uuid.uuid4().hex

    def submit(self, task: GraphTask, attempt: str = "") -> Future:
        key = f"{task.key}{attempt}-{self.token}"
        func, *args = task.call
        fut = self.client.submit(func, *args, key=key, priority=task.priority, resources=task.resources, pure=False)
        self.tasks[key], self.futures[key] = task, fut
        fut.add_done_callback(self.finished.put)
        return fut

    def next_batch(self) -> list[Future]:
        """The futures finished since the last call, waiting at most TICK_SECONDS for the first (no polling)."""
        try:
            batch = [self.finished.get(timeout=TICK_SECONDS)]
        except queue.Empty:
            return []
        while True:
            try:
                batch.append(self.finished.get_nowait())
            except queue.Empty:
                return batch

    def resubmit(self, key: str) -> Future:
        """The task of `key` again, under a key of its own (the old future is cancelled and then ignored)."""
        task = self.tasks.pop(key)
        self.client.cancel([self.futures.pop(key)])
        self.resubmits += 1
        return self.submit(task, f"-r{self.resubmits}")

    def said_workers(self, now: set[str]) -> None:
        """A worker that left or joined since the last look, in one line each (a batch log's record of it)."""
        if self.workers is not None:
            for addr in sorted(self.workers - now):
                log.warning("dask worker %s left the cluster; the tensors it held are recomputed elsewhere", addr)
            for addr in sorted(now - self.workers):
                log.warning("dask worker %s joined the cluster", addr)
                self.joined.add(addr)
        self.workers = now

    def say_unfit(self, look: ClusterLook) -> None:
        """A worker that joined is checked by streamsoup's plugin as it starts (clients.LaneResources): one that
        cannot take part gets no resources; say why, and move what the scheduler gave it before that (a worker
        that declared its resources gets tasks as it registers, which it then never runs)."""
        for addr in sorted(self.joined & set(look.offers)):
            try:
                problem = self.client.run(problem_of, workers=[addr]).get(addr)
            except Exception as exc:  # no streamsoup there to ask (or gone again: the next look says so)
                problem = f"cannot run streamsoup ({type(exc).__name__}: {exc})"
            if problem is None:  # the plugin has not run there yet
                continue
            self.joined.discard(addr)
            if not problem:
                continue
            log.warning("dask worker %s joined, but takes no part in the merge: it %s", addr, problem)
            for key in [k for k in look.busy.get(addr, ()) if k in self.tasks]:
                self.resubmit(key)

    def rescue(self) -> None:
        """Look at the cluster: take out silent workers, resubmit stranded tasks, stop when that cannot help."""
        self.last_watch = time.monotonic()
        if not self.watch or not self.tasks or self.client.status != "running":
            return  # a client reconnecting waits its whole timeout in any call: the cancelled futures say why
        try:
            if self.workers is None:  # the first look: the scheduler's own limits, which the watch applies
                settings = self.client.run_on_scheduler(remote.scheduler_settings)
                self.silent_s, self.allowed = settings["worker_ttl"], int(settings["allowed_failures"])
            look = look_at_cluster(self.client, list(self.tasks))
        except Exception:  # the scheduler is gone: the futures' cancellation says so
            return
        self.said_workers(set(look.offers))
        self.say_unfit(look)
        self.limits = look.limits
        self.drop_silent(look)
        self.say_stalled(look)
        self.resubmit_stranded(look)

    def drop_silent(self, look: ClusterLook) -> None:
        """A worker whose heartbeat has not changed for the scheduler's worker-ttl (by our clock: the scheduler's
        may differ) while it runs our tasks is frozen, and so may be its nanny, which the scheduler asks first."""
        if self.silent_s is None:
            return
        limit = max(self.silent_s, 10 * heartbeat_interval(len(look.heard)))  # as the scheduler's own check
        now = time.monotonic()
        for addr, heard in look.heard.items():
            last = self.heard.get(addr)
            if last is None or last[0] != heard:
                self.heard[addr] = (heard, now)
                continue
            ours = [self.tasks[k].name for k in look.busy.get(addr, ()) if k in self.tasks]
            if not ours or addr in self.dropped or now - last[1] < limit:
                continue
            try:
                self.client.run_on_scheduler(remote.drop_worker, address=addr)
            except Exception:  # the scheduler is gone: the futures' cancellation says so
                return
            self.dropped.add(addr)
            log.warning(
                "dask worker %s has not answered for %.0f s while it runs %s (stopped, or out of memory?); it was "
                "taken out of the cluster and its tensors run on the other workers",
                addr,
                now - last[1],
                _names(ours),
            )

    def say_stalled(self, look: ClusterLook) -> None:
        """A task running far longer than this run's tasks take for their size, on a worker that still answers
        (its thread stuck on a hung filesystem, say): said once; dask cannot stop a running thread."""
        now = time.monotonic()
        for keys in look.busy.values():
            for key in keys:
                if key in self.tasks:
                    self.running.setdefault(key, now)
        if not self.rates or self.silent_s is None:
            return
        per_byte = 1 / sorted(self.rates)[len(self.rates) // 2]
        for addr, keys in look.busy.items():
            for key in [k for k in keys if k in self.tasks and k not in self.stalled]:
                task, ran = self.tasks[key], now - self.running[key]
                if ran > max(self.silent_s, STALL_FACTOR * per_byte * task.nbytes):
                    self.stalled.add(key)
                    log.warning(
                        "tensor %r has run for %.0f s on dask worker %s, over %dx what this merge's tensors take for "
                        "their size (a hung filesystem?): check that worker; the merge goes on when it answers, or "
                        "stop it (the work done is kept) and rerun without that worker",
                        task.name,
                        ran,
                        addr,
                        STALL_FACTOR,
                    )

    def finished_key(self, key: str, task: GraphTask) -> None:
        """A task is done: its rate (when a look saw it run) for say_stalled."""
        since = self.running.pop(key, None)
        if since is not None and task.nbytes and time.monotonic() > since:
            self.rates.append(task.nbytes / (time.monotonic() - since))

    def resubmit_stranded(self, look: ClusterLook) -> None:
        """Resubmit tasks stranded in no-worker that some worker can run now; stop if none can for long."""
        stuck = [k for k in look.stuck if k in self.tasks]
        movable = [k for k in stuck if fits(self.tasks[k].resources, look.offers)]
        waiting = [self.tasks[k] for k in stuck if k not in movable]
        try:
            counts = self.client.run_on_scheduler(remote.lost_counts, keys=movable) if movable else {}
        except Exception:  # the scheduler is gone: the futures' cancellation says so
            return
        for key in movable:  # a new key starts dask's own count afresh: ours adds them up per tensor
            task = self.tasks[key]
            self.losses[task.key] += counts.get(key, 0)
            if self.losses[task.key] > self.allowed:
                raise self.lost(task, self.losses[task.key])
            self.resubmit(key)
        if movable:
            log.warning("%d task(s) stranded when their worker left were resubmitted", len(movable))
        if not waiting:
            self.stranded_since = None
            return
        now = time.monotonic()
        count = sum(len(t.members) for t in waiting)
        if self.stranded_since is None:
            self.stranded_since = now
            log.warning(
                "%d tensor(s) wait for a worker that can run them (e.g. %s needs %s)",
                count,
                waiting[0].name,
                waiting[0].resources,
            )
        elif now - self.stranded_since > STRANDED_LIMIT_S:
            raise RunError(
                f"no worker of the cluster can run {count} remaining tensor(s) (e.g. {waiting[0].name!r} "
                f"needs {waiting[0].resources}) after {STRANDED_LIMIT_S:.0f} s; {KEPT}: "
                "add workers, or rerun the same command to resume"
            )

    def lost(self, task: GraphTask, times: int) -> RunError:
        """A tensor whose worker died under it again and again: most often a worker killed for memory."""
        limits = sorted({v for v in self.limits.values() if v})
        limit = f"; the workers' memory limits: {', '.join(format_size(v) for v in limits)}" if limits else ""
        ram = task.resources.get(RAM)
        asks = f" it asks for {format_size(int(ram * MiB))} of memory" if ram else ""
        return RunError(
            f"tensor {task.name!r} was lost with its dask worker {times} times (dask's allowed-failures is "
            f"{self.allowed});{asks}{limit}: a worker that passes its memory limit is restarted by its nanny; "
            f"{KEPT}: give the workers more memory (or declare a smaller ram= resource), check the workers' "
            "logs, then rerun the same command to resume"
        )


def _names(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def run_graph(
    client: Client,
    tasks: list[GraphTask],
    on_done: Callable[[Member, TensorResult], None],
    offers: dict[str, dict[str, float]],
    *,
    watch: bool = False,
    tick: Callable[[], None] = lambda: None,
) -> None:
    """Submit every task and call `on_done` for each of its tensors as it finishes; the first failure cancels
    the rest.

    `tick` runs a few times a second while nothing finishes (progress lines in batch logs);
    `watch` looks after tasks stranded on a user's cluster.
    """
    check_capacity(tasks, offers)
    graph = GraphRun(client, watch, tick)
    for task in sorted(tasks, key=lambda t: -t.priority):  # the first to arrive may start before the rest do
        graph.submit(task)
    graph.rescue()  # the first look: the workers there at the start
    try:
        while graph.tasks:
            batch = graph.next_batch()
            if not batch:
                tick()
            if time.monotonic() - graph.last_watch >= WATCH_SECONDS:
                graph.rescue()
            for fut in batch:
                task = graph.tasks.get(fut.key)
                if task is None:  # a future we replaced by a resubmission
                    continue
                try:
                    results = _result(fut, task)
                except KilledWorker:  # dask's own count of lost workers for this key passed allowed-failures
                    raise graph.lost(task, graph.losses[task.key] + graph.allowed + 1) from None
                except TimeoutError:  # its result was on a worker that died: dask recomputes it, we keep watching
                    fut.add_done_callback(graph.finished.put)
                    continue
                del graph.tasks[fut.key], graph.futures[fut.key]
                graph.finished_key(fut.key, task)
                for member, result in zip(task.members, results, strict=True):
                    on_done(member, result)
    except BaseException:
        client.cancel(list(graph.futures.values()))
        raise


def _result(fut: Future, task: GraphTask) -> list[TensorResult]:
    """The task's results; TimeoutError when they are not there after all (never blocks the watch for long)."""
    try:
        return fut.result(timeout=WATCH_SECONDS)
    except (TimeoutError, KilledWorker):
        raise
    except StreamsoupError:
        raise
    except (CancelledError, OSError) as exc:
        if isinstance(exc, OSError) and fut.status == "error":  # the task itself failed on a file
            raise task_failed(task.name, exc) from exc
        raise RunError(  # the connection to the cluster, not the task
            "lost the dask cluster (scheduler or workers gone); the work done so far is kept: "
            "rerun the same command, on this or another cluster or locally, to resume"
        ) from exc
    except Exception as exc:
        raise task_failed(task.name, exc) from exc
