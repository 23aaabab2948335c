#!/usr/bin/env python3
"""The naive MonoSoup baseline, as the paper's own script does it: both checkpoints loaded whole
in float32, one full `torch.linalg.svd` per weight matrix, one save at the end.

    python tools/naive_monosoup.py BASE FINETUNED OUT [--rank-rule entropy|energy] [--energy R]

Used by tools/bench.py as the reference point for time and memory; it shares no code with
streamsoup (so agreement between the two is evidence, not tautology).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def load_whole(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def monosoup(w0: torch.Tensor, w1: torch.Tensor, rule: str, energy: float) -> tuple[torch.Tensor, int]:
    shape = w1.shape
    a0, a1 = w0.reshape(shape[0], -1), w1.reshape(shape[0], -1)
    dw = a1 - a0
    u, s, vh = torch.linalg.svd(dw, full_matrices=False)
    r = s.numel()
    if rule == "entropy":
        p = s / s.sum()
        k = min(max(math.ceil(math.exp(float(-(p * torch.log(p + 1e-12)).sum()))), 1), r)
    else:
        share = torch.cumsum(s**2, 0) / (s**2).sum()
        k = min(int((share < energy).sum()) + 1, r)
    p_k = float((s[:k] ** 2).sum() / ((s**2).sum() + 1e-12))
    rho = 0.0 if k == r else float((s[k] / (s[0] + 1e-12)) ** 2)
    lam_low = min(max(rho + (1 - rho) * math.sqrt(min(max(1 - p_k, 0.0), 1.0)), 0.0), 1.0)
    lam_high = min(max(1 - lam_low, 0.0), 1.0)
    high = (u[:, :k] * s[:k]) @ vh[:k]
    return (a0 + lam_high * high + lam_low * (dw - high)).reshape(shape), k


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", type=Path)
    p.add_argument("finetuned", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--rank-rule", default="entropy", choices=("entropy", "energy"))
    p.add_argument("--energy", type=float, default=0.8)
    args = p.parse_args()
    t0 = time.perf_counter()
    base = {k: v.float() for k, v in load_whole(args.base).items()}
    ft_raw = load_whole(args.finetuned)
    ft = {k: v.float() for k, v in ft_raw.items()}
    out, ks = {}, {}
    for name, w1 in ft.items():
        w0 = base.get(name)
        ok = (
            w0 is not None and w0.shape == w1.shape and w1.ndim >= 2 and w1.numel() and ft_raw[name].is_floating_point()
        )
        if ok and float((w1 - w0).norm()) / (float(w0.norm()) + 1e-12) >= 1e-6:
            merged, ks[name] = monosoup(w0, w1, args.rank_rule, args.energy)
            out[name] = merged.to(ft_raw[name].dtype)
        else:
            out[name] = ft_raw[name]
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(out, str(args.out / "model.safetensors"), metadata={"format": "pt"})
    (args.out / "naive_report.json").write_text(json.dumps({"k": ks, "seconds": time.perf_counter() - t0}))


if __name__ == "__main__":
    main()
