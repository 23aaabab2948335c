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
    base, ft = make_checkpoints.make_pair(root, "llama3-70b", sparse=True, base_shard_size=5 * 10**9,
                                          ft_shard_size=5 * 10**9)  # fmt: skip
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
        "q": 80, "k": 80, "v": 80, "o": 80, "gate": 80, "up": 80, "down": 80, "embed": 1, "lm_head": 1}
    assert plan["output_bytes"] == sum(
        f.stat().st_size - 8 - int.from_bytes(open(f, "rb").read(8), "little")
        for f in sparse_70b[1].glob("*.safetensors")
    )
    if max_ram == "4GiB":  # embeddings and lm_head (2 GiB each in bf16) must be streamed
        assert plan["streamed"] >= 2


def test_plan_text_and_too_small_budget(sparse_70b):
    proc = run("plan", *sparse_70b, "--max-ram", "8GiB", "--devices", "cpu")
    assert proc.returncode == 0, proc.stderr
    for word in ("562 to edit", "peak RAM", "estimate", "lane cpu0", "GFLOP/s"):
        assert word in proc.stdout
    small = run("plan", *sparse_70b, "--max-ram", "1GiB", "--devices", "cpu")
    assert small.returncode == 2 and "model.embed_tokens.weight" in small.stderr and "--max-ram" in small.stderr
