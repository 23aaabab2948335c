"""Run a merge graph on a dask.distributed client (clients.py makes it: the embedded cluster or the user's).

Tasks are submitted one by one (``client.submit`` keeps per-task priority and
resources, which graph optimisation can drop from annotations), each asking for
one "lane": a lane holds one tensor's working set, so lanes bound the memory.
On a user's cluster the loop also watches for tasks stranded in state no-worker
(a worker died and came back, its resources restored only after the scheduler's
rescheduling pass) and resubmits them; if no worker can take them for long, it stops.
"""

from __future__ import annotations

import logging
import queue
import time
import uuid
from collections.abc import Callable
from concurrent.futures import CancelledError
from dataclasses import dataclass

from distributed import Client, Future

from ..errors import RunError, StreamsoupError
from ..planning.budget import RAM
from ..tasks.result import TensorResult, task_failed
from .clients import fits, no_worker_tasks
from .graph import GraphTask, Member

log = logging.getLogger(__name__)

#: seconds between looks at the scheduler for stranded tasks (user clusters only)
WATCH_SECONDS = 2.0
#: how long tasks may wait for a worker that can run them before the run stops (state kept)
STRANDED_LIMIT_S = 600.0
#: the longest the loop waits for a finished task before it ticks (progress lines, stranded tasks)
TICK_SECONDS = 0.25


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
        self.stranded_since: float | None = None
        self.last_watch = time.monotonic()
        self.workers: set[str] | None = None  # the cluster's workers at the last look
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
        """Resubmit tasks stranded in no-worker that some worker can run now; stop if none can for long."""
        self.last_watch = time.monotonic()
        if not self.watch or not self.tasks or self.client.status != "running":
            return  # a client reconnecting waits its whole timeout in any call: the cancelled futures say why
        try:
            seen = self.client.run_on_scheduler(no_worker_tasks, keys=list(self.tasks))
        except Exception:  # the scheduler is gone: the futures' cancellation says so
            return
        self.said_workers(set(seen["offers"]))
        stuck = [k for k in seen["stuck"] if k in self.tasks]
        waiting, moved = [], 0
        for key in stuck:
            task = self.tasks[key]
            if not fits(task.resources, seen["offers"]):
                waiting.append(task)
                continue
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
        if self.stranded_since is None:
            self.stranded_since = now
            log.warning(
                "%d task(s) wait for a worker that can run them (e.g. %s needs %s)",
                len(waiting),
                waiting[0].name,
                waiting[0].resources,
            )
        elif now - self.stranded_since > STRANDED_LIMIT_S:
            raise RunError(
                f"no worker of the cluster can run {len(waiting)} remaining tensor(s) (e.g. {waiting[0].name!r} "
                f"needs {waiting[0].resources}) after {STRANDED_LIMIT_S:.0f} s; the work done so far is kept: "
                "add workers, or rerun the same command to resume"
            )


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
    except TimeoutError:
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
