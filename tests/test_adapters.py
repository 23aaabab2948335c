"""PEFT LoRA adapters as the fine-tune: real tiny transformers models, adapters trained with peft.

The reference never goes through streamsoup's adapter code: peft itself merges the adapter into a
float64 copy of BASE (merge_and_unload: W1 with peft's own scaling, rslora, patterns, fan_in_fan_out,
embeddings, lora_bias, DoRA, modules_to_save), then tests/reference.py's float64 SVD MonoSoup.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from pathlib import Path

import make_adapters
import pytest
import torch
from conftest import load_folder, made_once, paths, raw_bytes
from helpers import assert_one_line_error, edited_adapter, report_rows, run
from reference import assert_within_rounding, monosoup_reference
from test_card import card_parts

if importlib.util.find_spec("peft") is None:  # not importorskip: importing peft costs ~4 s in every worker
    pytest.skip("needs peft (the test extra)", allow_module_level=True)
transformers = pytest.importorskip("transformers")

MODEL_CASES = [
    ("llama", "plain"),
    ("llama", "rslora"),
    ("llama", "patterns"),
    ("llama", "embedding"),
    ("llama", "modules_to_save"),
    ("llama", "dora"),
    ("qwen2", "plain"),
    ("qwen2", "lora_bias"),
    ("gpt2", "plain"),
    ("gpt2", "patterns"),
]
ADAPTER_CASES = [c for c in MODEL_CASES if c[1] != "dora"]


@pytest.fixture(scope="session")
def adapters(tmp_path_factory):
    """(arch, variant) -> (base folder, adapter folder), made on first use."""
    made: dict[tuple[str, str], tuple[Path, Path]] = {}

    def get(arch: str, variant: str) -> tuple[Path, Path]:
        if (arch, variant) not in made:
            make = lambda folder: [str(p) for p in make_adapters.make(folder, arch, variant)]  # noqa: E731
            made[arch, variant] = paths(*made_once(tmp_path_factory, f"adapter-{arch}-{variant}", make))
        return made[arch, variant]

    return get


def peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """W1 as peft defines it: the adapter merged into a float64 BASE by peft's merge_and_unload."""
    from peft import PeftModel

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def check_against_reference(base: Path, w1: dict[str, torch.Tensor], out: Path) -> dict[str, dict]:
    """Every output tensor within one rounding of the float64 MonoSoup of (BASE, peft's W1)."""
    got, w0s, rows = load_folder(out), load_folder(base), report_rows(out)
    assert set(got) == set(w0s), "a merged model has exactly the base's tensors"
    for name, out_t in got.items():
        assert out_t.dtype == w0s[name].dtype, f"{name}: output dtype is the base's"
        expected = monosoup_reference(w0s[name].to(torch.float64), w1[name])
        if expected.edited:
            assert rows[name]["action"] == "edit", name
            assert_within_rounding(out_t, expected, name)
            assert rows[name]["k"] == expected.k and rows[name]["rank"] == expected.rank, name
        else:
            assert rows[name]["action"] == "copy", name
            want = w1[name].to(out_t.dtype)
            assert torch.equal(out_t, want) or (out_t.float() - want.float()).abs().max() <= _ulp(want), name
    return rows


def _ulp(t: torch.Tensor) -> float:
    return float(t.float().abs().max()) * 2.0**-7


def load_logits(folder: Path, dtype=torch.bfloat16) -> torch.Tensor:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model(input_ids=torch.arange(10)[None]).logits


@pytest.mark.parametrize("arch,variant", MODEL_CASES, ids=[f"{a}-{v}" for a, v in MODEL_CASES])
def test_merged_model_is_exact_and_loads(adapters, tmp_path, arch, variant):
    base, adapter = adapters(arch, variant)
    out = tmp_path / "out"
    proc = run("merge", base, adapter, out, "-q")
    assert proc.returncode == 0, proc.stderr
    rows = check_against_reference(base, peft_merged(base, adapter), out)
    assert any(r["action"] == "edit" for r in rows.values())
    if variant == "dora":
        assert all(r.get("spectral") != "lowrank" for r in rows.values()), "DoRA takes the dense path"
    else:
        lowrank = [r for r in rows.values() if r.get("spectral") == "lowrank"]
        assert lowrank and all("LoRA rank" in r["reason"] for r in lowrank)
    assert torch.isfinite(load_logits(out)).all()
    assert not (out / "adapter_config.json").exists(), "a merged model is not an adapter"


@pytest.mark.parametrize("arch,variant", ADAPTER_CASES, ids=[f"{a}-{v}" for a, v in ADAPTER_CASES])
def test_adapter_output_loads_in_peft_and_merges_the_same(adapters, tmp_path, arch, variant):
    from peft import PeftModel

    base, adapter = adapters(arch, variant)
    out = tmp_path / "adapter-out"
    proc = run("merge", base, adapter, out, "--save", "adapter", "-q")
    assert proc.returncode == 0, proc.stderr
    config = json.loads((out / "adapter_config.json").read_text())
    assert card_parts(out)[0]["library_name"] == "peft"
    assert config["lora_alpha"] == config["r"] and not config["use_rslora"]
    assert config["alpha_pattern"] == config["rank_pattern"]
    original = load_folder(adapter)
    written = load_folder(out)
    assert {k: v.shape for k, v in written.items()} == {k: v.shape for k, v in original.items()}, "same ranks"
    w1 = peft_merged(base, adapter)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64)
    merged = PeftModel.from_pretrained(model, out).merge_and_unload().state_dict()
    w0s = load_folder(base)
    for name, w0 in w0s.items():
        expected = monosoup_reference(w0.to(torch.float64), w1[name])
        if expected.edited:
            assert_within_rounding(merged[name].to(w0.dtype), expected, name)
        else:
            assert (merged[name] - w1[name]).abs().max() <= _ulp(w1[name]), name
    assert run("verify", out).returncode == 0


def test_lowrank_spectrum_equals_dense():
    """Two QRs and an r x r SVD give the dense float64 spectrum; k, P_k, rho and lambdas agree."""
    import numpy as np

    from streamsoup.numerics.lowrank import lowrank_svd
    from streamsoup.numerics.monosoup import coefficients

    g = torch.Generator().manual_seed(3)
    for m, n, r in [(96, 48, 8), (48, 200, 16), (64, 64, 64), (300, 20, 4)]:
        left = torch.randn(m, r, generator=g, dtype=torch.float64) * 0.5 ** torch.arange(r, dtype=torch.float64)
        right = torch.randn(r, n, generator=g, dtype=torch.float64)
        svd = lowrank_svd(left, right)
        dense = np.linalg.svd((left @ right).numpy(), compute_uv=False)
        padded = svd.padded(min(m, n))
        assert np.allclose(padded.numpy(), dense, rtol=0, atol=1e-12 * dense[0])
        assert torch.allclose((svd.u * svd.s) @ svd.v.T, left @ right, atol=1e-12 * float(dense[0]))
        for rule in ("entropy", "energy"):
            a, b = coefficients(padded, rule), coefficients(torch.from_numpy(dense), rule)
            assert (a.k, a.rank) == (b.k, b.rank)
            for x, y in ((a.p_k, b.p_k), (a.rho, b.rho), (a.lambda_high, b.lambda_high)):
                assert abs(x - y) < 1e-10


def test_kill_mid_adapter_merge_resumes_byte_identical(adapters, tmp_path):
    base, adapter = adapters("llama", "plain")
    clean = tmp_path / "clean"
    assert run("merge", base, adapter, clean, "-q", "--shard-size", "30KB").returncode == 0
    out = tmp_path / "out"
    for point in ("commit:5", "block:9", "commit:13"):
        killed = run("merge", base, adapter, out, "-q", "--shard-size", "30KB", env={"STREAMSOUP_FAULT": point})
        assert killed.returncode == -9, killed.stderr
    assert run("status", out).returncode == 0
    done = run("merge", base, adapter, out, "-q", "--shard-size", "30KB")
    assert done.returncode == 0, done.stderr
    assert raw_bytes(out) == raw_bytes(clean)
    assert run("verify", out).returncode == 0


@pytest.mark.parametrize(
    "change,needles",
    [
        ({"trainable_token_indices": [1, 2]}, ["trainable_token_indices", "not support"]),
        ({"init_lora_weights": "pissa"}, ["pissa", "rewrites the base"]),
        ({"peft_type": "IA3"}, ["IA3", "only LoRA"]),
    ],
)
def test_unsupported_adapter_settings_are_refused_by_name(adapters, tmp_path, change, needles):
    base, adapter = adapters("llama", "plain")
    proc = run("merge", base, edited_adapter(adapter, tmp_path, **change), tmp_path / "out")
    assert_one_line_error(proc, 2, *needles)
    assert not (tmp_path / "out.partial").exists()


def test_adapter_on_the_wrong_base_names_its_base(adapters, tmp_path):
    llama_base, _ = adapters("llama", "plain")
    _, gpt2_adapter = adapters("gpt2", "plain")
    proc = run("merge", llama_base, gpt2_adapter, tmp_path / "out")
    assert_one_line_error(proc, 2, "does not fit the adapter", "c_attn", "the adapter names its base")


def test_untrained_adapter_and_misuse_are_refused(adapters, tmp_path):
    from safetensors.torch import load_file, save_file

    base, adapter = adapters("llama", "plain")
    zero = tmp_path / "zero"
    shutil.copytree(adapter, zero)
    tensors = load_file(zero / "adapter_model.safetensors")
    save_file(
        {k: torch.zeros_like(v) if ".lora_B." in k else v for k, v in tensors.items()},
        zero / "adapter_model.safetensors",
        metadata={"format": "pt"},
    )
    assert_one_line_error(run("merge", base, zero, tmp_path / "o1"), 2, "every lora_B", "untrained")
    assert_one_line_error(run("merge", adapter, base, tmp_path / "o2"), 2, "BASE", "is a PEFT LoRA adapter")
    assert_one_line_error(
        run("merge", base, base, tmp_path / "o3", "--save", "adapter"), 2, "--save adapter", "LoRA adapter as FINETUNED"
    )
    _, dora = adapters("llama", "dora")
    assert_one_line_error(run("merge", base, dora, tmp_path / "o4", "--save", "adapter"), 2, "DoRA", "--save model")
    assert not any(p.name.startswith("o") for p in tmp_path.iterdir())


def test_plan_shows_an_adapter_merge(adapters):
    base, adapter = adapters("llama", "plain")
    proc = run("plan", base, adapter)
    assert proc.returncode == 0, proc.stderr
    assert "low-rank" in proc.stdout


def hub_cache(cache: Path, repo: str, folder: Path, ref: str = "main") -> str:
    """huggingface_hub's cache layout, built by hand: blobs by sha256, refs/<ref>, snapshots/<commit>/ links."""
    import hashlib
    import os

    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    commit = hashlib.sha1(f"{repo}@{ref}".encode()).hexdigest()
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for f in sorted(folder.iterdir()):
        data = f.read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / ref).write_text(commit)
    return commit


@pytest.mark.slow
def test_hub_repo_ids_from_the_cache_offline(adapters, tmp_path):
    base, adapter = adapters("llama", "plain")
    cache = tmp_path / "hub"
    hub_cache(cache, "tiny-org/llama-base", base)
    commit = hub_cache(cache, "tiny-org/llama-lora", adapter, ref="v1")
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    by_path = tmp_path / "by-path"
    assert run("merge", base, adapter, by_path, "-q").returncode == 0
    for spec in ("tiny-org/llama-lora@v1", f"tiny-org/llama-lora@{commit}"):
        out = tmp_path / spec.replace("/", "_")
        proc = run("merge", "tiny-org/llama-base", spec, out, "-q", env=env)
        assert proc.returncode == 0, proc.stderr
        assert raw_bytes(out) == raw_bytes(by_path)
        meta, body = card_parts(out)  # the model card names the repo id, and keeps peft's card of the adapter
        assert meta["base_model"] == "tiny-org/llama-base" and meta["library_name"] == "transformers"
        assert "`tiny-org/llama-lora` (a PEFT LoRA adapter)" in body and "own model card" in body
    meta, _ = card_parts(by_path)
    assert "base_model" not in meta, "a path is not Hub metadata (and the adapter's base_model_name_or_path is one)"
    missing = run("merge", "tiny-org/nope", "tiny-org/llama-lora@v1", tmp_path / "o", env=env)
    assert_one_line_error(missing, 2, "BASE tiny-org/nope", "not in the Hugging Face cache", "HF_HUB_OFFLINE")
    bad_rev = run("merge", "tiny-org/llama-base", "tiny-org/llama-lora@v9", tmp_path / "o", env=env)
    assert_one_line_error(bad_rev, 2, "FINETUNED tiny-org/llama-lora@v9", "not in the Hugging Face cache")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_a_mistyped_path_is_not_sent_to_the_hub_and_an_unreachable_hub_is_said_at_once(awkward_pair, tmp_path):
    """`demo/finetunedd` beside a folder demo/ is a missing path (nothing asked of the Hub, which would get the name);
    a repo id with the Hub unreachable (a closed port here) is one line within seconds, not ~25 s of retries and
    "internal error: ConnectError"."""
    (tmp_path / "demo").mkdir()
    shutil.copytree(awkward_pair[0], tmp_path / "demo" / "base")
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    typo = run("plan", "demo/base", "demo/finetunedd", env=env, cwd=tmp_path)
    assert_one_line_error(typo, 2, "FINETUNED demo/finetunedd does not exist", "not a Hugging Face repo id")
    t0 = time.monotonic()
    remote = run("plan", "demo/base", "tiny-org/not-cached", env=env, cwd=tmp_path)
    assert_one_line_error(remote, 2, "FINETUNED tiny-org/not-cached", "the Hub cannot be reached", "127.0.0.1:1")
    assert time.monotonic() - t0 < 10
    for endpoint in ("https://host:99999", "https://[::1", "https://host..x"):  # malformed: one line too
        bad = run("plan", "demo/base", "tiny-org/not-cached", env={**env, "HF_ENDPOINT": endpoint}, cwd=tmp_path)
        assert_one_line_error(bad, 2, "FINETUNED tiny-org/not-cached")


def test_adapter_keys_that_carry_the_adapter_name_merge_as_without_it(adapters, tmp_path):
    """A PeftModel's own state_dict names the adapter in every key (`...lora_A.default.weight`): read as the same
    adapter (the same bytes), not as full tensors copied into OUT; two adapter names in one file are refused."""
    import re

    from safetensors.torch import load_file, save_file

    base, adapter = adapters("llama", "dora")
    tensors = load_file(adapter / "adapter_model.safetensors")
    named_key = lambda key, name: re.sub(  # noqa: E731
        r"\.(lora_A|lora_B|lora_magnitude_vector)(\.weight|\.bias)?$", rf".\1.{name}\2", key
    )
    named = tmp_path / "named"
    shutil.copytree(adapter, named)
    renamed = {named_key(k, "default"): v for k, v in tensors.items()}
    assert sum(k != named_key(k, "x") for k in tensors) >= 4 and set(renamed) != set(tensors)
    save_file(renamed, named / "adapter_model.safetensors")
    plain, from_named = tmp_path / "plain", tmp_path / "from-named"
    assert run("merge", base, adapter, plain, "-q").returncode == 0
    proc = run("merge", base, named, from_named, "-q")
    assert proc.returncode == 0, proc.stderr
    assert raw_bytes(from_named) == raw_bytes(plain)
    assert report_rows(from_named).keys() == report_rows(plain).keys()
    first = next(k for k in tensors if k != named_key(k, "x"))
    save_file({**renamed, named_key(first, "other"): tensors[first].clone()}, named / "adapter_model.safetensors")
    assert_one_line_error(run("merge", base, named, tmp_path / "two", "-q"), 2, "'default'", "'other'")


def test_a_peft_models_whole_state_dict_is_refused_and_peft_wrappers_copies_are_not_written(adapters, tmp_path):
    """PeftModel.state_dict() holds, beside the adapter's named factors, the base's own tensors inside peft's
    wrappers (`base_layer.weight`, `base_layer.bias`, `original_module.weight`) and every other tensor of the
    model: they were written to OUT as extra tensors (an untied lm_head among them). The whole dump is refused
    with the save call that writes the adapter alone; the wrappers' copies of base tensors that peft itself saves
    (`original_module.*` with modules_to_save of a resized vocabulary) are read past, as peft's loader does."""
    from peft import PeftModel
    from safetensors.torch import save_file

    base, adapter = adapters("qwen2", "modules_to_save")
    net = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)  # the adapter's own dtype
    model = PeftModel.from_pretrained(net, adapter)
    whole = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    assert any(k.endswith(".base_layer.bias") for k in whole) and any(".original_module." in k for k in whole)
    plain = tmp_path / "plain"
    assert run("merge", base, adapter, plain, "-q").returncode == 0
    for extra in (".base_layer.bias", ".original_module."):  # the factors, trained copies, and these: the adapter
        dumped = tmp_path / f"dumped{extra.strip('._')}"
        shutil.copytree(adapter, dumped)
        part = {k: v for k, v in whole.items() if "lora_" in k or "modules_to_save" in k or extra in k}
        assert len(part) > sum("lora_" in k or "modules_to_save" in k for k in whole)
        save_file(part, dumped / "adapter_model.safetensors")
        proc = run("merge", base, dumped, tmp_path / extra.strip("._"), "-q")
        assert proc.returncode == 0, proc.stderr
        assert raw_bytes(tmp_path / extra.strip("._")) == raw_bytes(plain)  # no extra tensor, the same bytes
    dumped = tmp_path / "dumped"
    shutil.copytree(adapter, dumped)
    save_file(whole, dumped / "adapter_model.safetensors")
    proc = run("merge", base, dumped, tmp_path / "out", "-q")
    assert_one_line_error(proc, 2, "whole PeftModel's state_dict", "base_layer.weight", "save_pretrained")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "arch,variant,part", [("qwen2", "lora_bias", "lora_B.bias"), ("llama", "dora", "lora_magnitude_vector")]
)
def test_adapter_tensors_of_the_wrong_shape_are_refused(adapters, tmp_path, arch, variant, part):
    """A lora_B.bias or DoRA magnitude that does not have BASE's output size would be broadcast (a [1] bias adds
    its value to every element of the base bias): refused before any work, naming the module."""
    from safetensors.torch import load_file, save_file

    base, adapter = adapters(arch, variant)
    broken = tmp_path / "broken"
    shutil.copytree(adapter, broken)
    tensors = load_file(broken / "adapter_model.safetensors")
    key = next(k for k in sorted(tensors) if f".{part}" in k)
    tensors[key] = tensors[key].reshape(-1)[:1].clone()
    save_file(tensors, broken / "adapter_model.safetensors")
    for command in ("plan", "merge"):
        extra = [tmp_path / "out"] if command == "merge" else []
        proc = run(command, base, broken, *extra)
        assert_one_line_error(proc, 2, key.split(f".{part}")[0].removeprefix("base_model.model."), "[1]")
    assert not (tmp_path / "out").exists()


def test_an_adapter_with_no_lora_update_is_refused(adapters, tmp_path):
    from safetensors.torch import load_file, save_file

    base, adapter = adapters("llama", "plain")
    empty = tmp_path / "empty"
    shutil.copytree(adapter, empty)
    tensors = load_file(empty / "adapter_model.safetensors")
    save_file(
        {k: v for k, v in tensors.items() if "lora_" not in k} or {"unrelated": torch.zeros(1)},
        empty / "adapter_model.safetensors",
    )
    assert_one_line_error(run("merge", base, empty, tmp_path / "out"), 2, "no LoRA")
    assert not (tmp_path / "out").exists()


def tiny_llama_with(lora, folder: Path, **config) -> tuple[Path, Path]:
    """A one-layer Llama built from a config (BASE) and `lora` on it, its weights random (FINETUNED)."""
    from peft import get_peft_model

    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        **config,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(folder / "base")
    get_peft_model(model, lora).save_pretrained(folder / "adapter")
    return folder / "base", folder / "adapter"


def test_an_adapter_rank_above_the_matrix_size_merges_exactly(tmp_path):
    """peft accepts r above min(m, n) (here r = 96 on 64 x 64 and 64 x 96 matrices): the merge is exact, in both
    OUT forms, instead of a mid-run error."""
    from peft import LoraConfig

    lora = LoraConfig(r=96, lora_alpha=16, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    base, adapter = tiny_llama_with(lora, tmp_path)
    proc = run("merge", base, adapter, tmp_path / "out", "-q")
    assert proc.returncode == 0, proc.stderr
    rows = check_against_reference(base, peft_merged(base, adapter), tmp_path / "out")
    assert rows["model.layers.0.mlp.down_proj.weight"]["action"] == "edit"
    again = run("merge", base, adapter, tmp_path / "as-adapter", "--save", "adapter", "-q")
    assert again.returncode == 0, again.stderr


def test_a_lora_on_lm_head_saved_with_its_base_layer_merges_exactly(tmp_path):
    """peft saves `lm_head.base_layer.weight` beside a LoRA on lm_head (save_embedding_layers): that is the
    adapter's own save, merged as peft merges it, not a whole state_dict."""
    from peft import LoraConfig
    from safetensors import safe_open

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    base, adapter = tiny_llama_with(lora, tmp_path, tie_word_embeddings=False)
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        assert any(k.endswith("lm_head.base_layer.weight") for k in f.keys())
    proc = run("merge", base, adapter, tmp_path / "out", "-q")
    assert proc.returncode == 0, proc.stderr
    rows = check_against_reference(base, peft_merged(base, adapter), tmp_path / "out")
    assert rows["lm_head.weight"]["action"] == "edit"


def _retyped(key_end: str, make) -> callable:
    """A damage: the first tensor whose key ends with `key_end` replaced by `make(tensor)`."""

    def damage(tensors: dict[str, torch.Tensor]) -> str:
        key = next(k for k in sorted(tensors) if k.endswith(key_end))
        tensors[key] = make(tensors[key])
        return key.rsplit(".lora_", 1)[0].removeprefix("base_model.model.")  # the module's name

    return damage


def _on_a_vector(tensors: dict[str, torch.Tensor]) -> str:
    """The q_proj module's factors renamed onto the model's final norm, a 1-D BASE tensor."""
    key = next(k for k in sorted(tensors) if k.endswith("q_proj.lora_A.weight"))
    module = key.removesuffix(".lora_A.weight")
    for part in ("lora_A.weight", "lora_B.weight"):
        tensors[f"base_model.model.model.norm.{part}"] = tensors.pop(f"{module}.{part}")
    return "model.norm"


ADAPTER_DAMAGE = {
    "a 0-D lora_A": ("plain", _retyped("lora_A.weight", lambda t: t[0, 0].clone()), "not a matrix"),
    "a 1-D lora_B": ("plain", _retyped("lora_B.weight", lambda t: t[:, 0].clone()), "not a matrix"),
    "an I32 lora_B": ("plain", _retyped("lora_B.weight", lambda t: t.to(torch.int32)), "I32, not floating point"),
    "a BOOL lora_A": ("plain", _retyped("lora_A.weight", lambda t: t > 0), "BOOL, not floating point"),
    "a LoRA on a 1-D base tensor": ("plain", _on_a_vector, "not a matrix"),
    "a DoRA magnitude of the wrong length": (
        "dora",
        _retyped("lora_magnitude_vector", lambda t: t[:-1].clone()),
        "lora_magnitude_vector",
    ),
}


@pytest.mark.parametrize("case", sorted(ADAPTER_DAMAGE))
def test_a_malformed_adapter_is_refused_at_plan_time(adapters, tmp_path, case):
    """Factors that are not matrices or not floating point, a LoRA on a vector, a DoRA magnitude of another length:
    one line naming the module, from `plan` as from `merge`, before any compute."""
    from safetensors.torch import load_file, save_file

    variant, damage, words = ADAPTER_DAMAGE[case]
    base, adapter = adapters("llama", variant)
    broken = tmp_path / "adapter"
    shutil.copytree(adapter, broken)
    tensors = load_file(broken / "adapter_model.safetensors")
    module = damage(tensors)
    save_file(tensors, broken / "adapter_model.safetensors")
    for args in (("plan", base, broken), ("merge", base, broken, tmp_path / "out")):
        assert_one_line_error(run(*args), 2, repr(module), words)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_many_slow_patterns_are_bounded_in_all_not_only_each(adapters, tmp_path):
    """200 rank_pattern keys of ~0.1 s per match each (under the 1 s limit of one match) against every module
    would take minutes: refused once the whole config has taken 10 s, at plan time."""
    base, adapter = adapters("llama", "plain")
    slow = tmp_path / "adapter"
    shutil.copytree(adapter, slow)
    config = json.loads((slow / "adapter_config.json").read_text())
    # each backtracks through ~30^5 splits of a module name and never matches; (?#...) makes the keys distinct
    config["rank_pattern"] = {f"(.*?){{5}}(?!)(?#{i})": 4 for i in range(200)}
    (slow / "adapter_config.json").write_text(json.dumps(config))
    t0 = time.monotonic()
    proc = run("plan", base, slow)
    assert_one_line_error(proc, 2, "rank_pattern", "take more than 10 s in all")
    assert time.monotonic() - t0 < 30


def test_an_adapter_config_nested_deep_is_one_line(adapters, tmp_path):
    """adapter_config.json of 100,000 nested arrays (a RecursionError in the parser): named, at plan time."""
    base, adapter = adapters("llama", "plain")
    deep = tmp_path / "adapter"
    shutil.copytree(adapter, deep)
    (deep / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    assert_one_line_error(run("plan", base, deep), 2, "adapter_config.json nests 100000 levels deep")


def test_nan_in_the_lora_factors_is_named_with_what_to_do_about_the_adapter(adapters, tmp_path):
    from safetensors.torch import load_file, save_file

    base, adapter = adapters("llama", "plain")
    broken = tmp_path / "nan-adapter"
    shutil.copytree(adapter, broken)
    tensors = load_file(broken / "adapter_model.safetensors")
    key = next(k for k in sorted(tensors) if "lora_A" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, broken / "adapter_model.safetensors")
    proc = run("merge", base, broken, tmp_path / "out")
    assert_one_line_error(
        proc, proc.returncode, "the LoRA factors of", "contain NaN or Inf", "fix the adapter, or rerun"
    )
    assert proc.returncode != 0 and not (tmp_path / "out").exists()
    assert run("merge", base, broken, tmp_path / "copied", "--allow-nonfinite", "-q").returncode == 0


def test_an_opened_adapter_as_base_is_refused_as_a_path_is(llama_lora):
    """The planner takes opened inputs too (an Adapter, a Checkpoint): an adapter as BASE is the same one-line
    refusal either way, not an internal error."""
    from streamsoup.errors import InputError
    from streamsoup.options import MergeOptions
    from streamsoup.planning.planner import plan_merge
    from streamsoup.sources.adapter import Adapter

    base, adapter = llama_lora
    for given in (adapter, Adapter.open(adapter)):
        with pytest.raises(InputError, match="is a PEFT LoRA adapter.*not a full model: pass the model"):
            plan_merge(given, base, MergeOptions())
