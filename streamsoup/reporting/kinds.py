"""Module kind and layer of a tensor, from its name alone (Llama, Qwen, Mistral, GPT-2, BERT, CLIP, T5, ...).

The report groups tensors by what they do in a transformer block, so a 70B model's 560
matrices read as ten rows. Names are matched on their last module name, with the
enclosing block (attention or MLP) deciding the names several architectures share
(`c_proj`, `dense`, `wo`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

KINDS = ("q", "k", "v", "qkv", "o", "gate", "up", "down", "expert", "embed", "lm_head", "other")

_LEAF = {  # unambiguous last module names
    **dict.fromkeys(("q_proj", "query", "wq", "q_lin", "q"), "q"),
    **dict.fromkeys(("k_proj", "key", "wk", "k_lin", "k"), "k"),
    **dict.fromkeys(("v_proj", "value", "wv", "v_lin", "v"), "v"),
    **dict.fromkeys(("c_attn", "qkv_proj", "query_key_value", "qkv", "wqkv", "in_proj"), "qkv"),
    **dict.fromkeys(("o_proj", "out_proj", "out_lin", "o"), "o"),
    **dict.fromkeys(("gate_proj", "w1", "wi_0", "gate_up_proj"), "gate"),
    **dict.fromkeys(("up_proj", "c_fc", "fc1", "w3", "wi_1", "wi", "dense_h_to_4h", "lin1", "fc_in"), "up"),
    **dict.fromkeys(("down_proj", "fc2", "w2", "dense_4h_to_h", "lin2", "fc_out"), "down"),
    **dict.fromkeys(("lm_head", "embed_out", "output", "decoder"), "lm_head"),
}
EXPERTS = "experts"
_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)
_EMBED = re.compile(r"embed|^wte$|^wpe$|^shared$|^tok_embeddings$", re.IGNORECASE)
_LAYER = re.compile(r"^(?P<stack>.*?)\.(?P<layer>\d+)\.")
_SUFFIXES = (".weight", ".bias", ".lora_A", ".lora_B")


@dataclass(frozen=True)
class Where:
    """A tensor's place in the model: module kind, layer index (None outside the blocks) and its stack."""

    kind: str
    layer: int | None
    stack: str  # the name before the layer index ("model.layers", "vision_model.encoder.layers"), "" if none


def module_path(name: str) -> list[str]:
    """The module names of a tensor name, its parameter suffix and a job's slice of it (`[3]`, `[0:4096]`)
    removed."""
    name = re.sub(r"(\[\d+(:\d+)?\])+$", "", name)
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.split(".")


def module_kind(name: str) -> str:
    parts = module_path(name)
    leaf = parts[-1].lower()
    parents = [p for p in parts[:-1] if not p.isdigit()]
    parent = parents[-1].lower() if parents else ""
    if EXPERTS in parents:  # a mixture-of-experts expert's matrix (one of a stacked tensor: `proj[3]`)
        return "expert"
    if _EMBED.search(leaf) or (leaf in ("weight", "proj") and "embed" in parent):
        return "embed"
    if leaf in ("wo", "c_proj", "dense"):  # named alike in attention and MLP blocks
        if leaf == "dense" and parent == "pooler":
            return "other"
        if any(_ATTENTION.search(p) for p in parents):
            return "o"
        if leaf == "dense" and parent == "intermediate":  # BERT: intermediate.dense, output.dense
            return "up"
        if leaf == "dense" and parent != "output":
            return "other"
        return "down"
    kind = _LEAF.get(leaf)
    if kind == "lm_head" and leaf in ("output", "decoder") and len(parents) > 2:
        return "other"  # only a top-level `output` / `cls.predictions.decoder` is the output head
    return kind or "other"


def locate(name: str) -> Where:
    match = _LAYER.match(name)
    layer = int(match.group("layer")) if match else None
    return Where(module_kind(name), layer, match.group("stack") if match else "")
