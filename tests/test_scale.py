"""Budgets: tensors bigger than the budget are streamed in row blocks, exactly, resumably; device lanes."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from conftest import made_once
from helpers import assert_merged_exactly, report_rows, run, tree_digest

from streamsoup.io.state import STATE_NAME

BUDGET = "450MB"  # leaves ~100 MiB for tasks after streamsoup's own ~260 MiB and reserve


@pytest.fixture(scope="session")
def streamed_reference(big_pair, tmp_path_factory) -> tuple[Path, dict]:
    def merge(folder: Path) -> list:
        proc = run("merge", *big_pair, folder / "out", "--max-ram", BUDGET, "--devices", "cpu", "-q")
        assert proc.returncode == 0, proc.stderr
        return [str(folder / "out"), tree_digest(folder / "out")]

    out, digest = made_once(tmp_path_factory, "streamed-reference", merge)
    return Path(out), digest


@pytest.mark.slow
def test_streamed_tensors_are_exact(big_pair, big_expected, streamed_reference):
    out, _ = streamed_reference
    rows = report_rows(out)
    for name in ("tall.weight", "wide.weight", "conv.weight", "f32.weight", "model.embed_tokens.weight"):
        assert rows[name]["blocks"] > 1, f"{name} should have been streamed"
    assert (
        rows["model.embed_tokens.weight"]["action"] == "edit"
        and "17000 added rows kept" in rows["model.embed_tokens.weight"]["reason"]
    )
    assert rows["small.weight"]["blocks"] == 0
    assert_merged_exactly(*big_pair, out, expected=big_expected)


def test_streamed_equals_in_memory_bytes(big_pair, streamed_reference, tmp_path):
    """A roomy budget (all in memory) gives the very same bytes: the arithmetic never depends on the budget."""
    ref, digest = streamed_reference
    out = tmp_path / "roomy"
    assert run("merge", *big_pair, out, "--max-ram", "8GiB", "--devices", "cpu", "-q").returncode == 0
    assert all(r["blocks"] == 0 for r in report_rows(out).values())
    assert tree_digest(out)["model.safetensors"] == digest["model.safetensors"]


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["gram:2", "block:2", "block:4"])
def test_kill_mid_tensor_then_resume(big_pair, streamed_reference, tmp_path, phase):
    """SIGKILL inside a streamed tensor (Gram pass, or projection pass), rerun: it resumes mid-tensor."""
    ref, digest = streamed_reference
    out = tmp_path / "out"
    args = ("merge", *big_pair, out, "--max-ram", BUDGET, "--devices", "cpu", "--checkpoint-seconds", "0", "-q")
    killed = run(*args, env={"STREAMSOUP_FAULT": phase})
    assert killed.returncode == -signal.SIGKILL
    import zarr

    tensors = zarr.open_group(str(tmp_path / "out.partial" / STATE_NAME), mode="r")["tensors"]
    partial = [dict(g["partial"].attrs) for _, g in tensors.groups() if "partial" in g]
    want = "gram" if phase.startswith("gram") else "project"
    assert [p["phase"] for p in partial] == [want] and partial[0]["next_row"] >= 1
    # resume under another budget: other read blocks, same rows, same bytes
    proc = run(*[a if a != BUDGET else "560MB" for a in args])
    assert proc.returncode == 0, proc.stderr
    assert tree_digest(out) == digest


def _partial_group(tmp_path: Path):
    import zarr

    tensors = zarr.open_group(str(tmp_path / "out.partial" / STATE_NAME), mode="r")["tensors"]
    return next((key, g["partial"]) for key, g in tensors.groups() if "partial" in g)


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["gram:2", "block:3"])
def test_damaged_mid_tensor_progress_is_not_trusted(big_pair, streamed_reference, tmp_path, phase):
    """After a kill mid-tensor: a Gram chunk deleted, or a byte flipped in rows already written. The rerun
    notices (checksums recorded with the progress), redoes what it covered, and publishes the same bytes."""
    from streamsoup.io.checkpoint import Checkpoint

    ref, digest = streamed_reference
    out = tmp_path / "out"
    args = ("merge", *big_pair, out, "--max-ram", BUDGET, "--devices", "cpu", "--checkpoint-seconds", "0")
    assert run(*args, "-q", env={"STREAMSOUP_FAULT": phase}).returncode == -signal.SIGKILL
    key, partial = _partial_group(tmp_path)
    attrs = dict(partial.attrs)
    folder = tmp_path / "out.partial" / STATE_NAME / "tensors" / key / "partial"
    if phase.startswith("gram"):
        chunk = next(p for p in (folder / f"gram_{attrs['slot']}").rglob("*") if p.is_file() and p.name != "zarr.json")
        chunk.unlink()  # zarr would read it back as zeros
    else:
        name = list(Checkpoint.from_path(big_pair[1]))[int(key.split("-")[1])]  # keys follow the plan's order
        target = Checkpoint.from_path(tmp_path / "out.partial")[name]
        with open(target.path, "r+b") as f:  # the first row block was written before the kill
            f.seek(target.offset + 5)
            byte = f.read(1)
            f.seek(target.offset + 5)
            f.write(bytes([byte[0] ^ 0x40]))
    proc = run(*args)
    assert proc.returncode == 0, proc.stderr
    assert "damaged" in proc.stderr or "changed on disk" in proc.stderr, proc.stderr
    assert tree_digest(out) == digest


@pytest.mark.slow
def test_device_lanes_give_the_same_bytes(big_pair, streamed_reference, tmp_path):
    """Two simulated device lanes (the GPU code path, on the CPU) against CPU lanes of one thread: same bytes."""
    _, digest = streamed_reference
    out = tmp_path / "two"
    proc = run("merge", *big_pair, out, "--max-ram", BUDGET, "--devices", "cpu,cpu", "--threads", "1", "-q")
    assert proc.returncode == 0, proc.stderr
    assert tree_digest(out) == digest
    assert {r["device"] for r in report_rows(out).values() if r["action"] == "edit"} == {"cpu"}


def test_budget_too_small_is_refused(big_pair, tmp_path):
    proc = run("merge", *big_pair, tmp_path / "o", "--max-ram", "100MB")
    assert proc.returncode == 2 and "--max-ram" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o.partial").exists()


def test_unknown_device_is_refused(big_pair, tmp_path):
    for spec, needle in (("cuda:7", "no such GPU"), ("tpu", "not auto, cpu")):
        proc = run("merge", *big_pair, tmp_path / "o", "--devices", spec)
        assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
