"""Synthetic (base, fine-tune) safetensors pairs shaped like real LLMs: the demo, the tests and the benchmarks.

Llama/Qwen-style names and shapes (GQA k/v, untied lm_head, optional q/k/v biases),
bf16, several shards with an index json, config.json, tokenizer and generation
config. Each fine-tune matrix is ``W0 + decaying low-rank update + dense noise``,
the shape of real fine-tuning updates. Tensors are generated row block by row
block and written in place, so a multi-GB pair never sits in memory.

``awkward=True`` adds what real pairs throw at a merger: a conv kernel, an untouched
(frozen) matrix, a resized vocabulary, tensors only in one checkpoint, int and
1-D tensors, fp16/fp32/fp64 and base/fine-tune dtype mismatches, a 1e-9 relative
update, and a base sharded differently and without an index. It ships in the package so
that ``streamsoup demo DIR`` works from a plain ``pip install``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import zlib
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

import torch

from .errors import UsageError
from .io import rawio
from .io.checkpoint import INDEX_NAME
from .io.dtypes import FLOAT_DTYPES, item_size
from .io.layout import ShardLayout, TensorSpec

TORCH_DTYPES = {**FLOAT_DTYPES, "I64": torch.int64, "I32": torch.int32}
ROW_BLOCK_ELEMENTS = 16 * 1024 * 1024


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    qkv_bias: bool = False  # Qwen-style
    arch: str = "llama"

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


PRESETS: dict[str, ModelShape] = {
    "tiny": ModelShape(hidden=64, intermediate=160, layers=2, heads=4, kv_heads=2, vocab=320),
    "small": ModelShape(hidden=256, intermediate=688, layers=4, heads=8, kv_heads=2, vocab=2048),
    "qwen-small": ModelShape(
        hidden=256, intermediate=704, layers=3, heads=8, kv_heads=2, vocab=2304, qkv_bias=True, arch="qwen2"
    ),
    "medium": ModelShape(hidden=1024, intermediate=2816, layers=4, heads=16, kv_heads=4, vocab=8192),
    # ~1.5 GB per checkpoint in bf16 (TinyLlama widths)
    "1.5gb": ModelShape(hidden=2048, intermediate=5632, layers=14, heads=32, kv_heads=4, vocab=32000),
    # ~1.7 GB per checkpoint: the benchmark pair of the README
    "bench": ModelShape(hidden=2048, intermediate=5632, layers=16, heads=32, kv_heads=4, vocab=32000),
    "llama2-7b": ModelShape(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000),
    # real 70B-class shapes, for --sparse (headers real, data holes): plan and budgets at full scale
    "llama3-70b": ModelShape(hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8, vocab=128256),
    "qwen2-72b": ModelShape(
        hidden=8192, intermediate=29568, layers=80, heads=64, kv_heads=8, vocab=152064, qkv_bias=True, arch="qwen2"
    ),
}
HF_SHARD_SIZE = 5 * 10**9


@dataclass(frozen=True)
class TensorDef:
    """One tensor of the pair; a None shape means the tensor is absent from that side."""

    name: str
    base_shape: tuple[int, ...] | None
    ft_shape: tuple[int, ...] | None
    base_dtype: str = "BF16"
    ft_dtype: str = "BF16"
    kind: str = "matrix"  # matrix | norm | bias | int | frozen | tiny
    std: float = 0.02


def llama_tensors(s: ModelShape) -> list[TensorDef]:
    h, kv = s.hidden, s.kv_heads * s.head_dim
    out = [TensorDef("model.embed_tokens.weight", (s.vocab, h), (s.vocab, h))]
    for i in range(s.layers):
        p = f"model.layers.{i}."
        for proj, rows in (("q", h), ("k", kv), ("v", kv)):
            out.append(TensorDef(f"{p}self_attn.{proj}_proj.weight", (rows, h), (rows, h)))
            if s.qkv_bias:
                out.append(TensorDef(f"{p}self_attn.{proj}_proj.bias", (rows,), (rows,), kind="bias"))
        out.append(TensorDef(f"{p}self_attn.o_proj.weight", (h, h), (h, h)))
        out.append(TensorDef(f"{p}mlp.gate_proj.weight", (s.intermediate, h), (s.intermediate, h)))
        out.append(TensorDef(f"{p}mlp.up_proj.weight", (s.intermediate, h), (s.intermediate, h)))
        out.append(TensorDef(f"{p}mlp.down_proj.weight", (h, s.intermediate), (h, s.intermediate)))
        out.append(TensorDef(f"{p}input_layernorm.weight", (h,), (h,), kind="norm"))
        out.append(TensorDef(f"{p}post_attention_layernorm.weight", (h,), (h,), kind="norm"))
    out.append(TensorDef("model.norm.weight", (h,), (h,), kind="norm"))
    out.append(TensorDef("lm_head.weight", (s.vocab, h), (s.vocab, h)))
    return out


def awkward_tensors(s: ModelShape, tensors: list[TensorDef]) -> list[TensorDef]:
    """Everything a real pair can throw at a merger, on top of the plain model."""
    h = s.hidden
    out = []
    for t in tensors:
        if t.name in ("model.embed_tokens.weight", "lm_head.weight"):  # vocabulary grown by fine-tuning
            t = replace(t, ft_shape=(s.vocab + 8, h))
        elif t.name == "model.layers.0.mlp.up_proj.weight":
            t = replace(t, kind="frozen")
        elif t.name == "model.layers.0.self_attn.o_proj.weight":
            t = replace(t, base_dtype="F16", ft_dtype="F16")
        elif t.name == "model.layers.0.self_attn.q_proj.weight":
            t = replace(t, base_dtype="F32", ft_dtype="F32")
        elif t.name == "model.layers.0.self_attn.v_proj.weight":
            t = replace(t, base_dtype="F32")  # base kept in fp32, fine-tune saved in bf16
        out.append(t)
    out += [
        TensorDef("vision_tower.patch_embed.proj.weight", (h, 3, 4, 4), (h, 3, 4, 4), std=0.1),
        TensorDef("vision_tower.patch_embed.proj.bias", (h,), (h,), kind="bias"),
        TensorDef("multi_modal_projector.linear.weight", (h, 48), (h, 48), "F64", "F64", kind="tiny"),
        TensorDef("multi_modal_projector.wide.weight", (16, 3 * h), (16, 3 * h), "F32", "F32"),
        TensorDef("score.weight", None, (4, h)),  # a new head, only in the fine-tune
        TensorDef("model.rotary_emb.inv_freq", (s.head_dim // 2,), None, "F32", "F32", kind="norm"),
        TensorDef("model.position_ids", (1, 64), (1, 64), "I64", "I64", kind="int"),
        TensorDef("model.empty_buffer", (0, h), (0, h)),
    ]
    return out


def _generator(seed: int, name: str, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()) * 7 + salt)


class UpdateModel:
    """A fine-tuning update: decaying low-rank part (sigma_i ~ 0.8^i) plus dense noise."""

    def __init__(self, t: TensorDef, seed: int) -> None:
        shape = t.ft_shape or t.base_shape
        self.rows = shape[0] if shape else 0
        self.cols = math.prod(shape[1:]) if len(shape) > 1 else 1
        g = _generator(seed, t.name, 1)
        r = max(1, min(24, self.rows, self.cols))
        sigma = 0.8 ** torch.arange(r, dtype=torch.float64)
        target = 0.1 * t.std * math.sqrt(self.rows * self.cols)  # low-rank part ~10% of W0 per element
        sigma *= target / float(sigma.norm())
        self.a = torch.linalg.qr(torch.randn(self.rows, r, generator=g, dtype=torch.float64))[0] * sigma
        self.b = torch.linalg.qr(torch.randn(self.cols, r, generator=g, dtype=torch.float64))[0].T
        self.noise = 0.025 * t.std

    def block(self, rows: slice, g: torch.Generator) -> torch.Tensor:
        n = rows.stop - rows.start
        return self.a[rows] @ self.b + self.noise * torch.randn(n, self.cols, generator=g, dtype=torch.float64)


def generate_rows(t: TensorDef, rows: slice, cols: int, seed: int, update: UpdateModel | None):
    """(W0 block, W1 block) in float64 for rows of the 2-D view; None where a side is absent."""
    g = _generator(seed, t.name, 2 + rows.start)
    n = rows.stop - rows.start
    if t.kind == "int":
        w = torch.arange(rows.start * cols, rows.stop * cols, dtype=torch.float64).reshape(n, cols)
        return w, w
    if t.kind == "norm":
        w0 = 1.0 + 0.05 * torch.randn(n, cols, generator=g, dtype=torch.float64)
        return w0, w0 + 0.01 * torch.randn(n, cols, generator=g, dtype=torch.float64)
    w0 = t.std * torch.randn(n, cols, generator=g, dtype=torch.float64)
    if t.kind == "bias":
        return w0, w0 + 0.1 * t.std * torch.randn(n, cols, generator=g, dtype=torch.float64)
    if t.kind == "frozen":
        return w0, w0
    if t.kind == "tiny":
        return w0, w0 * (1.0 + 1e-9)
    return w0, (w0 if update is None else w0 + update.block(rows, g))


class Writer:
    """A checkpoint folder being written in place: preallocated shards, pwrite by row block."""

    def __init__(self, folder: Path, specs: list[TensorSpec], shard_size: int, with_index: bool) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.layout = ShardLayout.plan(specs, shard_size)
        self.fds = {}
        for shard in self.layout.shards:
            fd = os.open(folder / shard.file, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            rawio.pwrite_all(fd, memoryview(shard.header), 0)
            os.ftruncate(fd, shard.size)
            self.fds[shard.file] = fd
        index = self.layout.index_json()
        if index is not None and with_index:
            (folder / INDEX_NAME).write_text(json.dumps(index, indent=2))

    def write(self, name: str, dtype: str, row_start: int, block: torch.Tensor) -> None:
        place = self.layout.placements[name]
        data = block.to(TORCH_DTYPES[dtype]).contiguous().view(-1).view(torch.uint8).numpy()
        offset = place.offset + row_start * (data.nbytes // max(block.shape[0], 1))
        rawio.pwrite_all(self.fds[place.file], memoryview(data), offset)

    def close(self, sync: bool = True) -> None:
        """`sync=False` leaves the bytes to the page cache: for inputs that need not survive a crash."""
        for fd in self.fds.values():
            if sync:
                os.fsync(fd)
            os.close(fd)


def write_side_files(folder: Path, shape: ModelShape, vocab: int) -> None:
    config = {
        "architectures": ["Qwen2ForCausalLM" if shape.arch == "qwen2" else "LlamaForCausalLM"],
        "model_type": shape.arch,
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "vocab_size": vocab,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "rms_norm_eps": 1e-5,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    tokenizer = {"version": "1.0", "model": {"type": "BPE", "vocab": {f"t{i}": i for i in range(min(vocab, 64))}}}
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4096}))


def _row_blocks(t: TensorDef, shape: tuple[int, ...], seed: int, update: UpdateModel | None):
    """(first row, W0 block, W1 block) over the 2-D view of `shape`; 1-D tensors are one row."""
    rows_total, cols = (1, shape[0]) if len(shape) == 1 else (shape[0], math.prod(shape[1:]))
    if rows_total * cols == 0:
        return
    step = max(1, ROW_BLOCK_ELEMENTS // cols)
    for start in range(0, rows_total, step):
        w0, w1 = generate_rows(t, slice(start, min(start + step, rows_total)), cols, seed, update)
        yield start, w0, w1


def make_pair(
    out: str | Path,
    preset: str | ModelShape = "tiny",
    *,
    awkward: bool = False,
    seed: int = 0,
    base_shard_size: int | None = None,
    ft_shard_size: int | None = None,
    sparse: bool = False,
) -> tuple[Path, Path]:
    """Write OUT/base and OUT/finetuned; returns their paths."""
    shape = PRESETS[preset] if isinstance(preset, str) else preset
    tensors = llama_tensors(shape)
    if awkward:
        tensors = awkward_tensors(shape, tensors)
    total = sum(math.prod(t.ft_shape or ()) * 2 for t in tensors)
    ft_shard_size = ft_shard_size or max(total // 3, 1)  # several shards by default
    base_shard_size = base_shard_size or (max(total // 2, 1) if awkward else ft_shard_size)
    out = Path(out)
    base = Writer(
        out / "base",
        [TensorSpec(t.name, t.base_dtype, t.base_shape) for t in tensors if t.base_shape],
        base_shard_size,
        with_index=not awkward,
    )
    ft = Writer(
        out / "finetuned",
        [TensorSpec(t.name, t.ft_dtype, t.ft_shape) for t in tensors if t.ft_shape],
        ft_shard_size,
        with_index=True,
    )
    for t in [] if sparse else tensors:  # sparse: headers only, the data are holes
        if t.base_shape == t.ft_shape:
            update = UpdateModel(t, seed) if t.kind == "matrix" else None
            for start, w0, w1 in _row_blocks(t, t.ft_shape, seed, update):
                base.write(t.name, t.base_dtype, start, w0)
                ft.write(t.name, t.ft_dtype, start, w1)
            continue
        for shape_t, side, dtype in ((t.base_shape, base, t.base_dtype), (t.ft_shape, ft, t.ft_dtype)):
            for start, w0, _ in _row_blocks(t, shape_t, seed + (side is ft), None) if shape_t else ():
                side.write(t.name, dtype, start, w0)
    base.close()
    ft.close()
    write_side_files(out / "base", shape, shape.vocab)
    write_side_files(out / "finetuned", shape, shape.vocab + (8 if awkward else 0))
    return out / "base", out / "finetuned"


def preset_bytes(preset: str) -> int:
    """The size of one checkpoint of a preset's demo pair (bf16, the awkward tensors included)."""
    shape = PRESETS[preset]
    tensors = awkward_tensors(shape, llama_tensors(shape))
    return sum(math.prod(t.base_shape) * item_size(t.base_dtype, t.name) for t in tensors if t.base_shape is not None)


def write_demo(folder: Path, preset: str) -> tuple[Path, Path]:
    """The demo pair (with the awkward tensors real pairs have) and the example configs; never over existing files."""
    if preset not in PRESETS:
        raise UsageError(f"--preset {preset!r} is not one of {', '.join(sorted(PRESETS))}")
    taken = [folder / name for name in ("base", "finetuned", "configs") if os.path.lexists(folder / name)]
    if taken:
        raise UsageError(f"{taken[0]} already exists; streamsoup demo writes only new folders: choose another DIR")
    base, ft = make_pair(folder, preset, awkward=True)
    configs = folder / "configs"
    configs.mkdir()
    for entry in resources.files(__package__).joinpath("configs").iterdir():
        if entry.name.endswith(".yaml"):
            with resources.as_file(entry) as path:
                shutil.copyfile(path, configs / entry.name)
    return base, ft
