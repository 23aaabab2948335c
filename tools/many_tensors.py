#!/usr/bin/env python3
"""The cost per tensor: plan and merge a pair of N tiny matrices (a DeepSeek-V3-sized model has ~90,000 tensors).

    python tools/many_tensors.py DIR --tensors 5000 [--merge-tensors 5000]

Writes DIR/base and DIR/ft (one safetensors file each, N fp32 8x8 matrices with a small update),
times `streamsoup plan` on N tensors and `streamsoup merge` on the first --merge-tensors of them
(a separate pair), and prints wall times and the overhead per tensor, start-up included. Never
asserts a timing: the numbers go to docs/.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_pair(root: Path, n: int) -> tuple[Path, Path]:
    g = torch.Generator().manual_seed(n)
    base = {f"layers.{i}.weight": torch.randn(8, 8, generator=g) for i in range(n)}
    ft = {k: v + 0.01 * torch.randn(8, 8, generator=g) for k, v in base.items()}
    for side, tensors in (("base", base), ("ft", ft)):
        (root / side).mkdir(parents=True, exist_ok=True)
        save_file(tensors, root / side / "model.safetensors")
    return root / "base", root / "ft"


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", type=Path)
    p.add_argument("--tensors", type=int, default=100_000, help="tensors of the planned pair")
    p.add_argument("--merge-tensors", type=int, default=5000, help="tensors of the merged pair")
    args = p.parse_args(argv)
    cli = [sys.executable, "-m", "streamsoup.cli"]
    startup = timed([*cli, "--version"])
    base, ft = write_pair(args.dir / f"plan-{args.tensors}", args.tensors)
    plan = timed([*cli, "plan", str(base), str(ft)])
    base, ft = write_pair(args.dir / f"merge-{args.merge_tensors}", args.merge_tensors)
    out = args.dir / f"merged-{args.merge_tensors}"
    shutil.rmtree(out, ignore_errors=True)
    merge = timed([*cli, "merge", str(base), str(ft), str(out), "-q"])
    print(f"start-up (streamsoup --version): {startup:.1f} s")
    print(f"plan  {args.tensors} tensors: {plan:.1f} s ({(plan - startup) / args.tensors * 1e3:.2f} ms per tensor)")
    print(
        f"merge {args.merge_tensors} tensors: {merge:.1f} s "
        f"({(merge - startup) / args.merge_tensors * 1e3:.2f} ms per tensor, start-up excluded)"
    )


if __name__ == "__main__":
    main()
