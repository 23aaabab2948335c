"""Reading checkpoints: headers only while planning, bounded reads, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from streamsoup.errors import InputError
from streamsoup.io.checkpoint import Checkpoint, read_header, read_tensor
from streamsoup.io.layout import ShardLayout, TensorSpec, encode_header


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int64])
def test_read_tensor_round_trips_every_dtype(tmp_path, dtype):
    t = (torch.randn(5, 7) * 100).to(dtype)
    save_file({"a": t, "b": t[:2].clone()}, tmp_path / "x.safetensors")
    ckpt = Checkpoint.from_path(tmp_path / "x.safetensors")
    if dtype in (torch.int64,):
        assert ckpt["a"].dtype == "I64"
        return
    assert torch.equal(read_tensor(ckpt["a"]), t)
    assert torch.equal(read_tensor(ckpt["b"]), t[:2])


def test_folder_with_and_without_index(awkward_pair):
    base, ft = awkward_pair
    assert not (base / "model.safetensors.index.json").exists()
    b, f = Checkpoint.from_path(base), Checkpoint.from_path(ft)
    assert len(b.files) != len(f.files)  # sharded differently
    assert "score.weight" in f and "score.weight" not in b


def test_planning_reads_headers_only(awkward_pair, monkeypatch):
    """plan_merge must not read tensor data: fail any pread."""
    import os

    from streamsoup.options import MergeOptions
    from streamsoup.planning.planner import plan_merge

    def no_pread(*a, **k):
        raise AssertionError("tensor data read while planning")

    monkeypatch.setattr(os, "preadv", no_pread)
    plan = plan_merge(*awkward_pair, MergeOptions())
    assert len(plan.jobs) > 10 and plan.bytes_to_write > 0


def test_corrupt_and_truncated_headers(tmp_path):
    save_file({"a": torch.ones(64, 64)}, tmp_path / "ok.safetensors")
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[:-100])
    with pytest.raises(InputError, match="truncated"):
        read_header(tmp_path / "trunc.safetensors")
    (tmp_path / "huge.safetensors").write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(InputError, match="corrupt"):
        read_header(tmp_path / "huge.safetensors")
    (tmp_path / "json.safetensors").write_bytes((4).to_bytes(8, "little") + b"{{{{")
    with pytest.raises(InputError, match="not valid JSON"):
        read_header(tmp_path / "json.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(b"abc")
    with pytest.raises(InputError, match="shorter than 8"):
        read_header(tmp_path / "tiny.safetensors")


def test_index_naming_missing_shard(tmp_path):
    save_file({"a": torch.ones(2, 2)}, tmp_path / "model-00001-of-00002.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})
    )
    with pytest.raises(InputError, match="model-00002-of-00002"):
        Checkpoint.from_path(tmp_path)


def test_duplicate_tensor_across_shards(tmp_path):
    save_file({"a": torch.ones(2, 2)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"a": torch.ones(2, 2)}, tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(InputError, match="'a' appears in both"):
        Checkpoint.from_path(tmp_path)


def test_layout_headers_are_valid_safetensors(tmp_path):
    specs = [TensorSpec(f"t{i}", "BF16", (i + 1, 3)) for i in range(10)] + [TensorSpec("e", "F32", (0, 4))]
    layout = ShardLayout.plan(specs, shard_size=40)
    assert len(layout.shards) > 1
    for shard in layout.shards:
        assert len(shard.header) % 8 == 0
        path = tmp_path / shard.file
        path.write_bytes(shard.header + bytes(shard.size - len(shard.header)))
        header = read_header(path)
        assert [r.name for r in header.tensors] == [s.name for s in shard.tensors]
    header, offsets = encode_header([TensorSpec("x", "F16", (2, 2))])
    assert offsets == [0] and header[8:].rstrip(b" ").endswith(b"}")


def test_options_sizes_and_yaml(tmp_path):
    from streamsoup.errors import UsageError
    from streamsoup.options import MergeOptions
    from streamsoup.units import parse_size

    assert parse_size("5GB") == 5 * 10**9 and parse_size("8GiB") == 8 * 2**30 and parse_size(1024) == 1024
    with pytest.raises(UsageError):
        parse_size("-3GB")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("shard-size: 2GB\nrank_rule: energy\n")
    opts = MergeOptions.create(cfg, energy=0.7)
    assert opts.shard_size == 2 * 10**9 and opts.rank_rule == "energy" and opts.energy == 0.7


def test_every_example_config_loads():
    from streamsoup.options import MergeOptions, load_config

    configs = sorted((Path(__file__).parents[1] / "streamsoup" / "configs").glob("*.yaml"))
    assert configs
    for cfg in configs:
        assert set(load_config(cfg)), cfg
        MergeOptions.create(cfg)  # every key known, every value valid


def test_an_mxfp4_read_of_anything_but_one_experts_slice_is_a_clear_error(tmp_path):
    """The planner hands MXFP4 reads one expert's 2-D slice with its scales; anything else is named, not asserted."""
    from streamsoup.io import quantized
    from streamsoup.io.checkpoint import TensorRef, read_block

    path = tmp_path / "blocks.bin"
    path.write_bytes(bytes(4 * 64 * 16))
    stacked = TensorRef(
        "experts.down_proj_blocks", str(path), "U8", (4, 64, 32), 0, 4 * 64 * 16, encoding=quantized.MXFP4
    )
    with pytest.raises(InputError, match=r"experts.down_proj_blocks.*one expert's 2-D slice.*\[4, 64, 32\]"):
        read_block(stacked, 0, 8, False)
