"""Threads on a shared machine: by default a lane per core with one thread each (the fastest alone and beside a
busy neighbour, docs/benchmarks-shared-machine.md); the cores other processes keep busy at the start are seen
and said, with what runs faster beside them when lanes run several threads; the thread count never follows
the load (it changes the float64 sums' rounding: the same merge must give the same bytes), and a resumed
merge keeps its first attempt's."""

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
    default = resolve_lanes("cpu", 0, 0)
    assert (default.cpu, default.threads) == (cores, 1), "by default a lane per core, one thread each"
    assert resolve_lanes("auto", 0, 0, busy=1).threads == 1
    assert resolve_lanes("cpu", 1, 0).threads == cores
    assert resolve_lanes("cpu", 1, 0, busy=1).threads == cores, "the load never changes the arithmetic"
    assert resolve_lanes("cpu", 2, 0, busy=0).threads == max(1, cores // 2)
    assert resolve_lanes("cpu", 4 * cores, 0).threads == 1, "never fewer than one thread"
    assert resolve_lanes("cpu", 1, 3, busy=1).threads == 3, "--threads is taken as given"
    assert resolve_lanes("cpu", 1, 0, busy=1).describe().endswith("(1 core(s) busy with other processes)")
    assert usable_cores() == len(os.sched_getaffinity(0))


@pytest.mark.serial  # the load of the machine is what it measures
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs a second core for the neighbour")
def test_a_busy_neighbour_is_seen_and_said_with_the_faster_settings(neighbour, awkward_pair, tmp_path):
    assert busy_cores() >= 1, "a look of its own, without a command's start to measure from"
    proc = run("merge", *awkward_pair, tmp_path / "out", "--devices", "cpu")
    assert proc.returncode == 0, proc.stderr
    start = next(line for line in proc.stderr.splitlines() if line.startswith("streamsoup: max-ram"))
    assert "core(s) busy with other processes" in start, start
    assert f"{usable_cores()} CPU lane(s), 1 torch thread(s)" in start, "the default does not follow the load"
    assert "warning:" not in proc.stderr, "one thread per lane is already what runs fastest beside them"
    proc = run("merge", *awkward_pair, tmp_path / "one-lane", "--devices", "cpu", "--lanes", "1")
    assert proc.returncode == 0, proc.stderr
    start = next(line for line in proc.stderr.splitlines() if line.startswith("streamsoup: max-ram"))
    assert f"1 CPU lane(s), {usable_cores()} torch thread(s)" in start, "the threads do not follow the load"
    advice = [line for line in proc.stderr.splitlines() if "warning:" in line and "busy with other" in line]
    assert len(advice) == 1 and "--threads 1" in advice[0] and "same bytes" in advice[0], proc.stderr


@pytest.mark.skipif(usable_cores() < 2, reason="needs two cores for two threads")
def test_a_resumed_merge_keeps_the_first_attempts_threads(awkward_pair, tmp_path):
    """Interrupted with one lane on every core, resumed with the defaults (a lane per core, one thread each):
    the rest of the tensors are computed with the first attempt's threads."""
    import json
    import signal

    out = tmp_path / "out"
    killed = run("merge", *awkward_pair, out, "--lanes", "1", "-q", env={"STREAMSOUP_FAULT": "commit:5"})
    assert killed.returncode == -signal.SIGKILL
    proc = run("merge", *awkward_pair, out, "-q")
    assert proc.returncode == 0, proc.stderr
    attempts = json.loads((out / "streamsoup_report.json").read_text())["run"]["attempts"]
    cores = usable_cores()
    assert [a["machine"]["threads"] for a in attempts] == [cores, cores]


@pytest.mark.parametrize("given", [None, "12"])
def test_openblas_threads_sleep_when_idle_unless_the_environment_says(given):
    """A lane of several threads alternates torch's OpenMP and scipy's OpenBLAS: OpenBLAS's idle threads must
    not spin on the cores OpenMP needs (docs/benchmarks-shared-machine.md); a value the user set is kept."""
    code = (
        "import os, torch\nfrom streamsoup.numerics.hostlinalg import matmul\n"
        "a = torch.ones(4, 4, dtype=torch.float64)\n"
        "assert (matmul(a, a, torch.empty(4, 4, dtype=torch.float64)) == 4).all()\n"
        "print(os.environ.get('OPENBLAS_THREAD_TIMEOUT'))"
    )
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    if given:
        env["OPENBLAS_THREAD_TIMEOUT"] = given
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip() == (given or "4")


def _look_while_busy(queue) -> None:
    """In a process forked after the import: look at the load while a thread of its own keeps a core busy."""
    import threading

    done = threading.Event()

    def spin() -> None:
        while not done.is_set():
            pass

    spinner = threading.Thread(target=spin, daemon=True)
    spinner.start()
    queue.put(busy_cores())
    done.set()


@pytest.mark.serial  # the load of the machine is what it measures
def test_a_process_forked_after_the_import_does_not_count_itself_as_a_neighbour():
    """The load is measured from this process's own CPU time: a fork (a forkserver, a forking dask worker) must
    not measure its parent's instead and count its own work as another process's."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_look_while_busy, args=(queue,))
    child.start()
    busy = queue.get(timeout=60)
    child.join()
    assert busy == 0, "the process's own busy core was counted as another process's"
