"""Every merged tensor against the independent float64 SVD reference (tests/reference.py)."""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest
import torch
from helpers import assert_merged_exactly
from safetensors.torch import save_file

import streamsoup

RULES = [("entropy", 0.8), ("energy", 0.8), ("energy", 0.5)]


def check_merge(base: Path, ft: Path, out: Path, rule: str, energy: float, **options) -> dict:
    """Merge in-process, then hold every output tensor to the reference; returns the report."""
    streamsoup.merge(base, ft, out, rank_rule=rule, energy=energy, **options)
    return assert_merged_exactly(base, ft, out, rule, energy)


@pytest.mark.parametrize("spectral", ["gram", "svd"])
@pytest.mark.parametrize("rule,energy", RULES)
def test_awkward_pair_is_exact(awkward_pair, tmp_path, rule, energy, spectral):
    base, ft = awkward_pair
    report = check_merge(base, ft, tmp_path / "out", rule, energy, spectral=spectral, shard_size="100KB")
    actions = {r["name"]: (r["action"], r["reason"]) for r in report["tensors"]}
    assert actions["model.layers.0.mlp.up_proj.weight"][0] == "copy"  # frozen: zero update
    assert "min-rel-update" in actions["multi_modal_projector.linear.weight"][1]  # 1e-9 relative update
    assert "differs from base" in actions["model.embed_tokens.weight"][1]
    assert actions["score.weight"] == ("copy", "not in base")
    assert actions["vision_tower.patch_embed.proj.weight"][0] == "edit"  # 4-D conv kernel
    assert actions["model.layers.0.self_attn.v_proj.weight"][0] == "edit"  # fp32 base, bf16 fine-tune
    assert report["dropped"] == [{"name": "model.rotary_emb.inv_freq", "action": "drop", "reason": "only in base"}]


def test_qwen_pair_two_lanes_is_exact(qwen_pair, tmp_path):
    base, ft = qwen_pair
    check_merge(base, ft, tmp_path / "out", "entropy", 0.8, lanes=2)


def _update(shape, dtype, seed, scale=0.1, rank=6):
    g = torch.Generator().manual_seed(seed)
    m = shape[0]
    n = int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else 1
    w0 = 0.02 * torch.randn(m, n, generator=g, dtype=torch.float64)
    a = torch.randn(m, rank, generator=g, dtype=torch.float64) * (0.7 ** torch.arange(rank))
    low = a @ torch.randn(rank, n, generator=g, dtype=torch.float64)
    dw = scale * 0.02 * low / low.norm() * (m * n) ** 0.5 + 0.002 * torch.randn(m, n, generator=g, dtype=torch.float64)
    return w0.reshape(shape).to(dtype), (w0 + dw).reshape(shape).to(dtype)


KINDS = {
    "tall": (96, 40),
    "wide": (40, 96),
    "square": (64, 64),
    "conv": (32, 3, 3, 3),
    "column": (80, 1),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("spectral", ["gram", "svd"])
def test_tensor_kinds_single_file(tmp_path, kind, dtype, spectral):
    """Single .safetensors files written by safetensors itself, one tensor kind and dtype each."""
    w0, w1 = _update(KINDS[kind], dtype, seed=zlib.crc32(f"{kind}{dtype}".encode()))
    (tmp_path / "b").mkdir()
    (tmp_path / "f").mkdir()
    save_file(
        {"w": w0, "bias": w0.reshape(-1)[:7].clone()}, tmp_path / "b" / "m.safetensors", metadata={"format": "pt"}
    )
    save_file(
        {"w": w1, "bias": w1.reshape(-1)[:7].clone()}, tmp_path / "f" / "m.safetensors", metadata={"format": "pt"}
    )
    for rule, energy in RULES[:2]:
        out = tmp_path / f"out-{rule}"
        report = check_merge(
            tmp_path / "b" / "m.safetensors", tmp_path / "f" / "m.safetensors", out, rule, energy, spectral=spectral
        )
        rows = {r["name"]: r for r in report["tensors"]}
        assert rows["w"]["action"] == "edit" and rows["bias"]["action"] == "copy"


def test_full_rank_k_equals_r(tmp_path):
    """An update with a flat spectrum drives k to r (rho = 0, lam_low from P_k = 1)."""
    q = torch.linalg.qr(torch.randn(48, 48, dtype=torch.float64))[0]
    w0 = torch.zeros(48, 48, dtype=torch.float32)
    (tmp_path / "b").mkdir()
    (tmp_path / "f").mkdir()
    save_file({"w": w0}, tmp_path / "b" / "b.safetensors")
    save_file({"w": (w0 + 0.01 * q).float()}, tmp_path / "f" / "f.safetensors")
    report = check_merge(
        tmp_path / "b" / "b.safetensors", tmp_path / "f" / "f.safetensors", tmp_path / "out", "entropy", 0.8
    )
    row = report["tensors"][0]
    assert row["k"] == row["rank"] == 48 and row["rho"] == 0.0
