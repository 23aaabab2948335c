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

import dask.config
from dask.utils import parse_timedelta
from distributed import Client, Future
from distributed.scheduler import KilledWorker

from ..errors import RunError, StreamsoupError
from ..planning.budget import RAM, MiB
from ..tasks.result import TensorResult, task_failed
from ..units import format_size
from .clients import ClusterLook, drop_worker, fits, look_at_cluster, lost_counts
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


def silent_limit() -> float:
    """Seconds without a heartbeat after which a worker holding our tasks is taken out: dask's own worker-ttl."""
    return float(parse_timedelta(dask.config.get("distributed.scheduler.worker-ttl") or "5 minutes", "s"))


def allowed_losses() -> int:
    """How often a tensor may be lost with its worker: dask's own allowed-failures (3 by default)."""
    return int(dask.config.get("distributed.scheduler.allowed-failures", 3))


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
        self.losses: Counter[str] = Counter()  # task key (without attempt) -> resubmissions after a lost worker
        self.stranded_since: float | None = None
        self.last_watch = time.monotonic()
        self.workers: set[str] | None = None  # the cluster's workers at the last look
        self.heard: dict[str, tuple[float, float]] = {}  # worker -> (its last heartbeat, when we saw it change)
        self.dropped: set[str] = set()
        self.limits: dict[str, int] = {}
        self.silent_s, self.allowed = silent_limit(), allowed_losses()
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

    def said_workers(self, now: set[str]) -> None:
        """A worker that left or joined since the last look, in one line each (a batch log's record of it)."""
        if self.workers is not None:
            for addr in sorted(self.workers - now):
                log.warning("dask worker %s left the cluster; the tensors it held are recomputed elsewhere", addr)
            for addr in sorted(now - self.workers):
                log.warning("dask worker %s joined the cluster", addr)
        self.workers = now

    def rescue(self) -> None:
        """Look at the cluster: take out silent workers, resubmit stranded tasks, stop when that cannot help."""
        self.last_watch = time.monotonic()
        if not self.watch or not self.tasks or self.client.status != "running":
            return  # a client reconnecting waits its whole timeout in any call: the cancelled futures say why
        try:
            look = look_at_cluster(self.client, list(self.tasks))
        except Exception:  # the scheduler is gone: the futures' cancellation says so
            return
        self.said_workers(set(look.offers))
        self.limits = look.limits
        self.drop_silent(look)
        self.resubmit_stranded(look)

    def drop_silent(self, look: ClusterLook) -> None:
        """A worker whose heartbeat has not changed for `silent_s` (by our clock: the scheduler's may differ)
        while it runs our tasks is frozen; dask would wait on it forever."""
        now = time.monotonic()
        for addr, heard in look.heard.items():
            last = self.heard.get(addr)
            if last is None or last[0] != heard:
                self.heard[addr] = (heard, now)
                continue
            ours = [self.tasks[k].name for k in look.busy.get(addr, ()) if k in self.tasks]
            if not ours or addr in self.dropped or now - last[1] < self.silent_s:
                continue
            self.dropped.add(addr)
            log.warning(
                "dask worker %s has not answered for %.0f s while it runs %s (stopped, out of memory, or a hung "
                "filesystem?); it is taken out of the cluster and its tensors run on the other workers",
                addr,
                now - last[1],
                _names(ours),
            )
            try:
                self.client.run_on_scheduler(drop_worker, address=addr)
            except Exception:  # the scheduler is gone: the futures' cancellation says so
                return

    def resubmit_stranded(self, look: ClusterLook) -> None:
        """Resubmit tasks stranded in no-worker that some worker can run now; stop if none can for long."""
        stuck = [k for k in look.stuck if k in self.tasks]
        movable = [k for k in stuck if fits(self.tasks[k].resources, look.offers)]
        waiting = [self.tasks[k] for k in stuck if k not in movable]
        moved = 0
        counts = self.client.run_on_scheduler(lost_counts, keys=movable) if movable else {}
        for key in movable:  # a new key starts dask's own count afresh: ours adds them up per tensor
            task = self.tasks[key]
            self.losses[task.key] += counts.get(key, 0)
            if self.losses[task.key] > self.allowed:
                raise self.lost(task, self.losses[task.key])
            del self.tasks[key]
            self.client.cancel([self.futures.pop(key)])
            self.resubmits += 1
            moved += 1
            self.submit(task, f"-r{self.resubmits}")
        if moved:
            log.warning("%d task(s) stranded when their worker left were resubmitted", moved)
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
