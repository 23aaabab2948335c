"""--dtype: every float tensor of OUT in one dtype, on a real tiny Llama fine-tune saved in float32; edited tensors
are the float64 reference rounded once, copied ones the fine-tune's values converted once."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_folder, made_once, paths
from helpers import assert_one_line_error, report_rows, run
from reference import assert_within_rounding, monosoup_reference
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")

TORCH = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "keep": torch.float32}
CONFIG = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "keep": "float32"}


def as_float32(folder: Path, into: Path) -> Path:
    """The checkpoint re-saved in float32 (its config saying so), one shard."""
    into.mkdir(parents=True)
    for f in folder.iterdir():
        if f.suffix == ".json" and "index" not in f.name:
            shutil.copy(f, into / f.name)
    save_file({k: v.to(torch.float32) for k, v in load_folder(folder).items()}, into / "model.safetensors")
    config = json.loads((into / "config.json").read_text())
    (into / "config.json").write_text(json.dumps({**config, "dtype": "float32"}))
    return into


@pytest.fixture(scope="module")
def fp32_pair(tmp_path_factory, llama_finetune) -> tuple[Path, Path]:
    def make(folder: Path) -> list[str]:
        base, ft = llama_finetune
        return [str(as_float32(base, folder / "base")), str(as_float32(ft, folder / "finetuned"))]

    return paths(*made_once(tmp_path_factory, "dtype-fp32-pair", make))


@pytest.mark.parametrize("dtype", ["keep", "bf16", "fp16", "fp32"])
def test_every_float_tensor_in_the_dtype_asked_for_and_exact(fp32_pair, tmp_path, dtype):
    base, ft = fp32_pair
    out = tmp_path / "out"
    assert run("merge", base, ft, out, "--dtype", dtype, "-q").returncode == 0
    w0s, w1s, got, rows = load_folder(base), load_folder(ft), load_folder(out), report_rows(out)
    assert got.keys() == w1s.keys()
    target = TORCH[dtype]
    for name, tensor in got.items():
        assert tensor.dtype == target, (name, tensor.dtype)
        assert rows[name]["dtype"] == {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}[target]
        if rows[name]["action"] == "edit":
            expected = monosoup_reference(w0s[name].to(torch.float64), w1s[name].to(torch.float64))
            assert expected.edited, name
            assert_within_rounding(tensor, expected, name)
        else:
            assert torch.equal(tensor, w1s[name].to(target)), name  # the fine-tune's values, converted once
    assert json.loads((out / "config.json").read_text())["dtype"] == CONFIG[dtype]
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert next(model.parameters()).dtype == target
    assert run("verify", out).returncode == 0


def test_a_value_the_dtype_cannot_hold_is_refused_and_keep_is_the_default(fp32_pair, tmp_path):
    """A copied fine-tune value beyond fp16's range would be Inf once written: refused, naming the tensor."""
    base, ft = fp32_pair
    big = tmp_path / "big"
    shutil.copytree(ft, big)
    tensors = load_folder(big)
    tensors["model.norm.weight"][0] = 1e6
    save_file(tensors, big / "model.safetensors")
    proc = run("merge", base, big, tmp_path / "out", "--dtype", "fp16")
    assert_one_line_error(proc, proc.returncode, "tensor 'model.norm.weight'", "do not fit F16", "NaN or Inf")
    assert proc.returncode != 0 and not (tmp_path / "out").exists()
    default = tmp_path / "default"
    assert run("merge", base, ft, default, "-q").returncode == 0
    assert {t.dtype for t in load_folder(default).values()} == {torch.float32}
    report = json.loads((default / "streamsoup_report.json").read_text())
    assert report["options"]["dtype"] == "keep"


def test_dtype_is_for_a_merged_model(llama_lora, tmp_path):
    base, adapter = llama_lora
    proc = run("merge", base, adapter, tmp_path / "out", "--save", "adapter", "--dtype", "fp16")
    assert_one_line_error(proc, 2, "--dtype fp16 is for a merged model", "--save adapter")
    merged = tmp_path / "merged"
    assert run("merge", base, adapter, merged, "--dtype", "fp32", "-q").returncode == 0
    assert {t.dtype for t in load_folder(merged).values() if t.is_floating_point()} == {torch.float32}


def test_a_zero_d_tensor_and_an_overflow_that_allow_nonfinite_does_not_excuse(fp32_pair, tmp_path):
    """A 0-d float (CLIP's logit_scale) converts like any tensor; a finite value fp16 cannot hold is refused
    with --allow-nonfinite too (that flag lets the fine-tune's own NaN/Inf through, not new ones)."""
    base, ft = fp32_pair
    with_scalar = {}
    for role, folder in (("base", base), ("ft", ft)):
        copy = tmp_path / role
        shutil.copytree(folder, copy)
        tensors = load_folder(copy)
        tensors["logit_scale"] = torch.tensor(2.6593, dtype=torch.float32)
        save_file(tensors, copy / "model.safetensors")
        with_scalar[role] = copy
    out = tmp_path / "out"
    assert run("merge", with_scalar["base"], with_scalar["ft"], out, "--dtype", "bf16", "-q").returncode == 0
    scalar = load_folder(out)["logit_scale"]
    assert scalar.dtype == torch.bfloat16 and scalar.shape == () and scalar == torch.tensor(2.6593).to(torch.bfloat16)
    tensors = load_folder(with_scalar["ft"])
    tensors["model.norm.weight"][0] = 1e6
    save_file(tensors, with_scalar["ft"] / "model.safetensors")
    proc = run("merge", with_scalar["base"], with_scalar["ft"], tmp_path / "o2", "--dtype", "fp16", "--allow-nonfinite")
    assert_one_line_error(proc, proc.returncode, "tensor 'model.norm.weight'", "do not fit F16", "--dtype")
    assert proc.returncode != 0 and not (tmp_path / "o2").exists()


def near_ties(dtype: torch.dtype, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 values on, just above and just below the midpoints of neighbours of `dtype` (normal, subnormal,
    either sign), with their correct rounding to nearest, ties to even, known by construction: a float32 step
    (2^-24 relative) moves such a value past the midpoint, so rounding through float32 rounds it wrongly."""
    bits = {torch.bfloat16: (0x7F7E, 1), torch.float16: (0x7BFE, 1)}[dtype][0]
    g = torch.Generator().manual_seed(seed)
    low = torch.randint(1, bits, (count,), generator=g, dtype=torch.int32)
    low[: count // 8] = torch.randint(1, 0x7F, (count // 8,), generator=g, dtype=torch.int32)  # subnormals too
    lo, hi = (v.to(torch.int16).view(dtype).to(torch.float64) for v in (low, low + 1))
    mid = (lo + hi) / 2  # exact in float64
    nudge = (hi - lo) * 2.0**-30  # far below float32's resolution at these magnitudes
    values = torch.cat([mid + nudge, mid - nudge, mid])
    even = torch.where(low % 2 == 0, lo, hi)
    expected = torch.cat([hi, lo, even])
    sign = torch.where(torch.rand(values.shape, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
    return values * sign, (expected * sign).to(dtype)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_a_float64_value_is_rounded_once_to_nearest_even(tmp_path, dtype):
    """README: the fine-tune's values converted once, edited ones the float64 result rounded once to nearest, ties
    to even. torch rounds a float64 to bf16/fp16 through float32 (twice), which gets values next to a midpoint
    wrong: a float64 checkpoint written with --dtype must not."""
    target = TORCH[dtype]
    values, expected = near_ties(target, 512, seed=3)
    g = torch.Generator().manual_seed(4)
    w0 = torch.randn(48, 32, generator=g, dtype=torch.float64)
    tensors = {"layer.weight": w0, "norm.weight": values}
    tuned = {"layer.weight": w0 + 0.05 * torch.randn(48, 32, generator=g, dtype=torch.float64), "norm.weight": values}
    for folder in ("base", "ft"):
        (tmp_path / folder).mkdir()
    save_file(tensors, tmp_path / "base" / "model.safetensors")
    save_file(tuned, tmp_path / "ft" / "model.safetensors")
    out = tmp_path / "out"
    assert run("merge", tmp_path / "base", tmp_path / "ft", out, "--dtype", dtype, "-q").returncode == 0
    got = load_folder(out)
    assert report_rows(out)["norm.weight"]["action"] != "edit"
    wrong = (got["norm.weight"].view(torch.int16) != expected.view(torch.int16)).sum().item()
    assert wrong == 0, f"{wrong} of {values.numel()} values not rounded once to nearest even"


def nearest_even(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The reference: every finite positive value of `dtype` listed, the two neighbours of |v| found by search and
    the nearer taken by exact float64 differences (Sterbenz), ties to the even bit pattern; past the largest
    value's half step, infinity."""
    finite = torch.arange(1, {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}[dtype], dtype=torch.int32)
    grid = torch.cat([torch.zeros(1, dtype=torch.float64), finite.to(torch.int16).view(dtype).to(torch.float64)])
    top = grid[-1] + (grid[-1] - grid[-2])  # where the next value would be: the overflow threshold is its midpoint
    grid = torch.cat([grid, top.reshape(1)])
    mag = values.abs()
    hi_i = torch.searchsorted(grid, mag, right=False).clamp(max=grid.numel() - 1)
    lo_i = torch.where(grid[hi_i] == mag, hi_i, hi_i - 1).clamp(min=0)
    lo, hi = grid[lo_i], grid[hi_i]
    down, up = mag - lo, hi - mag
    pick_hi = (up < down) | ((up == down) & (hi_i % 2 == 0) & (hi_i != lo_i))
    index = torch.where(pick_hi, hi_i, lo_i)
    bits = torch.where(index == grid.numel() - 1, torch.tensor(0x7F80 if dtype == torch.bfloat16 else 0x7C00), index)
    bits = bits.to(torch.int32) | torch.where(torch.signbit(values), 0x8000, 0).to(torch.int32)
    return bits.to(torch.int16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rounding_once_against_an_exact_reference(dtype):
    """io.dtypes.rounded over values where rounding twice goes wrong (next to midpoints, subnormals, the
    overflow threshold, zero, either sign) and over plain random values: the exact reference's bits."""
    from streamsoup.io.dtypes import rounded

    values, _ = near_ties(dtype, 4096, seed=5)
    g = torch.Generator().manual_seed(6)
    largest = torch.finfo(dtype).max
    step = largest - float(torch.tensor(0x7F7E if dtype == torch.bfloat16 else 0x7BFE, dtype=torch.int16).view(dtype))
    edge = torch.tensor(
        [largest + step / 2, largest + step / 2 - step * 2.0**-30, largest + step, 0.0, -0.0, 2.0**-160]
    )
    plain = torch.randn(20000, generator=g, dtype=torch.float64) * torch.exp2(
        torch.randint(-40, 16, (20000,), generator=g)
    )
    values = torch.cat([values, edge.to(torch.float64), -edge.to(torch.float64), plain])
    got = rounded(values, dtype).view(torch.int16)
    want = nearest_even(values, dtype)
    bad = (got != want).nonzero().flatten()
    assert bad.numel() == 0, [
        (values[i].item(), hex(got[i].item() & 0xFFFF), hex(want[i].item() & 0xFFFF)) for i in bad[:5]
    ]
    assert rounded(torch.tensor([math.nan, math.inf, -math.inf], dtype=torch.float64), dtype).isnan().tolist() == [
        True,
        False,
        False,
    ]
    if dtype == torch.float16:  # numpy converts float64 to float16 once: a second, independent reference
        assert torch.equal(got, torch.from_numpy(values.numpy().astype(np.float16).view(np.int16)))


def test_an_edited_tensor_is_its_float64_result_rounded_once():
    """The projection's float64 values, micro block by micro block, rounded once: over a million values some lie
    where rounding through float32 goes to the other neighbour (about one in 2^16)."""
    from streamsoup.numerics.monosoup import reweigh
    from streamsoup.numerics.spectral import MemoryRows
    from streamsoup.options import MergeOptions
    from streamsoup.tasks.dense import gram_pass, reweighed, spectrum_of
    from streamsoup.tasks.result import Stopwatch

    g = torch.Generator().manual_seed(7)
    w0 = torch.randn(1024, 1024, generator=g).to(torch.bfloat16)
    update = torch.randn(1024, 8, generator=g) @ torch.randn(8, 1024, generator=g) / 8
    w1 = (w0.float() + 0.02 * (update + 0.1 * torch.randn(1024, 1024, generator=g))).to(torch.bfloat16)
    src = MemoryRows(w0, w1)
    options = MergeOptions().edit
    spectrum, coef = spectrum_of(src, gram_pass(src, options.spectral, Stopwatch()), options, Stopwatch())
    got = reweighed(src, spectrum, coef, torch.bfloat16, Stopwatch())

    def float64_values(rows: slice) -> torch.Tensor:
        block_w0, x = src.read(rows)  # src's workspace: used before the next read
        return reweigh(block_w0, x, spectrum.high_part(x, coef.k), coef)  # new tensors, not the workspace

    exact = torch.cat([float64_values(rows) for rows in src.micro_blocks(slice(0, src.rows))])
    assert torch.equal(got.view(torch.int16), nearest_even(exact, torch.bfloat16).reshape(got.shape))
