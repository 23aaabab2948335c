"""What a Hugging Face user gets in OUT: a model card whose loading code runs, Hub metadata without local paths,
and the config a `from_pretrained(OUT)` needs, on real tiny transformers models and peft adapters."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import load_folder
from helpers import assert_one_line_error, run
from test_card import card_parts

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def card_code(out: Path) -> str:
    """The card's loading code, pointed at OUT."""
    _, body = card_parts(out)
    code = body.split("## How to load it", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    return code.replace("path/to/this/folder", str(out))


def run_card_code(out: Path) -> dict:
    scope: dict = {"__name__": "__main__"}
    exec(compile(card_code(out), f"<card of {out.name}>", "exec"), scope)
    return scope


def assert_holds_out(state: dict[str, torch.Tensor], out: Path) -> None:
    """Every tensor OUT holds is in `state` with the same values."""
    stored = load_folder(out)
    for name, tensor in stored.items():
        assert name in state, name
        assert torch.equal(state[name].detach().to(torch.float64), tensor.to(torch.float64)), name


def with_task_type(adapter: Path, folder: Path, task_type: str | None) -> Path:
    """A copy of the adapter whose adapter_config.json says `task_type` (peft's trainers set CAUSAL_LM)."""
    shutil.copytree(adapter, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["task_type"] = task_type
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def test_the_cards_loading_code_runs_for_a_full_model(llama_finetune, tmp_path):
    base, ft = llama_finetune
    out = tmp_path / "out"
    assert run("merge", base, ft, out, "-q").returncode == 0
    model = run_card_code(out)["model"]
    assert type(model).__name__ == "LlamaForCausalLM"
    assert_holds_out(model.state_dict(), out)


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])
def test_the_cards_loading_code_runs_for_an_adapter(llama_lora, tmp_path, task_type):
    """--save adapter: the base is loaded with the class peft's task_type needs (a PeftModelForCausalLM on a bare
    AutoModel failed: no prepare_inputs_for_generation), or the base's architecture when the adapter has none."""
    base, adapter = llama_lora
    adapter = with_task_type(adapter, tmp_path / "adapter", task_type)
    out = tmp_path / "out"
    proc = run("merge", base, adapter, out, "--save", "adapter")
    assert proc.returncode == 0, proc.stderr
    verified = run("verify", out).stdout  # 'verified N tensors': merge counts OUT's tensors as verify does
    tensors = int(verified.split()[1])
    assert f"matrices into {tensors} tensors" in proc.stdout and tensors == len(load_folder(out)), proc.stdout
    code = card_code(out)
    assert ("AutoModelForCausalLM" if task_type else "LlamaForCausalLM") in code, code
    model = run_card_code(out)["model"]
    assert isinstance(model, peft.PeftModel)
    written = load_folder(out)
    lora_state = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    assert set(written) == set(lora_state)
    assert all(torch.equal(lora_state[k].to(torch.float64), v.to(torch.float64)) for k, v in written.items())
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()
    merged = tmp_path / "merged"  # and --save model of the same adapter: a transformers model
    assert run("merge", base, adapter, merged, "-q").returncode == 0
    assert_holds_out(run_card_code(merged)["model"].state_dict(), merged)


def test_the_cards_loading_code_runs_without_a_config(awkward_pair, tmp_path):
    """A checkpoint without config.json: the code reads every shard into one state dict."""
    base, ft = tmp_path / "base", tmp_path / "ft"
    shutil.copytree(awkward_pair[0], base)
    shutil.copytree(awkward_pair[1], ft)
    for folder in (base, ft):
        (folder / "config.json").unlink(missing_ok=True)
    out = tmp_path / "out"
    assert run("merge", base, ft, out, "--shard-size", "100KB", "-q").returncode == 0
    assert len(list(out.glob("*.safetensors"))) > 1, "sharded: every shard must be read"
    state = run_card_code(out)["state_dict"]
    assert set(state) == set(load_folder(out))
    assert_holds_out(state, out)


def test_base_model_is_a_hub_repo_id_or_absent(llama_lora, llama_finetune, tmp_path):
    """The Hub refuses a path as base_model: a repo id from --base-model-id, the adapter's or BASE's config, or
    none at all (the card says how to give one); tags the Hub derives from base_model are not carried over."""
    base, adapter = llama_lora
    by_path = tmp_path / "by-path"
    assert run("merge", base, adapter, by_path, "--save", "adapter", "-q").returncode == 0
    meta, body = card_parts(by_path)
    assert "base_model" not in meta and "merge with --base-model-id ORG/NAME" in body
    assert json.loads((by_path / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)

    ft_card = "---\ntags: [lora, 'base_model:adapter:someone/else']\nbase_model: someone/else\n---\ntheirs\n"
    named = with_task_type(adapter, tmp_path / "named-adapter", "CAUSAL_LM")
    (named / "README.md").write_text(ft_card)
    out = tmp_path / "named"
    proc = run("merge", base, named, out, "--save", "adapter", "--base-model-id", "tiny-org/llama-base", "-q")
    assert proc.returncode == 0, proc.stderr
    meta, body = card_parts(out)
    assert meta["base_model"] == "tiny-org/llama-base" and "repo id from --base-model-id" in body
    assert meta["tags"] == ["lora", "monosoup", "merge", "streamsoup"], "base_model:* tags named another model"
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-org/llama-base"

    config_named = tmp_path / "config-named"
    shutil.copytree(llama_finetune[0], config_named)
    config = json.loads((config_named / "config.json").read_text())
    for name_or_path, expected in (
        ("/home/me/checkpoints/base", None),
        ("tiny-org/from-config", "tiny-org/from-config"),
    ):
        (config_named / "config.json").write_text(json.dumps({**config, "_name_or_path": name_or_path}))
        out = tmp_path / f"from-config-{expected is not None}"
        assert run("merge", config_named, llama_finetune[1], out, "-q").returncode == 0
        meta, body = card_parts(out)
        assert meta.get("base_model") == expected, meta
        if expected:
            assert "repo id from BASE's config.json (_name_or_path)" in body

    for bad in ("./local/base", "/abs/base", "org/name@main", "a/b/c"):
        proc = run("merge", base, adapter, tmp_path / "bad", "--base-model-id", bad)
        assert_one_line_error(proc, 2, "--base-model-id must be a Hugging Face repo id")
        assert not (tmp_path / "bad.partial").exists()


def test_a_torch_save_fine_tune_gets_the_bases_config(llama_finetune, tmp_path):
    """FINETUNED as one .pt file with a Hugging Face folder as BASE: OUT takes BASE's config and tokenizer files
    (said once), so `from_pretrained(OUT)` works."""
    base, ft = llama_finetune
    pt = tmp_path / "finetuned.pt"
    torch.save(load_folder(ft), pt)
    out = tmp_path / "out"
    proc = run("merge", base, pt, out)
    assert proc.returncode == 0, proc.stderr
    assert "FINETUNED has no config.json (a torch.save file): OUT gets BASE's config" in proc.stderr
    for name in (p.name for p in base.iterdir() if p.suffix == ".json" and "index" not in p.name):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert_holds_out(model.state_dict(), out)
    assert_holds_out(run_card_code(out)["model"].state_dict(), out)


def test_hub_ids_and_class_names_from_configs_are_held_to_their_rules():
    """A config's _name_or_path or architectures end up in metadata and in code the card asks users to run."""
    from streamsoup.reporting.card import python_name
    from streamsoup.reporting.kinds import locate
    from streamsoup.sources.hub import hub_model_id

    assert hub_model_id("meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"
    for bad in ("evil/x\n", "org/-x", "org/name.", "/abs/path", "./rel", "a/b/c", "org/name@main", "gpt2", "a/b..c"):
        assert hub_model_id(bad) is None, bad
    assert python_name("LlamaForCausalLM") and not python_name("lambda") and not python_name("X; import os")
    assert (
        locate("model.layers.0.self_attn.qkv_proj.weight[0:3072]").kind
        == locate("model.layers.0.self_attn.qkv_proj.weight").kind
    )
    assert locate("model.layers.1.mlp.experts.gate_up_proj[3][0:64]").layer == 1


def test_a_weights_file_inside_its_folder_borrows_nothing(llama_finetune, tmp_path):
    """FINETUNED given as a file of a model folder: not BASE's config either (it may not fit); said."""
    base, ft = llama_finetune
    shards = sorted(ft.glob("*.safetensors"))
    single = tmp_path / "ft"
    single.mkdir()
    torch.save(load_folder(ft), single / "pytorch_model.bin")
    shutil.copy(ft / "config.json", single / "config.json")
    out = tmp_path / "out"
    proc = run("merge", base, single / "pytorch_model.bin", out)
    assert proc.returncode == 0, proc.stderr
    assert "OUT gets no config or tokenizer" in proc.stderr and f"give FINETUNED's folder {single}" in proc.stderr
    assert not (out / "config.json").exists() and shards
