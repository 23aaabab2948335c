"""The same merge on a real dask.distributed cluster: a scheduler and two workers on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import assert_merged_exactly, run, start, tree_digest

from streamsoup.state import STATE_NAME, RunState

DASK = str(Path(sys.executable).parent / "dask")
WORKER_RAM_MIB = 1024


class LoopbackCluster:
    """`dask scheduler` + `dask worker` processes, each in its own process group."""

    def __init__(self, root: Path, n_workers: int = 2) -> None:
        self.root = root
        sched_file = root / "scheduler.json"
        self.scheduler = self._spawn([DASK, "scheduler", "--host", "127.0.0.1", "--port", "0",
                                      "--scheduler-file", str(sched_file), "--no-dashboard"])  # fmt: skip
        deadline = time.time() + 60
        while not sched_file.exists() and time.time() < deadline:
            time.sleep(0.1)
        self.address = json.loads(sched_file.read_text())["address"]
        self.workers = [self._spawn([DASK, "worker", self.address, "--nthreads", "1", "--memory-limit", "0",
                                     "--resources", f"cpu=1,ram={WORKER_RAM_MIB}", "--name", f"w{i}",
                                     "--no-dashboard"]) for i in range(n_workers)]  # fmt: skip
        self._wait_for_workers(n_workers)

    def _spawn(self, cmd: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{len(list(self.root.glob('*.log')))}.log", "w")
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def _wait_for_workers(self, n: int) -> None:
        from distributed import Client

        with Client(self.address, timeout="30s") as client:
            client.wait_for_workers(n, timeout=60)

    def kill(self, proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()

    def shutdown(self) -> None:
        for proc in [*self.workers, self.scheduler]:
            self.kill(proc)


@pytest.fixture
def cluster(tmp_path):
    (tmp_path / "cluster").mkdir()
    c = LoopbackCluster(tmp_path / "cluster")
    yield c
    c.shutdown()


@pytest.fixture(scope="session")
def medium_pair(tmp_path_factory):
    import make_checkpoints

    return make_checkpoints.make_pair(tmp_path_factory.mktemp("medium"), "medium", seed=5)


@pytest.fixture(scope="session")
def medium_local(medium_pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("medium-local") / "out"
    # the workers run torch on one thread each: the same configuration locally gives the same bytes
    assert run("merge", *medium_pair, out, "--devices", "cpu", "--threads", "1", "-q").returncode == 0
    return tree_digest(out)


def test_cluster_merge_matches_local(awkward_pair, cluster, tmp_path):
    local, remote = tmp_path / "local", tmp_path / "remote"
    assert run("merge", *awkward_pair, local, "--devices", "cpu", "--threads", "1", "-q").returncode == 0
    proc = run("merge", *awkward_pair, remote, "--scheduler", cluster.address, "-q")
    assert proc.returncode == 0, proc.stderr
    assert tree_digest(remote) == tree_digest(local)
    assert_merged_exactly(*awkward_pair, remote)


def _wait_commits(partial: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if len(RunState.read(partial / STATE_NAME).committed()) >= n:
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise AssertionError("the merge made no progress")


def test_worker_killed_mid_merge(medium_pair, medium_local, cluster, tmp_path):
    out = tmp_path / "out"
    proc = start("merge", *medium_pair, out, "--scheduler", cluster.address, "-q")
    _wait_commits(tmp_path / "out.partial", 4, proc)
    cluster.kill(cluster.workers[0])  # the worker and its nanny: gone for good
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert tree_digest(out) == medium_local


def test_cluster_gone_then_resume_locally(medium_pair, medium_local, cluster, tmp_path):
    out = tmp_path / "out"
    proc = start("merge", *medium_pair, out, "--scheduler", cluster.address, "-q")
    _wait_commits(tmp_path / "out.partial", 4, proc)
    cluster.shutdown()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    assert "lost the dask cluster" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and len(RunState.read(tmp_path / "out.partial" / STATE_NAME).committed()) >= 4
    proc2 = run("merge", *medium_pair, out, "--devices", "cpu", "--threads", "1", "-q")
    assert proc2.returncode == 0, proc2.stderr
    assert tree_digest(out) == medium_local


def test_workers_without_resources_are_refused(awkward_pair, tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    sched_file = root / "s.json"
    procs = [subprocess.Popen([DASK, "scheduler", "--host", "127.0.0.1", "--port", "0", "--scheduler-file",
                               str(sched_file), "--no-dashboard"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)]  # fmt: skip
    try:
        while not sched_file.exists():
            time.sleep(0.1)
        address = json.loads(sched_file.read_text())["address"]
        procs.append(
            subprocess.Popen(
                [DASK, "worker", address, "--nthreads", "1", "--no-dashboard"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
        from distributed import Client

        with Client(address, timeout="30s") as c:
            c.wait_for_workers(1, timeout=60)
        proc = run("merge", *awkward_pair, tmp_path / "o", "--scheduler", address)
        assert proc.returncode == 2 and "--resources" in proc.stderr and "Traceback" not in proc.stderr
        bad = run("merge", *awkward_pair, tmp_path / "o", "--scheduler", "tcp://127.0.0.1:1")
        assert bad.returncode == 2 and "cannot reach a dask scheduler" in bad.stderr
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)
