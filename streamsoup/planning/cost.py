"""What a merge costs on this machine: a short calibration and a cost model per tensor, summed over the lanes.

The calibration measures a float64 matmul, the merge's own eigensolve, writing and reading
back a scratch file and the CPU work on every byte (dtype conversion, checksums). A tensor
costs its Gram (`gram_flops`, its upper triangle on the host), an eigh of alpha*c^3, a
projection of <= 2*rows*c^2 flops, its bytes read and written (a streamed tensor reads its
inputs twice) and the fixed cost of a task. Tensors are packed onto the lanes longest first; the
merge takes the busiest lane's time or the disk's (one disk serves every lane), whichever is
longer, plus the command's start-up and the publish.
"""

from __future__ import annotations

import heapq
import os
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import psutil
import torch

from .._version import __version__
from ..io import rawio
from ..numerics.hostlinalg import matmul, set_threads
from ..numerics.hostmemory import configure_process
from ..numerics.spectral import eigh_spectrum
from . import ratecache
from .budget import Budget
from .planner import COPY, TensorJob
from .prepare import Schedule
from .schedule import Execution, edit_matrix, gemm_flops, groupable

CALIBRATION_BYTES = 64 * 2**20
WRITE_CHUNKS = 4
#: the fixed cost of one tensor beyond its arithmetic and bytes: small ones share a task, a tensor with a task of
#: its own pays dask's scheduling and a fdatasync (docs/benchmarks-many-tensors.md)
SMALL_TENSOR_S = 0.0012
TASK_S = 0.004
#: loading LAPACK at the first eigensolve, the cluster's start, the report, model card and publish
FIXED_S = 0.5
#: argv[0] of the streamsoup command: the console script, or `python -m streamsoup.cli`
CLI_ENTRIES = ("streamsoup", "cli.py")


@dataclass(frozen=True)
class Rates:
    """Measured on this machine, per lane kind."""

    cpu_gflops: float  # float64 matmul
    cpu_eigh_alpha: float  # seconds per c^3 of a float64 eigh
    device_gflops: float
    device_eigh_alpha: float
    read_bps: float
    write_bps: float
    convert_bps: float = float("inf")  # 16-bit bytes read -> float64, per second (the CPU cost of reading)
    checksum_bps: float = float("inf")  # crc32c of bytes written, per second
    startup_s: float = 0.0  # this command's start-up (interpreter, imports); 0 inside a running program
    measured_at: float = 0.0  # when (epoch seconds)
    reused: bool = False  # measured by an earlier command minutes ago (planning/ratecache.py)


def _time(fn, repeat: int = 2) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _compute_rates(device: str) -> tuple[float, float]:
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    n = 2048 if dev.type == "cuda" else 1536  # big enough to be cubic (docs/benchmarks.md, "Behind the code")
    a = torch.randn(n, n, dtype=torch.float64, device=dev)
    out = torch.empty_like(a)
    gflops = 2 * n**3 / _time(lambda: (matmul(a, a, out), sync())) / 1e9  # the merge's GEMM (OpenBLAS on the host)
    g = a.T @ a
    alpha = _time(lambda: (eigh_spectrum(g.clone()).keep_needed(n // 2), sync()), repeat=1) / n**3  # a merge's
    return gflops, alpha


def _io_rates(scratch_dir: Path) -> tuple[float, float]:
    """Write then read back a scratch file (page cache dropped): no input tensor data is touched.

    The write rate is the slowest of WRITE_CHUNKS fdatasync'd chunks: a virtual disk's host cache takes the
    first writes at several times the rate it sustains, and a multi-GB output is written at the sustained rate
    (docs/benchmarks.md, "Behind the code").
    """
    data = np.random.default_rng(0).integers(0, 255, CALIBRATION_BYTES, dtype=np.uint8)
    with tempfile.NamedTemporaryFile(dir=scratch_dir, prefix=".streamsoup-calibration-") as f:
        write_bps = float("inf")
        for chunk in range(WRITE_CHUNKS):
            t0 = time.perf_counter()
            rawio.pwrite_all(f.fileno(), memoryview(data), chunk * CALIBRATION_BYTES)
            os.fdatasync(f.fileno())
            write_bps = min(write_bps, CALIBRATION_BYTES / max(time.perf_counter() - t0, 1e-6))
        rawio.drop_cache(f.fileno(), 0, WRITE_CHUNKS * CALIBRATION_BYTES)
        t0 = time.perf_counter()
        rawio.read_bytes(f.fileno(), 0, CALIBRATION_BYTES)
        read_bps = CALIBRATION_BYTES / max(time.perf_counter() - t0, 1e-6)
    return read_bps, write_bps


def _byte_rates() -> tuple[float, float]:
    """What the host spends on every byte besides the disk: bf16 -> float64 as tensors are read, crc32c as
    they are written (both were most of a copy-heavy merge's time that the first model left out)."""
    data = np.random.default_rng(1).integers(0, 255, CALIBRATION_BYTES // 4, dtype=np.uint8)
    half = torch.from_numpy(data).view(torch.bfloat16)
    convert = data.nbytes / max(_time(lambda: half.to(torch.float64), repeat=1), 1e-9)
    checksum = data.nbytes / max(_time(lambda: rawio.crc_of(memoryview(data)), repeat=1), 1e-9)
    return convert, checksum


def startup_seconds() -> float:
    """How long this command took to get here (interpreter, imports, planning), measured as its process's age
    when the process is the streamsoup command; a program calling the API pays none of it per merge."""
    entry = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    if entry not in CLI_ENTRIES:
        return 0.0
    return max(0.0, time.time() - psutil.Process().create_time())


def calibrate(budget: Budget, scratch_dir: Path) -> Rates:
    """Rates of one lane: torch runs with the thread count each lane will have; a calibration of the same
    machine, lanes and scratch filesystem from the last minutes is reused (planning/ratecache.py)."""
    startup = startup_seconds()
    configure_process()  # the merge's malloc settings: the calibration runs as a merge would
    scratch_dir.mkdir(parents=True, exist_ok=True)
    key = ratecache.key_of(
        {
            "host": socket.gethostname(),
            "cpus": os.cpu_count(),
            "cpu": cpu_model(),
            "threads": budget.lanes.threads,
            "devices": budget.lanes.devices,
            "scratch": os.stat(scratch_dir).st_dev,
            "torch": torch.__version__,
            "streamsoup": __version__,
        }
    )
    cached = ratecache.load(key)
    if cached is not None and set(cached[0]) == RATE_FIELDS:
        rates, at = cached
        return Rates(**rates, startup_s=startup, measured_at=at, reused=True)
    set_threads(budget.lanes.threads)
    cpu = _compute_rates("cpu")
    gpus = [d for d in budget.lanes.devices if d.startswith("cuda")]
    dev = _compute_rates(gpus[0]) if gpus else cpu
    rates = Rates(*cpu, *dev, *_io_rates(scratch_dir), *_byte_rates(), startup_s=startup, measured_at=time.time())
    ratecache.store(key, {k: v for k, v in asdict(rates).items() if k in RATE_FIELDS})
    return rates


#: what a calibration measures (and the cache keeps): not the command's start-up, nor when or by whom
RATE_FIELDS = {f for f in Rates.__dataclass_fields__} - {"startup_s", "measured_at", "reused"}


def cpu_model() -> str:
    """The CPU's model name (Linux), '' elsewhere: two machines of one host name are not one machine."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return ""


def disk_seconds(job: TensorJob, execution: Execution, rates: Rates) -> float:
    """The disk's share of a tensor: one disk serves every lane, so these add up across lanes too."""
    read, written = io_bytes(job, execution)
    return read / rates.read_bps + written / rates.write_bps


def tensor_seconds(job: TensorJob, execution: Execution, rates: Rates, lane_is_gpu: bool) -> float:
    io = io_bytes(job, execution)
    fixed = SMALL_TENSOR_S if groupable(job, execution) else TASK_S
    seconds = fixed + disk_seconds(job, execution, rates)
    seconds += io[0] / rates.convert_bps + io[1] / rates.checksum_bps
    if job.lowrank:  # an adapter's update: W0 + (U lam S) V^T, no eigensolve
        return seconds + gemm_flops(job, "cpu") / (rates.cpu_gflops * 1e9)
    if job.action == COPY:
        return seconds
    gflops = rates.device_gflops if lane_is_gpu else rates.cpu_gflops
    alpha = rates.device_eigh_alpha if lane_is_gpu else rates.cpu_eigh_alpha
    flops = gemm_flops(job, "cuda" if lane_is_gpu else "cpu")
    return seconds + flops / (gflops * 1e9) + alpha * edit_matrix(job)[1] ** 3


def io_bytes(job: TensorJob, execution: Execution) -> tuple[int, int]:
    """(bytes read, bytes written); a streamed tensor reads its inputs twice."""
    if job.lowrank:
        factors = sum(r.nbytes for r in job.lora.refs)
        return factors + (0 if job.factors_out else job.base.nbytes), job.placement.nbytes
    if job.action == COPY:
        return job.finetuned.nbytes, job.finetuned.nbytes
    reads = job.base.nbytes + job.finetuned.nbytes
    return reads * (2 if execution.streamed else 1), job.finetuned.nbytes


@dataclass(frozen=True)
class Estimate:
    """A schedule's cost on this machine: its time, the bytes it moves, its memory peak and its busiest tensor."""

    seconds: float
    lanes: tuple[tuple[str, int, float], ...]  # (lane, tensors, seconds) as the tensors were packed
    bytes_read: int
    peak_ram: int
    largest_tensor: str  # the tensor with the largest working set
    largest_working_set: int
    rates: Rates


def estimate(schedule: Schedule, rates: Rates) -> Estimate:
    """Pack the tensors longest first onto the least loaded lane of their kind; the disk serves every lane."""
    plan, budget, executions = schedule.plan, schedule.budget, schedule.executions
    lanes = [("cpu", f"cpu{i}") for i in range(budget.lanes.cpu)]
    lanes += [("device", f"{d}#{i}") for i, d in enumerate(budget.lanes.devices)]  # two lanes may share a GPU
    real_gpu = any(d.startswith("cuda") for d in budget.lanes.devices)
    costs = {
        j.key: tensor_seconds(j, executions[j.key], rates, executions[j.key].lane == "device" and real_gpu)
        for j in plan.jobs
    }
    loads: dict[str, list] = {name: [0.0, 0] for _, name in lanes}
    heaps = {kind: [(0.0, name) for k, name in lanes if k == kind] for kind in ("cpu", "device")}
    for job in sorted(plan.jobs, key=lambda j: -costs[j.key]):
        heap = heaps[executions[job.key].lane]
        load, name = heapq.heappop(heap)
        heapq.heappush(heap, (load + costs[job.key], name))
        loads[name][0] += costs[job.key]
        loads[name][1] += 1
    disk = sum(disk_seconds(j, executions[j.key], rates) for j in plan.jobs)  # lanes overlap compute, not the disk
    biggest = max(plan.jobs, key=lambda j: executions[j.key].ram)
    concurrent = sorted((e.ram for e in executions.values()), reverse=True)[: budget.lanes.total]
    busiest = max((t for t, _ in loads.values()), default=0.0)
    return Estimate(
        seconds=rates.startup_s + FIXED_S + max(disk, busiest),
        lanes=tuple((name, n, t) for name, (t, n) in loads.items()),
        bytes_read=sum(io_bytes(j, executions[j.key])[0] for j in plan.jobs),
        peak_ram=budget.max_ram - budget.task_ram + min(sum(concurrent), budget.task_ram),  # baseline + reserve + tasks
        largest_tensor=biggest.name,
        largest_working_set=executions[biggest.key].ram,
        rates=rates,
    )
