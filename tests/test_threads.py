"""Threads on a shared machine: the default leaves out the cores other processes keep busy at the start
(a BLAS/OpenMP region waits for its slowest thread, and a thread sharing a core with a neighbour is it)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from helpers import run

from streamsoup.planning.budget import busy_cores, resolve_lanes, usable_cores

BUSY = "import time\nend = time.time() + 60\nwhile time.time() < end: pass"


@pytest.fixture
def neighbour():
    """One real CPU-bound process beside the test (a workstation's other job)."""
    hog = subprocess.Popen([sys.executable, "-c", BUSY])
    time.sleep(0.5)
    yield hog
    hog.kill()
    hog.wait()


def test_threads_share_the_free_cores_between_the_lanes():
    cores = usable_cores()
    assert resolve_lanes("cpu", 1, 0).threads == cores
    assert resolve_lanes("cpu", 1, 0, busy=1).threads == max(1, cores - 1)
    assert resolve_lanes("cpu", 2, 0, busy=0).threads == max(1, cores // 2)
    assert resolve_lanes("cpu", 1, 0, busy=10 * cores).threads == 1, "never fewer than one thread"
    assert resolve_lanes("cpu", 1, 3, busy=1).threads == 3, "--threads is taken as given"
    assert resolve_lanes("cpu", 1, 0, busy=1).describe().endswith("(1 core(s) busy with other processes)")
    assert usable_cores() == len(os.sched_getaffinity(0))


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs a second core for the neighbour")
def test_a_busy_neighbour_is_seen_and_left_its_core(neighbour, awkward_pair, tmp_path):
    assert busy_cores() >= 1
    proc = run("merge", *awkward_pair, tmp_path / "out", "--devices", "cpu")
    assert proc.returncode == 0, proc.stderr
    start = next(line for line in proc.stderr.splitlines() if line.startswith("streamsoup: max-ram"))
    assert "core(s) busy with other processes" in start, start
    threads = int(start.split(" torch thread(s)")[0].rsplit(" ", 1)[1])
    assert threads <= usable_cores() - 1 or threads == 1, start


def test_a_resumed_merge_keeps_the_first_attempts_threads(awkward_pair, tmp_path):
    """Interrupted with --threads 1, resumed without --threads (whatever the load is now): the rest of the
    tensors are computed with one thread too, as the first attempt's were."""
    import json
    import signal

    out = tmp_path / "out"
    killed = run("merge", *awkward_pair, out, "--threads", "1", "-q", env={"STREAMSOUP_FAULT": "commit:5"})
    assert killed.returncode == -signal.SIGKILL
    proc = run("merge", *awkward_pair, out, "-q")
    assert proc.returncode == 0, proc.stderr
    attempts = json.loads((out / "streamsoup_report.json").read_text())["run"]["attempts"]
    assert [a["machine"]["threads"] for a in attempts] == [1, 1]


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores")
def test_default_lanes_one_per_core_only_where_memory_lets_them_run_together(awkward_pair, big_pair):
    """A lane per core with one thread each (faster alone and beside a neighbour, docs/benchmarks-shared-
    machine.md) when the largest working sets fit side by side; under a budget that streams, one lane."""
    import json

    def lanes(*args) -> tuple[int, dict]:
        proc = run("plan", *args, "--devices", "cpu", "--json")
        assert proc.returncode == 0, proc.stderr
        doc = json.loads(proc.stdout)
        return len(doc["estimate"]["lanes"]), doc["summary"]

    assert lanes(*awkward_pair, "--max-ram", "8GiB")[0] == usable_cores()
    count, summary = lanes(*big_pair, "--max-ram", "450MB")
    assert count == 1 and summary["streamed"] > 0
    assert lanes(*awkward_pair, "--max-ram", "8GiB", "--lanes", "1")[0] == 1, "--lanes is taken as given"
