"""A fine-tune whose vocabulary grew (a chat template's tokens): embed_tokens and lm_head of [V0 + n, h] against
the base's [V0, h]. The base's rows are MonoSoup of that matrix, exact against the float64 reference; the added
rows are the fine-tune's; the model loads. (Streamed, resumed and strided: big_pair's embed.weight, test_scale.)"""

from __future__ import annotations

import json

import make_adapters
import pytest
import torch
from conftest import load_folder, made_once, paths
from helpers import assert_merged_exactly, report_rows, run

transformers = pytest.importorskip("transformers")

ADDED = 8


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    make = lambda folder: [str(p) for p in make_adapters.make_finetune(folder, "llama", added_tokens=ADDED)]  # noqa: E731
    return paths(*made_once(tmp_path_factory, "resized-vocabulary", make))


@pytest.mark.parametrize("rule", ["entropy", "energy"])
def test_a_grown_vocabulary_is_edited_on_the_bases_rows(grown, tmp_path, rule):
    base, ft = grown
    out = tmp_path / "out"
    assert run("merge", base, ft, out, "--rank-rule", rule, "-q").returncode == 0
    w0s, w1s, rows = load_folder(base), load_folder(ft), report_rows(out)
    grew = {n for n in w1s if n in w0s and w1s[n].shape[0] == w0s[n].shape[0] + ADDED}
    assert grew == {"model.embed_tokens.weight", "lm_head.weight"}
    report = assert_merged_exactly(base, ft, out, rule)  # the base's rows within 1 ulp, the added rows equal
    for name in grew:
        assert rows[name]["action"] == "edit" and rows[name]["shape"] == list(w1s[name].shape)
        assert f"edited rows 0:{w0s[name].shape[0]} (the base's), {ADDED} added rows kept" in rows[name]["reason"]
    assert {o["name"] for o in report["outliers"] if o["why"].startswith("a resized vocabulary")} == grew
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape[0] == w1s["model.embed_tokens.weight"].shape[0]
    assert json.loads((out / "config.json").read_text())["vocab_size"] == w1s["lm_head.weight"].shape[0]


def test_a_resized_tensor_below_min_rel_update_is_copied_whole(grown, tmp_path):
    """Copied after all (its update too small for --min-rel-update): every row the fine-tune's, added ones too."""
    base, ft = grown
    out = tmp_path / "out"
    assert run("merge", base, ft, out, "--min-rel-update", "1e9", "-q").returncode == 0
    w1s, got = load_folder(ft), load_folder(out)
    assert all(torch.equal(got[n], w1s[n]) for n in w1s)
    assert report_rows(out)["lm_head.weight"]["action"] == "copy"


def test_nan_in_the_added_rows_is_refused_or_let_through_as_asked(grown, tmp_path):
    """The added rows are copied: NaN/Inf in them is the fine-tune's (refused, or kept with --allow-nonfinite)."""
    import shutil

    from helpers import assert_one_line_error
    from safetensors.torch import load_file, save_file

    base, ft = grown
    broken = tmp_path / "ft"
    shutil.copytree(ft, broken)
    shard = next(p for p in sorted(broken.glob("*.safetensors")) if "lm_head.weight" in load_file(p))
    tensors = load_file(shard)
    tensors["lm_head.weight"][-1, 0] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    proc = run("merge", base, broken, tmp_path / "out")
    assert_one_line_error(proc, proc.returncode, "tensor 'lm_head.weight' contains NaN or Inf", "--allow-nonfinite")
    assert proc.returncode != 0 and not (tmp_path / "out").exists()
    allowed = tmp_path / "allowed"
    assert run("merge", base, broken, allowed, "--allow-nonfinite", "-q").returncode == 0
    got = load_folder(allowed)["lm_head.weight"]
    assert torch.isnan(got[-1, 0]) and torch.isfinite(got[:-1]).all()


def test_only_a_vocabulary_is_resized():
    """A grown matrix that is not a vocabulary's (position embeddings, a classifier head) is copied whole."""
    from streamsoup.io.checkpoint import TensorRef
    from streamsoup.planning.planner import resized_rows

    def ref(name, rows):
        return TensorRef(name, "f", "BF16", (rows, 16), 0, rows * 32)

    assert resized_rows(ref("model.embed_tokens.weight", 40), ref("model.embed_tokens.weight", 32)) == 32
    assert resized_rows(ref("lm_head.weight", 40), ref("lm_head.weight", 32)) == 32
    assert resized_rows(ref("model.embed_positions.weight", 40), ref("model.embed_positions.weight", 32)) == 0
    assert resized_rows(ref("score.weight", 40), ref("score.weight", 32)) == 0
    assert resized_rows(ref("lm_head.weight", 32), ref("lm_head.weight", 40)) == 0, "shrunk: not a resize"
