"""Fused projections edited as their logical matrices (--split-fused).

MonoSoup acts on each stored matrix, so a model saved with `gate_up_proj` (gate and up stacked,
transformers 5) or a fused `qkv_proj` / `in_proj_weight` gives other numbers than the same model
saved with one matrix per projection. With --split-fused each such matrix is cut into its logical
matrices along its rows, each edited on its own, so both layouts give the same values. Only the
layouts whose parts are whole row blocks are known; a fused tensor that is not one of them is
edited whole and said once.
"""

from __future__ import annotations

from .preflight import config_tree

#: name ending -> how many equal row blocks: [gate; up], [q; k; v]
ROW_FUSED = {"gate_up_proj": 2, "in_proj_weight": 3, "qkv_proj": 3}
#: fused along columns (GPT-2's Conv1D keeps [in, 3 * out]): not split
COLUMN_FUSED = ("c_attn",)
#: config keys that may give the width of one of gate / up
INTERMEDIATE_KEYS = ("intermediate_size", "moe_intermediate_size", "expert_intermediate_size", "ffn_hidden_size")


def _ints(config: dict, keys: tuple[str, ...]) -> set[int]:
    return {c[k] for c in config_tree(config) for k in keys if isinstance(c.get(k), int)}


def fused_kind(name: str) -> str:
    """The fused projection a tensor name ends in ("" for none)."""
    parts = name.removesuffix(".weight").split(".")
    return parts[-1] if parts[-1] in ROW_FUSED or parts[-1] in COLUMN_FUSED else ""


def row_parts(name: str, rows: int, cols: int, config: dict) -> tuple[int, str]:
    """(how many equal row blocks the [rows, cols] matrix splits into, 0 for none; a line when a fused tensor is
    not split). gate_up_proj: rows twice an intermediate size of config.json; in_proj_weight: [3 e, e];
    qkv_proj: [3 h, h] (as many query as key/value heads)."""
    kind = fused_kind(name)
    if not kind or rows <= 0 or cols <= 0:
        return 0, ""
    if kind in COLUMN_FUSED:
        return 0, f"{kind} is fused along its columns ([in, 3 out]): --split-fused edits it whole"
    if kind == "gate_up_proj":
        if rows % 2 == 0 and rows // 2 in _ints(config, INTERMEDIATE_KEYS):
            return 2, ""
        return 0, f"gate_up_proj {[rows, cols]} is not [2 x intermediate size, hidden]: --split-fused edits it whole"
    if rows == 3 * cols:
        return 3, ""
    return 0, f"{kind} {[rows, cols]} has other query than key/value widths: --split-fused edits it whole"
