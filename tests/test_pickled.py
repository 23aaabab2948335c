"""PyTorch checkpoints saved by torch.save: read from the pickle alone, merged exactly, and never running code."""

from __future__ import annotations

import collections
import json
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_one_line_error, run, run_here
from reference import assert_within_rounding, monosoup_reference
from safetensors import safe_open
from safetensors.torch import save_file

from streamsoup.io.checkpoint import read_tensor
from streamsoup.sources.opening import open_checkpoint

REPORT = "streamsoup_report.json"


def tiny_llama_state() -> dict[str, torch.Tensor]:
    """A real transformers model's state dict, built from a config (bf16, tied embeddings)."""
    import transformers

    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    return model.state_dict()


def fine_tuned(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    out = {}
    for name, t in state.items():
        if t.ndim == 2 and name != "lm_head.weight":
            low = torch.randn(t.shape[0], 3, generator=g) @ torch.randn(3, t.shape[1], generator=g)
            t = (t.float() + 0.004 * low + 0.002 * torch.randn(t.shape, generator=g)).to(t.dtype)  # ~40% of W0
        out[name] = t
    out["lm_head.weight"] = out["model.embed_tokens.weight"]  # tied: both names share one storage
    return out


def save_sharded_bin(state: dict[str, torch.Tensor], folder: Path, shards: int = 3) -> None:
    """As transformers < 5 saved models: pytorch_model-0000i-of-0000N.bin and their index."""
    folder.mkdir(parents=True)
    names = list(state)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save({n: state[n] for n in part}, folder / file)
        weight_map.update(dict.fromkeys(part, file))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text("{}")


@pytest.fixture(scope="module")
def bin_pair(tmp_path_factory) -> tuple[Path, Path, dict, dict]:
    root = tmp_path_factory.mktemp("bin")
    base = tiny_llama_state()
    ft = fine_tuned(base)
    save_sharded_bin(base, root / "base")
    torch.save(ft, root / "ft.bin")
    return root / "base", root / "ft.bin", base, ft


def loaded(out: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        return {n: f.get_tensor(n) for n in f.keys()}  # noqa: SIM118 - safe_open has no items()


def assert_exact(base: dict[str, torch.Tensor], ft: dict[str, torch.Tensor], out: Path) -> None:
    """Every output tensor against the float64 reference, from torch's own load of the inputs; copies byte-identical."""
    merged = loaded(out)
    rows = {r["name"]: r for r in json.loads((out / REPORT).read_text())["tensors"]}
    assert set(merged) == set(ft) == set(rows)
    for name, w1 in ft.items():
        exp = monosoup_reference(base[name], w1, "entropy", 0.8) if name in base else None
        if exp is not None and exp.edited:
            assert rows[name]["action"] == "edit" and rows[name]["k"] == exp.k, name
            assert_within_rounding(merged[name], exp, name)
        else:
            assert rows[name]["action"] == "copy", name
            raw = lambda x: x.contiguous().reshape(-1).view(torch.uint8)  # noqa: E731
            assert torch.equal(raw(merged[name]), raw(w1)), name


def test_bin_pair_is_merged_within_rounding_of_the_reference(bin_pair, tmp_path):
    base_dir, ft_file, base, ft = bin_pair
    out = tmp_path / "out"
    proc = run_here("merge", base_dir, ft_file, out, "-q")
    assert proc.returncode == 0, proc.stderr
    assert_exact(base, ft, out)


def test_mixed_formats_give_the_values_of_the_safetensors_merge(bin_pair, tmp_path):
    base_dir, ft_file, base, ft = bin_pair
    (tmp_path / "st_base").mkdir()
    (tmp_path / "st_ft").mkdir()
    save_file({k: v.clone().contiguous() for k, v in base.items()}, tmp_path / "st_base" / "m.safetensors")
    save_file({k: v.clone().contiguous() for k, v in ft.items()}, tmp_path / "st_ft" / "m.safetensors")
    runs = {
        "safetensors": (tmp_path / "st_base", tmp_path / "st_ft"),
        "bin+st": (base_dir, tmp_path / "st_ft"),
        "st+bin": (tmp_path / "st_base", ft_file),
    }
    digests = {}
    for label, (b, f) in runs.items():
        proc = run_here("merge", b, f, tmp_path / label, "-q")
        assert proc.returncode == 0, (label, proc.stderr)
        merged = loaded(tmp_path / label)
        digests[label] = {n: t.reshape(-1).view(torch.uint8).numpy().tobytes() for n, t in merged.items()}
    assert digests["bin+st"] == digests["safetensors"] == digests["st+bin"]  # tensor by tensor (orders differ)
    assert (tmp_path / "bin+st" / "model.safetensors").read_bytes() == (
        tmp_path / "safetensors" / "model.safetensors"
    ).read_bytes()  # the same FINETUNED file: the same bytes


def test_views_shared_storage_zero_d_and_every_dtype(tmp_path):
    fused = torch.randn(12, 8, dtype=torch.bfloat16)
    state = collections.OrderedDict(
        qkv=fused,
        q=fused[:4],
        k=fused[4:8],
        v=fused[8:],
        tied=fused,
        scale=torch.tensor(2.5),
        f16=torch.randn(3, 5, dtype=torch.float16),
        f64=torch.randn(4, dtype=torch.float64),
        i64=torch.arange(7),
        i32=torch.arange(3, dtype=torch.int32),
        flags=torch.tensor([True, False, True]),
        param=torch.nn.Parameter(torch.ones(2, 2)),
        u8=torch.arange(5, dtype=torch.uint8),
    )
    torch.save(state, tmp_path / "s.pt")
    ckpt = open_checkpoint(tmp_path / "s.pt", "BASE")
    assert set(ckpt) == set(state)
    fd = os.open(tmp_path / "s.pt", os.O_RDONLY)
    try:
        for name, t in state.items():
            ref = ckpt[name]
            assert ref.shape == tuple(t.shape), name
            got = os.pread(fd, ref.nbytes, ref.offset)
            assert got == t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(), name
    finally:
        os.close(fd)
    assert ckpt["q"].offset == ckpt["qkv"].offset == ckpt["tied"].offset  # one storage, read in place
    assert torch.equal(read_tensor(ckpt["k"]), fused[4:8])


def test_nested_state_dict_is_taken_and_ambiguity_refused(bin_pair, tmp_path):
    base_dir, _, _, ft = bin_pair
    torch.save({"state_dict": ft, "epoch": 3, "optimizer": {"state": {}, "param_groups": []}}, tmp_path / "n.pt")
    proc = run_here("merge", base_dir, tmp_path / "n.pt", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert "ignored 2 other entries (epoch, optimizer)" in proc.stderr
    torch.save({"model": ft, "ema": ft}, tmp_path / "two.pt")
    proc = run_here("merge", base_dir, tmp_path / "two.pt", tmp_path / "out2")
    assert_one_line_error(proc, 2, "two.pt", "'model'", "'ema'", "not one state dict")
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out2.partial").exists()


class Payload:
    """What a hostile checkpoint would carry: unpickling it creates a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(bin_pair, tmp_path):
    base_dir, _, _, ft = bin_pair
    marker = tmp_path / "pwned"
    torch.save({**ft, "extra": Payload(marker)}, tmp_path / "evil.bin")
    torch.load(tmp_path / "evil.bin", weights_only=False)  # the control: torch's own unsafe load does run it
    assert marker.exists()
    marker.unlink()
    proc = run_here("merge", base_dir, tmp_path / "evil.bin", tmp_path / "out")
    assert_one_line_error(proc, 2, "evil.bin", "posix.system", "could run code")
    assert not marker.exists() and not (tmp_path / "out").exists()
    proc = run_here("plan", base_dir, tmp_path / "evil.bin")
    assert_one_line_error(proc, 2, "posix.system")
    assert not marker.exists()


def test_legacy_format_is_refused_with_the_way_out(bin_pair, tmp_path):
    base_dir, _, _, ft = bin_pair
    torch.save(ft, tmp_path / "old.bin", _use_new_zipfile_serialization=False)
    proc = run_here("merge", base_dir, tmp_path / "old.bin", tmp_path / "out")
    assert_one_line_error(proc, 2, "old.bin", "legacy format", "torch.save(torch.load(")
    (tmp_path / "junk.bin").write_bytes(np.arange(100, dtype=np.uint8).tobytes())
    proc = run_here("merge", base_dir, tmp_path / "junk.bin", tmp_path / "out")
    assert_one_line_error(proc, 2, "junk.bin", "not a torch.save checkpoint")
    assert not (tmp_path / "out").exists()


def layouts() -> dict[str, torch.Tensor]:
    """Views torch.save keeps as (storage, offset, shape, stride): transposed, sliced, permuted, strided, expanded."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 7, 5, 4, generator=g).to(torch.bfloat16)
    return {
        "transposed": x.reshape(42, 20).T,
        "columns": x.reshape(42, 20)[:, 3:11],
        "permuted": x.permute(2, 0, 3, 1),
        "permuted_slice": x.permute(1, 3, 0, 2)[:, 1:3],
        "every_third": x.reshape(-1)[::3],
        "expanded": torch.randn(1, 5, generator=g).to(torch.float16).expand(9, 5),
        "wide": x.reshape(6, 140)[:, ::2],
        "int_transposed": torch.arange(35).reshape(5, 7).T,
        "bool_columns": (x.reshape(42, 20) > 0)[:, 1::2],
    }


@pytest.mark.parametrize("span", [4 * 2**20, 16, 1], ids=["one-read", "16-byte-pieces", "1-byte-pieces"])
def test_views_are_read_exactly_in_bounded_pieces(tmp_path, monkeypatch, span):
    """Whole, by rows and by columns (the streamed paths), whatever the piece size the gather is cut into."""
    from streamsoup.io import strided
    from streamsoup.io.checkpoint import matrix_shape, read_raw_block

    monkeypatch.setattr(strided, "GATHER_SPAN", span)
    views = layouts()
    torch.save(views, tmp_path / "v.pt")
    ckpt = open_checkpoint(tmp_path / "v.pt", "BASE")
    raw = lambda t: torch.empty(t.shape, dtype=t.dtype).copy_(t).reshape(-1).view(torch.uint8).numpy()  # noqa: E731
    for name, view in views.items():
        ref = ckpt[name]
        assert ref.stride == view.stride() and ref.span <= view.untyped_storage().nbytes(), name
        m, n = matrix_shape(ref.shape)
        matrix = view.reshape(m, n)
        assert np.array_equal(read_raw_block(ref, 0, m).reshape(-1), raw(view)), name
        for a, b in {(0, m), (1, m - 1), (m - 1, m), (2, 3)}:
            assert np.array_equal(read_raw_block(ref, a, b).reshape(-1), raw(matrix[a:b])), (name, a, b)
        for a, b in {(0, n), (1, n - 1), (n - 1, n), (2, min(n, 9))} if n > 2 else {(0, n)}:
            got = read_raw_block(ref, a, b, transposed=True).reshape(-1)
            assert np.array_equal(got, raw(matrix[:, a:b].T)), (name, a, b)
        if view.dtype.is_floating_point:
            assert torch.equal(read_tensor(ref), view), name


def with_views(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same values, every matrix stored as a view: transposed, or the leading columns of a wider storage."""
    out = {}
    for i, (name, t) in enumerate(state.items()):
        if t.ndim == 2 and i % 2:
            out[name] = t.T.contiguous().T
        elif t.ndim == 2:
            out[name] = torch.cat([t, torch.zeros(t.shape[0], 3, dtype=t.dtype)], dim=1)[:, : t.shape[1]]
        else:
            out[name] = t
    return out


def test_a_fine_tune_of_views_merges_to_the_bytes_of_its_contiguous_twin(bin_pair, tmp_path):
    base_dir, ft_file, base, ft = bin_pair
    views = with_views(ft)
    assert sum(not t.is_contiguous() for t in views.values()) >= 10
    torch.save(views, tmp_path / "views.bin")
    for label, file in (("views", tmp_path / "views.bin"), ("contiguous", ft_file)):
        proc = run_here("merge", base_dir, file, tmp_path / label, "-q")
        assert proc.returncode == 0, proc.stderr
    digest = lambda out: {n: t.reshape(-1).view(torch.uint8).numpy().tobytes() for n, t in loaded(out).items()}  # noqa: E731
    assert digest(tmp_path / "views") == digest(tmp_path / "contiguous")  # tensor by tensor: file orders differ
    assert_exact(base, ft, tmp_path / "views")


@pytest.mark.slow
def test_views_bigger_than_the_budget_are_streamed_exactly(big_pair, big_expected, tmp_path):
    """Transposed, column-sliced and permuted storages, read in row and column blocks under --max-ram."""
    from helpers import assert_merged_exactly, report_rows
    from safetensors.torch import load_file

    base_dir, ft_dir = big_pair
    ft = load_file(ft_dir / "model.safetensors")
    views = dict(ft)
    views["tall.weight"] = ft["tall.weight"].T.contiguous().T
    views["wide.weight"] = torch.cat([ft["wide.weight"], ft["wide.weight"][:, :7]], dim=1)[:, :40000]
    views["conv.weight"] = ft["conv.weight"].permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)
    views["f32.weight"] = ft["f32.weight"].T.contiguous().T
    views["model.embed_tokens.weight"] = (
        ft["model.embed_tokens.weight"].T.contiguous().T
    )  # its first rows (the base's) a strided slice
    torch.save(views, tmp_path / "views.pt")
    del ft, views
    out = tmp_path / "out"
    proc = run("merge", base_dir, tmp_path / "views.pt", out, "--max-ram", "450MB", "--devices", "cpu", "-q")
    assert proc.returncode == 0, proc.stderr
    rows = report_rows(out)
    streamed = ("tall.weight", "wide.weight", "conv.weight", "f32.weight", "model.embed_tokens.weight")
    assert all(rows[n]["blocks"] > 1 for n in streamed), rows
    assert_merged_exactly(base_dir, ft_dir, out, expected=big_expected)


def test_kill_mid_bin_merge_then_resume_is_byte_identical(bin_pair, tmp_path):
    base_dir, ft_file, _, _ = bin_pair
    whole = tmp_path / "whole"
    assert run_here("merge", base_dir, ft_file, whole, "--shard-size", "100KB", "-q").returncode == 0
    out = tmp_path / "out"
    killed = run("merge", base_dir, ft_file, out, "--shard-size", "100KB", "-q", env={"STREAMSOUP_FAULT": "commit:5"})
    assert killed.returncode == -9 and not out.exists() and (tmp_path / "out.partial").exists()
    resumed = run("merge", base_dir, ft_file, out, "--shard-size", "100KB", "-q")
    assert resumed.returncode == 0, resumed.stderr
    shards = sorted(p.name for p in whole.glob("*.safetensors"))
    assert len(shards) > 1 and shards == sorted(p.name for p in out.glob("*.safetensors"))
    for name in [*shards, "model.safetensors.index.json"]:
        assert (out / name).read_bytes() == (whole / name).read_bytes(), name


def test_ddp_prefix_on_one_side_pairs_with_the_plain_names(bin_pair, tmp_path):
    base_dir, ft_file, _, ft = bin_pair
    torch.save({f"module.{k}": v for k, v in ft.items()}, tmp_path / "ddp.pt")
    plain, ddp = tmp_path / "plain", tmp_path / "ddp"
    assert run_here("merge", base_dir, ft_file, plain, "-q").returncode == 0
    proc = run_here("merge", base_dir, tmp_path / "ddp.pt", ddp)
    assert proc.returncode == 0, proc.stderr
    assert "'module.'" in proc.stderr and "OUT uses the names without it" in proc.stderr
    assert loaded(ddp).keys() == loaded(plain).keys() == ft.keys()
    assert all(torch.equal(a, b) for a, b in zip(loaded(ddp).values(), loaded(plain).values(), strict=True))


def test_a_bin_repo_id_resolves_from_the_cache(bin_pair, tmp_path):
    from test_adapters import hub_cache

    base_dir, ft_file, _, _ = bin_pair
    cache = tmp_path / "hub"
    hub_cache(cache, "tiny-org/bin-base", base_dir)
    by_path, by_id = tmp_path / "by-path", tmp_path / "by-id"
    assert run_here("merge", base_dir, ft_file, by_path, "-q").returncode == 0
    proc = run(
        "merge", "tiny-org/bin-base", ft_file, by_id, "-q", env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    )
    assert proc.returncode == 0, proc.stderr
    assert (by_id / "model.safetensors").read_bytes() == (by_path / "model.safetensors").read_bytes()


def open_clip_style(seed: int, width: int = 32) -> dict[str, torch.Tensor]:
    """The names and kinds of the paper's open_clip fine-tunes (model.visual..., a conv stem, a fused in_proj,
    a 0-d logit scale, a classification head), in float32, small."""
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "model.visual.conv1.weight": (width, 3, 4, 4),
        "model.visual.class_embedding": (width,),
        "model.visual.transformer.resblocks.0.attn.in_proj_weight": (3 * width, width),
        "model.visual.transformer.resblocks.0.attn.in_proj_bias": (3 * width,),
        "model.visual.transformer.resblocks.0.attn.out_proj.weight": (width, width),
        "model.visual.transformer.resblocks.0.mlp.c_fc.weight": (4 * width, width),
        "model.visual.proj": (width, 16),
        "classification_head.weight": (10, 16),
        "model.logit_scale": (),
    }
    return {n: torch.randn(s, generator=g) for n, s in shapes.items()}


def test_open_clip_style_state_dicts_are_merged_exactly(tmp_path):
    base = open_clip_style(0)
    g = torch.Generator().manual_seed(5)
    ft = {n: t + 0.05 * torch.randn(t.shape, generator=g) for n, t in base.items()}
    torch.save(base, tmp_path / "zeroshot.pt")
    torch.save({"state_dict": ft, "epoch": 10}, tmp_path / "finetuned.pt")
    out = tmp_path / "out"
    proc = run_here("merge", tmp_path / "zeroshot.pt", tmp_path / "finetuned.pt", out, "-q")
    assert proc.returncode == 0, proc.stderr
    assert_exact(base, ft, out)
    rows = {r["name"]: r for r in json.loads((out / REPORT).read_text())["tensors"]}
    assert rows["model.visual.conv1.weight"]["action"] == "edit" and rows["model.logit_scale"]["action"] == "copy"


@pytest.mark.parametrize("target", ["../outside.bin", "/etc/passwd", "sub/x.bin"])
def test_an_index_may_name_only_files_of_its_own_folder(bin_pair, tmp_path, target):
    base_dir, ft_file, _, _ = bin_pair
    folder = tmp_path / "ft"
    folder.mkdir()
    (tmp_path / "outside.bin").write_bytes(ft_file.read_bytes())
    (folder / "sub").mkdir()
    (folder / "sub" / "x.bin").write_bytes(ft_file.read_bytes())
    names = list(torch.load(ft_file, weights_only=True))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(names, target)}))
    proc = run_here("merge", base_dir, folder, tmp_path / "out")
    assert_one_line_error(proc, 2, "pytorch_model.bin.index.json", repr(target), "not a file of")


class _StorageId:
    def __init__(self, key: str, numel: int, kind: type = torch.FloatStorage) -> None:
        self.key, self.numel, self.kind = key, numel, kind


class _TensorOf:
    """Pickles as torch.save pickles a tensor: _rebuild_tensor_v2 over a persistent storage id."""

    def __init__(self, storage: _StorageId, shape: tuple[int, ...]) -> None:
        self.storage, self.shape = storage, shape

    def __reduce__(self):
        stride = tuple(int(np.prod(self.shape[i + 1 :])) for i in range(len(self.shape)))
        return torch._utils._rebuild_tensor_v2, (self.storage, 0, self.shape, stride, False, collections.OrderedDict())


class _TorchPickler(__import__("pickle").Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageId):
            return ("storage", obj.kind, obj.key, "cpu", obj.numel)
        return None


def crafted_bin(
    path: Path, tensors: dict[str, _TensorOf], storages: dict[str, bytes], pickle_bytes: bytes = b""
) -> Path:
    """A torch.save zip written by hand: the pickle says what the test wants, the storages hold what they hold."""
    import io
    import zipfile

    buf = io.BytesIO()
    _TorchPickler(buf, protocol=2).dump(collections.OrderedDict(tensors))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickle_bytes or buf.getvalue())
        for key, data in storages.items():
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/version", "3\n")
    return path


def test_a_storage_larger_than_its_zip_entry_is_refused(tmp_path):
    """The pickle's storage sizes are claims: a storage that runs past its zip entry would read the next entry's
    header and another tensor's bytes (torch.load refuses the file), past the end of the file an internal error."""
    a, b = torch.arange(16, dtype=torch.float32), torch.arange(16, 32, dtype=torch.float32)
    save_file({"a": torch.ones(8, 5), "b": torch.ones(4, 4)}, tmp_path / "base.safetensors")
    data = {"0": a.numpy().tobytes(), "1": b.numpy().tobytes()}
    t = lambda key, numel, shape: _TensorOf(_StorageId(key, numel), shape)  # noqa: E731
    cases = {
        "into the next entry": {"a": t("0", 40, (8, 5)), "b": t("1", 16, (4, 4))},
        "past the end": {"a": t("0", 16, (4, 4)), "b": t("1", 4096, (64, 64))},
    }
    for case, tensors in cases.items():
        ft = crafted_bin(tmp_path / f"{case.replace(' ', '-')}.bin", tensors, data)
        with pytest.raises(RuntimeError):  # the control: torch itself refuses it
            torch.load(ft, weights_only=True)
        for command in ("plan", "merge"):
            extra = [tmp_path / "out"] if command == "merge" else []
            proc = run_here(command, tmp_path / "base.safetensors", ft, *extra)
            assert_one_line_error(proc, 2, ft.name, "storage", "corrupt")
        assert not (tmp_path / "out").exists()


def test_a_zip_entry_pointing_at_another_entrys_bytes_is_refused(tmp_path):
    """The zip's central directory says where each storage's local header is: one crafted to point at another
    entry (same size) would read that entry's bytes as this tensor's, with exit 0, as torch.load does. The local
    header names its entry (zipfile checks it), and no two storages may share bytes."""
    import struct as st

    a, b = torch.arange(16, dtype=torch.float32), torch.arange(16, 32, dtype=torch.float32)
    save_file({"a": torch.ones(4, 4), "b": torch.ones(4, 4)}, tmp_path / "base.safetensors")
    t = lambda key: _TensorOf(_StorageId(key, 16), (4, 4))  # noqa: E731
    ft = crafted_bin(
        tmp_path / "ft.bin", {"a": t("0"), "b": t("1")}, {"0": a.numpy().tobytes(), "1": b.numpy().tobytes()}
    )
    raw = bytearray(ft.read_bytes())
    central = {}  # entry name -> offset of its central directory record
    at = raw.find(b"PK\x01\x02")
    while at >= 0:
        name_len = st.unpack("<H", raw[at + 28 : at + 30])[0]
        central[bytes(raw[at + 46 : at + 46 + name_len]).decode()] = at
        at = raw.find(b"PK\x01\x02", at + 46)
    first = raw[central["archive/data/0"] + 42 : central["archive/data/0"] + 46]
    raw[central["archive/data/1"] + 42 : central["archive/data/1"] + 46] = first  # data/1's header := data/0's
    ft.write_bytes(bytes(raw))
    import zipfile

    with pytest.raises(zipfile.BadZipFile, match="differ"):  # the control: the zip format's own reader refuses it
        zipfile.ZipFile(ft).read("archive/data/1")
    assert torch.equal(torch.load(ft, weights_only=True)["b"], a.reshape(4, 4))  # torch reads a's bytes as b
    for command in ("plan", "merge"):
        extra = [tmp_path / "out"] if command == "merge" else []
        assert_one_line_error(run_here(command, tmp_path / "base.safetensors", ft, *extra), 2, "ft.bin", "corrupt")
    assert not (tmp_path / "out").exists()


def test_a_pickle_cannot_change_how_later_files_are_read(tmp_path):
    """A BUILD on torch.HalfStorage in one file must not make the reader take fp16 storages as bf16 afterwards."""
    # GLOBAL torch.HalfStorage, BUILD {"dtype": "BF16"} on it, POP; the result: {"a": 1}
    evil = b"\x80\x02ctorch\nHalfStorage\n}X\x05\x00\x00\x00dtypeX\x04\x00\x00\x00BF16sb0}X\x01\x00\x00\x00aK\x01s."
    crafted = crafted_bin(tmp_path / "evil.bin", {}, {}, pickle_bytes=evil)
    assert_one_line_error(run_here("plan", crafted, crafted), 2, "evil.bin")
    half = torch.linspace(-2, 2, 64, dtype=torch.float16).reshape(8, 8)
    torch.save({"w": half}, tmp_path / "half.bin")
    ckpt = open_checkpoint(tmp_path / "half.bin", "FINETUNED")
    assert ckpt["w"].dtype == "F16" and torch.equal(read_tensor(ckpt["w"]), half)


def test_a_tensor_named_like_safetensors_metadata_is_refused(tmp_path):
    """`__metadata__` is the one name a safetensors header reserves: an OUT holding it would not load."""
    torch.save({"__metadata__": torch.ones(4, 4), "w": torch.ones(4, 4)}, tmp_path / "base.bin")
    torch.save({"__metadata__": torch.ones(4, 4) * 2, "w": torch.ones(4, 4) * 1.01}, tmp_path / "ft.bin")
    proc = run_here("merge", tmp_path / "base.bin", tmp_path / "ft.bin", tmp_path / "out")
    assert_one_line_error(proc, 2, "__metadata__", "rename")
    assert not (tmp_path / "out").exists()


def test_an_expanded_view_is_refused_not_budgeted(bin_pair, tmp_path):
    """A tensor of 2^40 elements over a storage of one (torch.save keeps an expanded view as it is: a small file)
    is refused as a view, at plan time, instead of asking for 32 TiB of --max-ram."""
    base_dir, _, _, ft = bin_pair
    name = next(n for n, t in ft.items() if t.dim() == 2)
    views = {**ft, name: torch.zeros(1, dtype=ft[name].dtype).expand(2**20, 2**20)}
    torch.save(views, tmp_path / "expanded.pt")
    assert (tmp_path / "expanded.pt").stat().st_size < sum(t.nbytes for t in ft.values()) + 10_000
    plan = run_here("plan", base_dir, tmp_path / "expanded.pt")
    merge = run_here("merge", base_dir, tmp_path / "expanded.pt", tmp_path / "out")
    for proc in (plan, merge):
        assert_one_line_error(proc, 2, repr(name), "expanded or overlapping view", "corrupt or crafted")
    assert not (tmp_path / "out").exists()


def _dag(levels: int) -> bytes:
    """(t, t) of (t, t) ... `levels` deep on the stack: one leaf, shared, 2^levels paths to walk."""
    ops = [b"K\x00\x85q\x00"]  # (0,) memoized as 0
    ops += [bytes([0x68, i, 0x68, i, 0x86, 0x71, i + 1]) for i in range(levels)]  # BINGET i twice, TUPLE2, BINPUT
    return b"".join(ops)


def _dag_key(levels: int) -> bytes:
    """A dict whose key is the DAG: 2^levels paths to hash."""
    return b"\x80\x02}" + _dag(levels) + b"K\x01s."  # PROTO 2, EMPTY_DICT, the key, 1, SETITEM, STOP


def _dag_persistent_id(levels: int) -> bytes:
    """The same shared tuples as a persistent id: repr'd into an error message, it grew to gigabytes."""
    return b"\x80\x02}X\x01\x00\x00\x00w" + _dag(levels) + b"Qs."  # {"w": BINPERSID of the DAG}


def _nested_key(depth: int) -> bytes:
    return b"\x80\x02}K\x00" + b"\x85" * depth + b"K\x01s."  # ((((0,),),),...) as a key


def _int_as_storage() -> bytes:
    rebuild = b"ctorch._utils\n_rebuild_tensor_v2\n"
    return b"\x80\x02}X\x01\x00\x00\x00w" + rebuild + b"(K\x05K\x00K\x02\x85K\x01\x85tRs."


CRAFTED_PICKLES = {
    "a key 64 levels of shared tuples (2^64 to hash)": (_dag_key(64), zipfile.ZIP_STORED, "shared parts counted"),
    "a persistent id 64 levels of shared tuples": (_dag_persistent_id(64), zipfile.ZIP_STORED, "shared parts"),
    "a key of a million nested tuples": (_nested_key(1_000_000), zipfile.ZIP_STORED, "nested deeper than 64"),
    "a tensor rebuilt from an int": (_int_as_storage(), zipfile.ZIP_STORED, "rebuilt from a int, not a storage"),
    "a compressed pickle": (_nested_key(10), zipfile.ZIP_DEFLATED, "compressed"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED_PICKLES))
def test_a_crafted_pickle_is_one_line_in_seconds(bin_pair, tmp_path, case):
    """Pickles of a few hundred bytes that hashed for ever, crashed the interpreter or met a type they did not
    expect: refused by name, before anything is unpickled."""
    data, compression, words = CRAFTED_PICKLES[case]
    crafted = tmp_path / "crafted.pt"
    with zipfile.ZipFile(crafted, "w", compression) as archive:
        archive.writestr("archive/data.pkl", data)
    t0 = time.monotonic()
    proc = run_here("plan", bin_pair[0], crafted)
    assert_one_line_error(proc, 2, str(crafted), words)
    assert time.monotonic() - t0 < 10


def _frame(body: bytes) -> bytes:
    return b"\x80\x02}X\x01\x00\x00\x00w" + body + b"s."  # {"w": <body>}


def _text(s: str) -> bytes:
    return b"X" + len(s).to_bytes(4, "little") + s.encode()


MORE_CRAFTED = {
    "a BUILD that rewrites a storage after it was checked": (
        _frame(
            b"("
            + _text("storage")
            + b"ctorch\nFloatStorage\n"
            + _text("0")
            + _text("cpu")
            + b"K\x04tQ}"
            + _text("key")
            + _text("x")
            + b"sb"
        ),
        "a BUILD on a storage",
    ),
    "keys that share one hash": (
        b"\x80\x02}("
        + b"".join(b"\x8a\x09" + (k * (2**61 - 1)).to_bytes(9, "little") + b"K\x01" for k in range(1, 4))
        + b"u.",
        "61 bits or more",
    ),
    "a memo index far out of sequence (the unpickler sizes its memo by it)": (
        b"\x80\x02Nr\x00\x00\x00\x040}.",
        "out of sequence",
    ),
    "bytes encoded with a quadratic codec": (
        _frame(b"c_codecs\nencode\n" + _text("abc") + _text("punycode") + b"\x86R"),
        "encoded otherwise",
    ),
    "an OrderedDict made from items (lists that can grow after the check)": (
        _frame(b"ccollections\nOrderedDict\n]](" + _text("a") + b"K\x01ea\x85R"),
        "OrderedDict made from items",
    ),
}


@pytest.mark.parametrize("case", sorted(MORE_CRAFTED))
def test_a_crafted_pickle_of_the_second_review_is_one_line(bin_pair, tmp_path, case):
    data, words = MORE_CRAFTED[case]
    crafted = tmp_path / "crafted.pt"
    with zipfile.ZipFile(crafted, "w") as archive:
        archive.writestr("archive/data.pkl", data)
        archive.writestr("archive/data/0", b"\0" * 16)
    assert_one_line_error(run_here("plan", bin_pair[0], crafted), 2, str(crafted), words)
