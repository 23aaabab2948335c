#!/usr/bin/env python3
"""An adapter merge at scale: a LLM-shaped bf16 base and a rank-r LoRA adapter on all its linear layers.

    python tools/bench_adapter.py DIR [--preset llama2-7b] [--rank 64]    # measure (writes ~2x the base)
    python tools/bench_adapter.py DIR --preset llama3-70b --sparse         # plan only, headers and holes

Writes DIR/base (random bf16 weights, Hugging Face layout), DIR/adapter (a PEFT folder: config and
factors with B != 0, float32) and, measured, the I/O floor (read the base once, write its size), the
merge with --save model and with --save adapter (wall time and peak RSS of the process tree, via
tools/peak_rss.py), and `streamsoup plan` of the adapter merge next to the dense path's estimate
for the same shapes (a sparse pair). Results go to DIR/bench-adapter.json and stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import make_checkpoints as mc  # noqa: E402

from streamsoup.io.layout import TensorSpec  # noqa: E402
from streamsoup.synthetic import write_side_files  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_base(folder: Path, shape: mc.ModelShape, sparse: bool) -> None:
    """Random bf16 weights block by block (fast: no fine-tune to derive), or headers over holes."""
    tensors = mc.llama_tensors(shape)
    writer = mc.Writer(
        folder, [TensorSpec(t.name, "BF16", t.base_shape) for t in tensors], mc.HF_SHARD_SIZE, with_index=True
    )
    g = torch.Generator().manual_seed(0)
    for t in [] if sparse else tensors:
        rows, cols = (1, t.base_shape[0]) if len(t.base_shape) == 1 else (t.base_shape[0], math.prod(t.base_shape[1:]))
        step = max(1, 2**24 // cols)
        for start in range(0, rows, step):
            n = min(step, rows - start)
            writer.write(t.name, "BF16", start, (0.02 * torch.randn(n, cols, generator=g)).to(torch.bfloat16))
    writer.close()
    write_side_files(folder, shape, shape.vocab)


def make_adapter(folder: Path, base: Path, rank: int, sparse: bool) -> None:
    """A PEFT LoRA folder over every linear layer of the base: A ~ N(0, 1/in), B small and non-zero."""
    from streamsoup.io.checkpoint import Checkpoint

    ckpt = Checkpoint.from_path(base)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    tensors, shapes = {}, {}
    for name, ref in ckpt.items():
        module = name.removesuffix(".weight")
        if not name.endswith(".weight") or module.rsplit(".", 1)[-1] not in TARGETS:
            continue
        out_f, in_f = ref.shape
        key = f"base_model.model.{module}"
        if sparse:
            shapes[f"{key}.lora_A.weight"] = (rank, in_f)
            shapes[f"{key}.lora_B.weight"] = (out_f, rank)
            continue
        tensors[f"{key}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) / math.sqrt(in_f)
        tensors[f"{key}.lora_B.weight"] = 1e-3 * torch.randn(out_f, rank, generator=g)
    if sparse:  # headers only: the data are holes (plan reads headers alone)
        specs = [TensorSpec(k, "F32", v) for k, v in shapes.items()]
        w = mc.Writer(folder, specs, 2**62, with_index=False)
        w.close()
        (folder / "model.safetensors").rename(folder / "adapter_model.safetensors")
    else:
        save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": list(TARGETS),
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "bias": "none",
        "base_model_name_or_path": str(base),
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
        "task_type": "CAUSAL_LM",
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))


def io_floor(base: Path, scratch: Path) -> float:
    """Read every base shard once and write the same number of bytes (fdatasync): what any merge must do."""
    import numpy as np
    from io_floor import CHUNK, read_all, write_scratch

    buf = np.empty(CHUNK, dtype=np.uint8)
    t0 = time.perf_counter()
    write_scratch(scratch, read_all(base, buf), buf)
    return time.perf_counter() - t0


def cold_cache() -> None:
    """Drop the page cache (root only) so reads come from the disk; otherwise note that they may not."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        print("note: cannot drop the page cache (not root): reads may be served from memory", file=sys.stderr)


def measured(cmd: list[str]) -> dict:
    cold_cache()
    proc = subprocess.run(
        [sys.executable, str(HERE / "peak_rss.py"), "--json", "--", *cmd], capture_output=True, text=True, check=True
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plan_seconds(base: Path, finetuned: Path, *extra: str) -> tuple[float, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "streamsoup.cli", "plan", str(base), str(finetuned), "--json", *extra],
        capture_output=True,
        text=True,
        check=True,
    )
    summary = json.loads(proc.stdout)
    return summary["estimate"]["seconds"], proc.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dir", type=Path)
    p.add_argument("--preset", default="llama2-7b", choices=sorted(mc.PRESETS))
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--sparse", action="store_true", help="headers only: `plan` at full scale in no disk space")
    a = p.parse_args()
    shape = mc.PRESETS[a.preset]
    base, adapter = a.dir / "base", a.dir / "adapter"
    if not (base / "config.json").exists():
        make_base(base, shape, a.sparse)
    if not (adapter / "adapter_config.json").exists():
        make_adapter(adapter, base, a.rank, a.sparse)
    dense_base, dense_ft = mc.make_pair(
        a.dir / "dense-sparse", shape, sparse=True, base_shard_size=mc.HF_SHARD_SIZE, ft_shard_size=mc.HF_SHARD_SIZE
    )
    results: dict = {
        "preset": a.preset,
        "rank": a.rank,
        "base_bytes": sum(f.stat().st_size for f in base.glob("*.safetensors")),
    }
    results["plan_adapter_model_s"], _ = plan_seconds(base, adapter)
    results["plan_adapter_adapter_s"], _ = plan_seconds(base, adapter, "--save", "adapter")
    results["plan_dense_s"], _ = plan_seconds(dense_base, dense_ft)
    if not a.sparse:
        cold_cache()
        results["io_floor_s"] = io_floor(base, a.dir / "scratch")
        for save in ("model", "adapter"):
            out = a.dir / f"out-{save}"
            if out.exists():
                subprocess.run(["rm", "-rf", str(out)], check=True)
            results[f"merge_{save}"] = measured(
                [
                    sys.executable,
                    "-m",
                    "streamsoup.cli",
                    "merge",
                    str(base),
                    str(adapter),
                    str(out),
                    "--save",
                    save,
                    "-q",
                ]
            )
            if save == "model":
                subprocess.run(["rm", "-rf", str(out)], check=True)  # keep the disk free
    (a.dir / "bench-adapter.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
