"""Every bad input: one line naming the culprit, non-zero exit, no OUT, inputs untouched."""

from __future__ import annotations

import json
import math
import subprocess
import time
from pathlib import Path

import pytest
from helpers import assert_one_line_error, poison, run, small_disk, tree_digest


def corrupt_header(base: Path, ft: Path) -> str:
    shard = sorted(ft.glob("*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[8:12] = b"!!!!"
    shard.write_bytes(bytes(data))
    return shard.name


def truncate_file(base: Path, ft: Path) -> str:
    shard = sorted(base.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    return shard.name


def index_missing_shard(base: Path, ft: Path) -> str:
    index = json.loads((ft / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = "model-00009-of-00009.safetensors"
    (ft / "model.safetensors.index.json").write_text(json.dumps(index))
    return "model-00009-of-00009.safetensors"


def index_missing_tensor(base: Path, ft: Path) -> str:
    index = json.loads((ft / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"].values()))
    index["weight_map"]["model.ghost.weight"] = first
    (ft / "model.safetensors.index.json").write_text(json.dumps(index))
    return "model.ghost.weight"


def duplicate_names(base: Path, ft: Path) -> str:
    import torch
    from safetensors.torch import save_file

    save_file({"model.norm.weight": torch.ones(4)}, base / "zz-extra.safetensors")
    return "model.norm.weight"


def unreadable_file(base: Path, ft: Path) -> str:
    (ft / "model-00002-of-00004.safetensors").unlink()
    (ft / "model-00002-of-00004.safetensors").symlink_to(ft / "gone.safetensors")
    return "model-00002-of-00004.safetensors"


def nan_in_edited(base: Path, ft: Path) -> str:
    poison(ft, "model.layers.1.mlp.gate_proj.weight", math.nan)
    return "model.layers.1.mlp.gate_proj.weight"


def inf_in_base(base: Path, ft: Path) -> str:
    poison(base, "model.layers.1.self_attn.o_proj.weight", math.inf)
    return "model.layers.1.self_attn.o_proj.weight"


def config_nested_deep(base: Path, ft: Path) -> str:
    (ft / "config.json").write_text("[" * 100_000 + "]" * 100_000)  # 200 KB: a RecursionError at the card, once
    return "config.json"


def config_of_megabytes(base: Path, ft: Path) -> str:
    (ft / "config.json").write_text(json.dumps({"model_type": "llama", "pad": "x" * (5 << 20)}))
    return "config.json"


def config_a_fifo(base: Path, ft: Path) -> str:
    import os

    (ft / "config.json").unlink()
    os.mkfifo(ft / "config.json")  # a read would wait for a writer for ever
    return "config.json"


def index_nested_deep(base: Path, ft: Path) -> str:
    (ft / "model.safetensors.index.json").write_text('{"weight_map": ' + "[" * 50_000 + "]" * 50_000 + "}")
    return "model.safetensors.index.json"


def weight_beside_its_mxfp4_encoding(base: Path, ft: Path) -> str:
    import torch
    from safetensors.torch import save_file

    save_file(
        {
            "model.layers.0.mlp.down_proj.weight_blocks": torch.zeros(1, 4, 2, 16, dtype=torch.uint8),
            "model.layers.0.mlp.down_proj.weight_scales": torch.full((1, 4, 2), 127, dtype=torch.uint8),
        },
        base / "zz-extra.safetensors",
    )
    return "'model.layers.0.mlp.down_proj.weight_blocks'"


CASES = {
    "corrupt header": (corrupt_header, 2),
    "truncated file": (truncate_file, 2),
    "index names a missing shard": (index_missing_shard, 2),
    "index names a missing tensor": (index_missing_tensor, 2),
    "duplicate tensor names": (duplicate_names, 2),
    "unreadable file": (unreadable_file, 2),
    "NaN in an edited tensor": (nan_in_edited, 1),  # found as it is read: once OUT.partial holds work
    "Inf in the base": (inf_in_base, 1),
    "config.json nested 100,000 deep": (config_nested_deep, 2),
    "config.json of 5 MiB": (config_of_megabytes, 2),
    "config.json that is a FIFO": (config_a_fifo, 2),
    "index nested 50,000 deep": (index_nested_deep, 2),
    "a weight beside its own MXFP4 encoding": (weight_beside_its_mxfp4_encoding, 2),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(pair, tmp_path, case):
    damage, code = CASES[case]
    base, ft = pair
    culprit = damage(base, ft)
    before = tree_digest(base), tree_digest(ft)
    proc = run("merge", base, ft, tmp_path / "out")
    assert_one_line_error(proc, code, culprit)
    assert not (tmp_path / "out").exists()
    # the one rule: exit 2 refuses before any work and leaves nothing; exit 1 keeps the work, and says so
    assert (tmp_path / "out.partial").exists() == (code == 1)
    assert (code == 1) == ("the work done so far is kept" in proc.stderr)
    assert (tree_digest(base), tree_digest(ft)) == before


def test_missing_empty_existing_and_nested_out(pair, tmp_path):
    base, ft = pair
    before = tree_digest(base), tree_digest(ft)
    assert_one_line_error(run("merge", tmp_path / "nope", ft, tmp_path / "o"), 2, "nope", "does not exist")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run("merge", base, tmp_path / "empty", tmp_path / "o"), 2, "empty", "no *.safetensors")
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "streamsoup_report.json").write_text("{}")
    assert_one_line_error(run("merge", base, ft, tmp_path / "done"), 2, "already exists")
    assert_one_line_error(run("merge", base, ft, base / "sub" / "out"), 2, "inside BASE")
    assert not (tmp_path / "o").exists() and not (base / "sub").exists()
    assert (tree_digest(base), tree_digest(ft)) == before


def test_disk_too_small_is_refused_up_front(awkward_pair, tmp_path):
    """OUT on a tmpfs too small for it: refused in seconds, before anything is written; a roomier disk works."""
    base, ft = awkward_pair
    with small_disk(tmp_path / "disk", "120k") as disk:
        out = disk / "out"
        t0 = time.time()
        proc = run("merge", base, ft, out, "--shard-size", "100KB")
        assert time.time() - t0 < 10
        assert_one_line_error(proc, 2, "not enough disk space", "KiB free", str(disk))
        assert list(disk.iterdir()) == [], "nothing may be left behind"
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        proc = run("merge", base, ft, out, "--shard-size", "100KB", "-q")
        assert proc.returncode == 0, proc.stderr
        assert run("verify", out, "-q").returncode == 0
        ref = tmp_path / "ref"
        assert run("merge", base, ft, ref, "--shard-size", "100KB", "-q").returncode == 0
        assert tree_digest(out) == tree_digest(ref)


def test_a_small_state_disk_with_room_enough_is_not_refused(awkward_pair, tmp_path):
    """--work-dir on a 1 MiB filesystem: the state needs ~250 KiB there (blocks of its small files included), so the
    merge runs; at 200 KiB it is refused with what it needs, counted the same way."""
    base, ft = awkward_pair
    with small_disk(tmp_path / "disk", "1m") as disk:
        proc = run("merge", base, ft, tmp_path / "out", "--work-dir", disk / "state", "-q")
        assert proc.returncode == 0, proc.stderr
        assert list(disk.iterdir()) == [], "the state is removed on success"
        subprocess.run(["mount", "-o", "remount,size=200k", str(disk)], check=True)
        proc = run("merge", base, ft, tmp_path / "out2", "--work-dir", disk / "state")
        assert_one_line_error(proc, 2, "not enough disk space", "small files or folders", "200.00 KiB free")


def test_disk_filled_after_a_kill_keeps_state_then_resumes(awkward_pair, tmp_path):
    """A run is killed, another process then takes the whole disk: the rerun is refused up front (the shards'
    space is already reserved, the state and report still need room), the state is kept; free the space and
    rerun: it resumes, identical output."""
    base, ft = awkward_pair
    with small_disk(tmp_path / "disk", "24m") as disk:
        out = disk / "out"
        killed = run("merge", base, ft, out, "--shard-size", "100KB", "-q", env={"STREAMSOUP_FAULT": "commit:6"})
        assert killed.returncode == -9
        filler = disk / "filler"
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=4k"], capture_output=True)  # until ENOSPC
        before = tree_digest(disk / "out.partial")
        proc = run("merge", base, ft, out, "--shard-size", "100KB")
        assert_one_line_error(proc, 2, "not enough disk space")
        assert not out.exists() and tree_digest(disk / "out.partial") == before
        filler.unlink()
        proc = run("merge", base, ft, out, "--shard-size", "100KB")
        assert proc.returncode == 0, proc.stderr
        assert "resuming: 5/28 tensors already done" in proc.stderr
        ref = tmp_path / "ref"
        assert run("merge", base, ft, ref, "--shard-size", "100KB", "-q").returncode == 0
        assert tree_digest(out) == tree_digest(ref)


REPORT_DAMAGE = {
    "truncated": lambda text: text[: len(text) // 2],
    "a list": lambda text: "[]",
    "no summary": lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "summary"}),
    "a row without its checksum": lambda text: json.dumps(
        {**json.loads(text), "tensors": [{"name": "x"}, *json.loads(text)["tensors"][1:]]}
    ),
    "a count that is text": lambda text: json.dumps(
        {**json.loads(text), "summary": {**json.loads(text)["summary"], "tensors": "many"}}
    ),
    "nested 100,000 deep": lambda text: "[" * 100_000 + "]" * 100_000,
    "a time of 400 digits": lambda text: text.replace('"seconds": ', '"seconds": 1' + "0" * 400 + ', "x": ', 1),
    "a shard record that is a number": lambda text: json.dumps({**json.loads(text), "shards": {"a.safetensors": 5}}),
}


@pytest.mark.parametrize("damage", sorted(REPORT_DAMAGE))
def test_a_damaged_report_is_one_line_for_every_command(reference, tmp_path, damage):
    """verify, status, report and a merge into that OUT again: exit 2, the report named, no traceback."""
    import shutil

    base, ft, done, _ = reference
    out = tmp_path / "out"
    shutil.copytree(done, out)
    report = out / "streamsoup_report.json"
    report.write_text(REPORT_DAMAGE[damage](report.read_text()))
    for command in (("verify", out), ("status", out), ("report", out)):
        assert_one_line_error(run(*command), 2, str(report), "damaged")
    again = run("merge", base, ft, out, "--shard-size", "100KB")
    assert_one_line_error(again, 2, str(out), "never overwrites")


def test_a_report_row_of_the_wrong_shape_is_one_line_for_report(reference, tmp_path):
    """`report` formats every row: a field it computes with, of the wrong type, names the damaged report."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(reference[2], out)
    report = out / "streamsoup_report.json"
    doc = json.loads(report.read_text())
    doc["tensors"][0]["shape"] = 7
    report.write_text(json.dumps(doc))
    assert_one_line_error(run("report", out), 2, str(report), "damaged", "wrong type")


def test_yaml_nested_deep_is_refused_in_a_config_and_ignored_in_a_card(pair, tmp_path):
    """An options file nested 10,000 deep, or with an int of 5,000 digits, is one line; a fine-tune's README whose
    front matter is (read at the very end, for the model card) is kept as text: the merge finishes."""
    import shutil

    base, ft = pair
    deep = tmp_path / "deep.yaml"
    deep.write_text("rank-rule: " + "[" * 10_000 + "]" * 10_000 + "\n")
    assert_one_line_error(run("merge", base, ft, tmp_path / "o", "--config", deep), 2, str(deep), "nests deeper")
    huge = tmp_path / "huge.yaml"
    huge.write_text("energy: 1" + "0" * 5000 + "\n")  # more digits than Python converts to an int
    assert_one_line_error(run("merge", base, ft, tmp_path / "o", "--config", huge), 2, str(huge), "not valid YAML")
    for front in ("license: " + "[" * 10_000 + "]" * 10_000, "license: 1" + "0" * 5000):
        (ft / "README.md").write_text("---\n" + front + "\n---\nmy model\n")
        proc = run("merge", base, ft, tmp_path / "out", "-q")
        assert proc.returncode == 0, proc.stderr
        assert "my model" in (tmp_path / "out" / "README.md").read_text()
        shutil.rmtree(tmp_path / "out")


def test_a_dashboard_without_a_host_is_refused(pair, tmp_path):
    """`--dashboard :0` would listen on every interface (dask's reading of an empty host)."""
    proc = run("merge", *pair, tmp_path / "out", "--dashboard", ":0")
    assert_one_line_error(proc, 2, "--dashboard", "a host is needed")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_a_path_that_is_not_utf8_is_merged_and_shown_escaped(awkward_pair, tmp_path):
    """A fine-tune folder whose name holds a byte that is not UTF-8 (Linux allows any): the merge finishes and the
    model card shows the byte as \\xff, instead of failing to write README.md after all the work."""
    import os
    import shutil

    ft = Path(os.fsdecode(bytes(tmp_path) + b"/ft\xff"))
    shutil.copytree(awkward_pair[1], ft)
    proc = run("merge", awkward_pair[0], ft, tmp_path / "out", "-q")
    assert proc.returncode == 0, proc.stderr
    assert "ft\\xff" in (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    assert run("verify", tmp_path / "out", "-q").returncode == 0


@pytest.mark.parametrize(
    ("where", "role", "url", "words"),
    [
        ("base", "BASE", "ftp://host/model", ("over s3://, gs://, az:// and http(s):// only, not ftp://",)),
        ("finetuned", "FINETUNED", "ftp://host/model", ("only, not ftp://", "copy it to a disk")),
        ("out", "OUT", "s3://bucket/model", ("is a URL", "not object storage", "upload OUT once it is complete")),
        ("work_dir", "--work-dir", "s3://bucket/model", ("is a URL", "upload OUT once it is complete")),
    ],
)
def test_a_url_for_a_path_is_refused_by_name(awkward_pair, tmp_path, where, role, url, words):
    """A URL where streamsoup writes (OUT, --work-dir), or of a store it cannot read inputs from: one line naming
    it, nothing made. Was: "BASE ./s3:/bucket/model does not exist", and an OUT URL made the folders `s3:/bucket`
    in the current folder. (BASE and FINETUNED in object storage: tests/test_object_store.py.)"""
    given = dict(zip(("base", "finetuned", "out"), (*map(str, awkward_pair), "o"), strict=True))
    base, ft, out = (url if where == w else p for w, p in given.items())
    extra = ["--work-dir", url] if where == "work_dir" else []
    proc = run("merge", base, ft, out, *extra, "-q", cwd=tmp_path)
    assert_one_line_error(proc, 2, f"{role} {url}", *words)
    assert list(tmp_path.iterdir()) == [], "nothing made in the current folder"
    if where in ("base", "finetuned"):
        assert_one_line_error(run("plan", base, ft, cwd=tmp_path), 2, f"{role} {url}")
        local = {"base": base, "finetuned": ft, where: "file://" + str(awkward_pair[where == "finetuned"])}
        assert run("plan", local["base"], local["finetuned"], cwd=tmp_path).returncode == 0, "file:// is a path"


def test_a_file_url_names_its_local_path_or_is_refused(awkward_pair, tmp_path):
    """`file:///abs/path` (any case) is that path; a host, query or fragment would name another file (`file://out/m`
    is /m on host "out", where OUT would have been written): refused in one line, nothing made."""
    base, ft = (f"FILE://{p}" for p in awkward_pair)
    assert run("plan", base, ft, cwd=tmp_path).returncode == 0
    for url in ("file://out/merged", f"file://{tmp_path}/o#1", f"file://{tmp_path}/o?x"):
        proc = run("merge", *awkward_pair, url, "-q", cwd=tmp_path)
        assert_one_line_error(proc, 2, f"OUT {url} is not a local file URL")
        assert list(tmp_path.iterdir()) == []
