#!/usr/bin/env python3
"""Benchmark streamsoup against the naive approach, the I/O floor and (when installed) mergekit.

    .venv/bin/python tools/bench.py                     # the ~1.7 GB pair of docs/benchmarks.md
    .venv/bin/python tools/bench.py --preset medium --skip-naive
    .venv/bin/python tools/bench.py --kernels           # each matrix shape of the pair against its kernel floor

For each approach: wall time, parameters per second and the peak RSS of its whole process
tree (tools/peak_rss.py), then the ratios; streamsoup's output is compared with the naive
one tensor by tensor. Writes a markdown table (and a PNG plot when matplotlib is installed).
Page caches are dropped before each run when running as root.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
import make_checkpoints  # noqa: E402
from peak_rss import measure  # noqa: E402

from streamsoup.numerics.hostlinalg import set_threads  # noqa: E402

PY = sys.executable


def drop_caches() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def param_count(folder: Path) -> int:
    from streamsoup.io.checkpoint import Checkpoint

    return sum(r.numel for r in Checkpoint.from_path(folder).values())


def run_one(name: str, cmd: list[str], params: int) -> dict:
    cold = drop_caches()
    print(f"[bench] {name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    res = measure(cmd)
    if res["returncode"] != 0:
        raise SystemExit(f"[bench] {name} failed with exit code {res['returncode']}")
    return {
        "approach": name,
        "seconds": res["seconds"],
        "peak_rss": res["peak_rss_bytes"],
        "params_per_s": params / res["seconds"],
        "cold_cache": cold,
    }


def ordered(t: torch.Tensor) -> torch.Tensor:
    bits = t.view(torch.int16).to(torch.int32)
    return torch.where(bits < 0, -32768 - bits, bits)


def agreement(ours: Path, naive: Path) -> dict:
    """Per tensor: ulps between streamsoup and the naive float32-SVD output, and whether k agrees."""
    from safetensors import safe_open

    report = {r["name"]: r for r in json.loads((ours / "streamsoup_report.json").read_text())["tensors"]}
    naive_k = json.loads((naive / "naive_report.json").read_text())["k"]
    worst, over, total, k_diff = 0, 0, 0, []
    with safe_open(str(naive / "model.safetensors"), "pt") as nf:
        for shard in sorted(ours.glob("*.safetensors")):
            with safe_open(str(shard), "pt") as of:
                for name in of.keys():
                    a, b = of.get_tensor(name), nf.get_tensor(name)
                    if a.dtype in (torch.bfloat16, torch.float16):
                        d = (ordered(a) - ordered(b)).abs()
                        worst = max(worst, int(d.max()))
                        over += int((d > 1).sum())
                        total += d.numel()
                    if report[name]["action"] == "edit" and naive_k.get(name) != report[name]["k"]:
                        k_diff.append(name)
    return {"max_ulps": worst, "elements_over_1_ulp": over, "elements": total, "k_mismatches": k_diff}


def mergekit_cmd(base: Path, ft: Path, out: Path, cfg: Path) -> list[str] | None:
    exe = shutil.which("mergekit-yaml")
    if exe is None:
        return None
    cfg.write_text(
        f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {ft}\n"
        "    parameters:\n      weight: 1.0\ndtype: bfloat16\n"
    )
    return [exe, str(cfg), str(out), "--lazy-unpickle"]


def pair_shapes(preset: str) -> Counter:
    """(rows, cols) of every matrix MonoSoup edits in a preset's pair, with how often each occurs."""
    shape = make_checkpoints.PRESETS[preset]
    return Counter(tuple(t.ft_shape) for t in make_checkpoints.llama_tensors(shape) if len(t.ft_shape) == 2)


def _timed(fn, sync) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def floor_seconds(m: int, n: int, side: int, device: str) -> dict[str, dict[str, float]]:
    """Two kernel floors of one matrix, phase by phase, at full BLAS rate (no blocking, conversions or I/O):

    "issue": issue 13's definition: one float64 Gram GEMM of the tall view, one eigh, one projection
             through `side` eigenvectors (X V, then (X V) V^T);
    "path":  the arithmetic the merge does now: the Gram's upper triangle (`gram_update` on the whole
             matrix at once), the partial eigensolve (`eigh_spectrum(...).keep_needed`), the same projection
             by the merge's own GEMM (`hostlinalg.matmul`: OpenBLAS on the host).
    """
    from streamsoup.numerics.hostlinalg import matmul
    from streamsoup.numerics.spectral import eigh_spectrum, gram_update

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    rows, c = max(m, n), min(m, n)
    x = torch.randn(rows, c, dtype=torch.float64, device=device)
    issue: dict = {}
    path: dict = {}
    g = torch.empty(c, c, dtype=torch.float64, device=device)
    issue["gram"] = _timed(lambda: torch.matmul(x.T, x, out=g), sync)
    v = None

    def eigh():
        nonlocal v
        v = torch.linalg.eigh(g)[1][:, : max(side, 1)].contiguous()

    issue["eigh"] = _timed(eigh, sync)
    issue["project"] = _timed(lambda: (x @ v) @ v.T, sync)
    xv, out = torch.empty(rows, v.shape[1], dtype=torch.float64, device=device), torch.empty_like(x)
    path["project"] = _timed(lambda: matmul(matmul(x, v, xv), v, out, transpose_b=True), sync)
    g.zero_()
    path["gram"] = _timed(lambda: gram_update(g, x), sync)
    path["eigh"] = _timed(lambda: eigh_spectrum(g).keep_needed(max(side, 1)), sync)
    return {"issue": issue, "path": path}


def kernels(devices: list[str], shapes: Counter, paths: list[str]) -> list[dict]:
    """Per matrix shape: the merge's own compute path (the functions a task calls; no I/O), phase by phase,
    and the kernel floor for the same k."""
    from streamsoup.numerics.spectral import MemoryRows
    from streamsoup.options import MergeOptions
    from streamsoup.tasks.dense import gram_pass, reweighed, spectrum_of
    from streamsoup.tasks.result import Stopwatch

    rows = []
    for device in devices:
        for (m, n), count in shapes.items():
            g = torch.Generator().manual_seed(0)
            w0 = (0.02 * torch.randn(m, n, generator=g)).to(torch.bfloat16)
            low = torch.randn(m, 32, generator=g) @ torch.randn(32, n, generator=g)
            w1 = (w0.float() + 2e-4 * low + 5e-4 * torch.randn(m, n, generator=g)).to(torch.bfloat16)
            for path in paths:
                src, watch = MemoryRows(w0, w1, device), Stopwatch(device)
                t0 = time.perf_counter()
                sums = gram_pass(src, path, watch)
                spectrum, coef = spectrum_of(src, sums, MergeOptions(spectral=path), watch)
                reweighed(src, spectrum, coef, torch.bfloat16, watch)
                dt = time.perf_counter() - t0
                floors = floor_seconds(m, n, min(coef.k, coef.rank - coef.k), device)
                rows.append(
                    {
                        "device": device,
                        "shape": f"{m}x{n}",
                        "count": count,
                        "path": path,
                        "seconds": dt,
                        "phases": watch.as_dict(),
                        "floor": floors["issue"],
                        "path_floor": floors["path"],
                        "k": coef.k,
                        "params_per_s": m * n / dt,
                    }
                )
                print(
                    f"[bench] {device} {m}x{n} x{count} {path}: {dt:.2f} s, floor {sum(floors['issue'].values()):.2f}"
                    f" s (k={coef.k})",
                    file=sys.stderr,
                    flush=True,
                )
    return rows


def merge_floor(out: Path, device: str) -> dict:
    """The kernel floor of a finished merge: per distinct shape of its edited tensors, measured once at the
    median min(k, rank - k) of that shape, times how often the shape occurs, at the thread count of one of
    the merge's lanes; and the merge's phase split. Its lanes run side by side: the floor of the wall time
    is the sum over `lanes`."""
    whole = json.loads((out / "streamsoup_report.json").read_text())
    report, machine = whole["tensors"], whole["machine"]
    lanes = int(re.match(r"(\d+) CPU lane", machine["lanes"]).group(1)) if device == "cpu" else 1
    set_threads(machine["threads"])
    by_shape: dict[tuple, list[int]] = {}
    phases = Counter()
    for r in report:
        phases.update(r.get("phases") or {})
        if r["action"] == "edit":
            m, n = r["shape"][0], math.prod(r["shape"][1:])
            by_shape.setdefault((m, n), []).append(min(r["k"], r["rank"] - r["k"]))
    total = {"issue": Counter(), "path": Counter()}
    for (m, n), sides in by_shape.items():
        for which, f in floor_seconds(m, n, int(statistics.median(sides)), device).items():
            total[which].update({k: v * len(sides) for k, v in f.items()})
    return {
        "floor": dict(total["issue"]),
        "floor_seconds": sum(total["issue"].values()) / lanes,
        "path_floor": dict(total["path"]),
        "path_floor_seconds": sum(total["path"].values()) / lanes,
        "phases": dict(phases),
        "lanes": lanes,
        "threads": machine["threads"],
    }


def fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def write_doc(
    path: Path, meta: dict, rows: list[dict], agree: dict | None, kern: list[dict], cmd: str, floor: dict | None = None
) -> str:
    lines = [
        f"# Benchmarks\n\nReproduce with:\n\n```\n{cmd}\n```\n",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in meta.items()) + "\n",
    ]
    if rows:
        naive = next((r for r in rows if r["approach"] == "naive"), None)
        lines += [
            "| approach | wall time | params/s | peak RSS (process tree) | time vs naive | RSS vs naive |",
            "|---|---|---|---|---|---|",
        ]
        for r in rows:
            tv = f"{r['seconds'] / naive['seconds']:.3f}x" if naive else "-"
            rv = f"{r['peak_rss'] / naive['peak_rss']:.3f}x" if naive else "-"
            lines.append(
                f"| {r['approach']} | {r['seconds']:.1f} s | {r['params_per_s'] / 1e6:.1f} M | "
                f"{fmt_bytes(r['peak_rss'])} | {tv} | {rv} |"
            )
        io = next((r for r in rows if r["approach"] == "I/O floor"), None)
        ours = next((r for r in rows if r["approach"] == "streamsoup"), None)
        if io and ours:
            lines.append(f"\nstreamsoup / I/O floor: {ours['seconds'] / io['seconds']:.2f}x")
    if agree:
        lines.append(
            f"\nAgreement with the naive float32 SVD: max {agree['max_ulps']} ulp over {agree['elements']:,} "
            f"16-bit elements, {agree['elements_over_1_ulp']:,} over 1 ulp; k differs on "
            f"{len(agree['k_mismatches'])} tensor(s) {agree['k_mismatches'][:5]}"
        )
    if floor:
        per = f"at {floor['threads']} thread(s), over {floor['lanes']} lane(s) side by side"
        lines += [
            f"\nstreamsoup / its kernel floor (issue 13's: one float64 Gram GEMM + one eigh + one projection "
            f"per edited matrix at full BLAS rate {per}, {floor['floor_seconds']:.1f} s): "
            f"{ours['seconds'] / floor['floor_seconds']:.2f}x",
            f"\nstreamsoup / the floor of the arithmetic it does (the Gram's upper triangle + the partial "
            f"eigensolve + one projection, same rate, {floor['path_floor_seconds']:.1f} s): "
            f"{ours['seconds'] / floor['path_floor_seconds']:.2f}x",
            "\n| phase | streamsoup (sum over tensors) | issue 13's floor | its arithmetic's floor |",
            "|---|---|---|---|",
        ]
        for phase in ("read", "gram", "eigh", "project", "write"):
            cells = [f"{floor[f].get(phase, 0):.1f} s" if phase in floor[f] else "-" for f in ("floor", "path_floor")]
            lines.append(f"| {phase} | {floor['phases'].get(phase, 0):.1f} s | {cells[0]} | {cells[1]} |")
    if kern:
        lines += [
            "\n## Per-matrix compute (no I/O): the merge's own path against its kernel floors\n",
            "Floors: issue 13's (Gram GEMM + eigh + projection) and that of the arithmetic the path does "
            "(upper block triangle of the Gram + partial eigensolve + projection), both at full rate on whole "
            "matrices.\n",
            "| device | shape | count | path | k | gram | eigh | project | total | floor | ratio | path floor "
            "| ratio |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in kern:
            ph, fl, pf = r["phases"], sum(r["floor"].values()), sum(r["path_floor"].values())
            lines.append(
                f"| {r['device']} | {r['shape']} | {r['count']} | {r['path']} | {r['k']} | {ph['gram']:.2f} | "
                f"{ph['eigh']:.2f} | {ph['project']:.2f} | {r['seconds']:.2f} | {fl:.2f} | "
                f"{r['seconds'] / fl:.2f}x | {pf:.2f} | {r['seconds'] / pf:.2f}x |"
            )
        for spectral in sorted({r["path"] for r in kern}):
            tot = sum(r["seconds"] * r["count"] for r in kern if r["path"] == spectral)
            fl = sum(sum(r["floor"].values()) * r["count"] for r in kern if r["path"] == spectral)
            pf = sum(sum(r["path_floor"].values()) * r["count"] for r in kern if r["path"] == spectral)
            lines.append(
                f"\nWhole pair, {spectral} path: {tot:.1f} s of compute against issue 13's kernel floor of "
                f"{fl:.1f} s ({tot / fl:.2f}x) and its own arithmetic's floor of {pf:.1f} s "
                f"({tot / pf:.2f}x)"
            )
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def plot(path: Path, rows: list[dict]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[bench] matplotlib not installed: no plot", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    names = [r["approach"] for r in rows]
    axes[0].barh(names, [r["seconds"] for r in rows], color="#4477aa")
    axes[0].set_xlabel("wall time (s)")
    axes[1].barh(names, [r["peak_rss"] / 2**30 for r in rows], color="#cc6677")
    axes[1].set_xlabel("peak RSS of the process tree (GiB)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="bench", choices=sorted(make_checkpoints.PRESETS))
    p.add_argument("--data", type=Path, default=ROOT / "bench-data", help="where pairs and outputs go")
    p.add_argument("--devices", default="auto")
    p.add_argument("--lanes", default="", help="streamsoup --lanes (default: its own default)")
    p.add_argument("--max-ram", default=None)
    p.add_argument("--skip-naive", action="store_true")
    p.add_argument(
        "--kernels",
        action="store_true",
        help="only the compute of each matrix shape of the preset's pair against its kernel floor",
    )
    p.add_argument("--paths", default="gram", help="spectral paths for --kernels (gram,svd)")
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = p.parse_args()
    meta = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "date": time.strftime("%Y-%m-%d"),
    }
    cmd = ".venv/bin/python tools/bench.py " + " ".join(sys.argv[1:])
    devs = ["cuda:0"] if args.devices.startswith("cuda") else ["cpu"]
    if args.kernels:
        set_threads(os.cpu_count() or 1)
        kern = kernels(devs, pair_shapes(args.preset), args.paths.split(","))
        print(write_doc(args.doc.with_name(args.doc.stem + "-kernels.md"), meta, [], None, kern, cmd))
        return
    pair = args.data / args.preset
    if not (pair / "finetuned").exists():
        make_checkpoints.make_pair(pair, args.preset)
    base, ft = pair / "base", pair / "finetuned"
    params = param_count(ft)
    meta["pair"] = f"{args.preset} ({params / 1e6:.0f} M params, "
    meta["pair"] += f"{sum(f.stat().st_size for f in ft.glob('*.safetensors')) / 2**30:.2f} GiB per checkpoint)"
    runs = pair / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir()
    ours = [
        PY,
        "-m",
        "streamsoup.cli",
        "merge",
        str(base),
        str(ft),
        str(runs / "streamsoup"),
        "-q",
        "--devices",
        args.devices,
        *(["--lanes", args.lanes] if args.lanes else []),
    ]
    if args.max_ram:
        ours += ["--max-ram", args.max_ram]
    rows = [run_one("streamsoup", ours, params)]
    rows.append(run_one("I/O floor", [PY, str(ROOT / "tools" / "io_floor.py"), str(base), str(ft), str(runs)], params))
    agree = None
    if not args.skip_naive:
        naive = [PY, str(ROOT / "tools" / "naive_monosoup.py"), str(base), str(ft), str(runs / "naive")]
        rows.append(run_one("naive", naive, params))
        agree = agreement(runs / "streamsoup", runs / "naive")
    mk = mergekit_cmd(base, ft, runs / "mergekit", runs / "mergekit.yaml")
    if mk is not None:
        rows.append(run_one("mergekit task_arithmetic", mk, params))
    floor = merge_floor(runs / "streamsoup", devs[0])
    print(write_doc(args.doc, meta, rows, agree, [], cmd, floor))
    plot(args.doc.with_suffix(".png"), rows)
    (args.doc.with_suffix(".json")).write_text(
        json.dumps({"meta": meta, "runs": rows, "agreement": agree, "kernel_floor": floor}, indent=2)
    )


if __name__ == "__main__":
    main()
