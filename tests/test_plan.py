"""`streamsoup plan` at full 70B scale, on sparse checkpoints with real shapes (no data on disk)."""

from __future__ import annotations

import json
import time

import pytest
from helpers import run


@pytest.fixture(scope="session")
def sparse_70b(tmp_path_factory):
    import make_checkpoints

    root = tmp_path_factory.mktemp("l70")
    base, ft = make_checkpoints.make_pair(
        root, "llama3-70b", sparse=True, base_shard_size=5 * 10**9, ft_shard_size=5 * 10**9
    )
    return base, ft


@pytest.mark.parametrize("max_ram,lanes", [("16GiB", 1), ("4GiB", 2)])
def test_plan_70b_in_seconds_within_budget(sparse_70b, max_ram, lanes):
    t0 = time.time()
    proc = run("plan", *sparse_70b, "--max-ram", max_ram, "--lanes", str(lanes), "--json", "--devices", "cpu")
    elapsed = time.time() - t0
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    plan, est = doc["summary"], doc["estimate"]
    assert elapsed < 60
    assert plan["tensors"] == 80 * 9 + 3 and plan["edit_candidates"] == 80 * 7 + 2
    assert est["peak_ram"] <= est["max_ram"]
    assert est["largest_working_set"] <= est["task_ram"]
    assert len(est["lanes"]) == lanes and est["seconds"] > 0
    assert {kind: m["tensors"] for kind, m in doc["modules"].items()} == {
        "q": 80,
        "k": 80,
        "v": 80,
        "o": 80,
        "gate": 80,
        "up": 80,
        "down": 80,
        "embed": 1,
        "lm_head": 1,
    }
    assert plan["output_bytes"] == sum(
        f.stat().st_size - 8 - int.from_bytes(open(f, "rb").read(8), "little")
        for f in sparse_70b[1].glob("*.safetensors")
    )
    if max_ram == "4GiB":  # embeddings and lm_head (2 GiB each in bf16) must be streamed
        assert plan["streamed"] >= 2


@pytest.mark.slow
def test_plan_text_and_too_small_budget(sparse_70b):
    proc = run("plan", *sparse_70b, "--max-ram", "8GiB", "--devices", "cpu")
    assert proc.returncode == 0, proc.stderr
    for word in ("562 to edit", "peak RAM", "estimate", "lane cpu0", "GFLOP/s"):
        assert word in proc.stdout
    assert " day" not in proc.stdout, proc.stdout  # hours counted on: "33:05:12", not "1 day, 9:05:12"
    from streamsoup.units import format_duration

    assert [format_duration(s) for s in (0, 70, 86399, 119112, -5)] == [
        "0:00:00",
        "0:01:10",
        "23:59:59",
        "33:05:12",
        "0:00:00",
    ]
    small = run("plan", *sparse_70b, "--max-ram", "1GiB", "--devices", "cpu")
    assert small.returncode == 2 and "model.embed_tokens.weight" in small.stderr and "--max-ram" in small.stderr


@pytest.mark.serial  # the estimate calibrates this machine's speed: other tests beside it slow it
def test_a_big_merge_says_its_estimate_and_a_small_one_does_not(sparse_70b, awkward_pair, tmp_path):
    """A merge writing 1 GiB or more calibrates and says plan's estimate at the start and beside the real time
    at the end; a small one skips the ~3 s calibration. The estimate counts this process's start-up."""
    from streamsoup.options import MergeOptions
    from streamsoup.planning.budget import make_budget
    from streamsoup.planning.cost import FIXED_S, startup_seconds
    from streamsoup.planning.planner import plan_merge
    from streamsoup.planning.prepare import prepare
    from streamsoup.reporting import MergeSummary
    from streamsoup.run.driver import ESTIMATE_BYTES, estimated_seconds

    opts = MergeOptions(max_ram=16 * 2**30, devices="cpu")
    budget = make_budget(opts, False)
    big = plan_merge(*sparse_70b, opts)
    assert big.bytes_to_write >= ESTIMATE_BYTES
    seconds = estimated_seconds(prepare(big, budget), tmp_path / "out")
    assert seconds is not None and seconds > FIXED_S + 3600, "70B of arithmetic on this machine takes hours"
    assert startup_seconds() == 0.0, "inside a long-running process (pytest) a merge pays no start-up"
    small = plan_merge(*awkward_pair, opts)
    assert estimated_seconds(prepare(small, budget), tmp_path / "out") is None
    summary = MergeSummary(tmp_path / "out", 3, 2, 1, 0, 10, 41.5, tmp_path / "r", estimated_seconds=seconds)
    assert f"in 41.5 s (estimated ~{int(seconds) // 3600}:" in summary.line()


def test_tasks_run_longest_first_whatever_the_plan_order(sparse_70b, tmp_path):
    """lm_head is last in a Llama plan and among its longest tensors: it gets a high priority, so the last lanes
    to finish are not waiting on it (what `plan`'s estimate already assumes); ties keep plan order."""
    from streamsoup.options import MergeOptions
    from streamsoup.planning.budget import make_budget
    from streamsoup.planning.planner import plan_merge
    from streamsoup.planning.prepare import prepare
    from streamsoup.planning.schedule import arithmetic_cost
    from streamsoup.run.graph import build_graph
    from streamsoup.tasks.result import TaskContext

    opts = MergeOptions(max_ram=16 * 2**30, devices="cpu")
    plan = plan_merge(*sparse_70b, opts)
    executions = prepare(plan, make_budget(opts, False)).executions
    tasks = build_graph(plan, TaskContext(str(tmp_path), str(tmp_path / "state")), opts.edit, executions)
    jobs = {j.key: j for j in plan.jobs}
    cost = {t.key: sum(arithmetic_cost(jobs[m.key]) for m in t.members) for t in tasks}
    order = sorted(tasks, key=lambda t: -t.priority)
    assert sorted(t.priority for t in tasks) == list(range(1, len(tasks) + 1)), "one priority each"
    pairs = list(zip(order, order[1:], strict=False))
    assert all(cost[a.key] >= cost[b.key] for a, b in pairs), "longest first"
    ties = [(a, b) for a, b in pairs if cost[a.key] == cost[b.key]]
    assert ties and all(jobs[a.members[0].key].index < jobs[b.members[0].key].index for a, b in ties)
    names = [t.members[0].name for t in order]
    assert plan.jobs[-1].name == "lm_head.weight" and names.index("lm_head.weight") < len(names) // 10
    assert cost[order[-1].key] < cost[order[0].key] // 1000, "copies of small tensors come last"


def test_a_calibration_is_reused_for_minutes_for_the_same_lanes_only(awkward_pair, tmp_path, monkeypatch):
    """`plan` asked again (options being tuned) reuses this machine's calibration of the last minutes, and says
    so; other lanes are measured again, and so is an entry that expired or a cache file that is damaged."""
    from streamsoup.planning import ratecache

    cache = tmp_path / "cache"
    env = {"STREAMSOUP_CACHE_DIR": str(cache)}
    plan = lambda *extra: run("plan", *awkward_pair, "--devices", "cpu", *extra, env=env)  # noqa: E731
    calibration = lambda proc: next(line for line in proc.stdout.splitlines() if line.startswith("calibration"))  # noqa: E731
    first = plan()
    assert first.returncode == 0 and "reused" not in calibration(first), first.stdout
    again = plan()
    assert "ago, reused" in calibration(again)
    assert calibration(again).split(" (")[0] == calibration(first).split(" (")[0]  # the same rates
    assert "reused" not in calibration(plan("--threads", "2")), "other lanes: measured"
    monkeypatch.setenv("STREAMSOUP_CACHE_DIR", str(tmp_path / "unit"))
    ratecache.store("k", {"cpu_gflops": 10.0})
    assert ratecache.load("k") == ({"cpu_gflops": 10.0}, pytest.approx(time.time(), abs=60))
    entries = json.loads((tmp_path / "unit" / ratecache.CACHE_FILE).read_text())
    entries["k"]["at"] -= ratecache.REUSE_S + 1
    (tmp_path / "unit" / ratecache.CACHE_FILE).write_text(json.dumps(entries))
    assert ratecache.load("k") is None, "expired: measured again"
    (tmp_path / "unit" / ratecache.CACHE_FILE).write_text("{not json")
    assert ratecache.load("k") is None
    ratecache.store("k", {"cpu_gflops": 0.0})  # a rate that cannot be: measured again
    assert ratecache.load("k") is None
