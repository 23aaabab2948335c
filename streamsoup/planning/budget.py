"""Devices, lanes and memory budgets: what may run at once without passing --max-ram / --max-vram.

A *lane* runs one tensor at a time: CPU lanes use torch on the host, device lanes
(one per GPU) stream row blocks to their GPU. Every tensor gets a working-set
estimate; tasks are admitted through dask worker resources ("ram" in MiB, "cpu"
and "device" lanes), so the sum of what runs stays inside the budget. A tensor
whose whole working set does not fit is processed in row blocks read from disk.
"""

from __future__ import annotations

import math
import os
import socket
import time
from dataclasses import dataclass

import psutil
import torch

from ..errors import OptionError, UsageError
from ..numerics.spectral import micro_rows
from ..options import MergeOptions
from ..units import format_size

MiB = 2**20
#: the dask worker resources a task holds: MiB of host memory, and a lane of its kind
RAM, CPU, DEVICE = "ram", "cpu", "device"
#: lanes per GPU: while one task computes, the other reads or writes (they share the VRAM budget)
GPU_SLOTS = 2
#: what the driver needs besides tasks: Zarr commits, tqdm, dask bookkeeping
DRIVER_RESERVE = 96 * MiB
#: float64 temporaries alive per row block: delta, base, high, result, projection, cast
BLOCK_TEMPS = 6
#: c x c float64 matrices alive around the eigensolve: Gram, eigenvectors, solver workspace (~2)
EIGH_MATRICES = 4


@dataclass(frozen=True)
class Lanes:
    """The lanes of this run."""

    cpu: int
    devices: tuple[str, ...]  # one device lane each: "cuda:0", ... ("cpu" entries simulate a GPU lane)
    threads: int  # torch threads (process-wide; lanes share the cores)
    busy_cores: int = 0  # cores other processes kept busy at the start (left out of the default threads)

    @property
    def total(self) -> int:
        return self.cpu + len(self.devices)

    def vram_share(self, max_vram: int) -> int:
        """VRAM per device lane: a GPU's budget split between the lanes that share it."""
        gpus = [d for d in self.devices if d.startswith("cuda")]
        return max_vram // max(1, max((gpus.count(d) for d in gpus), default=1))

    def describe(self) -> str:
        parts = [f"{self.cpu} CPU lane(s)"] if self.cpu else []
        parts += [f"{self.devices.count(d)} lane(s) on {d}" for d in dict.fromkeys(self.devices)]
        busy = f" ({self.busy_cores} core(s) busy with other processes)" if self.busy_cores else ""
        threads = f"{self.threads} torch thread(s)" if self.threads else "each worker's own torch threads"
        return ", ".join(parts) + f", {threads}{busy}"


@dataclass(frozen=True)
class Budget:
    """The memory a run may use: --max-ram for the whole process, what is left of it for tasks, --max-vram."""

    max_ram: int
    task_ram: int
    max_vram: int
    lanes: Lanes
    cluster: bool = False  # task_ram is the largest worker's, not a share of --max-ram on this machine


#: the most CPU lanes per core --lanes may ask for locally (a lane waiting on I/O lets another compute)
LANES_PER_CORE = 4


#: the shortest and longest look at the machine's load (from a command's start: its planning is the window)
LOAD_SAMPLE_S = 0.2
LOAD_WINDOW_S = 30.0


@dataclass(frozen=True)
class LoadMark:
    """Where a look at the machine's load begins: this process's CPU seconds and the machine's busy ones, then."""

    pid: int
    own: float
    machine: float
    at: float

    @classmethod
    def now(cls) -> LoadMark:
        times = psutil.cpu_times()
        idle = times.idle + getattr(times, "iowait", 0.0)
        guests = getattr(times, "guest", 0.0) + getattr(times, "guest_nice", 0.0)  # counted in user already
        own = psutil.Process().cpu_times()
        return cls(os.getpid(), own.user + own.system, sum(times) - idle - guests, time.monotonic())


def busy_cores(since: LoadMark | None = None) -> int:
    """Cores that other processes kept busy since `since` (a shared workstation's other jobs).

    A command marks its start and looks when it sizes its lanes, so its planning is the window; without a
    mark, or with one older than LOAD_WINDOW_S or of another process (a fork), a fresh short look is taken.
    BLAS and OpenMP regions split their work evenly over their threads: a thread that shares its core
    with a neighbour finishes last and the whole region waits for it, so threads beyond the free cores
    make the merge slower, not faster.
    """
    if since is None or since.pid != os.getpid() or time.monotonic() - since.at > LOAD_WINDOW_S:
        since = LoadMark.now()
    waited = time.monotonic() - since.at
    if waited < LOAD_SAMPLE_S:
        time.sleep(LOAD_SAMPLE_S - waited)
    now = LoadMark.now()
    others = ((now.machine - since.machine) - (now.own - since.own)) / max(now.at - since.at, 1e-9)
    return max(0, int(others + 0.25))  # a core counts as busy from 3/4 of it taken


def usable_cores() -> int:
    """The cores this process may run on (its affinity: taskset, a cpuset, SLURM's binding)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def resolve_lanes(devices: str, lanes: int, threads: int, busy: int = 0, io_bound: bool = False) -> Lanes:
    """--devices auto|cpu|cuda|cuda:0,cuda:1 (a list of devices makes one device lane per entry).

    On the host alone (or an adapter merge, I/O-bound) the default is a lane per usable core with one
    thread each: separate eigensolves side by side beat one on every core, alone and beside a busy
    neighbour (docs/benchmarks-shared-machine.md), and one thread per lane makes the float64 sums'
    rounding the same on every machine. With GPU lanes, one CPU lane shares the cores. The thread
    count never follows the load: the same merge gives the same bytes.
    """
    spec = devices.strip().lower()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cores = usable_cores()
    if spec == "auto":
        found = tuple(f"cuda:{i}" for i in range(gpus))
        want = lanes or (cores if io_bound or not found else 1)
        cpu = want if not found else max(0, want - 1) or 1
    elif spec == "cpu":
        found, cpu = (), lanes or cores
    elif spec == "cuda":
        if not gpus:
            raise OptionError("devices", "cuda: no CUDA device is visible (use cpu or auto)")
        found, cpu = tuple(f"cuda:{i}" for i in range(gpus)), 0
    else:
        items = [d.strip() for d in spec.split(",") if d.strip()]
        for item in items:
            if item == "cpu":
                continue
            if not item.startswith("cuda:") or not item[5:].isdigit():
                raise OptionError("devices", f"{item!r} is not auto, cpu, cuda or cuda:N")
            if int(item[5:]) >= gpus:
                raise OptionError("devices", f"{item}: no such GPU (this machine has {gpus})")
        found, cpu = tuple(items), 0
    found = tuple(d for d in found for _ in range(GPU_SLOTS if d.startswith("cuda") else 1))
    running = cpu + len(found)
    return Lanes(
        cpu=cpu, devices=found, threads=threads or max(1, cores // max(1, running)), busy_cores=min(busy, cores)
    )


def available_ram() -> int:
    return psutil.virtual_memory().available


def physical_ram() -> int:
    return psutil.virtual_memory().total


def check_max_ram(max_ram: int, machine: int, where: str = "this machine") -> None:
    """A budget above the memory that exists is a typo, not a plan: refuse it with the machine's figure."""
    if max_ram > machine:
        raise OptionError(
            "max_ram",
            f"{format_size(max_ram)} is more than the {format_size(machine)} of memory "
            f"{where} has; give at most {format_size(machine)}",
        )


def check_max_vram(max_vram: int, devices: tuple[str, ...]) -> None:
    """Likewise for --max-vram against the smallest GPU of the run."""
    gpus = [d for d in dict.fromkeys(devices) if d.startswith("cuda")]
    if not gpus:
        return
    total = min(torch.cuda.get_device_properties(torch.device(d)).total_memory for d in gpus)
    if max_vram > total:
        raise OptionError(
            "max_vram",
            f"{format_size(max_vram)} is more than the {format_size(total)} of memory "
            f"of the GPU; give at most {format_size(total)}",
        )


def machine_info(budget: Budget, where: str) -> dict:
    """The device configuration of an attempt, for the report: what the numbers in it were computed on (a
    cluster's GPUs are its workers', which this machine, often without any, cannot name)."""
    lanes = budget.lanes
    local_gpus = [] if budget.cluster else [d for d in dict.fromkeys(lanes.devices) if d.startswith("cuda")]
    gpus = [f"{d}: {torch.cuda.get_device_name(torch.device(d))}" for d in local_gpus]
    return {
        "host": socket.gethostname(),
        "cpus": os.cpu_count(),
        "ram_bytes": physical_ram(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if gpus else None,
        "gpus": gpus,
        "lanes": lanes.describe(),
        "threads": lanes.threads,
        "max_ram": budget.max_ram,
        "max_vram": budget.max_vram,
        "where": where,
    }


def default_max_ram() -> int:
    """A safe share of what is free now: 70%, leaving room for the page cache and other programs."""
    return int(available_ram() * 0.7)


def process_rss() -> int:
    return psutil.Process().memory_info().rss


def device_memory(device: str) -> int:
    if device.startswith("cuda"):
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return free
    return available_ram()


def default_max_vram(devices: tuple[str, ...]) -> int:
    """90% of the least free memory among the GPUs of the run."""
    gpu = [d for d in devices if d.startswith("cuda")]
    return int(min(device_memory(d) for d in gpu) * 0.9) if gpu else 0


# ---------------------------------------------------------------- working sets


def eigh_bytes(cols: int) -> int:
    return EIGH_MATRICES * cols * cols * 8


def micro_temp_bytes(cols: int) -> int:
    """float64 temporaries of one micro block."""
    return BLOCK_TEMPS * micro_rows(cols) * cols * 8


def in_memory_bytes(rows: int, cols: int, in_bytes: int, out_bytes: int) -> int:
    """Both inputs and the output held whole, plus the eigensolve and one micro block of float64."""
    return in_bytes + out_bytes + eigh_bytes(cols) + micro_temp_bytes(cols)


def streamed_bytes(block_rows: int, cols: int, elem_bytes: int) -> int:
    """Read blocks from disk: the eigensolve, one read block of native inputs/output, one micro block."""
    return eigh_bytes(cols) + block_rows * cols * elem_bytes + micro_temp_bytes(cols)


def fit_block_rows(budget: int, rows: int, cols: int, elem_bytes: int, cap: int = 256 * MiB) -> int:
    """The most rows per read block (a multiple of the micro block) inside `budget`; 0 if none fits."""
    micro = micro_rows(cols)
    spare = budget - eigh_bytes(cols) - micro_temp_bytes(cols)
    fit = min(spare, cap) // max(cols * elem_bytes, 1)
    if fit < micro:
        return 0
    return int(min(rows, fit // micro * micro))


def to_mib(n: int) -> int:
    return max(1, math.ceil(n / MiB))


def check_budget(max_ram: int, baseline: int) -> int:
    """The RAM left for tasks; refuse a budget below what the process itself needs."""
    left = max_ram - baseline - DRIVER_RESERVE
    if left < 32 * MiB:
        raise OptionError(
            "max_ram",
            f"{format_size(max_ram)} is too small: streamsoup itself uses {format_size(baseline)}; "
            f"give at least {format_size(baseline + DRIVER_RESERVE + 32 * MiB)}",
        )
    return left


def check_machine_lanes(opts: MergeOptions) -> None:
    """--lanes and --threads within what this machine's cores can run (a typo must not start thousands of threads)."""
    cores = os.cpu_count() or 1
    if opts.lanes and opts.lanes > LANES_PER_CORE * cores:
        most = LANES_PER_CORE * cores
        raise OptionError(
            "lanes",
            f"{opts.lanes} is more than {LANES_PER_CORE} per core of this machine's {cores} "
            f"cores (they would only wait on each other); give at most {most}",
        )
    if opts.threads and opts.threads > cores:
        raise OptionError("threads", f"{opts.threads} is more than this machine's {cores} cores; give at most {cores}")


def make_budget(
    opts: MergeOptions, io_bound: bool = False, threads: int | None = None, since: LoadMark | None = None
) -> Budget:
    """Lanes and memory budgets of this run; the RAM left for tasks is what the process does not use already.

    `io_bound` (an adapter merge: each task streams W0 through a thin GEMM): one lane per core with one
    thread each even beside GPU lanes, so one tensor's reads, writes and fdatasync overlap another's compute.
    `threads`: torch threads per lane instead of --threads' (a resumed merge keeps its first attempt's);
    `since`: the command's start, from which the load of the machine is measured.
    """
    check_machine_lanes(opts)
    threads = opts.threads if threads is None else threads
    busy = 0 if threads else busy_cores(since)  # said in the start line; it never changes the threads
    lanes = resolve_lanes(opts.devices, opts.lanes, threads, busy, io_bound)
    if opts.max_ram:
        check_max_ram(opts.max_ram, physical_ram())
    if opts.max_vram:
        check_max_vram(opts.max_vram, lanes.devices)
    max_ram = opts.max_ram or default_max_ram()
    task_ram = check_budget(max_ram, process_rss())
    return Budget(max_ram, task_ram, opts.max_vram or default_max_vram(lanes.devices), lanes)


def check_declared_ram(facts: dict[str, dict]) -> None:
    """A worker declaring more `ram` for tasks than its memory limit leaves before its nanny kills it (at
    `kill_share` of it: dask's distributed.worker.memory.terminate) dies at the first big tensor, again at each
    restart: refuse it before any work."""
    for address, fact in sorted(facts.items()):
        declared, limit = (fact.get("declared") or {}).get(RAM), fact.get("memory_limit") or 0
        share = fact.get("kill_share") or 0
        if declared is None or not limit or not share:
            continue
        rss = int(fact.get("rss") or 0)
        room = max(0, int(share * limit) - rss) // MiB
        if declared > room:
            raise UsageError(
                f"dask worker {address} declares ram={declared:g} (MiB) for tasks, but its memory limit of "
                f"{format_size(limit)} leaves {room} MiB beside the worker's own {format_size(rss)} (its nanny kills "
                f"it at {share:.0%}): declare at most ram={room}, or start the worker with a larger --memory-limit"
            )


def workers_budget(
    resources: dict[str, dict[str, float]], facts: dict[str, dict], opts: MergeOptions, address: str
) -> Budget:
    """Lanes and memory of a cluster, from the resources (declared or derived) and facts of its workers.

    The per-task RAM is the largest worker's: dask places each task on a worker whose `ram`
    holds it, and a tensor bigger than every worker is streamed in row blocks that fit.
    """
    usable = {a: r for a, r in resources.items() if r.get(RAM) and (r.get(CPU) or r.get(DEVICE))}
    if not usable:
        raise UsageError(
            f"the dask cluster at {address} offers streamsoup no memory or lanes "
            f"({len(resources)} worker(s)); give workers threads and memory, or declare resources "
            '(e.g. `--resources "cpu=2,ram=8192"`, ram in MiB)'
        )
    check_declared_ram(facts)
    task_ram = int(max(r[RAM] for r in usable.values())) * MiB
    if opts.max_ram:
        machine = max((f["total_memory"] for f in facts.values()), default=opts.max_ram)
        check_max_ram(opts.max_ram, machine, "the largest worker machine")
        task_ram = min(task_ram, opts.max_ram)
    gpu_memory = [f["gpu_memory"] for f in facts.values() if f.get("gpus")]
    if opts.max_vram and gpu_memory and opts.max_vram > min(gpu_memory):
        raise OptionError(
            "max_vram",
            f"{format_size(opts.max_vram)} is more than the {format_size(min(gpu_memory))} "
            "of memory of the workers' GPUs",
        )
    max_vram = opts.max_vram or int(0.9 * min(gpu_memory, default=16 * 2**30))
    cpu = int(sum(r.get(CPU, 0) for r in usable.values()))
    devices = ("cuda",) * int(sum(r.get(DEVICE, 0) for r in usable.values()))
    lanes = Lanes(cpu=cpu, devices=devices, threads=opts.threads)
    return Budget(max_ram=task_ram, task_ram=task_ram, max_vram=max_vram, lanes=lanes, cluster=True)
