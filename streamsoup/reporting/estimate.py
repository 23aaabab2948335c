"""`streamsoup plan`: what a merge will do, how much memory it will take, and how long, from headers only.

Time comes from a short calibration of this machine (a float64 matmul, the merge's own
eigensolve, writing and reading back a scratch file, the CPU work on every byte: dtype
conversion and checksums) and a cost model per tensor: Gram `gram_flops` (its upper
triangle on the host), eigh alpha*c^3, projection <= 2*rows*c^2 flops, its bytes read and
written (streamed tensors read their inputs twice) and the fixed cost of a task. Tensors are
packed onto the lanes longest first; the merge takes the busiest lane's time or the disk's (one
disk serves every lane: all bytes read and written at the calibrated rates), whichever is longer,
and the start-up of the command and the publish come on top.
"""

from __future__ import annotations

import heapq
import os
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from .._version import __version__
from ..errors import OptionError
from ..io import rawio
from ..numerics.hostlinalg import matmul, set_threads
from ..numerics.spectral import eigh_spectrum
from ..options import MergeOptions
from ..planning.budget import Budget
from ..planning.planner import COPY, MergePlan, TensorJob, plan_merge
from ..planning.schedule import Execution, edit_matrix, gemm_flops, groupable, local_schedule
from ..tasks.devices import configure_process
from ..units import format_duration, format_size
from . import ratecache
from .record import describe_inputs
from .summary import annotate, module_stats

CALIBRATION_BYTES = 64 * 2**20
WRITE_CHUNKS = 4
#: the fixed cost of one tensor beyond its arithmetic and bytes: small ones share a task (1.2 ms each,
#: docs/benchmarks-many-tensors.md), a tensor with a task of its own pays dask's scheduling and a fdatasync
SMALL_TENSOR_S = 0.0012
TASK_S = 0.004
#: loading LAPACK at the first eigensolve, the cluster's start, the report, model card and publish
FIXED_S = 0.5
#: argv[0] of the streamsoup command: the console script, or `python -m streamsoup.cli`
CLI_ENTRIES = ("streamsoup", "cli.py")
SPECTRAL_FIELDS = ("k", "rank", "P_k", "rho", "lambda_high", "lambda_low", "rel_update")


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
    reused: bool = False  # measured by an earlier command minutes ago (reporting/ratecache.py)


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
    n = 2048 if dev.type == "cuda" else 1536  # smaller eigensolves are not yet cubic: 768 predicted 2x too slow
    a = torch.randn(n, n, dtype=torch.float64, device=dev)
    out = torch.empty_like(a)
    gflops = 2 * n**3 / _time(lambda: (matmul(a, a, out), sync())) / 1e9  # the merge's GEMM (OpenBLAS on the host)
    g = a.T @ a
    alpha = _time(lambda: (eigh_spectrum(g.clone()).keep_needed(n // 2), sync()), repeat=1) / n**3  # a merge's
    return gflops, alpha


def _io_rates(scratch_dir: Path) -> tuple[float, float]:
    """Write then read back a scratch file (page cache dropped): no input tensor data is touched.

    The write rate is the slowest of WRITE_CHUNKS fdatasync'd chunks: a virtual disk's host cache takes the
    first ~100 MB at several times the rate it sustains (measured here: 1.5 GB/s, then 0.3 GB/s), and a
    multi-GB output is written at the sustained rate.
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
    machine, lanes and scratch filesystem from the last minutes is reused (reporting/ratecache.py)."""
    startup = startup_seconds()
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


def disk_seconds(job, run: Execution, rates: Rates) -> float:
    """The disk's share of a tensor: one disk serves every lane, so these add up across lanes too."""
    read, written = run_io_bytes(job, run)
    return read / rates.read_bps + written / rates.write_bps


def tensor_seconds(job, run: Execution, rates: Rates, lane_is_gpu: bool) -> float:
    io = run_io_bytes(job, run)
    fixed = SMALL_TENSOR_S if groupable(job, run) else TASK_S
    seconds = fixed + disk_seconds(job, run, rates)
    seconds += io[0] / rates.convert_bps + io[1] / rates.checksum_bps
    if job.lowrank:  # an adapter's update: W0 + (U lam S) V^T, no eigensolve
        return seconds + gemm_flops(job, "cpu") / (rates.cpu_gflops * 1e9)
    if job.action == COPY:
        return seconds
    gflops = rates.device_gflops if lane_is_gpu else rates.cpu_gflops
    alpha = rates.device_eigh_alpha if lane_is_gpu else rates.cpu_eigh_alpha
    flops = gemm_flops(job, "cuda" if lane_is_gpu else "cpu")
    return seconds + flops / (gflops * 1e9) + alpha * edit_matrix(job)[1] ** 3


def run_io_bytes(job, run: Execution) -> tuple[int, int]:
    """(bytes read, bytes written); a streamed tensor reads its inputs twice."""
    if job.lowrank:
        factors = sum(r.nbytes for r in job.lora.refs)
        return factors + (0 if job.factors_out else job.base.nbytes), job.placement.nbytes
    if job.action == COPY:
        return job.finetuned.nbytes, job.finetuned.nbytes
    reads = job.base.nbytes + job.finetuned.nbytes
    return reads * (2 if run.streamed else 1), job.finetuned.nbytes


@dataclass
class PlanSummary:
    tensors: int
    edit_candidates: int
    copies: int
    dropped: int
    bytes_read: int
    bytes_written: int
    streamed: int
    largest_tensor: str
    largest_working_set: int
    max_ram: int
    task_ram: int
    peak_ram: int
    max_vram: int
    lanes: list[dict]
    estimated_seconds: float
    rates: dict
    warnings: list[str]
    lowrank: int = 0  # adapter updates computed from their factors (no eigensolve)
    save: str = "model"
    inputs: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list, repr=False)  # per tensor, as the report's rows (no spectra yet)

    def as_dict(self) -> dict:
        """`plan --json`: the report's structure (summary, modules, tensors), plus the estimate."""
        rows = [annotate(r) for r in self.rows]
        return {
            "streamsoup": __version__,
            "document": "plan",
            "inputs": self.inputs,
            "options": self.options,
            "summary": {
                "tensors": self.tensors,
                "edit_candidates": self.edit_candidates,
                "edited": None,
                "copied": self.copies,
                "dropped": self.dropped,
                "output_bytes": self.bytes_written,
                "bytes_read": self.bytes_read,
                "streamed": self.streamed,
                "lowrank": self.lowrank,
                "save": self.save,
            },
            "modules": module_stats(rows, planned=True),
            "tensors": rows,
            "estimate": {
                "seconds": self.estimated_seconds,
                "lanes": self.lanes,
                "rates": self.rates,
                "peak_ram": self.peak_ram,
                "max_ram": self.max_ram,
                "task_ram": self.task_ram,
                "max_vram": self.max_vram,
                "largest_tensor": self.largest_tensor,
                "largest_working_set": self.largest_working_set,
            },
            "warnings": self.warnings,
        }

    def __str__(self) -> str:
        return format_plan(self)


def plan_row(job: TensorJob) -> dict:
    """A tensor as the report will list it, with what only the run can tell left empty."""
    return {
        "name": job.name,
        "shape": list(job.shape),
        "dtype": job.out_dtype,
        "action": job.action,
        "reason": job.reason or "edit candidate",
        **dict.fromkeys(SPECTRAL_FIELDS),
    }


def summarize(plan: MergePlan, budget: Budget, runs: dict[str, Execution], rates: Rates) -> PlanSummary:
    lanes = [("cpu", f"cpu{i}") for i in range(budget.lanes.cpu)]
    lanes += [("device", f"{d}#{i}") for i, d in enumerate(budget.lanes.devices)]  # two lanes may share a GPU
    real_gpu = any(d.startswith("cuda") for d in budget.lanes.devices)
    costs = {j.key: tensor_seconds(j, runs[j.key], rates, runs[j.key].lane == "device" and real_gpu) for j in plan.jobs}
    loads: dict[str, list] = {name: [0.0, 0, name] for _, name in lanes}
    heaps = {kind: [(0.0, name) for k, name in lanes if k == kind] for kind in ("cpu", "device")}
    for job in sorted(plan.jobs, key=lambda j: -costs[j.key]):  # longest first onto the least loaded lane
        heap = heaps[runs[job.key].lane]
        load, name = heapq.heappop(heap)
        heapq.heappush(heap, (load + costs[job.key], name))
        loads[name][0] += costs[job.key]
        loads[name][1] += 1
    disk = sum(disk_seconds(j, runs[j.key], rates) for j in plan.jobs)  # lanes overlap compute, not the disk
    biggest = max(plan.jobs, key=lambda j: runs[j.key].ram)
    concurrent = sorted((r.ram for r in runs.values()), reverse=True)[: budget.lanes.total]
    peak = budget.max_ram - budget.task_ram + min(sum(concurrent), budget.task_ram)  # baseline + reserve + tasks
    return PlanSummary(
        tensors=len(plan.jobs),
        edit_candidates=len(plan.edits),
        copies=len(plan.jobs) - len(plan.edits),
        dropped=len(plan.dropped),
        bytes_read=sum(run_io_bytes(j, runs[j.key])[0] for j in plan.jobs),
        bytes_written=plan.bytes_to_write,
        streamed=sum(r.streamed for r in runs.values()),
        largest_tensor=biggest.name,
        largest_working_set=runs[biggest.key].ram,
        max_ram=budget.max_ram,
        task_ram=budget.task_ram,
        peak_ram=peak,
        max_vram=budget.max_vram,
        lanes=[{"lane": name, "tensors": n, "seconds": round(t, 1)} for t, n, name in loads.values()],
        estimated_seconds=rates.startup_s + FIXED_S + max(disk, max((t for t, _, _ in loads.values()), default=0.0)),
        rates=asdict(rates),
        warnings=list(plan.warnings),
        lowrank=sum(j.lowrank for j in plan.jobs),
        save=plan.save,
        inputs=describe_inputs(plan),
        options=plan.options.as_dict(),
        rows=[plan_row(j) for j in plan.jobs],
    )


def format_plan(s: PlanSummary) -> str:
    r = s.rates
    lines = [
        f"tensors      {s.tensors}: up to {s.edit_candidates} to edit (one whose update is below "
        f"--min-rel-update is copied instead: the data decide), {s.copies} to copy, {s.dropped} dropped (only in base)",
        f"I/O          read {format_size(s.bytes_read)}, write {format_size(s.bytes_written)}",
    ]
    if s.lowrank:
        what = (
            "the reweighed factors are written (BASE is not read)"
            if s.save == "adapter"
            else "W0 + U diag(lam s) V^T is written as W0 streams through"
        )
        lines.append(f"adapter      {s.lowrank} low-rank updates from LoRA factors: no eigensolve; {what}")
    lines += [
        f"largest      {s.largest_tensor}: working set {format_size(s.largest_working_set)}",
        f"memory       peak RAM <= {format_size(s.peak_ram)} (--max-ram {format_size(s.max_ram)}, "
        f"{format_size(s.task_ram)} for tensors); {s.streamed} tensor(s) streamed in row blocks",
    ]
    if s.max_vram:
        lines.append(f"GPU memory   <= {format_size(s.max_vram)} per device")
    lines.append(
        f"calibration  float64 {r['cpu_gflops']:.1f} GFLOP/s CPU"
        + (f", {r['device_gflops']:.1f} GFLOP/s device" if r["device_gflops"] != r["cpu_gflops"] else "")
        + f"; read {format_size(r['read_bps'])}/s, write {format_size(r['write_bps'])}/s"
        + (f" (measured {format_duration(time.time() - r['measured_at'])} ago, reused)" if r["reused"] else "")
    )
    for lane in s.lanes:
        lines.append(f"lane {lane['lane']:<8} {lane['tensors']:>5} tensors  ~{format_duration(lane['seconds'])}")
    lines.append(f"estimate     ~{format_duration(s.estimated_seconds)} on this machine")
    lines += [f"warning      {w}" for w in s.warnings]
    return "\n".join(lines)


def estimate(base: str | Path, finetuned: str | Path, opts: MergeOptions, given: dict[str, Any]) -> PlanSummary:
    """The plan of a merge on this machine, its budgets and its time; `given` (the caller's options) may not
    hold options only a merge uses: plan would silently ignore them."""
    plan_names = {f.name for f in MergeOptions.plan_fields()}
    unused = [name for name, value in given.items() if value not in (None, "", False) and name not in plan_names]
    if unused:
        raise OptionError(
            unused[0], "is not used by plan, which plans a merge on this machine from the headers alone; leave it out"
        )
    merge_plan = plan_merge(base, finetuned, opts)
    configure_process()
    budget, runs = local_schedule(merge_plan, opts)
    return summarize(merge_plan, budget, runs, calibrate(budget, Path.cwd()))
