"""OUT/README.md, the Hugging Face model card: front matter a Hub reader parses, the report's table, the fine-tune's
own card kept."""

from __future__ import annotations

import json

import yaml
from helpers import report_rows, run

CARD = "README.md"


def card_parts(out) -> tuple[dict, str]:
    """The card's front matter (parsed by yaml, as the Hub does) and its body."""
    text = (out / CARD).read_text()
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


FINETUNE_CARD = """---
license: apache-2.0
language: [en]
tags: [llama, sft]
base_model: someone/else
---
# My fine-tune

Trained on the very best data.
"""


def test_a_path_merge_gets_a_card_with_the_fine_tunes_own_card_folded_in(pair, tmp_path):
    base, ft = pair
    (ft / CARD).write_text(FINETUNE_CARD)
    out = tmp_path / "out"
    proc = run("merge", base, ft, out, "-q")
    assert proc.returncode == 0, proc.stderr
    meta, body = card_parts(out)
    assert "base_model" not in meta, "a local BASE has no Hub repo id, and theirs named another model than ours"
    assert f"| base model | `{base.absolute()}` (no Hugging Face repo id known" in body
    assert meta["license"] == "apache-2.0" and meta["language"] == ["en"]  # carried from the fine-tune's card
    assert meta["tags"] == ["llama", "sft", "monosoup", "merge", "streamsoup"]
    assert meta["library_name"] == "transformers"  # OUT has the fine-tune's transformers config.json
    report = json.loads((out / "streamsoup_report.json").read_text())
    s = report["summary"]
    assert f"| tensors | {s['tensors']}: {s['edited']} edited, {s['copied']} copied, {s['dropped']} dropped |" in body
    assert "arxiv.org/abs/2602.09689" in body and "entropy" in body
    for kind, m in report["modules"].items():
        assert f"| {kind} | {m['tensors']} | {m['edited']} |" in body, kind
    assert "## The fine-tune's own model card" in body and "Trained on the very best data." in body
    assert body.index("## How to load it") < body.index("## The fine-tune's own model card")
    assert "from_pretrained" in body
    assert len(report_rows(out)) == s["tensors"]


def test_a_fine_tune_without_a_card_gets_ours_alone(pair, tmp_path):
    base, ft = pair
    (ft / CARD).unlink(missing_ok=True)
    out = tmp_path / "out"
    assert run("merge", base, ft, out, "-q", "--rank-rule", "energy", "--energy", "0.9").returncode == 0
    meta, body = card_parts(out)
    assert set(meta) == {"tags", "library_name"} and meta["tags"] == ["monosoup", "merge", "streamsoup"]
    assert "energy, energy 0.9" in body and "own model card" not in body


def test_a_card_with_broken_front_matter_is_kept_whole_as_text(pair, tmp_path):
    base, ft = pair
    (ft / CARD).write_text("---\nlicense: [unclosed\n---\nbody text\n")
    out = tmp_path / "out"
    assert run("merge", base, ft, out, "-q").returncode == 0
    meta, body = card_parts(out)
    assert "license" not in meta and "license: [unclosed" in body and "body text" in body
