"""Today's giant checkpoints: experts stacked in 3-D tensors (a real tiny gpt-oss) are edited expert by expert;
FP8 bases and fine-tunes (block-scaled the DeepSeek way, per-channel the FBGEMM way) and gpt-oss's MXFP4 experts
are decoded, exact against a float64 reference on the dequantized weights; other quantized formats are refused
by name before any work. Experts saved one 2-D tensor each (a real tiny Mixtral) merge exactly too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import load_folder
from helpers import assert_merged_exactly, assert_one_line_error, report_rows, run
from reference import assert_within_rounding, monosoup_reference
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def fine_tune(model, steps: int = 4) -> None:
    """A few AdamW steps of language modelling on random tokens, in float32 (weights move as a short fine-tune
    moves them); the model keeps its dtype. Experts the router never picked keep their weights."""
    dtype = model.dtype
    model.to(torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.to(dtype).eval()


def save_pair(root: Path, model) -> tuple[Path, Path]:
    """A model as BASE and a fine-tune of it as FINETUNED."""
    base, ft = root / "base", root / "ft"
    model.save_pretrained(base)
    fine_tune(model)
    model.save_pretrained(ft)
    return base, ft


def tiny_llama(dtype=torch.bfloat16):
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=384,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(dtype)


def tiny_gpt_oss():
    config = transformers.GptOssConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        layer_types=["full_attention"],
    )
    torch.manual_seed(0)
    return transformers.GptOssForCausalLM(config).to(torch.bfloat16)


def fp8_quantized(folder: Path, block: int | None = 128) -> dict[str, torch.Tensor]:
    """Quantize a saved model's matrices as DeepSeek-V3 ships them (float8_e4m3fn, a float32 `weight_scale_inv`
    per block, W = q * scale; quantization_config in config.json), or with `block=None` per output channel as
    FBGEMM does (`weight_scale` [rows, 1]). Returns the dequantized float64 weights the test's own way."""
    path = folder / "model.safetensors"
    out, weights = {}, {}
    for name, w in load_file(path).items():
        if w.dim() != 2 or "embed" in name or "norm" in name:
            out[name], weights[name] = w, w.double()
            continue
        w32, (m, n) = w.float(), w.shape
        b_rows, b_cols = (block, block) if block else (1, n)
        scales = torch.empty(-(-m // b_rows), -(-n // b_cols))
        deq = torch.empty(m, n, dtype=torch.float64)
        q = torch.empty(m, n, dtype=torch.float8_e4m3fn)
        for i in range(scales.shape[0]):
            for j in range(scales.shape[1]):
                rows, cols = slice(i * b_rows, (i + 1) * b_rows), slice(j * b_cols, (j + 1) * b_cols)
                scales[i, j] = w32[rows, cols].abs().max().clamp(min=1e-12) / 448.0
                q[rows, cols] = (w32[rows, cols] / scales[i, j]).to(q.dtype)
                deq[rows, cols] = q[rows, cols].double() * scales[i, j].double()
        out[name], weights[name] = q, deq
        out[name + ("_scale_inv" if block else "_scale")] = scales
    save_file(out, path, metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = (
        {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [block, block]}
        if block
        else {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0}
    )
    (folder / "config.json").write_text(json.dumps(config))
    return weights


def assert_like_reference(
    w0: dict[str, torch.Tensor], w1: dict[str, torch.Tensor], out: Path, experts: int | None = None
) -> dict:
    """Every output tensor (each expert of a stacked one) within rounding of the float64 reference."""
    o, rows = load_folder(out), report_rows(out)
    assert set(o) == set(w1), set(o) ^ set(w1)
    for name, b in w1.items():
        assert o[name].shape == b.shape, name
        stacked = experts is not None and b.dim() == 3 and ".experts." in name
        parts = (
            [(f"{name}[{e}]", w0[name][e], b[e], o[name][e]) for e in range(experts)]
            if stacked
            else [(name, w0[name], b, o[name])]
        )
        for row, a0, a1, got in parts:
            exp = monosoup_reference(a0, a1) if a0.dim() >= 2 and "experts" not in name or stacked else None
            if exp is not None and exp.edited:
                assert rows[row]["action"] == "edit" and rows[row]["k"] == exp.k, (row, rows[row])
                assert_within_rounding(got, exp, row)
            else:
                assert rows[row]["action"] == "copy", row
                assert torch.equal(got.double(), a1.double()), row
    return rows


def test_stacked_experts_of_a_real_gpt_oss_are_edited_one_by_one(tmp_path):
    base, ft = save_pair(tmp_path, tiny_gpt_oss())
    w0, w1 = load_folder(base), load_folder(ft)
    assert [n for n, t in w1.items() if t.dim() == 3], "gpt-oss keeps its experts stacked in 3-D tensors"
    out = tmp_path / "out"
    proc = run("merge", base, ft, out, "-q")
    assert proc.returncode == 0, proc.stderr
    rows = assert_like_reference(w0, w1, out, experts=4)
    name = "model.layers.0.mlp.experts.gate_up_proj"
    assert [rows[f"{name}[{e}]"]["expert"] for e in range(4)] == [[e, 4] for e in range(4)]
    assert {rows[f"{name}[{e}]"]["kind"] for e in range(4)} == {"expert"}
    assert rows["model.layers.0.mlp.experts.gate_up_proj_bias"]["action"] == "copy", "[experts, out]: biases"
    _, info = transformers.GptOssForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    verify = run("verify", out)
    assert verify.returncode == 0 and "all checksums match" in verify.stdout, verify.stdout + verify.stderr
    data = bytearray((out / "model.safetensors").read_bytes())  # one expert's bytes changed: named by verify
    ckpt = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    begin, end = ckpt[name]["data_offsets"]
    at = 8 + int.from_bytes(data[:8], "little") + begin + 3 * (end - begin) // 4 + 10
    data[at] ^= 0x40
    (out / "model.safetensors").write_bytes(bytes(data))
    verify = run("verify", out)
    assert verify.returncode != 0 and f"{name}[3]" in verify.stdout and f"{name}[2]" not in verify.stdout


def test_fp8_block_scaled_base_and_bf16_fine_tune_merge_exactly(tmp_path):
    """DeepSeek-V3's way: an FP8 base, its fine-tune in bf16: MonoSoup of the dequantized base, scales consumed."""
    base, ft = tmp_path / "base", tmp_path / "ft"
    model = tiny_llama()
    model.save_pretrained(base)
    w0 = fp8_quantized(base)
    with torch.no_grad():  # the fine-tune starts from the dequantized base
        for name, p in model.named_parameters():
            p.copy_(w0[name].to(p.dtype))
    fine_tune(model)
    model.save_pretrained(ft)
    out = tmp_path / "out"
    proc = run("merge", base, ft, out)
    assert proc.returncode == 0, proc.stderr
    assert "BASE is quantized (FP8 block-scaled [128, 128])" in proc.stderr, proc.stderr
    rows = assert_like_reference(w0, load_folder(ft), out)
    assert sum(r["action"] == "edit" for r in rows.values()) == 9, "every matrix (7 of them FP8) is edited"
    report = json.loads((out / "streamsoup_report.json").read_text())
    assert not report["dropped"], "the scales are part of the base's weights, not tensors only in the base"


def test_fp8_fine_tune_is_written_in_bf16_and_loads(tmp_path):
    """Both sides FP8 (per-channel, FBGEMM's weight_scale): OUT is bf16, its config.json without the
    quantization_config, and transformers loads it with no missing or unexpected keys."""
    base, ft = save_pair(tmp_path, tiny_llama())
    w0, w1 = fp8_quantized(base, block=None), fp8_quantized(ft, block=None)
    out = tmp_path / "out"
    proc = run("merge", base, ft, out)
    assert proc.returncode == 0, proc.stderr
    assert "OUT is written in bf16" in proc.stderr, proc.stderr
    o = load_folder(out)
    assert {t.dtype for t in o.values()} == {torch.bfloat16} and not any(n.endswith("_scale") for n in o)
    rows = assert_like_reference(w0, {n: w1[n] for n in o}, out)
    assert sum(r["action"] == "edit" for r in rows.values()) == 9
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    _, info = transformers.LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


def mxfp4_quantized(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, cols] -> gpt-oss's (blocks uint8 [rows, cols/32, 16], scales uint8 [rows, cols/32]): each group of
    32 under a power-of-two scale putting its largest magnitude at most at 6, rounded to the nearest E2M1 value,
    the even element in the low nibble."""
    rows, cols = w.shape
    g = w.double().reshape(rows, cols // 32, 32)
    exponent = torch.ceil(torch.log2(g.abs().amax(-1).clamp(min=1e-30) / 6.0))
    scaled = g / torch.pow(2.0, exponent).unsqueeze(-1)
    code = (scaled.abs().unsqueeze(-1) - FP4.double()).abs().argmin(-1) | ((scaled < 0).long() << 3)
    pairs = code.reshape(rows, cols // 32, 16, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8), (exponent + 127).to(torch.uint8)


def mxfp4_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    """gpt-oss as OpenAI ships it: experts' matrices as MXFP4 `_blocks`/`_scales`, the rest bf16. Returns the
    dequantized weights, through transformers' own dequantization."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    path = folder / "model.safetensors"
    out, weights = {}, {}
    for name, w in load_file(path).items():
        if w.dim() != 3:
            out[name], weights[name] = w, w.double()
            continue
        packed = [mxfp4_quantized(w[e].T.contiguous()) for e in range(w.shape[0])]  # stored [out, in/32, 16]
        blocks, scales = torch.stack([b for b, _ in packed]), torch.stack([s for _, s in packed])
        out[name + "_blocks"], out[name + "_scales"] = blocks, scales
        weights[name] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32).double()
        assert weights[name].shape == w.shape
        err = (weights[name] - w.double()).norm() / w.double().norm()
        assert err < 0.2, f"{name}: MXFP4 round trip off by {err:.3f}"
    save_file(out, path, metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    }
    (folder / "config.json").write_text(json.dumps(config))
    return weights


def test_mxfp4_experts_decode_as_transformers_does(tmp_path):
    """streamsoup's MXFP4 reader against transformers' dequantization, expert by expert, rows and columns."""
    from streamsoup.io.checkpoint import read_block, read_tensor
    from streamsoup.sources import open_input

    base = tmp_path / "base"
    tiny_gpt_oss().save_pretrained(base)
    weights = mxfp4_checkpoint(base)
    ckpt = open_input(base, "BASE").ckpt
    name = "model.layers.0.mlp.experts.down_proj"
    assert name + "_blocks" not in ckpt and name + "_scales" not in ckpt
    ref = ckpt[name]
    assert ref.shape == tuple(weights[name].shape)
    assert torch.equal(read_tensor(ref), weights[name])
    part = ref.part(2, 4)
    assert torch.equal(read_tensor(part), weights[name][2])
    assert torch.equal(read_block(part, 5, 41, False), weights[name][2][5:41])
    assert torch.equal(read_block(part, 3, 17, True), weights[name][2][:, 3:17].T)


def test_mxfp4_gpt_oss_base_and_bf16_fine_tune_merge_exactly(tmp_path):
    base, ft = tmp_path / "base", tmp_path / "ft"
    model = tiny_gpt_oss()
    model.save_pretrained(base)
    w0 = mxfp4_checkpoint(base)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(w0[name].to(p.dtype))
    fine_tune(model)
    model.save_pretrained(ft)
    out = tmp_path / "out"
    proc = run("merge", base, ft, out, "--max-ram", "400MiB")
    assert proc.returncode == 0, proc.stderr
    assert "BASE is quantized (MXFP4 experts)" in proc.stderr
    rows = assert_like_reference(w0, load_folder(ft), out, experts=4)
    assert sum(r["action"] == "edit" and r["kind"] == "expert" for r in rows.values()) == 8
    _, info = transformers.GptOssForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


def test_other_quantized_formats_are_refused_by_name(tmp_path):
    base, ft = save_pair(tmp_path, tiny_llama())
    tensors = load_file(ft / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    tensors[name] = tensors[name].to(torch.float8_e4m3fn)  # FP8 without scales: nothing to decode it with
    save_file(tensors, ft / "model.safetensors", metadata={"format": "pt"})
    assert_one_line_error(
        run("merge", base, ft, tmp_path / "out"), 2, "FINETUNED", "FP8 tensor", name, "no float scale tensor"
    )
    gptq = tmp_path / "gptq"
    gptq.mkdir()
    packed = {
        "model.layers.0.mlp.down_proj.qweight": torch.zeros(48, 256, dtype=torch.int32),
        "model.layers.0.mlp.down_proj.qzeros": torch.zeros(3, 32, dtype=torch.int32),
        "model.layers.0.mlp.down_proj.scales": torch.ones(3, 256, dtype=torch.float16),
    }
    save_file(packed, gptq / "model.safetensors")
    assert_one_line_error(run("merge", gptq, ft, tmp_path / "out"), 2, "BASE", "GPTQ", ".qweight")
    (gptq / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "awq"}}))
    assert_one_line_error(run("plan", gptq, ft), 2, "BASE", "quant_method 'awq'", "dequantize it to bf16")
    mx = tmp_path / "mxfp4"
    mx.mkdir()
    save_file(
        {"model.layers.0.mlp.experts.down_proj_blocks": torch.zeros(4, 256, 8, 16, dtype=torch.uint8)},
        mx / "model.safetensors",
    )
    assert_one_line_error(run("merge", mx, ft, tmp_path / "out"), 2, "BASE", "MXFP4", "_scales")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_stacked_experts_without_a_config_are_refused(tmp_path):
    base, ft = save_pair(tmp_path, tiny_gpt_oss())
    (ft / "config.json").unlink()
    proc = run("merge", base, ft, tmp_path / "out")
    assert_one_line_error(proc, 2, "FINETUNED", "experts stacked", "config.json declares no expert count")


def test_experts_saved_one_matrix_each_merge_exactly(tmp_path):
    """Mixtral's experts are 2-D tensors of their own: each is a weight matrix, edited like any other."""
    config = transformers.MixtralConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    torch.manual_seed(0)
    base, ft = save_pair(tmp_path, transformers.MixtralForCausalLM(config).to(torch.bfloat16))
    out = tmp_path / "out"
    proc = run("merge", base, ft, out, "-q")
    assert proc.returncode == 0, proc.stderr
    assert_merged_exactly(base, ft, out)
    _, info = transformers.MixtralForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


@pytest.mark.slow
def test_fp8_streamed_in_row_blocks_gives_the_in_memory_bytes(tmp_path):
    """A decoded matrix too big for the budget is read, decoded and merged in row blocks: the same bytes."""
    base, ft = tmp_path / "base", tmp_path / "ft"
    g = torch.Generator().manual_seed(3)
    w = torch.randn(3000, 2304, generator=g, dtype=torch.float64) / 48
    for folder, tensor in ((base, w), (ft, w + 0.002 * torch.randn(w.shape, generator=g, dtype=torch.float64))):
        folder.mkdir()
        save_file({"model.layers.0.mlp.down_proj.weight": tensor.to(torch.bfloat16)}, folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    fp8_quantized(base)
    args = ("--devices", "cpu", "-q")
    streamed, roomy = tmp_path / "streamed", tmp_path / "roomy"
    assert run("merge", base, ft, streamed, "--max-ram", "640MB", *args).returncode == 0
    assert run("merge", base, ft, roomy, *args).returncode == 0  # the default budget: whole, in this process
    name = "model.layers.0.mlp.down_proj.weight"
    assert report_rows(streamed)[name]["blocks"] > 1 and report_rows(roomy)[name]["blocks"] == 0
    assert (streamed / "model.safetensors").read_bytes() == (roomy / "model.safetensors").read_bytes()
    # the in-memory FP8 path is held to the float64 reference by test_fp8_block_scaled_base_and_bf16_fine_tune_merge_
    # exactly; that reference's 3000 x 2304 SVD here took 6-12 s of the suite for no path that test does not take


def test_decoded_values_beyond_the_output_dtype_are_named_as_such(tmp_path):
    """An FP8 fine-tune whose scale makes a copied tensor's decoded values exceed bf16 (a tensor BASE lacks): said as
    what happened (the decoded values do not fit), not as an edit that overflowed."""
    base, ft = save_pair(tmp_path, tiny_llama())
    fp8_quantized(ft)
    name = "model.layers.0.mlp.down_proj.weight"
    tensors = load_file(ft / "model.safetensors")
    tensors[name + "_scale_inv"] = torch.full_like(tensors[name + "_scale_inv"], 1e37)  # 448 * 1e37 > bf16 max
    save_file(tensors, ft / "model.safetensors", metadata={"format": "pt"})
    kept = {k: v for k, v in load_file(base / "model.safetensors").items() if k != name}  # copied: not in BASE
    save_file(kept, base / "model.safetensors", metadata={"format": "pt"})
    proc = run("merge", base, ft, tmp_path / "out", "-q")
    error = proc.stderr.strip().splitlines()[-1]  # after the warning that FINETUNED is decoded
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert error.startswith("streamsoup: error: ") and repr(name) in error and "decoded from fp8" in error
    assert "do not fit BF16" in error and "edited" not in error, error
    assert not (tmp_path / "out").exists()


def test_an_fp8_base_of_another_model_is_refused(tmp_path):
    """The unrelated-base check samples a quantized side decoded: another seed's FP8 base is refused."""
    base, ft = save_pair(tmp_path, tiny_llama())
    other = tmp_path / "other"
    torch.manual_seed(7)
    transformers.LlamaForCausalLM(tiny_llama().config).to(torch.bfloat16).save_pretrained(other)
    fp8_quantized(other)
    assert_one_line_error(run("merge", other, ft, tmp_path / "out"), 2, "does not look like the model")
