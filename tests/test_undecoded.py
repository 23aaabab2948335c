"""Layouts streamsoup does not decode yet are refused by name before any work, never merged wrong with exit 0:
quantized checkpoints (FP8 block-scaled the DeepSeek way, MXFP4 experts, GPTQ packing, a quantization_config)
and experts stacked in one 3-D tensor (a real tiny gpt-oss). Experts saved one 2-D tensor each (a real tiny
Mixtral) merge exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import load_folder
from helpers import assert_merged_exactly, assert_one_line_error, run
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")


def save_pair(root: Path, model, scale: float = 0.02) -> tuple[Path, Path]:
    """A model as BASE and a fine-tune of it (every float matrix moved by a few percent) as FINETUNED."""
    base, ft = root / "base", root / "ft"
    model.save_pretrained(base)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=g).to(p.dtype))
    model.save_pretrained(ft)
    return base, ft


def tiny_llama(dtype=torch.bfloat16):
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=384, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(dtype)


def fp8_block_quantized(folder: Path, block: int = 128) -> None:
    """Quantize a saved model the way DeepSeek-V3 ships: float8_e4m3fn weights, a float32 `weight_scale_inv`
    per 128x128 block (W = q * scale_inv), quantization_config in config.json."""
    path = folder / "model.safetensors"
    tensors = load_file(path)
    out = {}
    for name, w in tensors.items():
        if w.dim() != 2 or "embed" in name or "norm" in name:
            out[name] = w
            continue
        m, n = w.shape
        w32 = w.float()
        scales = torch.empty((m + block - 1) // block, (n + block - 1) // block)
        q = torch.empty(m, n, dtype=torch.float8_e4m3fn)
        for i in range(scales.shape[0]):
            for j in range(scales.shape[1]):
                tile = w32[i * block : (i + 1) * block, j * block : (j + 1) * block]
                scales[i, j] = tile.abs().max().clamp(min=1e-12) / 448.0
                q[i * block : (i + 1) * block, j * block : (j + 1) * block] = (tile / scales[i, j]).to(q.dtype)
        out[name], out[name + "_scale_inv"] = q, scales
    save_file(out, path, metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [block, block]}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))


def test_fp8_block_scaled_base_is_refused_before_any_work(tmp_path):
    base, ft = save_pair(tmp_path, tiny_llama())
    fp8_block_quantized(base)
    proc = run("merge", base, ft, tmp_path / "out")
    assert_one_line_error(proc, 2, "BASE", "quantized", "quant_method 'fp8'", "dequantize it to bf16")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    config = json.loads((base / "config.json").read_text())
    del config["quantization_config"]  # the tensors alone give it away too
    (base / "config.json").write_text(json.dumps(config))
    proc = run("plan", base, ft)
    assert_one_line_error(proc, 2, "BASE", "FP8", "weight_scale_inv")


def test_fp8_fine_tune_and_packed_formats_are_refused_by_name(tmp_path):
    base, ft = save_pair(tmp_path, tiny_llama())
    tensors = load_file(ft / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    tensors[name] = tensors[name].to(torch.float8_e4m3fn)  # FP8 without scales: still not a float we edit
    save_file(tensors, ft / "model.safetensors", metadata={"format": "pt"})
    assert_one_line_error(run("merge", base, ft, tmp_path / "out"), 2, "FINETUNED", "F8_E4M3", name)
    gptq = tmp_path / "gptq"
    gptq.mkdir()
    packed = {"model.layers.0.mlp.down_proj.qweight": torch.zeros(48, 256, dtype=torch.int32),
              "model.layers.0.mlp.down_proj.qzeros": torch.zeros(3, 32, dtype=torch.int32),
              "model.layers.0.mlp.down_proj.scales": torch.ones(3, 256, dtype=torch.float16)}  # fmt: skip
    save_file(packed, gptq / "model.safetensors")
    assert_one_line_error(run("merge", gptq, ft, tmp_path / "out"), 2, "BASE", "GPTQ", ".qweight")
    mx = tmp_path / "mxfp4"
    mx.mkdir()
    prefix = "model.layers.0.mlp.experts.down_proj"
    experts = {f"{prefix}_blocks": torch.zeros(4, 256, 8, 16, dtype=torch.uint8),
               f"{prefix}_scales": torch.full((4, 256, 8), 127, dtype=torch.uint8)}  # fmt: skip
    save_file(experts, mx / "model.safetensors")
    assert_one_line_error(run("merge", mx, ft, tmp_path / "out"), 2, "BASE", "MXFP4", "_blocks")


def test_stacked_experts_of_a_real_gpt_oss_are_refused(tmp_path):
    config = transformers.GptOssConfig(vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                                       num_experts_per_tok=2, layer_types=["full_attention"])  # fmt: skip
    torch.manual_seed(0)
    base, ft = save_pair(tmp_path, transformers.GptOssForCausalLM(config).to(torch.bfloat16))
    stacked = [n for n, t in load_folder(ft).items() if t.dim() == 3 and ".experts." in n]
    assert stacked, "gpt-oss keeps its experts stacked in 3-D tensors"
    proc = run("merge", base, ft, tmp_path / "out")
    assert_one_line_error(proc, 2, "BASE", "stacks 4 experts", "config.json: 4 experts")
    assert any(n in proc.stderr for n in stacked), proc.stderr
    assert not (tmp_path / "out.partial").exists()


def test_experts_saved_one_matrix_each_merge_exactly(tmp_path):
    """Mixtral's experts are 2-D tensors of their own: each is a weight matrix, edited like any other."""
    config = transformers.MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2)  # fmt: skip
    torch.manual_seed(0)
    base, ft = save_pair(tmp_path, transformers.MixtralForCausalLM(config).to(torch.bfloat16))
    out = tmp_path / "out"
    proc = run("merge", base, ft, out, "-q")
    assert proc.returncode == 0, proc.stderr
    assert_merged_exactly(base, ft, out)
    _, info = transformers.MixtralForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
