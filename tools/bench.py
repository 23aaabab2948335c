#!/usr/bin/env python3
"""Benchmark streamsoup against the naive approach, the I/O floor and (when installed) mergekit.

    python tools/bench.py                          # the ~1.7 GB pair of docs/benchmarks.md
    python tools/bench.py --preset medium --skip-naive
    python tools/bench.py --kernels --devices cuda # per-tensor rates of each spectral path

For each approach: wall time, parameters per second and the peak RSS of its whole process
tree (tools/peak_rss.py), then the ratios; streamsoup's output is compared with the naive
one tensor by tensor. Writes a markdown table (and a PNG plot when matplotlib is installed).
Page caches are dropped before each run when running as root.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
import make_checkpoints  # noqa: E402
from peak_rss import measure  # noqa: E402

PY = sys.executable


def drop_caches() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def param_count(folder: Path) -> int:
    from streamsoup.checkpoint import Checkpoint

    return sum(r.numel for r in Checkpoint.from_path(folder).values())


def run_one(name: str, cmd: list[str], params: int) -> dict:
    cold = drop_caches()
    print(f"[bench] {name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    res = measure(cmd)
    if res["returncode"] != 0:
        raise SystemExit(f"[bench] {name} failed with exit code {res['returncode']}")
    return {"approach": name, "seconds": res["seconds"], "peak_rss": res["peak_rss_bytes"],
            "params_per_s": params / res["seconds"], "cold_cache": cold}  # fmt: skip


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
    cfg.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {ft}\n"
                   "    parameters:\n      weight: 1.0\ndtype: bfloat16\n")  # fmt: skip
    return [exe, str(cfg), str(out), "--lazy-unpickle"]


def kernels(devices: list[str], shapes: list[tuple[int, int]], paths: list[str]) -> list[dict]:
    """Compute-only rate of one tensor through the exact code path a merge uses (no I/O)."""
    from streamsoup.monosoup import coefficients, reweigh
    from streamsoup.spectral import MemoryRows, compute_spectrum

    rows = []
    for device in devices:
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        for m, n in shapes:
            g = torch.Generator().manual_seed(0)
            w0 = (0.02 * torch.randn(m, n, generator=g)).to(torch.bfloat16)
            low = torch.randn(m, 32, generator=g) @ torch.randn(32, n, generator=g)
            w1 = (w0.float() + 2e-4 * low + 5e-4 * torch.randn(m, n, generator=g)).to(torch.bfloat16)
            for path in paths:
                src = MemoryRows(w0, w1, device)
                sync()
                t0 = time.perf_counter()
                spectrum = compute_spectrum(src, path)
                coef = coefficients(spectrum.s)
                out = torch.empty(m, n, dtype=torch.bfloat16)
                tall = src.tall_view(out)
                for _, block in src.read_blocks():
                    for r in src.micro_blocks(block):
                        w0b, x = src.read(r)
                        tall[r] = reweigh(w0b, x, spectrum.high_part(x, coef.k), coef).to(out.dtype).cpu()
                sync()
                dt = time.perf_counter() - t0
                rows.append({"device": device, "shape": f"{m}x{n}", "path": path, "seconds": dt,
                             "params_per_s": m * n / dt, "k": coef.k})  # fmt: skip
                print(f"[bench] {device} {m}x{n} {path}: {dt:.2f} s (k={coef.k})", file=sys.stderr, flush=True)
    return rows


def fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def write_doc(path: Path, meta: dict, rows: list[dict], agree: dict | None, kern: list[dict], cmd: str) -> str:
    lines = [f"# Benchmarks\n\nReproduce with:\n\n```\n{cmd}\n```\n",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in meta.items()) + "\n"]  # fmt: skip
    if rows:
        naive = next((r for r in rows if r["approach"] == "naive"), None)
        lines += ["| approach | wall time | params/s | peak RSS (process tree) | time vs naive | RSS vs naive |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for r in rows:
            tv = f"{r['seconds'] / naive['seconds']:.3f}x" if naive else "-"
            rv = f"{r['peak_rss'] / naive['peak_rss']:.3f}x" if naive else "-"
            lines.append(f"| {r['approach']} | {r['seconds']:.1f} s | {r['params_per_s'] / 1e6:.1f} M | "
                         f"{fmt_bytes(r['peak_rss'])} | {tv} | {rv} |")  # fmt: skip
        floor = next((r for r in rows if r["approach"] == "I/O floor"), None)
        ours = next((r for r in rows if r["approach"] == "streamsoup"), None)
        if floor and ours:
            lines.append(f"\nstreamsoup / I/O floor: {ours['seconds'] / floor['seconds']:.2f}x")
    if agree:
        lines.append(
            f"\nAgreement with the naive float32 SVD: max {agree['max_ulps']} ulp over {agree['elements']:,} "
            f"16-bit elements, {agree['elements_over_1_ulp']:,} over 1 ulp; k differs on "
            f"{len(agree['k_mismatches'])} tensor(s) {agree['k_mismatches'][:5]}"
        )
    if kern:
        lines += ["\n## Per-tensor compute (no I/O)\n", "| device | shape | path | seconds | params/s | k |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for r in kern:
            lines.append(f"| {r['device']} | {r['shape']} | {r['path']} | {r['seconds']:.2f} | "
                         f"{r['params_per_s'] / 1e6:.1f} M | {r['k']} |")  # fmt: skip
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
    p.add_argument("--lanes", default="1")
    p.add_argument("--max-ram", default=None)
    p.add_argument("--skip-naive", action="store_true")
    p.add_argument("--kernels", action="store_true", help="only per-tensor compute rates of each spectral path")
    p.add_argument("--kernel-shapes", default="4096x4096,4096x11008,8192x28672")
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = p.parse_args()
    meta = {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
            "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    cmd = "python tools/bench.py " + " ".join(sys.argv[1:])
    if args.kernels:
        devs = ["cuda:0"] if args.devices.startswith("cuda") else ["cpu"]
        shapes = [tuple(int(x) for x in s.split("x")) for s in args.kernel_shapes.split(",")]
        kern = kernels(devs, shapes, ["gram", "svd"])
        print(write_doc(args.doc, meta, [], None, kern, cmd))
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
    ours = [PY, "-m", "streamsoup.cli", "merge", str(base), str(ft), str(runs / "streamsoup"), "-q",
            "--devices", args.devices, "--lanes", args.lanes]  # fmt: skip
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
    print(write_doc(args.doc, meta, rows, agree, [], cmd))
    plot(args.doc.with_suffix(".png"), rows)
    (args.doc.with_suffix(".json")).write_text(json.dumps({"meta": meta, "runs": rows, "agreement": agree}, indent=2))


if __name__ == "__main__":
    main()
