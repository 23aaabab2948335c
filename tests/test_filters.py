"""--exclude / --only: tensors a user keeps unedited, on a real tiny Llama fine-tune and a peft LoRA adapter; the
edited ones exact against the independent float64 reference, the kept ones the fine-tune's own values."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import load_folder
from helpers import assert_one_line_error, report_rows, run
from reference import assert_within_rounding, monosoup_reference


def kept_names(names, exclude=(), only=()):
    """The reference's rule, written from the README: kept when an --exclude pattern is found in the name, or
    when --only patterns are given and none is."""
    return {
        n for n in names if any(re.search(p, n) for p in exclude) or (only and not any(re.search(p, n) for p in only))
    }


@pytest.mark.parametrize(
    "exclude, only",
    [
        (("embed_tokens|lm_head",), ()),
        ((r"mlp\.", r"layers\.0\."), ()),
        ((), (r"q_proj", r"v_proj")),
        (("k_",), ("attn",)),
    ],
)
def test_kept_tensors_are_the_fine_tunes_and_the_rest_exact(llama_finetune, tmp_path, exclude, only):
    base, ft = llama_finetune
    out = tmp_path / "out"
    flags = [w for p in exclude for w in ("--exclude", p)] + [w for p in only for w in ("--only", p)]
    proc = run("merge", base, ft, out, *flags, "-q")
    assert proc.returncode == 0, proc.stderr
    w0s, w1s, got, rows = load_folder(base), load_folder(ft), load_folder(out), report_rows(out)
    candidates = {n for n, r in rows.items() if r["action"] == "edit" or r["reason"].startswith("kept unedited")}
    kept = kept_names(candidates, exclude, only)
    assert kept and kept != candidates, "the case keeps some edit candidates and edits others"
    for name in candidates:
        if name in kept:
            assert torch.equal(got[name], w1s[name]), name
            assert rows[name]["action"] == "copy" and rows[name]["reason"].startswith("kept unedited: "), rows[name]
            rule = rows[name]["reason"]
            assert ("--exclude" in rule and any(repr(p) in rule for p in exclude)) or "--only" in rule, rule
        else:
            expected = monosoup_reference(w0s[name].to(torch.float64), w1s[name].to(torch.float64))
            assert rows[name]["action"] == ("edit" if expected.edited else "copy"), name
            if expected.edited:
                assert_within_rounding(got[name], expected, name)
    summary = json.loads((out / "streamsoup_report.json").read_text())["summary"]
    assert summary["copied_because"]["kept unedited"] == len(kept)


def test_the_filters_come_from_a_config_and_the_api_too(llama_finetune, tmp_path):
    import streamsoup

    base, ft = llama_finetune
    config = tmp_path / "filters.yaml"
    config.write_text("exclude:\n  - embed_tokens\n  - lm_head\nonly: 'self_attn|mlp|embed|lm_head'\n")
    by_flags = tmp_path / "flags"
    flags = ["--exclude", "embed_tokens", "--exclude", "lm_head", "--only", "self_attn|mlp|embed|lm_head"]
    assert run("merge", base, ft, by_flags, *flags, "-q").returncode == 0
    by_config = tmp_path / "config"
    assert run("merge", base, ft, by_config, "--config", config, "-q").returncode == 0
    by_api = tmp_path / "api"
    streamsoup.merge(base, ft, by_api, exclude=["embed_tokens", "lm_head"], only="self_attn|mlp|embed|lm_head")
    assert load_folder(by_flags).keys() == load_folder(by_config).keys() == load_folder(by_api).keys()
    for name, tensor in load_folder(by_flags).items():
        assert torch.equal(tensor, load_folder(by_config)[name]) and torch.equal(tensor, load_folder(by_api)[name])
    plan = streamsoup.plan(base, ft, exclude="lm_head")
    assert plan.as_dict()["options"]["exclude"] == ["lm_head"]
    assert any(r["name"] == "lm_head.weight" and r["reason"] == "kept unedited: --exclude 'lm_head'" for r in plan.rows)


def test_a_changed_filter_is_another_merge_and_a_bad_one_is_refused(llama_finetune, tmp_path):
    base, ft = llama_finetune
    out = tmp_path / "out"
    assert run("merge", base, ft, out, "--exclude", "lm_head", "-q").returncode == 0
    again = run("merge", base, ft, out, "--exclude", "lm_head")
    assert again.returncode == 0 and "already complete" in again.stdout, "the same filter: the same merge"
    other = run("merge", base, ft, out, "--exclude", "embed_tokens")
    assert_one_line_error(other, 2, "different merge", "--exclude")
    for bad in ("(", "[z-a]"):
        proc = run("merge", base, ft, tmp_path / "bad", "--exclude", bad)
        assert_one_line_error(proc, 2, "--exclude", "not a valid regular expression")
    proc = run("merge", base, ft, tmp_path / "bad", "--only", "")
    assert_one_line_error(proc, 2, "--only must be a non-empty regular expression")
    assert not (tmp_path / "bad.partial").exists()


@pytest.mark.parametrize("save", ["model", "adapter"])
def test_an_adapters_kept_modules_are_the_fine_tunes(llama_lora, tmp_path, save):
    """A LoRA module kept unedited: the merged model gets peft's W0 + scale B A, an adapter OUT the factors of that
    same update (scaling 1); the others are MonoSoup'd as without the filter."""
    transformers = pytest.importorskip("transformers")  # imported here: 3 s that every collection would pay
    from peft import PeftModel

    base, adapter = llama_lora
    plain, filtered = tmp_path / "plain", tmp_path / "filtered"
    assert run("merge", base, adapter, plain, "--save", save, "-q").returncode == 0
    assert (
        run("merge", base, adapter, filtered, "--save", save, "--exclude", r"self_attn\.q_proj", "-q").returncode == 0
    )
    rows = report_rows(filtered)
    kept = {n for n, r in rows.items() if r["reason"] == r"kept unedited: --exclude 'self_attn\\.q_proj'"}
    assert kept and all("q_proj" in n for n in kept) and len(kept) == sum("q_proj" in n for n in rows)
    before, after = load_folder(plain), load_folder(filtered)
    assert before.keys() == after.keys()
    for name in after:  # every other module's tensors as without the filter
        if "q_proj" not in name:
            assert torch.equal(after[name], before[name]), name
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64)
    w1 = PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()
    if save == "model":
        merged = after
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64)
        merged = PeftModel.from_pretrained(model, filtered).merge_and_unload().state_dict()
    for name in kept:
        ulp = torch.finfo(torch.bfloat16).eps * w1[name].abs().max()
        assert (merged[name].to(torch.float64) - w1[name]).abs().max() <= ulp, name


def test_verifys_repair_command_repeats_the_filters(llama_finetune, tmp_path):
    """A damaged OUT: verify's one line says how to write it again, --exclude / --only / --dtype included."""
    import os
    import shlex

    base, ft = llama_finetune
    out = tmp_path / "out"
    flags = ["--exclude", "lm_head", "--exclude", r"mlp\.down", "--only", "layers", "--dtype", "fp32"]
    assert run("merge", base, ft, out, *flags, "-q").returncode == 0
    expected = {n: t.clone() for n, t in load_folder(out).items()}
    shard = sorted(out.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    bad = run("verify", out, "-q")
    assert bad.returncode == 1
    move, merge = bad.stderr.strip().split("write it again: ", 1)[1].split(" && ")
    os.rename(*shlex.split(move)[1:])
    words = shlex.split(merge)
    assert sum(w.startswith("--exclude=") for w in words) == 2 and "--only=layers" in words and "--dtype" in words
    assert run(*words[1:], "-q").returncode == 0
    assert all(torch.equal(t, expected[n]) for n, t in load_folder(out).items())


def test_patterns_that_would_crash_hang_or_find_nothing(llama_finetune, tmp_path):
    """A regex too big to compile, too deep, or backtracking for ever is one line; a typo is said."""
    base, ft = llama_finetune
    for bad in ("a{4294967296}", "(" * 499 + "a" + ")" * 499):
        proc = run("merge", base, ft, tmp_path / "bad", "--exclude", bad)
        assert_one_line_error(proc, 2, "--exclude", "not a valid regular expression")
    slow = run("merge", base, ft, tmp_path / "slow", "--only", "(.*?){30}q{5}")
    assert_one_line_error(slow, 2, "--only", "takes too long to match the tensor names")
    typo = run("merge", base, ft, tmp_path / "typo", "--only", "mpl")
    assert typo.returncode == 0 and "--only 'mpl' finds no tensor to edit" in typo.stderr, typo.stderr
