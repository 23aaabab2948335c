"""Never ship a wrong model with exit 0: wrong or identical inputs, adapters, NaN in copies, impossible sizes.

Each refusal: exit 2, one line naming the file or tensor and the fix, no traceback, nothing written
(no OUT, no OUT.partial when refused up front), inputs byte-identical.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import raw_bytes
from helpers import assert_one_line_error, poison, report_rows, run, tree_digest
from safetensors.torch import load_file, save_file

import streamsoup
from streamsoup.errors import OptionError
from streamsoup.io.checkpoint import Checkpoint


def wrong_base(tmp: Path, base: Path, ft: Path) -> tuple[list, list[str]]:
    import make_checkpoints

    other, _ = make_checkpoints.make_pair(tmp / "other", "small", seed=9)
    return [other, ft], ["does not fit", "differ in shape", "hidden size 256", "hidden size 64", "as BASE"]


def same_folder(tmp: Path, base: Path, ft: Path) -> tuple[list, list[str]]:
    return [ft, ft], ["same files", "nothing to merge"]


def identical_copy(tmp: Path, base: Path, ft: Path) -> tuple[list, list[str]]:
    shutil.copytree(base, tmp / "copy")
    return [base, tmp / "copy"], ["hold the same values", "pass the fine-tune as FINETUNED"]


def adapter_folder(tmp: Path, base: Path, ft: Path) -> tuple[list, list[str]]:
    adapter = tmp / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    save_file(
        {
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(4, 64),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(64, 4),
        },
        adapter / "adapter_model.safetensors",
        metadata={"format": "pt"},
    )
    return [adapter, ft], ["BASE", "is a PEFT LoRA adapter", "the adapter folder as FINETUNED"]


def nan_in_copied(tmp: Path, base: Path, ft: Path) -> tuple[list, list[str]]:
    poison(ft, "score.weight", math.nan)  # only in the fine-tune: copied
    return [base, ft], ["score.weight", "NaN or Inf", "--allow-nonfinite"]


def inf_in_resized(tmp: Path, base: Path, ft: Path) -> tuple[list, list[str]]:
    poison(ft, "model.embed_tokens.weight", math.inf, at=3000)  # resized vocabulary: copied
    return [base, ft], ["model.embed_tokens.weight", "NaN or Inf", "--allow-nonfinite"]


def max_ram_beyond_machine(tmp: Path, base: Path, ft: Path) -> tuple[list, list[str]]:
    return [base, ft, "--max-ram", "100TiB"], ["--max-ram", "of memory this machine has", "give at most"]


def absurd_max_ram(tmp: Path, base: Path, ft: Path) -> tuple[list, list[str]]:
    return [base, ft, "--max-ram", "99999999999999999999GiB"], ["--max-ram", "give at most"]


def unusable_size(tmp: Path, base: Path, ft: Path) -> tuple[list, list[str]]:
    return [base, ft, "--shard-size", "9" * 400 + "GB"], ["--shard-size", "not a usable size"]


UP_FRONT = {
    "wrong BASE": wrong_base,
    "BASE and FINETUNED the same folder": same_folder,
    "BASE and FINETUNED byte-identical copies": identical_copy,
    "an adapter folder as BASE": adapter_folder,
    "--max-ram beyond the machine": max_ram_beyond_machine,
    "an absurd --max-ram": absurd_max_ram,
    "an unusable --shard-size": unusable_size,
}
MID_RUN = {"NaN in a copied tensor": nan_in_copied, "Inf in a resized embedding": inf_in_resized}


@pytest.mark.parametrize("case", sorted(UP_FRONT) + sorted(MID_RUN))
def test_bad_input_is_refused(pair, tmp_path, case):
    base, ft = pair
    args, needles = {**UP_FRONT, **MID_RUN}[case](tmp_path, base, ft)
    before = tree_digest(base), tree_digest(ft)
    out = tmp_path / "out"
    proc = run("merge", *args[:2], out, *args[2:])
    assert not out.exists()
    if case in UP_FRONT:  # the one rule: exit 2 before any work, nothing left behind; exit 1 after, work kept
        assert_one_line_error(proc, 2, *needles)
        assert not (tmp_path / "out.partial").exists(), "refused up front: nothing may be left behind"
        assert "merging:" not in proc.stderr, "refused before any tensor was computed"
    else:
        assert_one_line_error(proc, 1, *needles, "the work done so far is kept in", "--fresh")
        assert (tmp_path / "out.partial").is_dir()
        again = run("merge", *args[:2], out, *args[2:], "--allow-nonfinite")  # not in the fingerprint: the same
        assert again.returncode == 0 and out.is_dir(), again.stderr  # merge goes on in the kept OUT.partial
    assert (tree_digest(base), tree_digest(ft)) == before


def test_allow_nonfinite_copies_byte_for_byte(pair, tmp_path):
    base, ft = pair
    poison(ft, "score.weight", math.nan)
    poison(ft, "model.layers.1.mlp.gate_proj.weight", math.inf)  # an edit candidate: copied unchanged instead
    out = tmp_path / "out"
    proc = run("merge", base, ft, out, "--allow-nonfinite", "-q")
    assert proc.returncode == 0, proc.stderr
    got, want = raw_bytes(out), raw_bytes(ft)
    assert got["score.weight"] == want["score.weight"]
    assert got["model.layers.1.mlp.gate_proj.weight"] == want["model.layers.1.mlp.gate_proj.weight"]
    row = report_rows(out)["model.layers.1.mlp.gate_proj.weight"]
    assert row["action"] == "copy" and "--allow-nonfinite" in row["reason"]
    edited = [r for r in report_rows(out).values() if r["action"] == "edit"]
    assert edited and all(torch.isfinite(t).all() for t in _tensors(out, [r["name"] for r in edited]))


def _tensors(folder: Path, names: list[str]) -> list[torch.Tensor]:
    from conftest import load_folder

    loaded = load_folder(folder)
    return [loaded[n].float() for n in names]


def test_few_pairs_warn_once_and_go_on(pair, tmp_path):
    """Fewer than half of the fine-tune's float matrices pair with BASE: one warning line with counts."""
    base, ft = pair
    keep = {}
    ckpt = Checkpoint.from_path(base)
    from conftest import load_folder

    tensors = load_folder(base)
    matrices = [n for n, r in ckpt.items() if len(r.shape) == 2 and r.numel]
    for name in matrices[: len(matrices) // 4]:
        keep[name] = tensors[name]
    small_base = tmp_path / "small-base"
    small_base.mkdir()
    save_file(keep, small_base / "model.safetensors", metadata={"format": "pt"})
    proc = run("merge", small_base, ft, tmp_path / "out", "-q")
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "float matrices of FINETUNED pair with BASE" in warnings[0], proc.stderr
    plan = run("plan", small_base, ft, "--devices", "cpu")
    assert plan.returncode == 0 and "float matrices of FINETUNED pair with BASE" in plan.stdout


def test_plan_never_contradicts_merge(pair, tmp_path):
    base, ft = pair
    plan = json.loads(run("plan", base, ft, "--json", "--devices", "cpu").stdout)["summary"]
    text = run("plan", base, ft, "--devices", "cpu").stdout
    assert f"up to {plan['edit_candidates']} to edit" in text
    out = tmp_path / "out"
    assert run("merge", base, ft, out, "-q").returncode == 0
    summary = json.loads((out / "streamsoup_report.json").read_text())["summary"]
    rows = report_rows(out).values()
    below = [
        r
        for r in rows
        if r["action"] == "copy" and ("min-rel-update" in r["reason"] or r["reason"].startswith("no update"))
    ]
    assert summary["edited"] + len(below) == plan["edit_candidates"] and summary["edited"] <= plan["edit_candidates"]
    assert summary["tensors"] == plan["tensors"] and summary["dropped"] == plan["dropped"]
    for flag in (["--scheduler", "tcp://127.0.0.1:8786"], ["--checkpoint-seconds", "5"], ["--allow-nonfinite"]):
        assert_one_line_error(run("plan", base, ft, *flag), 2, flag[0], "not used by plan")


def test_words(pair, tmp_path):
    base, ft = pair
    (tmp_path / "plain").mkdir()
    assert_one_line_error(run("status", tmp_path / "plain"), 2, "is not a streamsoup output")
    from streamsoup.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.choices and "merge" in a.choices).choices
    for command in ("merge", "plan", "status", "verify"):
        for action in subparsers[command]._actions:
            text = action.help or ""
            assert text.count("(default:") <= 1 and "(default: )" not in text, (command, action.dest, text)
            if not action.option_strings:  # positionals: every one described
                assert len(text) > 10, (command, action.dest)
    assert "two lanes" in run("merge", "--help").stdout
    out = tmp_path / "out"
    assert run("merge", base, ft, out, "-q").returncode == 0
    reasons = [r["reason"] for r in report_rows(out).values() if r["action"] == "edit"]
    assert all(r.startswith("k=") and " of rank " in r for r in reasons), reasons[:3]
    with pytest.raises(OptionError, match="^rank_rule must be entropy or energy"):
        streamsoup.merge(base, ft, tmp_path / "o2", rank_rule="median")
    with pytest.raises(OptionError, match="^max_ram "):
        streamsoup.merge(base, ft, tmp_path / "o2", max_ram="100TiB")
    with pytest.raises(OptionError, match=r"^rank_rul is not an option \(did you mean 'rank_rule'\?\)") as misspelt:
        streamsoup.merge(base, ft, tmp_path / "o2", rank_rul="energy")
    assert misspelt.value.name == "rank_rul", "the README promises OptionError naming the keyword"
    assert_one_line_error(
        run("merge", base, ft, tmp_path / "o2", "--rank-rule", "energy", "--energy", "2"),
        2,
        "--energy must be in (0, 1]",
    )


def test_an_unrelated_base_of_the_same_shapes_is_refused_and_a_big_update_is_not(tmp_path):
    """Another seed of the same architecture, or a Qwen2 of identical sizes, as BASE of a Llama fine-tune:
    every relative update ~1.41 (two independent initialisations); refused before any output, with the
    evidence. A real pair with ||dW|| = 0.5 ||W0|| still merges."""
    transformers = pytest.importorskip("transformers")
    sizes = dict(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )

    def saved(kind: str, seed: int, folder: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
        torch.manual_seed(seed)
        config = transformers.Qwen2Config(**sizes) if kind == "qwen2" else transformers.LlamaConfig(**sizes)
        net = (transformers.Qwen2ForCausalLM if kind == "qwen2" else transformers.LlamaForCausalLM)(config)
        net.to(dtype).save_pretrained(folder)
        return folder

    def as_views(folder: Path) -> Path:
        """The same model as one torch.save file whose matrices are transposed views (a strided layout)."""
        views = folder.with_name(folder.name + "-views")
        views.mkdir()
        tensors = load_file(folder / "model.safetensors")
        state = {n: t.T.contiguous().T if t.dim() == 2 else t for n, t in tensors.items()}
        torch.save(state, views / "pytorch_model.bin")
        shutil.copy(folder / "config.json", views)
        return views

    ft = saved("llama", 0, tmp_path / "ft")
    # the check reads decoded values: a BASE in another dtype or layout than the fine-tune is held to it too
    others = [
        (saved("llama", 1, tmp_path / "llama-1"), ()),
        (saved("qwen2", 0, tmp_path / "qwen2-0"), ("model_type 'qwen2' vs 'llama'",)),
        (saved("llama", 1, tmp_path / "f32", torch.float32), ()),
        (saved("llama", 1, tmp_path / "f16", torch.float16), ()),
    ]
    others.append((as_views(others[2][0]), ()))
    for other, needles in others:
        proc = run("merge", other, ft, tmp_path / "out")
        assert_one_line_error(proc, 2, "does not look like", "median relative update", "1.4", *needles, other.name)
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    # and the fine-tune's own values in fp32, or as views, are the same values: nothing to merge
    (tmp_path / "ft32").mkdir()
    upcast = {n: t.float() for n, t in load_file(ft / "model.safetensors").items()}
    save_file(upcast, tmp_path / "ft32" / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(ft / "config.json", tmp_path / "ft32")
    for same in (tmp_path / "ft32", as_views(tmp_path / "ft32")):
        assert_one_line_error(run("merge", same, ft, tmp_path / "out"), 2, "hold the same values")
    big = tmp_path / "big"
    shutil.copytree(ft, big)
    tensors = load_file(ft / "model.safetensors")
    g = torch.Generator().manual_seed(3)
    for name, w in tensors.items():
        if w.dim() == 2:
            d = torch.randn(w.shape, generator=g)
            tensors[name] = (w.double() + 0.5 * w.double().norm() * d / d.norm()).to(w.dtype)
    save_file(tensors, big / "model.safetensors", metadata={"format": "pt"})
    proc = run("merge", ft, big, tmp_path / "big-out", "-q")
    assert proc.returncode == 0, proc.stderr
