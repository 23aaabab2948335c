"""Where users already are: re-queued jobs, batch logs, `~` in paths, a busy dask port."""

from __future__ import annotations

import os
import re
import socket
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
from helpers import CLI, PROGRESS, STAMP, assert_one_line_error, run, run_process, tree_digest

LINE = re.compile(STAMP + r"merging: (\d+)/(\d+) tensors, [\d.]+ of [\d.]+ \w+, \d+:\d\d:\d\d elapsed, ETA (\S+)$")


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every file's bytes and mtime, and every folder's mtime (OUT itself included)."""
    out = {".": (None, folder.stat().st_mtime_ns)}
    for path in sorted(folder.rglob("*")):
        data = path.read_bytes() if path.is_file() else None
        out[str(path.relative_to(folder))] = (data, path.stat().st_mtime_ns)
    return out


def test_rerun_of_a_complete_merge_is_a_no_op(awkward_pair, tmp_path):
    base, ft = awkward_pair
    out = tmp_path / "out"
    assert run("merge", base, ft, out, "--shard-size", "100KB", "-q").returncode == 0
    before = snapshot(out)
    proc = run("merge", base, ft, out, "--shard-size", "100KB")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("edited") and "already complete" in proc.stdout
    assert len(proc.stdout.strip().splitlines()) == 1 and proc.stderr == ""
    assert snapshot(out) == before and not (tmp_path / "out.partial").exists()
    assert_one_line_error(
        run("merge", base, ft, out, "--shard-size", "200KB"),
        2,
        "different merge",
        "--shard-size 100000 -> 200000",
        "never overwrites",
    )
    assert snapshot(out) == before


def test_another_fine_tune_of_the_same_architecture_is_a_different_merge(awkward_pair, tmp_path):
    """Same names, shapes and shard layout (identical headers), other values: not the same merge."""
    import make_checkpoints

    base, ft = awkward_pair
    _, other_ft = make_checkpoints.make_pair(tmp_path / "other", "tiny", awkward=True, seed=7)
    out = tmp_path / "out"
    assert run("merge", base, ft, out, "-q").returncode == 0
    proc = run("merge", base, other_ft, out)
    assert_one_line_error(proc, 2, "different merge", "FINETUNED shard", "changed")


@pytest.mark.slow
def test_progress_in_a_batch_log(awkward_pair, tmp_path):
    """stderr to a file: plain N/M lines; after a kill, the resumed run says what was already done."""
    base, ft = awkward_pair
    out = tmp_path / "out"
    log = tmp_path / "log"
    with open(log, "w") as f:
        done = subprocess.run([*CLI, "merge", base, ft, out], stderr=f, stdout=subprocess.DEVNULL)
    assert done.returncode == 0
    lines = [m for line in log.read_text().splitlines() if (m := LINE.match(line))]
    assert len(lines) >= 3 and lines[-1].group(1) == lines[-1].group(2) == "28", log.read_text()
    stamped = datetime.strptime(lines[-1].group(0)[:20], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert abs((datetime.now(UTC) - stamped).total_seconds()) < 600, "the UTC time of the line"
    killed = run("merge", base, ft, tmp_path / "o2", env={"STREAMSOUP_FAULT": "commit:10"})
    assert killed.returncode == -9
    with open(log, "w") as f:
        done = subprocess.run([*CLI, "merge", base, ft, tmp_path / "o2"], stderr=f, stdout=subprocess.DEVNULL)
    assert done.returncode == 0
    text = log.read_text().splitlines()
    resumed = r"resuming: 9/28 tensors already done \([\d.]+ KiB of [\d.]+ KiB\); 19 to go"
    assert re.fullmatch(STAMP + resumed, text[1]), text
    first = LINE.match(text[2])
    assert first and first.group(1) == "9" and first.group(3) == "unknown", text[2]


@pytest.mark.parametrize("where", ["flags", "yaml"])
def test_tilde_and_variables_in_paths(awkward_pair, tmp_path, where):
    base, ft = awkward_pair
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    env = {"HOME": str(home), "STATE_ROOT": str(home / "scratch")}
    if where == "flags":
        args = ["~/out", "--work-dir", "$STATE_ROOT/state", "-q", "--config", "~/c.yaml"]
        (home / "c.yaml").write_text("rank-rule: energy\n")
    else:
        (home / "c.yaml").write_text("work-dir: ~/scratch/state\nrank-rule: energy\n")
        args = ["~/out", "--config", "~/c.yaml", "-q", "--devices", "cpu"]
    killed = run("merge", base, ft, *args, env={**env, "STREAMSOUP_FAULT": "commit:4"}, cwd=cwd)
    assert killed.returncode == -9
    assert (home / "scratch" / "state" / "zarr.json").exists() and (home / "out.partial").exists()
    proc = run("merge", base, ft, *args, env=env, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    assert (home / "out" / "streamsoup_report.json").exists() and not (home / "scratch" / "state").exists()
    assert list(cwd.iterdir()) == [], "a literal ~ or $VAR folder was created"
    assert "complete" in run("status", "~/out", env=env, cwd=cwd).stdout
    assert run("verify", "~/out", "-q", env=env, cwd=cwd).returncode == 0


def test_no_dask_warnings_when_its_port_is_busy(awkward_pair, tmp_path):
    """Another dask holds 8787: a normal run prints no warning; -v shows dask's messages."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", 8787))
        sock.listen()
    except OSError:
        pass  # already busy: so much the better
    try:
        proc = run_process("merge", *awkward_pair, tmp_path / "out")  # a new interpreter, to its shutdown
        assert proc.returncode == 0
        assert "Warning" not in proc.stderr and "warn" not in proc.stderr and "site-packages" not in proc.stderr
        assert all(PROGRESS.match(line) for line in proc.stderr.splitlines()), proc.stderr
    finally:
        sock.close()


def test_home_is_not_touched_by_default(awkward_pair, tmp_path):
    out = tmp_path / "out"
    proc = run_process("merge", *awkward_pair, out, "-q", env={"HOME": str(tmp_path / "nohome")})  # imports too
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "nohome").exists()
    assert tree_digest(out)
    assert os.path.isdir(out)


@pytest.mark.slow
def test_thousands_of_small_tensors_end_silently(tmp_path):
    """3,000 tiny tensors (small ones share tasks, commits are batched): exit 0, exact, and with -q nothing on
    stderr, no asyncio or dask noise after the success."""
    from helpers import assert_merged_exactly
    from many_tensors import write_pair

    base, ft = write_pair(tmp_path, 3000)
    proc = run_process("merge", base, ft, tmp_path / "out", "-q")  # a new interpreter, to its shutdown
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert_merged_exactly(base, ft, tmp_path / "out")
