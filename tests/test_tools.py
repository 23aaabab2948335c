"""The benchmark tools run: a tool that breaks when a module it borrows from moves is a benchmark nobody can rerun."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT
from helpers import run_tool_here


@pytest.mark.slow
def test_bench_adapter_sparse_plans_a_7b_adapter(tmp_path):
    """Headers over holes: the base, the adapter and the dense pair are written, and `plan` is asked of all three."""
    proc = run_tool_here(
        ["python", str(ROOT / "tools" / "bench_adapter.py"), str(tmp_path), "--preset", "llama2-7b", "--sparse"],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "bench-adapter.json").read_text())
    assert results["base_bytes"] > 13 * 10**9  # the 7B base's declared size, written as holes
    assert 0 < results["plan_adapter_adapter_s"] < results["plan_adapter_model_s"] < results["plan_dense_s"]
    assert "merge_model" not in results  # --sparse measures nothing
