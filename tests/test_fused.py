"""--split-fused: a real tiny Mixtral fine-tuned a few steps, saved with stacked gate_up_proj (transformers 5) and
with per-expert w1/w3/w2 (transformers 4): merged with --split-fused and per projection, both give the same model;
without it the fused layout gives other numbers (MonoSoup acts on each stored matrix)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import load_folder, made_once, paths
from helpers import report_rows, run
from reference import assert_within_rounding, monosoup_reference
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")

EXPERTS, INTER = 4, 40


def tiny_mixtral_pair(folder: Path) -> list[str]:
    """(base, fine-tune) in transformers 5's layout: bf16 safetensors with config.json."""
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=INTER,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=EXPERTS,
        num_experts_per_tok=2,
    )
    model = transformers.MixtralForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(folder / "base")
    model.to(torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        ids = torch.randint(0, config.vocab_size, (2, 12), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.to(torch.bfloat16).save_pretrained(folder / "finetuned")
    return [str(folder / "base"), str(folder / "finetuned")]


def stacked_layout(folder: Path, into: Path) -> Path:
    """The same checkpoint in transformers 5's in-memory layout: mlp.experts.gate_up_proj [E, 2I, H] (each
    expert's gate rows, then its up rows) and mlp.experts.down_proj [E, H, I] (save_pretrained writes the per-expert
    layout, so this one is built here)."""
    into.mkdir(parents=True)
    tensors, experts = {}, {}
    for name, tensor in load_folder(folder).items():
        moe = re.match(r"(.*)\.block_sparse_moe\.(?:experts\.(\d+)\.(w[123])|(gate))\.weight$", name)
        if moe is None:
            tensors[name] = tensor
        elif moe.group(4):
            tensors[f"{moe.group(1)}.mlp.gate.weight"] = tensor
        else:
            experts.setdefault(moe.group(1), {})[int(moe.group(2)), moe.group(3)] = tensor
    for layer, parts in experts.items():
        tensors[f"{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([parts[e, "w1"], parts[e, "w3"]]) for e in range(EXPERTS)]
        )
        tensors[f"{layer}.mlp.experts.down_proj"] = torch.stack([parts[e, "w2"] for e in range(EXPERTS)])
    save_file(tensors, into / "model.safetensors", metadata={"format": "pt"})
    (into / "config.json").write_text((folder / "config.json").read_text())
    return into


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return paths(*made_once(tmp_path_factory, "fused-mixtral", tiny_mixtral_pair))


def test_both_layouts_give_the_same_model_with_split_fused(mixtral, tmp_path):
    old_base, old_ft = mixtral  # as save_pretrained writes it: per expert
    base, ft = stacked_layout(old_base, tmp_path / "v5" / "base"), stacked_layout(old_ft, tmp_path / "v5" / "ft")
    fused, split, per_projection = tmp_path / "fused", tmp_path / "split", tmp_path / "per-projection"
    assert run("merge", base, ft, fused, "-q").returncode == 0
    assert run("merge", base, ft, split, "--split-fused", "-q").returncode == 0
    assert run("merge", old_base, old_ft, per_projection, "-q").returncode == 0
    assert any("gate_up_proj" in n for n in load_folder(split)), "the fused layout, as transformers 5 holds it"
    as_fused = load_folder(split)
    as_projections = load_folder(per_projection)
    for name, tensor in as_fused.items():
        moe = re.match(r"(.*)\.mlp\.experts\.(gate_up_proj|down_proj)$", name)
        if moe is None:
            other = name.replace(".mlp.gate.", ".block_sparse_moe.gate.")
            assert torch.equal(tensor, as_projections[other]), name
            continue
        for e in range(EXPERTS):
            prefix = f"{moe.group(1)}.block_sparse_moe.experts.{e}"
            if moe.group(2) == "gate_up_proj":
                assert torch.equal(tensor[e, :INTER], as_projections[f"{prefix}.w1.weight"]), (name, e, "gate")
                assert torch.equal(tensor[e, INTER:], as_projections[f"{prefix}.w3.weight"]), (name, e, "up")
            else:
                assert torch.equal(tensor[e], as_projections[f"{prefix}.w2.weight"]), (name, e, "down")
    # each logical matrix exact against the float64 reference; without --split-fused the numbers differ
    w0s, w1s, whole = load_folder(base), load_folder(ft), load_folder(fused)
    name = "model.layers.0.mlp.experts.gate_up_proj"
    for e in range(EXPERTS):
        for rows in (slice(0, INTER), slice(INTER, 2 * INTER)):
            expected = monosoup_reference(w0s[name][e, rows].double(), w1s[name][e, rows].double())
            assert_within_rounding(as_fused[name][e, rows], expected, f"{name}[{e}][{rows}]")
    differ = (whole[name] != as_fused[name]).double().mean().item()
    assert differ > 0.5, f"only {differ:.0%} of gate_up_proj's elements differ between the two merges"
    rows = report_rows(split)
    parts = [r for n, r in rows.items() if n.startswith(name)]
    assert len(parts) == 2 * EXPERTS and all(r["expert"][1] == 2 * EXPERTS for r in parts)
    assert run("verify", split).returncode == 0
    loaded = [transformers.AutoModelForCausalLM.from_pretrained(p).state_dict() for p in (split, per_projection)]
    assert loaded[0].keys() == loaded[1].keys()
    assert all(torch.equal(loaded[0][k], loaded[1][k]) for k in loaded[0]), "the same model, either way saved"


def test_fused_tensors_that_cannot_be_split_are_said_and_edited_whole(mixtral, tmp_path):
    """A gate_up_proj whose rows are not twice config.json's intermediate size is not one of the known layouts:
    edited whole, said once."""
    lying = {}
    for role, folder in zip(("base", "finetuned"), mixtral, strict=True):
        copy = stacked_layout(folder, tmp_path / role)
        config = json.loads((copy / "config.json").read_text())
        (copy / "config.json").write_text(json.dumps({**config, "intermediate_size": INTER + 8}))
        lying[role] = copy
    proc = run("merge", lying["base"], lying["finetuned"], tmp_path / "out", "--split-fused")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("is not [2 x intermediate size, hidden]: --split-fused edits it whole") == 1
    rows = report_rows(tmp_path / "out")
    assert sum(n.startswith("model.layers.0.mlp.experts.gate_up_proj") for n in rows) == EXPERTS


def test_the_known_fused_layouts():
    """Which fused matrices --split-fused cuts, and into how many row blocks (planning/fused.py)."""
    from streamsoup.planning.fused import row_parts

    config = {"intermediate_size": 64, "text_config": {"moe_intermediate_size": 16}}
    assert row_parts("model.layers.0.mlp.gate_up_proj.weight", 128, 32, config) == (2, "")  # Phi-3
    assert row_parts("model.layers.0.mlp.experts.gate_up_proj", 32, 32, config) == (2, "")  # a nested MoE size
    assert row_parts("encoder.layers.0.self_attn.in_proj_weight", 96, 32, config) == (3, "")  # nn.MultiheadAttention
    assert row_parts("model.layers.0.self_attn.qkv_proj.weight", 96, 32, config) == (3, "")
    parts, note = row_parts("model.layers.0.self_attn.qkv_proj.weight", 64, 32, config)  # grouped-query heads
    assert parts == 0 and "other query than key/value widths" in note
    parts, note = row_parts("transformer.h.0.attn.c_attn.weight", 32, 96, config)
    assert parts == 0 and "fused along its columns" in note
    assert row_parts("model.layers.0.mlp.up_proj.weight", 64, 32, config) == (0, "")
