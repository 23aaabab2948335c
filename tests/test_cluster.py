"""The same merge on a real dask.distributed cluster: a scheduler and two workers on loopback."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import made_once
from helpers import assert_merged_exactly, assert_one_line_error, report_rows, run, start, tree_digest

from streamsoup.io.state import STATE_NAME, RunState

DASK = str(Path(sys.executable).parent / "dask")
#: a memory limit small enough that streamsoup's share on that worker (70% of it, less the worker's own
#: RSS with torch loaded) holds only the smaller tensors: the big ones must go to the other worker
SMALL_LIMIT = "700MB"


class LoopbackCluster:
    """`dask scheduler` + plain `dask worker` processes, started as a user would: no resources declared.

    Worker 0 has no memory limit, worker 1 a small one; each runs under its nanny, in its own process group.
    """

    def __init__(
        self, root: Path, limits: tuple[str, ...] = ("0", SMALL_LIMIT), resources: str = "", env: dict | None = None
    ) -> None:
        """`env`: the scheduler's (its dask settings: DASK_DISTRIBUTED__SCHEDULER__...)."""
        self.root = root
        self.scheduler_file = root / "scheduler.json"
        self.scheduler = self._spawn(
            [
                DASK,
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--scheduler-file",
                str(self.scheduler_file),
                "--no-dashboard",
            ],
            env,
        )
        self.workers: list[subprocess.Popen] = []
        try:
            deadline = time.time() + 60
            while not self.scheduler_file.exists() and time.time() < deadline:
                time.sleep(0.1)
            self.address = json.loads(self.scheduler_file.read_text())["address"]
            for i, limit in enumerate(limits):
                self.add_worker(limit, f"w{i}", resources)
            if limits:
                self.wait_for_workers(len(limits))
        except BaseException:  # no process of a cluster that did not start outlives the test
            self.shutdown()
            raise

    def add_worker(
        self,
        limit: str = "0",
        name: str = "",
        resources: str = "",
        wrap: tuple[str, ...] = (),
        env: dict | None = None,
        dask: tuple[str, ...] = (DASK,),
    ) -> subprocess.Popen:
        """A plain `dask worker` (one thread); `wrap` runs it inside another command (a mount namespace of its own),
        `env` adds to its environment, `dask` is the command that is dask's CLI."""
        cmd = [*dask, "worker", self.address, "--nthreads", "1", "--memory-limit", limit, "--no-dashboard"]
        cmd += ["--name", name or f"w{len(self.workers)}", *(["--resources", resources] if resources else [])]
        self.workers.append(self._spawn([*wrap, *cmd], env))
        return self.workers[-1]

    def _spawn(self, cmd: list[str], env: dict | None = None) -> subprocess.Popen:
        log = open(self.root / f"{len(list(self.root.glob('*.log')))}.log", "w")
        env = {**os.environ, **(env or {})}
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)

    def client(self):
        from distributed import Client

        return Client(self.address, timeout="30s")

    def wait_for_workers(self, n: int) -> None:
        """Until n workers are there (dask's wait counts at least n: a killed one may still be counted)."""
        with self.client() as client:
            client.wait_for_workers(n, timeout=60)
            deadline = time.time() + 60
            while len(client.scheduler_info(n_workers=-1)["workers"]) != n and time.time() < deadline:
                time.sleep(0.1)

    def resources(self) -> dict[str, dict]:
        """Worker name -> its resources, as the scheduler sees them."""
        with self.client() as client:
            return {w["name"]: w["resources"] for w in client.scheduler_info(n_workers=-1)["workers"].values()}

    def kill(self, proc: subprocess.Popen) -> None:
        """The worker and its nanny (its whole process group): gone for good."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()

    def crash_worker_process(self, proc: subprocess.Popen) -> None:
        """SIGKILL the worker process under its nanny: the nanny restarts it (runtime resources are lost)."""
        import psutil

        children = [c for c in psutil.Process(proc.pid).children() if "resource_tracker" not in " ".join(c.cmdline())]
        assert children, "the nanny has no worker process"
        for child in children:
            child.kill()

    def shutdown(self) -> None:
        """The scheduler first: a client then sees the cluster gone at once, not its workers leaving one by one."""
        for proc in [self.scheduler, *self.workers]:
            self.kill(proc)


@pytest.fixture
def cluster(tmp_path):
    (tmp_path / "cluster").mkdir()
    c = LoopbackCluster(tmp_path / "cluster")
    yield c
    c.shutdown()


@pytest.fixture(scope="session")
def medium_local(medium_pair, tmp_path_factory):
    def merge(folder: Path) -> dict[str, str]:
        # the workers run torch on one thread each: the same configuration locally gives the same bytes
        assert run("merge", *medium_pair, folder / "out", "--devices", "cpu", "--threads", "1", "-q").returncode == 0
        return tree_digest(folder / "out")

    return made_once(tmp_path_factory, "medium-local", merge)


@pytest.mark.slow
def test_plain_cluster_merge_matches_local(awkward_pair, cluster, tmp_path):
    """Workers that declare nothing get streamsoup's resources from what they are; same bytes as a local run."""
    local, remote = tmp_path / "local", tmp_path / "remote"
    assert run("merge", *awkward_pair, local, "--devices", "cpu", "--threads", "1", "-q").returncode == 0
    proc = run("merge", *awkward_pair, remote, "--scheduler", cluster.address)
    assert proc.returncode == 0, proc.stderr
    assert f"cluster {cluster.address}: 2 worker(s), 2 CPU lane(s)" in proc.stderr
    assert "dashboard" not in proc.stderr, "the scheduler runs with --no-dashboard: its HTTP server serves none"
    assert tree_digest(remote) == tree_digest(local)
    assert_merged_exactly(*awkward_pair, remote)
    res = cluster.resources()
    assert res["w0"]["cpu"] == res["w1"]["cpu"] == 1 and res["w0"]["device"] == res["w1"]["device"] == 0
    assert 0 < res["w1"]["ram"] < 700 * 10**6 / 2**20 * 0.7 < res["w0"]["ram"]  # the limit, less the worker's RSS


@pytest.mark.slow
def test_device_lanes_of_a_worker_serve_two_merges_at_once(awkward_pair, medium_pair, medium_local, tmp_path):
    """A worker that declares only device lanes (a GPU worker's; on this CPU-only machine its lanes compute on the
    CPU) keeps one pool of devices for every merge that runs there: a second merge that starts and ends while the
    first runs leaves the first's device lanes in place, and both are exact. The client, without a GPU itself (a
    login node), names no GPU of its own in the report (it raised before)."""
    local, remote, first_out = tmp_path / "local", tmp_path / "remote", tmp_path / "first"
    (tmp_path / "cluster").mkdir()
    cluster = LoopbackCluster(tmp_path / "cluster", limits=("0",), resources="device=2,ram=4000")
    try:
        assert run("merge", *awkward_pair, local, "--devices", "cpu", "--threads", "1", "-q").returncode == 0
        first = start("merge", *medium_pair, first_out, "--scheduler", cluster.address, "--threads", "1", "-q")
        _wait_commits(tmp_path / "first.partial", 2, first)
        proc = run("merge", *awkward_pair, remote, "--scheduler", cluster.address, "--threads", "1")
        assert proc.returncode == 0, proc.stderr
        assert "1 worker(s), 0 CPU lane(s), 2 GPU lane(s)" in proc.stderr, proc.stderr
        _, err = first.communicate(timeout=300)
        assert first.returncode == 0, err
    finally:
        cluster.shutdown()
    assert tree_digest(remote) == tree_digest(local)
    assert tree_digest(first_out) == medium_local
    for out in (remote, first_out):
        edits = [r for r in report_rows(out).values() if r["action"] == "edit"]
        assert edits and {r["device"] for r in edits} == {"cpu"}


@pytest.mark.slow
def test_two_merges_at_once_on_one_cluster_are_each_exact(medium_pair, medium_local, cluster, tmp_path):
    """Two users of one cluster merge at the same time, with tasks of the same names (the same model's tensors;
    the second asks every update to be copied, `--min-rel-update 1e9`, so its right bytes are the fine-tune's
    own): each gets its own bytes. dask hands a client the result of any task with the key it asks for, so keys
    shared between merges mixed their results."""
    from conftest import raw_bytes

    forward, copied = tmp_path / "forward", tmp_path / "copied"
    first = start("merge", *medium_pair, forward, "--scheduler", cluster.address, "-q")
    _wait_commits(tmp_path / "forward.partial", 2, first)  # the first merge's other tasks wait on the cluster
    second = run("merge", *medium_pair, copied, "--min-rel-update", "1e9", "--scheduler", cluster.address, "-q")
    assert second.returncode == 0, second.stderr
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert tree_digest(forward) == medium_local
    assert raw_bytes(copied) == raw_bytes(medium_pair[1])  # every tensor the fine-tune's, none the first's edit
    assert {r["action"] for r in report_rows(copied).values()} == {"copy"}


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


@pytest.mark.slow
def test_restarted_worker_rejoins_and_finishes(medium_pair, medium_local, cluster, tmp_path):
    """w1 (and its nanny) is killed for good mid-run and w0's worker process crashes: its nanny restarts it without
    resources, the plugin restores them, and the tasks stranded in no-worker meanwhile are resubmitted: w0 alone
    finishes. The cluster is named by its scheduler file."""
    out = tmp_path / "out"
    proc = start("merge", *medium_pair, out, "--scheduler-file", cluster.scheduler_file, "-q")
    _wait_commits(tmp_path / "out.partial", 10, proc)
    cluster.kill(cluster.workers[1])
    cluster.crash_worker_process(cluster.workers[0])
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert tree_digest(out) == medium_local
    assert cluster.resources()["w0"]["ram"] > 0
    assert re.search(r"Z streamsoup: warning: dask worker tcp://\S+ left the cluster", err), err  # a batch log says so


@pytest.mark.slow
def test_cluster_gone_then_resume_locally(medium_pair, medium_local, cluster, tmp_path):
    out = tmp_path / "out"
    proc = start("merge", *medium_pair, out, "--scheduler", cluster.address, "-q")
    _wait_commits(tmp_path / "out.partial", 10, proc)
    cluster.shutdown()
    gone = time.monotonic()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    assert time.monotonic() - gone < 10, "said at once, not after dask's reconnect timeout (20 s)"
    # a worker that restarted meanwhile (the 700 MB one, on a loaded machine) is said as it rejoins: a record, not
    # an error; the cluster's loss is the one error line
    record = re.compile(
        r"warning: dask worker \S+ (joined the cluster|left the cluster; the tensors it held are recomputed elsewhere)$"
    )
    records = [line for line in err.strip().splitlines() if record.search(line)]
    lines = [line for line in err.strip().splitlines() if line not in records]
    assert "Traceback" not in err and len(records) <= 2 and len(lines) == 1, err
    assert "lost the dask cluster" in lines[0], err
    assert not out.exists() and len(RunState.read(tmp_path / "out.partial" / STATE_NAME).committed()) >= 10
    proc2 = run("merge", *medium_pair, out, "--devices", "cpu", "--threads", "1", "-q")
    assert proc2.returncode == 0, proc2.stderr
    assert tree_digest(out) == medium_local


def test_declared_resources_win_and_a_dead_address_is_refused(awkward_pair, tmp_path):
    """A worker that declares ram= keeps it (only the missing lanes are derived); an unreachable scheduler
    and a missing scheduler file are one-line errors."""
    from streamsoup.run.clients import WorkerFacts, derive_resources

    facts = WorkerFacts(
        nthreads=4,
        memory_limit=0,
        rss=0,
        available=64 * 2**30,
        total_memory=64 * 2**30,
        gpus=1,
        gpu_memory=80 * 2**30,
        declared={"ram": 1000},
    )
    assert derive_resources(facts) == {"cpu": 2, "device": 2, "ram": 1000}
    assert derive_resources(facts, limitless_on_host=2)["ram"] == 1000
    plain = WorkerFacts(4, 0, 0, 64 * 2**30, 64 * 2**30, 0, 0)
    assert derive_resources(plain, limitless_on_host=2) == {"cpu": 4, "device": 0, "ram": int(0.7 * 32 * 1024)}
    limited = WorkerFacts(1, 2**30, 300 * 2**20, 64 * 2**30, 64 * 2**30, 0, 0)
    assert derive_resources(limited)["ram"] == (int(0.7 * 2**30) - 300 * 2**20) // 2**20
    bad = run("merge", *awkward_pair, tmp_path / "o", "--scheduler", "tcp://127.0.0.1:1")
    assert_one_line_error(bad, 2, "--scheduler", "cannot reach a dask scheduler")
    missing = run("merge", *awkward_pair, tmp_path / "o", "--scheduler-file", tmp_path / "nope.json")
    assert_one_line_error(missing, 2, "--scheduler-file", "nope.json")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_a_task_must_fit_one_worker_not_the_sum_of_two():
    """Workers of different sizes: a task goes where one worker holds all it asks; none such: refused up front."""
    from streamsoup.errors import RunError
    from streamsoup.run.clients import fits
    from streamsoup.run.executor import check_capacity
    from streamsoup.run.graph import GraphTask, Member

    offers = {"small": {"cpu": 1, "device": 0, "ram": 100}, "gpu": {"cpu": 0, "device": 2, "ram": 4000}}
    assert fits({"cpu": 1, "ram": 90}, offers) and fits({"device": 1, "ram": 3000}, offers)
    assert not fits({"cpu": 1, "ram": 3000}, offers), "the RAM of one worker and the lane of another"
    big = GraphTask("k", (Member("k", "lm_head.weight", 1),), (print,), 0, {"cpu": 1, "ram": 3000})
    with pytest.raises(RunError, match="lm_head.weight"):
        check_capacity([big], offers)


def test_relative_paths_reach_workers_that_run_in_other_folders(awkward_pair, cluster, tmp_path):
    """`cd job && streamsoup merge pair/base pair/ft out --scheduler ...`, the workers started elsewhere (as on any
    cluster): the inputs' paths leave the client absolute. Was: "No such file or directory: 'pair/ft/...'"."""
    import shutil

    job = tmp_path / "job"
    for side, src in zip(("base", "ft"), awkward_pair, strict=True):
        shutil.copytree(src, job / "pair" / side)
    assert Path.cwd() != job  # the workers run in the test's folder, not in job/
    proc = run("merge", "pair/base", "pair/ft", "out", "--scheduler", cluster.address, "-q", cwd=job)
    assert proc.returncode == 0, proc.stderr
    local = run("merge", *awkward_pair, tmp_path / "local", "--devices", "cpu", "--threads", "1", "-q")
    weights = lambda out: {k: v for k, v in tree_digest(out).items() if k.endswith(".safetensors")}  # noqa: E731
    assert local.returncode == 0 and weights(job / "out") == weights(tmp_path / "local")  # the card names the paths


def _can_unshare() -> bool:
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


def hidden(folder: Path) -> tuple[str, ...]:
    """Runs a worker in a mount namespace of its own where `folder` is an empty tmpfs: a machine that does not
    share that filesystem with this one, and sees another folder at the same path."""
    return ("unshare", "-rm", "sh", "-c", 'mount -t tmpfs tmpfs "$1" && shift && exec "$@"', "sh", str(folder))


def _one_worker(cluster: LoopbackCluster, **worker) -> subprocess.Popen:
    """The cluster's workers replaced by one new worker, under a name of its own (the scheduler refuses a worker
    whose name a dead one still holds), once the scheduler lists it alone."""
    for proc in cluster.workers:
        cluster.kill(proc)
    cluster.workers.clear()
    name = f"solo-{next(SOLO)}"
    proc = cluster.add_worker(name=name, **worker)
    deadline = time.time() + 60
    while set(cluster.resources()) != {name} and time.time() < deadline:
        time.sleep(0.1)
    assert set(cluster.resources()) == {name}, cluster.resources()
    return proc


SOLO = itertools.count()


@pytest.mark.slow
@pytest.mark.skipif(not _can_unshare(), reason="no unprivileged mount namespaces here")
def test_every_worker_must_run_this_streamsoup_and_see_the_inputs_and_OUT(awkward_pair, tmp_path):
    """Found before any compute, one line each naming the worker, the path and what to do: a worker of another
    streamsoup, one without the inputs' filesystem, one without OUT's. Was: the merge ran, or failed mid-run on
    "No such file or directory" (exit 2 with OUT.partial left behind)."""
    import torch

    from streamsoup import __version__

    (tmp_path / "cluster").mkdir()
    cluster = LoopbackCluster(tmp_path / "cluster", limits=())
    try:
        old = tmp_path / "old-env" / "streamsoup"
        old.mkdir(parents=True)
        (old / "__init__.py").write_text("")
        (old / "_version.py").write_text('__version__ = "0.6.0"\n')
        outs = tmp_path / "outs"
        outs.mkdir()
        out = outs / "out"
        merge = lambda: run("merge", *awkward_pair, out, "--scheduler", cluster.address, "-q")  # noqa: E731

        _one_worker(cluster, env={"PYTHONPATH": str(old.parent)})
        proc = merge()
        assert_one_line_error(proc, 2, "dask worker tcp://", f"runs streamsoup 0.6.0 and this machine {__version__}")
        assert "install the same version" in proc.stderr
        assert not out.exists() and not Path(f"{out}.partial").exists()

        # a Python with dask and torch but not streamsoup: this one without its site hooks (streamsoup's editable
        # install is one), the site-packages on its path, not the current folder
        site = str(Path(torch.__file__).parent.parent)
        _one_worker(cluster, env={"PYTHONPATH": site}, dask=(sys.executable, "-S", "-P", "-m", "dask"))
        proc = merge()
        assert_one_line_error(proc, 2, "dask worker tcp://", "cannot import streamsoup", f"streamsoup=={__version__}")

        _one_worker(cluster, wrap=hidden(awkward_pair[0].parent))
        proc = merge()
        assert_one_line_error(proc, 2, "dask worker tcp://", f"cannot read BASE file {awkward_pair[0]}", "share")
        assert not Path(f"{out}.partial").exists()

        _one_worker(cluster, wrap=hidden(outs))  # sees a writable folder there, but not this machine's
        proc = merge()
        assert_one_line_error(proc, 1, "dask worker tcp://", f"does not see {out}.partial as this machine does")
        assert "work done so far is kept" in proc.stderr and Path(f"{out}.partial").is_dir()

        _one_worker(cluster)  # the cause fixed: the same command resumes and finishes
        assert merge().returncode == 0
        local = run("merge", *awkward_pair, tmp_path / "local", "--devices", "cpu", "--threads", "1", "-q")
        weights = lambda o: {k: v for k, v in tree_digest(o).items() if k.endswith(".safetensors")}  # noqa: E731
        assert local.returncode == 0 and weights(out) == weights(tmp_path / "local")
    finally:
        cluster.shutdown()


@pytest.mark.slow
def test_a_frozen_worker_is_taken_out_and_the_merge_finishes(medium_pair, medium_local, tmp_path):
    """A worker stopped mid-run (SIGSTOP) with the nanny that would restart it: after the scheduler's worker-ttl
    without a heartbeat it is taken out and its tensors run on the other worker. Was: the merge waited forever,
    without a word. A worker of another streamsoup that joins meanwhile runs no task (those dask gave it as it
    registered move elsewhere), and is named."""
    (tmp_path / "cluster").mkdir()
    ttl = {"DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL": "5s"}  # the least: ten heartbeats of a small cluster
    cluster = LoopbackCluster(tmp_path / "cluster", limits=("0", "0"), env=ttl)
    frozen = cluster.workers[1]
    old = tmp_path / "old-env" / "streamsoup"
    old.mkdir(parents=True)
    (old / "__init__.py").write_text("")
    (old / "_version.py").write_text('__version__ = "0.6.0"\n')
    try:
        out = tmp_path / "out"
        proc = start("merge", *medium_pair, out, "--scheduler", cluster.address, "-q")
        _wait_commits(tmp_path / "out.partial", 4, proc)
        os.killpg(frozen.pid, signal.SIGSTOP)
        # declaring its resources, it is given tasks as it registers, before streamsoup's plugin runs there
        cluster.add_worker(name="old", resources="cpu=1,ram=2000", env={"PYTHONPATH": str(old.parent)})
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        assert tree_digest(out) == medium_local
        assert re.search(r"dask worker tcp://\S+ has not answered for \d+ s while it runs '", err), err
        assert re.search(r"dask worker tcp://\S+ joined, but takes no part in the merge: it runs streamsoup 0.6.0", err)
    finally:
        os.killpg(frozen.pid, signal.SIGCONT)
        cluster.shutdown()


@pytest.mark.slow
def test_a_worker_dying_under_every_task_stops_the_merge_with_its_cause(awkward_pair, tmp_path):
    """Each time the worker starts a tensor it dies (as one killed for memory does) and its nanny restarts it: the
    tensor is lost a bounded number of times, then one line says why, the work kept. Was: 35 restarts in 4
    minutes, resubmitted under new keys forever, nothing about memory."""
    (tmp_path / "cluster").mkdir()
    failures = {"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "1"}
    cluster = LoopbackCluster(tmp_path / "cluster", limits=(), env=failures)
    try:
        cluster.add_worker(env={"STREAMSOUP_FAULT": "task"})
        cluster.wait_for_workers(1)
        proc = run("merge", *awkward_pair, tmp_path / "out", "--scheduler", cluster.address, "-q")
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        for needle in ("was lost with its dask worker 2 times", "memory", "the work done so far is kept", "rerun"):
            assert needle in last, last
        assert (tmp_path / "out.partial").is_dir() and not (tmp_path / "out").exists()
    finally:
        cluster.shutdown()


def test_resources_a_worker_cannot_hold_and_a_stale_scheduler_file_are_refused(awkward_pair, tmp_path):
    """ram= declared above what the worker's memory limit leaves (its nanny would kill it at every big tensor), and
    a scheduler file whose scheduler has gone: one line each, naming the worker or the file, nothing written."""
    (tmp_path / "cluster").mkdir()
    cluster = LoopbackCluster(tmp_path / "cluster", limits=("700MB",), resources="ram=8192")
    try:
        proc = run("merge", *awkward_pair, tmp_path / "o", "--scheduler", cluster.address, "-q")
        assert_one_line_error(proc, 2, "dask worker tcp://", "declares ram=8192", "declare at most ram=")
    finally:
        cluster.shutdown()
    stale = tmp_path / "scheduler.json"
    stale.write_text(json.dumps({"address": "tcp://127.0.0.1:1"}))
    proc = run("merge", *awkward_pair, tmp_path / "o", "--scheduler-file", stale)
    assert_one_line_error(proc, 2, f"--scheduler-file {stale} names tcp://127.0.0.1:1", "has stopped")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_a_task_stalled_on_a_worker_that_still_answers_is_named_once(caplog):
    """A task's thread stuck on a hung filesystem leaves its worker's heartbeat going: the watch names the tensor
    and the worker once it has run far longer than this run's tensors take for their size."""
    from streamsoup.run.clients import ClusterLook
    from streamsoup.run.executor import STALL_FACTOR, GraphRun
    from streamsoup.run.graph import GraphTask, Member

    graph = GraphRun(client=None, watch=True, tick=lambda: None)
    graph.silent_s = 0.0
    task = GraphTask("k", (Member("k", "model.layers.0.mlp.down_proj.weight", 10**6),), (print,), 0, {})
    graph.tasks["k-1"] = task
    look = ClusterLook([], {"tcp://w": {}}, {"tcp://w": 1.0}, {"tcp://w": ["k-1", "someone-elses"]}, {})
    graph.say_stalled(look)  # seen running; no rate known yet: nothing said
    graph.rates = [1e6]  # a byte a microsecond: 1 s for this tensor, so 20 s is far too long
    graph.running["k-1"] -= STALL_FACTOR * 0.5
    with caplog.at_level("WARNING"):
        graph.say_stalled(look)
        assert not caplog.records, "half the limit: still running as expected"
        graph.running["k-1"] -= STALL_FACTOR
        graph.say_stalled(look)
        graph.say_stalled(look)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "'model.layers.0.mlp.down_proj.weight' has run for" in lines[0], lines
    assert "dask worker tcp://w" in lines[0] and "hung filesystem" in lines[0]


@pytest.mark.slow
def test_workers_read_the_inputs_from_object_storage_only(reference, s3, tmp_path):
    """BASE and FINETUNED as s3:// URLs, the workers in folders of their own with nothing of the pair on any disk
    they are told of: a worker that cannot reach the store is named before any compute; workers that can merge
    the same bytes as a local run."""
    _, _, _, digest = reference
    (tmp_path / "cluster").mkdir()
    cluster = LoopbackCluster(tmp_path / "cluster", limits=())
    try:
        out = tmp_path / "out"
        args = ("merge", "s3://models/base", "s3://models/ft", out, "--scheduler", cluster.address, "-q")
        nowhere = {**s3, "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "1"}  # the discard port
        _one_worker(cluster, env=nowhere)
        proc = run(*args, "--shard-size", "100KB", env=s3)
        assert_one_line_error(proc, 2, "dask worker tcp://", "cannot read BASE object s3://models/base/", "endpoint")
        assert not Path(f"{out}.partial").exists()
        _one_worker(cluster, env=s3)
        proc = run(*args, "--shard-size", "100KB", env=s3)
        assert proc.returncode == 0, proc.stderr
        assert {k: v for k, v in tree_digest(out).items() if k != "README.md"} == {
            k: v for k, v in digest.items() if k != "README.md"
        }
    finally:
        cluster.shutdown()
