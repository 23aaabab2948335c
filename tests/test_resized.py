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
