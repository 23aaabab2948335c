"""The dask clients a merge runs on: the embedded local cluster, or a cluster as users already run it.

The user's cluster is one of plain `dask worker`, dask-jobqueue, dask-cuda.

Such workers declare no resources. A WorkerPlugin derives streamsoup's resources on each
worker from what it knows of itself (threads, memory limit, or the machine's available memory
when it has none, the GPUs visible to it) and sets them with `Worker.set_resources`, so dask
admits tasks by our RAM and lane budgets. The plugin's `setup` runs again on workers that join
or restart mid-run (runtime resources are lost on restart). Resources a worker declared on its
command line take precedence over derived ones.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.config
import psutil
from distributed import Client, Scheduler, SpecCluster, Worker
from distributed.comm.addressing import get_address_host, get_address_host_port, parse_address
from distributed.diagnostics.plugin import WorkerPlugin

from .._version import __version__
from ..errors import OptionError, UsageError
from ..numerics.hostlinalg import set_threads
from ..options import MergeOptions
from ..paths import expand_path
from ..planning.budget import CPU, DEVICE, GPU_SLOTS, RAM, Budget, MiB, to_mib, workers_budget
from ..tasks.devices import install_pool
from ..units import format_size
from . import remote
from .workercheck import Expected, check_workers, lost_cluster, worker_problem

log = logging.getLogger(__name__)

PLUGIN_NAME = "streamsoup-lanes"
OURS = (CPU, DEVICE, RAM)
#: share of a worker's memory limit our tasks may take (dask's nanny pauses a worker at 80% of it)
LIMIT_SHARE = 0.7
#: share of the available memory of a worker machine without limits, split between its limitless workers
AVAILABLE_SHARE = 0.7
#: workers whose memory for tasks is within this share of the largest's are said to have the same
SAME_RAM = 0.95
#: how long to wait for the first worker, and for every worker to take the plugin
WORKER_WAIT_S = 120


def quiet_dask_logs() -> None:
    """Task failures reach the user as our own one-line errors; dask's logs only with -v."""
    level = logging.WARNING if logging.getLogger().getEffectiveLevel() <= logging.INFO else logging.CRITICAL
    names = [n for n in logging.root.manager.loggerDict if n.startswith(("distributed", "tornado"))]
    for name in {"distributed", "distributed.client", "distributed.worker", "distributed.scheduler", *names}:
        logging.getLogger(name).setLevel(level)  # dask's config gives child loggers levels of their own


#: where a local merge's HTTP servers listen: this machine only, a free port
LOOPBACK = "127.0.0.1:0"


@contextmanager
def local_client(budget: Budget, dashboard: str = "") -> Iterator[Client]:
    """An in-process cluster: one worker, a thread per lane, resources for lanes and RAM; nothing on the network.

    No dask memory manager: admission by the "ram" resource is our budget, and the
    nanny's RSS-based pausing would misread our deliberate working sets. `dashboard`
    (host:port) serves dask's dashboard there, the only port a local merge opens.
    """
    quiet_dask_logs()
    set_threads(budget.lanes.threads)
    # in-process (inproc://) comms; dask still starts an HTTP server on the scheduler and on the worker, on a
    # network interface unless told otherwise: both on loopback. A SpecCluster, not LocalCluster, because
    # LocalCluster turns the worker's dashboard on with its address (bokeh's import, at every start)
    served = {"dashboard_address": dashboard, "dashboard": True} if dashboard else {}
    worker = {
        "nthreads": budget.lanes.total,
        "memory_limit": 0,
        "resources": worker_capacity(budget),
        "dashboard_address": LOOPBACK,
        "dashboard": False,
    }
    cluster = SpecCluster(
        scheduler={
            "cls": Scheduler,
            "options": {"protocol": "inproc://", "dashboard_address": LOOPBACK, "dashboard": False, **served},
        },
        workers={"local": {"cls": Worker, "options": worker}},
        silence_logs=logging.WARNING,
    )
    client = Client(cluster)
    try:
        if budget.lanes.devices:
            client.run(install_pool, devices=budget.lanes.devices)
        yield client
    finally:
        client.close()
        cluster.close()


def dashboard_url(client: Client) -> str:
    """Where the local cluster's dashboard really listens (dask moves it to a free port when ADDR's is taken)."""
    server = client.cluster.scheduler.http_server
    host = f"[{server.address}]" if ":" in server.address else server.address
    return f"http://{host}:{server.port}/status"


def worker_capacity(budget: Budget) -> dict[str, float]:
    """What the embedded worker offers (see local_client)."""
    return {"cpu": budget.lanes.cpu, "device": len(budget.lanes.devices), RAM: to_mib(budget.task_ram)}


@dataclass(frozen=True)
class WorkerFacts:
    """What a worker knows of itself, measured on the worker."""

    nthreads: int
    memory_limit: int  # 0: none
    rss: int  # the worker process now (torch imported)
    available: int  # the machine's available memory
    total_memory: int  # the machine's physical memory
    gpus: int
    gpu_memory: int  # the smallest visible GPU's total memory; 0 without GPUs
    declared: dict[str, float] = field(default_factory=dict)  # streamsoup's resources given on its command line
    kill_share: float = 0.0  # the share of its memory limit at which its nanny kills it; 0: nothing kills it


def derive_resources(facts: WorkerFacts, limitless_on_host: int = 1) -> dict[str, float]:
    """cpu/device lanes and ram (MiB) for one worker; what it declared wins.

    Each thread is a lane (a task holds one working set); a GPU gets up to two lanes, taken from
    the threads. RAM: a share of the memory limit less what the worker already uses, or, with no
    limit, a share of the machine's available memory split between the limitless workers on it.
    """
    declared = {k: v for k, v in facts.declared.items() if k in OURS}
    if CPU in declared or DEVICE in declared:
        cpu, device = declared.get(CPU, 0), declared.get(DEVICE, 0)
    else:
        device = min(facts.nthreads, GPU_SLOTS * facts.gpus)
        cpu = facts.nthreads - device
    if RAM in declared:
        ram = declared[RAM]
    elif facts.memory_limit:
        ram = max(0, int(LIMIT_SHARE * facts.memory_limit) - facts.rss) // MiB
    else:
        ram = int(AVAILABLE_SHARE * facts.available / max(1, limitless_on_host)) // MiB
    return {CPU: cpu, DEVICE: device, RAM: ram}


def measure_worker(
    nthreads: int, memory_limit: int | None, declared: dict[str, float], nanny: bool = False
) -> WorkerFacts:
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpu_memory = min((torch.cuda.get_device_properties(i).total_memory for i in range(gpus)), default=0)
    vm = psutil.virtual_memory()
    return WorkerFacts(
        nthreads,
        int(memory_limit or 0),
        psutil.Process().memory_info().rss,
        vm.available,
        vm.total,
        gpus,
        gpu_memory,
        declared,
        float(dask.config.get("distributed.worker.memory.terminate") or 0) if nanny else 0.0,
    )


class LaneResources(WorkerPlugin):
    """Sets streamsoup's resources on every worker, now and whenever one joins or restarts.

    Once the merge's files are known (`expected`: workercheck.py), a worker that does not see them as
    the client does, or runs another streamsoup, gets no resources, so no task of the merge lands on it;
    `problem_of` tells the client why.
    """

    name = PLUGIN_NAME
    idempotent = False

    def __init__(self, expected: Expected | None = None, version: str = __version__, keep: bool = False) -> None:
        """`keep`: a worker measured by this merge's first registration keeps those resources (the plan was sized
        to them); the first registration measures every worker afresh (one may have served an earlier merge)."""
        self.expected, self.version, self.keep = expected, version, keep

    async def setup(self, worker) -> None:
        if not hasattr(worker, "_streamsoup_declared"):  # what the command line gave, before we set anything
            worker._streamsoup_declared = {k: v for k, v in worker.state.total_resources.items() if k in OURS}
        cached = getattr(worker, "_streamsoup_resources", None)
        if not (cached and (self.keep or worker.state.executing_count)):  # a busy worker's RSS holds another
            # merge's tensors in flight: measured now, it would shrink what that merge was sized to
            limit, declared = worker.memory_manager.memory_limit, worker._streamsoup_declared
            facts = measure_worker(worker.state.nthreads, limit, declared, nanny=bool(worker.nanny))
            worker._streamsoup_facts = facts
            host = get_address_host(worker.address)
            identity = await worker.scheduler.identity()
            limitless = sum(
                1 for w in identity.get("workers", {}).values() if w.get("host") == host and not w.get("memory_limit")
            )
            worker._streamsoup_resources = derive_resources(facts, limitless if not facts.memory_limit else 1)
        resources = dict(worker._streamsoup_resources)
        worker._streamsoup_problem = await self.problem()
        if worker._streamsoup_problem:
            resources = dict.fromkeys(resources, 0)
            log.warning("dask worker %s takes no part in the merge: it %s", worker.address, worker._streamsoup_problem)
        await worker.set_resources(**resources)
        log.info("streamsoup resources on %s: %s", worker.address, resources)

    async def problem(self) -> str:
        if self.version != __version__:
            return f"runs streamsoup {__version__} and the client {self.version}: install the same version on both"
        if self.expected is None:
            return ""
        view = await remote.worker_view(list(self.expected.files), self.expected.writable, list(self.expected.markers))
        return worker_problem(view, self.expected)


def problem_of(dask_worker) -> str | None:
    """On a worker: why the plugin gave it no resources ("" when it did; None: it has not run there yet)."""
    return getattr(dask_worker, "_streamsoup_problem", None)


def guard_joining_workers(client: Client, expected: Expected) -> None:
    """From now on, a worker that joins or restarts is checked as every worker was before the first task."""
    try:
        client.register_plugin(LaneResources(expected, keep=True), name=PLUGIN_NAME)
    except (OSError, TimeoutError) as exc:
        raise lost_cluster(client.scheduler.address, "registered its workers", exc) from None


def _facts_of(dask_worker) -> dict[str, Any]:
    facts = getattr(dask_worker, "_streamsoup_facts", None)
    return facts.__dict__ if facts is not None else {}


def scheduler_address(opts: MergeOptions) -> str:
    """--scheduler, or the address in --scheduler-file (as `dask scheduler --scheduler-file` and dask-mpi write it)."""
    if not opts.scheduler_file:
        return opts.scheduler
    path = expand_path(opts.scheduler_file, "--scheduler-file")
    try:
        address = json.loads(Path(path).read_text())["address"]
    except OSError as exc:
        raise OptionError("scheduler_file", f"{path}: cannot read it ({exc.strerror})") from None
    except (ValueError, KeyError, TypeError):
        raise OptionError("scheduler_file", f"{path}: not a dask scheduler file (no 'address')") from None
    return str(address)


def nothing_listens(address: str) -> str:
    """Why a tcp:// address surely has no scheduler (the port refuses connections), at once; "" when it may.

    dask's client retries a refused port until its timeout (20 s of silence for a mistyped port).
    """
    try:
        scheme, _ = parse_address(address)
        if scheme != "tcp":
            return ""
        host, port = get_address_host_port(address)
        socket.create_connection((host, port), timeout=5).close()
    except ConnectionRefusedError:
        return "connection refused: nothing listens on that port"
    except (OSError, ValueError, TypeError):
        return ""  # unreachable or slow: dask's own attempt says so
    return ""


def unreachable(opts: MergeOptions, address: str, why: str) -> OptionError:
    """A scheduler that does not answer, named as the user named it: the address, or the file that gave it."""
    if opts.scheduler_file:
        return OptionError(
            "scheduler_file",
            f"{expand_path(opts.scheduler_file)} names {address}, where no dask scheduler answers ({why}): a file "
            "left by a scheduler that has stopped? start the scheduler, or give the file it writes now",
        )
    return OptionError(
        "scheduler", f"{address}: cannot reach a dask scheduler there ({why}); start it, or check the address"
    )


@contextmanager
def cluster_client(opts: MergeOptions) -> Iterator[Client]:
    """A client of the user's cluster, every worker given streamsoup's resources; unregistered at the end."""
    address = scheduler_address(opts)
    quiet_dask_logs()
    refused = nothing_listens(address)
    if refused:
        raise unreachable(opts, address, refused)
    try:
        client = Client(address, timeout="20s")
    except (OSError, TimeoutError, ValueError) as exc:
        raise unreachable(opts, address, str(exc)) from None
    try:
        quiet_dask_logs()  # again: connecting created more loggers
        try:
            client.wait_for_workers(1, timeout=WORKER_WAIT_S)
        except TimeoutError:
            raise UsageError(
                f"the dask cluster at {address} has no workers (waited {WORKER_WAIT_S} s); "
                "start some with `dask worker " + address + "`"
            ) from None
        try:
            check_workers(client, Expected())  # this streamsoup on every worker, before its plugin is sent there
            client.register_plugin(LaneResources(), name=PLUGIN_NAME)
        except (OSError, TimeoutError) as exc:  # CommClosedError is an OSError: not a disk's
            raise lost_cluster(address, "registered its workers", exc) from None
        yield client
    finally:
        if client.status == "running":  # else the scheduler is gone (a call would wait out the timeout)
            try:
                client.unregister_worker_plugin(PLUGIN_NAME)
            except Exception:  # the cluster may be gone: nothing to clean
                pass
        client.close()


def worker_resources(client: Client) -> dict[str, dict[str, float]]:
    """Each worker's resources, as the scheduler sees them now."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    return {addr: dict(w.get("resources") or {}) for addr, w in workers.items()}


def dashboard(client: Client) -> str | None:
    """The scheduler's dashboard address, when it serves one: a scheduler started with --no-dashboard still lists
    a "dashboard" service (its HTTP server, for /health and metrics), whose /status page is then not found."""
    services = client.scheduler_info().get("services") or {}
    if "dashboard" not in services:
        return None
    link = client.dashboard_link
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the cluster's address, not a proxy's
    try:
        with direct.open(link, timeout=2) as page:
            return link if page.status == 200 else None
    except (OSError, ValueError, http.client.HTTPException):  # 404 (an OSError), no answer, a relative link
        return None


def cluster_budget(client: Client, opts: MergeOptions) -> Budget:
    """The budget of the cluster's workers as they are now (planning/budget.py: workers_budget)."""
    try:
        facts = {a: f for a, f in client.run(_facts_of).items() if f}
        resources = worker_resources(client)
    except (OSError, TimeoutError) as exc:  # a worker lost meanwhile: dask's comm error, not a disk's
        raise lost_cluster(scheduler_address(opts), "measured its workers", exc) from None
    return workers_budget(resources, facts, opts, scheduler_address(opts))


def ram_span(rams_mib: list[float]) -> str:
    """'8.00 GiB', or '2.00 GiB to 8.00 GiB' when the workers differ by more than their own RSS does (workers of
    one memory limit are within SAME_RAM of each other)."""
    low, high = min(rams_mib) * MiB, max(rams_mib) * MiB
    return format_size(high) if low >= SAME_RAM * high else f"{format_size(low)} to {format_size(high)}"


def describe(client: Client, budget: Budget, address: str) -> str:
    """One line: where we run and what the workers give us."""
    resources = worker_resources(client)
    span = ram_span([r.get(RAM, 0) for r in resources.values()])
    line = (
        f"cluster {address}: {len(resources)} worker(s), {budget.lanes.cpu} CPU lane(s), "
        f"{len(budget.lanes.devices)} GPU lane(s), {span} per worker for tensors"
    )
    link = dashboard(client)
    return line + (f"; dashboard {link}" if link else "")


@dataclass(frozen=True)
class ClusterLook:
    """What the watch of a run on a user's cluster reads from the scheduler at each look (plain RPCs, which the
    scheduler does not log, unlike `run_on_scheduler`)."""

    stuck: list[str]  # our keys that wait in state no-worker
    offers: dict[str, dict[str, float]]  # worker -> the resources it offers now
    heard: dict[str, float]  # worker -> when the scheduler last had its heartbeat (the scheduler's clock)
    busy: dict[str, list[str]]  # worker -> the keys it is running
    limits: dict[str, int]  # worker -> its memory limit (0: none)


def look_at_cluster(client: Client, keys: list[str]) -> ClusterLook:
    workers = client.scheduler_info(n_workers=-1)["workers"]
    states = client.sync(client.scheduler.get_task_status, keys=keys)
    return ClusterLook(
        stuck=[k for k, state in states.items() if state == "no-worker"],
        offers={a: dict(w.get("resources") or {}) for a, w in workers.items()},
        heard={a: float(w.get("last_seen") or 0) for a, w in workers.items()},
        busy={a: list(k) for a, k in client.processing().items()},
        limits={a: int(w.get("memory_limit") or 0) for a, w in workers.items()},
    )


def fits(request: dict[str, float], offers: dict[str, dict[str, float]]) -> bool:
    """Some single worker has every resource the task asks for (not one worker the RAM and another the lane)."""
    return any(all(offer.get(k, 0) >= v for k, v in request.items()) for offer in offers.values())
