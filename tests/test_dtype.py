"""--dtype: every float tensor of OUT in one dtype, on a real tiny Llama fine-tune saved in float32; edited tensors
are the float64 reference rounded once, copied ones the fine-tune's values converted once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

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
