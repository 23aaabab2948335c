"""Killed any way, at any moment, any number of times: the rerun gives the same bytes."""

from __future__ import annotations

import os
import random
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import assert_one_line_error, report_rows, run, start, tree_digest

from streamsoup.io.runlock import RunLock
from streamsoup.io.state import STATE_NAME, RunState


def committed_names(partial: Path) -> set[str]:
    """Tensors committed so far (none when a kill came before the state was made)."""
    if not (partial / STATE_NAME).exists():
        return set()
    return {m.row["name"] for m in RunState.read(partial / STATE_NAME).committed().values()}


@pytest.mark.parametrize(
    "point", ["commit:1", "commit:7", "commit:19", "publish.before-rename", "publish.after-rename"]
)
def test_kill_at_named_points_then_resume(reference, tmp_path, point):
    base, ft, _, digest = reference
    out = tmp_path / "out"
    killed = run("merge", base, ft, out, "--shard-size", "100KB", "-q", env={"STREAMSOUP_FAULT": point})
    assert killed.returncode == -signal.SIGKILL
    if point != "publish.after-rename":
        assert not out.exists(), "OUT must not exist before the merge is complete"
        before = committed_names(tmp_path / "out.partial")
    proc = run("merge", base, ft, out, "--shard-size", "100KB", "-q")
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "out.partial").exists()
    assert tree_digest(out) == digest
    assert not (out / STATE_NAME).exists() and not (out / ".streamsoup.lock").exists()
    if point.startswith("commit"):
        rows = report_rows(out)
        redone = {n for n, r in rows.items() if r["attempt"] == 2}
        assert redone == set(rows) - before, "committed work was recomputed"
        assert all(rows[n]["attempt"] == 1 for n in before)
        assert len(before) == int(point.split(":")[1]) - 1  # everything that finished before the kill


def _wait_for_commits(partial: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if len(committed_names(partial)) >= n:
                return
        except Exception:
            pass
        time.sleep(0.05)


@pytest.mark.slow
def test_sigkill_at_random_moments(medium_pair, medium_reference, tmp_path):
    """SIGKILL the process tree at random instants, several times, then finish: same bytes."""
    base, ft = medium_pair
    root = tmp_path
    out = root / "out"
    rng = random.Random(1234)
    kills = 0
    for _ in range(3):
        proc = start("merge", base, ft, out, "-q")
        time.sleep(rng.uniform(2.0, 4.0))  # past start-up, into the tensors
        if proc.poll() is not None:
            break
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
        if out.exists():  # killed after the publish rename, while exiting: OUT is whole, the rerun tidies up
            assert run("verify", out, "-q").returncode == 0
            break
    assert kills >= 1
    published = out.exists()
    before = set() if published else committed_names(root / "out.partial")
    proc = run("merge", base, ft, out, "-q")
    assert proc.returncode == 0, proc.stderr
    assert tree_digest(out) == medium_reference
    assert not (out / STATE_NAME).exists() and not (root / "out.partial").exists()
    if published:  # the last kill came after the publish: nothing was recomputed by the rerun
        return
    rows = report_rows(out)
    final = max(r["attempt"] for r in rows.values())  # a kill during start-up never reached the state
    assert all(rows[n]["attempt"] < final for n in before)
    assert {n for n, r in rows.items() if r["attempt"] == final} == set(rows) - before


def test_torn_write_is_detected_and_recomputed(reference, tmp_path):
    base, ft, _, digest = reference
    out = tmp_path / "out"
    run("merge", base, ft, out, "--shard-size", "100KB", "-q", env={"STREAMSOUP_FAULT": "commit:12"})
    partial = tmp_path / "out.partial"
    state = RunState.read(partial / STATE_NAME)
    victim = next(m for m in state.committed().values() if m.row["action"] == "edit")
    from streamsoup.io.checkpoint import Checkpoint

    ref = Checkpoint.from_path(partial)[victim.row["name"]]
    with open(ref.path, "r+b") as f:  # marker present, bytes corrupted
        f.seek(ref.offset + ref.nbytes // 2)
        f.write(b"\xff\xfe\xfd\xfc")
    proc = run("merge", base, ft, out, "--shard-size", "100KB", "-q")
    assert proc.returncode == 0, proc.stderr
    assert tree_digest(out) == digest
    assert report_rows(out)[victim.row["name"]]["attempt"] == 2


def test_changed_options_are_refused_then_fresh(reference, tmp_path):
    base, ft, _, digest = reference
    out = tmp_path / "out"
    run("merge", base, ft, out, "--shard-size", "100KB", "-q", env={"STREAMSOUP_FAULT": "commit:5"})
    proc = run("merge", base, ft, out, "--shard-size", "100KB", "--energy", "0.5", "--rank-rule", "energy")
    assert_one_line_error(proc, 2, "--rank-rule entropy -> energy", "--energy 0.8 -> 0.5", "--fresh")
    proc = run("merge", base, ft, out, "--shard-size", "200KB")
    assert_one_line_error(proc, 2, "--shard-size 100000 -> 200000")
    assert run("merge", base, ft, out, "--shard-size", "100KB", "-q", "--fresh").returncode == 0
    assert tree_digest(out) == digest


def test_changed_input_is_refused(awkward_pair, tmp_path):
    base, ft = awkward_pair
    ft2 = tmp_path / "ft"
    shutil.copytree(ft, ft2)
    run("merge", base, ft2, tmp_path / "out", "-q", env={"STREAMSOUP_FAULT": "commit:3"})
    shard = sorted(ft2.glob("*.safetensors"))[0]
    from streamsoup.io.checkpoint import read_header

    ref = read_header(shard).tensors[0]
    with open(shard, "r+b") as f:  # same header, same size, other values
        f.seek(ref.offset + ref.nbytes // 2)
        f.write(b"\x5a\xa5")
    proc = run("merge", base, ft2, tmp_path / "out")
    assert_one_line_error(proc, 2, f"FINETUNED shard {shard.name} changed")


def test_second_merge_on_same_out_is_refused(awkward_pair, tmp_path):
    base, ft = awkward_pair
    lock = RunLock(tmp_path / "out.partial").acquire()
    try:
        proc = run("merge", base, ft, tmp_path / "out")
        assert_one_line_error(proc, 2, "another streamsoup merge", f"pid {os.getpid()}")
        assert "max-ram" not in proc.stderr, "refused before its budget, calibration and start line"
        status = run("status", tmp_path / "out")
        assert (
            status.returncode == 0 and status.stdout.startswith("running (") and f"pid {os.getpid()}" in status.stdout
        ), status
    finally:
        lock.release()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signals_stop_cleanly_and_resume(medium_pair, tmp_path, sig):
    base, ft = medium_pair
    root = tmp_path
    out = root / "out"
    proc = start("merge", base, ft, out, "-q")
    _wait_for_commits(root / "out.partial", 3, proc)
    t0 = time.time()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert time.time() - t0 < 20
    assert "interrupted — rerun the same command to resume" in err and "Traceback" not in err
    assert not out.exists()
    status = run("status", out)
    assert status.returncode == 0 and "interrupted" in status.stdout and "remaining" in status.stdout
    if sig == signal.SIGINT:  # the state either signal leaves is the same: one resume shows it is whole
        assert run("merge", base, ft, out, "-q").returncode == 0
        assert run("verify", out, "-q").returncode == 0


def test_sigterm_before_a_merge_guards_its_commits_is_an_interrupt_too(awkward_pair, tmp_path):
    """SIGTERM while a command plans or calibrates (no merge guard yet) stops it as Ctrl-C does: one line,
    exit 130; not the default action's silent death by signal 15."""
    proc = start("plan", *awkward_pair, "--devices", "cpu", env={"STREAMSOUP_CACHE_DIR": str(tmp_path / "cache")})
    time.sleep(1.0)  # plan calibrates this machine for seconds (an empty cache: it measures)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (proc.returncode, err)
    assert err.strip().splitlines() == ["streamsoup: interrupted — rerun the same command to resume"], err
    assert out == ""


def test_status_and_verify(reference, tmp_path):
    base, ft, _, _ = reference
    out = tmp_path / "out"
    run("merge", base, ft, out, "--shard-size", "100KB", "-q", env={"STREAMSOUP_FAULT": "commit:9"})
    st = run("status", out, "--json")
    assert st.returncode == 0
    import json

    data = json.loads(st.stdout)
    assert data["state"] == "interrupted" and data["tensors_done"] == 8 and data["tensors_total"] == 28
    assert len(data["remaining"]) == 20 and data["attempts"] == 1
    assert run("merge", base, ft, out, "--shard-size", "100KB", "-q").returncode == 0
    assert "complete: 28 tensors" in run("status", out).stdout
    ok = run("verify", out, "-q")
    assert ok.returncode == 0 and "all checksums match" in ok.stdout
    shard = sorted(out.glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    bad = run("verify", out, "-q")
    assert bad.returncode == 1 and "MISMATCH" in bad.stdout and "checksum mismatch" in bad.stdout
    # the one line says how to repair, as a command that does: move OUT aside, merge again with its options
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr, bad.stderr
    move, merge = bad.stderr.strip().split("write it again: ", 1)[1].split(" && ")
    assert shlex.split(move) == ["mv", str(out), f"{out}.damaged"], move
    os.rename(*shlex.split(move)[1:])
    words = shlex.split(merge)
    assert words[:2] == ["streamsoup", "merge"] and "--shard-size" in words, merge
    assert run(*words[1:], "-q").returncode == 0
    assert run("verify", out, "-q").returncode == 0 and tree_digest(out) == reference[3]
    assert_one_line_error(run("status", tmp_path / "nothing"), 2, "no merge at")


def test_external_work_dir(reference, tmp_path):
    base, ft, _, digest = reference
    out, work = tmp_path / "out", tmp_path / "state"
    args = ("merge", base, ft, out, "--shard-size", "100KB", "-q", "--work-dir", work)
    run(*args, env={"STREAMSOUP_FAULT": "commit:4"})
    assert (work / "zarr.json").exists()
    assert "3/28 tensors" in run("status", out).stdout
    assert run(*args).returncode == 0
    assert tree_digest(out) == digest and not work.exists()


@pytest.fixture(scope="module")
def many_tensors(tmp_path_factory) -> tuple[Path, Path]:
    """1,200 small matrices: committed in batches (one Zarr write for many), the case of 100,000-tensor models."""
    import torch
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("many")
    g = torch.Generator().manual_seed(11)
    base = {f"layers.{i}.weight": torch.randn(8, 6, generator=g) for i in range(1200)}
    ft = {k: v + 0.05 * torch.randn(8, 6, generator=g) for k, v in base.items()}
    for side, tensors in (("base", base), ("ft", ft)):
        (root / side).mkdir()
        save_file(tensors, root / side / "model.safetensors")
    return root / "base", root / "ft"


@pytest.mark.slow
def test_batched_commits_resume_exactly_and_a_damaged_batch_is_redone(many_tensors, tmp_path):
    from streamsoup.io.state import BATCHES, STATE_NAME

    base, ft = many_tensors
    whole = tmp_path / "whole"
    # two lanes, the default here: the redone batch's spectra and bytes are the uninterrupted run's, to the bit
    assert run("merge", base, ft, whole, "-q", "--lanes", "2").returncode == 0
    out = tmp_path / "out"
    killed = run("merge", base, ft, out, "-q", "--lanes", "2", env={"STREAMSOUP_FAULT": "commit:700"})
    assert killed.returncode == -signal.SIGKILL
    assert "699/1200 tensors" in run("status", out).stdout  # every commit before the kill holds
    batches = sorted((out.with_name("out.partial") / STATE_NAME / BATCHES).iterdir())
    assert len(batches) >= 2, "small tensors are committed in batches"
    chunk = next(p for p in batches[0].rglob("c/*") if p.is_file())
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped byte in a batch's singular values
    chunk.write_bytes(bytes(data))
    proc = run("merge", base, ft, out, "--lanes", "2")
    assert proc.returncode == 0, proc.stderr
    assert "did not verify" in proc.stderr and "batches/" in proc.stderr
    assert tree_digest(out) == tree_digest(whole)
