"""Every merged tensor against the independent float64 SVD reference (tests/reference.py)."""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_merged_exactly
from hypothesis import given, settings
from hypothesis import strategies as st
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
    assert actions["model.embed_tokens.weight"][0] == "edit"  # a resized vocabulary: the base's rows edited
    assert "8 added rows kept as the fine-tune's" in actions["model.embed_tokens.weight"][1]
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
    anchor = torch.randn(8, 8)  # a zero-initialised layer beside a trained one (an all-zero file is refused)
    save_file({"w": w0, "anchor": anchor}, tmp_path / "b" / "b.safetensors")
    save_file({"w": (w0 + 0.01 * q).float(), "anchor": 1.01 * anchor}, tmp_path / "f" / "f.safetensors")
    report = check_merge(
        tmp_path / "b" / "b.safetensors", tmp_path / "f" / "f.safetensors", tmp_path / "out", "entropy", 0.8
    )
    row = next(r for r in report["tensors"] if r["name"] == "w")
    assert row["k"] == row["rank"] == 48 and row["rho"] == 0.0
    assert row["P_k"] == 1.0 and row["lambda_low"] == 0.0 and row["lambda_high"] == 1.0  # no epsilon left over


def scaled_pair(folder: Path, scales: list[float], w0_scale: float, dtype: torch.dtype) -> tuple[Path, Path]:
    """One tensor per scale c: W1 = W0 + c * D, one D (low rank plus noise) and one W0 for all."""
    g = torch.Generator().manual_seed(21)
    d = torch.randn(64, 6, generator=g) @ torch.randn(6, 40, generator=g) + 0.1 * torch.randn(64, 40, generator=g)
    w0 = w0_scale * torch.randn(64, 40, generator=g)
    anchor = torch.randn(16, 16, generator=g).to(dtype)  # W0 = 0 is a layer of a model, not all of it
    base = {f"s{i}.weight": w0.to(dtype).clone() for i in range(len(scales))} | {"anchor": anchor}
    ft = {f"s{i}.weight": (w0.double() + c * d.double()).to(dtype) for i, c in enumerate(scales)}
    ft["anchor"] = 1.01 * anchor
    for name, tensors in (("base", base), ("ft", ft)):
        (folder / name).mkdir(parents=True)
        save_file(tensors, folder / name / "model.safetensors")
    return folder / "base", folder / "ft"


DECISIONS = ("action", "k", "rank", "P_k", "rho", "lambda_high", "lambda_low")


def scaled_rows(report: dict) -> list[dict]:
    """The report's rows of the scaled tensors (not the anchor), in order."""
    return [r for r in report["tensors"] if r["name"] != "anchor"]


def test_an_update_of_exact_low_rank_has_no_low_part(tmp_path):
    """A fine-tune that moved 6 rows of a matrix leaves dW of rank 6 exactly: its SVD's tail is zero, so with
    k = 6, P_k = 1 and lambda_low = 0, the fine-tune's rows kept as they are. The Gram's eigenvalues carry
    rounding of ~1e-16 of the largest; read as a tail they gave lambda_low ~1e-8 from sqrt(1 - P_k)."""
    g = torch.Generator().manual_seed(5)
    q = torch.linalg.qr(torch.randn(48, 48, generator=g, dtype=torch.float64))[0]
    w0 = torch.randn(96, 48, generator=g)
    for scale in (1e-3, 0.05, 40.0):
        folder = tmp_path / f"s{scale}"
        w1 = w0.clone()
        steps = torch.linspace(1.0, 0.5, 6, dtype=torch.float64)[:, None]  # singular values 1 .. 0.5: exp(H) 5.9
        w1[:6] = (w0[:6].double() + scale * steps * q[:6]).float()
        (folder / "b").mkdir(parents=True)
        (folder / "f").mkdir()
        save_file({"w": w0}, folder / "b" / "b.safetensors")
        save_file({"w": w1}, folder / "f" / "f.safetensors")
        row = check_merge(
            folder / "b" / "b.safetensors", folder / "f" / "f.safetensors", folder / "out", "entropy", 0.8
        )["tensors"][0]
        assert (row["k"], row["rank"]) == (6, 48), (scale, row)
        assert (row["rho"], row["P_k"], row["lambda_low"], row["lambda_high"]) == (0.0, 1.0, 0.0, 1.0), (scale, row)


@pytest.mark.parametrize("rule", ["entropy", "energy"])
def test_decisions_do_not_depend_on_the_scale_of_the_update(tmp_path, rule):
    """MonoSoup decides from ratios of singular values: c * dW gets the k, P_k, rho and lambdas of dW for every
    c > 0 (exactly for powers of two, which scale a float without rounding), tiny fp32 updates and zero-initialised
    layers (W0 = 0) included; an absolute epsilon (1e-12 on sum s^2 and s_1) made them depend on c."""
    powers = [2.0**j for j in range(-30, 14, 3)]  # 9e-10 .. 8192: ||dW||^2 from ~1e-15 to ~1e11
    base, ft = scaled_pair(tmp_path / "zero", powers, 0.0, torch.float32)  # W1 = c * D: exact in fp32
    rows = scaled_rows(check_merge(base, ft, tmp_path / "zero" / "out", rule, 0.8))
    strict = json.loads(
        (tmp_path / "zero" / "out" / "streamsoup_report.json").read_text(),
        parse_constant=lambda c: pytest.fail(f"the report holds {c}: not JSON"),
    )
    assert all(r["rel_update"] is None for r in scaled_rows(strict))  # W0 = 0: no ratio (JSON has no Infinity)
    first = {key: rows[0][key] for key in DECISIONS}
    assert first["action"] == "edit" and 1 < first["k"] < first["rank"], first
    for row in rows:
        assert {key: row[key] for key in DECISIONS} == first, row["name"]
    # any c: W1 = c * D rounded once into fp32 (W0 = 0), or W0 + c * D in float64 (W0 != 0: c stops where
    # ||dW|| / ||W0|| reaches the fine-tune range, above it BASE is refused as unrelated)
    groups = (
        ("decades", [10.0**j for j in range(-8, 5)], 0.0, torch.float32),
        ("dense", [10.0**j for j in range(-8, -2)], 0.02, torch.float64),
    )
    for group, scales, w0_scale, dtype in groups:
        base, ft = scaled_pair(tmp_path / group, scales, w0_scale, dtype)
        rows = scaled_rows(check_merge(base, ft, tmp_path / group / "out", rule, 0.8))
        for row in rows:
            assert row["action"] == "edit" and (row["k"], row["rank"]) == (first["k"], first["rank"]), row["name"]
            for key in ("P_k", "rho", "lambda_high", "lambda_low"):
                assert row[key] == pytest.approx(first[key], abs=1e-6), (group, row["name"], key)


SPECTRA = st.lists(
    st.floats(min_value=1e-6, max_value=1.0, allow_nan=False, allow_infinity=False), min_size=1, max_size=48
).map(lambda v: torch.tensor(sorted(v, reverse=True), dtype=torch.float64))


@settings(max_examples=400, deadline=None)
@given(SPECTRA, st.integers(min_value=-60, max_value=60), st.sampled_from(["entropy", "energy"]))
def test_coefficients_of_a_spectrum_scaled_by_a_power_of_two_are_identical(s, j, rule):
    """The property the merge test above checks end to end, over many spectra: 2^j scales every singular value
    without rounding, so every decision must be bit-identical (1e-18 .. 1e18 times the update)."""
    from streamsoup.numerics.monosoup import coefficients

    assert coefficients(s * 2.0**j, rule) == coefficients(s, rule)


@settings(max_examples=400, deadline=None)
@given(SPECTRA, st.floats(min_value=1e-8, max_value=1e4), st.sampled_from(["entropy", "energy"]))
def test_coefficients_of_a_scaled_spectrum_agree_within_rounding(s, c, rule):
    """Any c > 0: the same k (unless exp(H), or the energy share, sits within rounding of its threshold) and the
    same P_k, rho and lambdas within a few float64 roundings."""
    from streamsoup.numerics.monosoup import coefficients

    a, b = coefficients(s, rule), coefficients(s * c, rule)
    p = (s / s.sum()).numpy()
    exp_h = math.exp(-float((p * np.log(p)).sum()))
    share = (np.cumsum(s.numpy() ** 2) / float((s**2).sum())).tolist()
    near = abs(exp_h - round(exp_h)) < 1e-9 if rule == "entropy" else min(abs(x - 0.8) for x in share) < 1e-12
    assert a.k == b.k or near, (a, b)
    if a.k == b.k:
        for key in ("p_k", "rho"):
            assert getattr(b, key) == pytest.approx(getattr(a, key), rel=1e-12, abs=1e-300), key
        for key in ("lambda_high", "lambda_low"):  # sqrt(1 - P_k) near 0 turns 1e-15 into up to 3e-8
            assert getattr(b, key) == pytest.approx(getattr(a, key), abs=5e-8), key
