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


def test_precision_probe_bounds_never_certify_another_k(awkward_pair, tmp_path):
    """tools/precision_probe.py's bounds hold: over updates of every kind of spectrum (low rank, flat, a long tail,
    exactly rank-deficient), a k its float32 bound certifies is always float64's; and it runs on a real pair."""
    import sys

    import torch

    sys.path.insert(0, str(ROOT / "tools"))
    from collections import Counter

    import precision_probe

    g, certified = torch.Generator().manual_seed(0), Counter()
    for trial in range(40):
        m, n = 20 + trial * 3, 8 + trial
        u, v = torch.randn(m, n, generator=g, dtype=torch.float64), torch.randn(n, n, generator=g, dtype=torch.float64)
        decay = torch.logspace(0, -(trial % 8), n, dtype=torch.float64)
        if trial % 5 == 0:
            decay[n // 2 :] = 0  # rank-deficient: float32 sees rounding noise where float64 sees zeros
        if trial % 5 == 1:
            decay = (torch.arange(n) < 3 + trial % 4).to(torch.float64)  # flat: exp(H) is an integer, on the edge
        dw = torch.linalg.qr(u)[0] @ torch.diag(decay) @ torch.linalg.qr(v)[0].T
        row = precision_probe.probe(f"m{trial}", dw)
        for kind, k in row.certified.items():
            assert k in (None, row.k64s[kind.split("-")[1]]), (trial, kind, k, row.k64s)
            certified[kind] += k is not None
    assert all(certified[kind] >= 5 for kind in ("svd-energy", "svd-entropy")), certified  # bounds that say something
    proc = run_tool_here(["python", str(ROOT / "tools" / "precision_probe.py"), *map(str, awkward_pair)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "| float32 gram | entropy |" in proc.stdout and "svd32:" in proc.stdout
