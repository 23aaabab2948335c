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
    proc = run_tool_here(
        ["python", str(ROOT / "tools" / "precision_probe.py"), *map(str, awkward_pair), "--projection"], tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert "| float32 Gram, float32 eigh | entropy |" in proc.stdout and "svd32:" in proc.stdout
    assert "| mixed |" in proc.stdout and "project_mixed_checked:" in proc.stdout


def test_precision_probe_projection_bound_holds():
    """tools/precision_probe.py's elementwise bound: no output element it certifies is more than 1 ulp from
    streamsoup's float64 output (bf16 and fp16, both sides of the split, updates far larger than W0 so outputs
    cancel to near zero), it certifies most elements (a bound that says something), and its grid rule holds
    on values placed at its edge: next to binade boundaries, in the subnormal range, across zero."""
    import sys

    import torch

    sys.path.insert(0, str(ROOT / "tools"))
    import precision_probe

    from streamsoup.io.dtypes import rounded

    g = torch.Generator().manual_seed(2)
    elements = certified = 0
    for trial in range(6):
        m, n = 256 + 64 * trial, 96 + 16 * trial
        if trial % 2:
            m, n = n, m
        dtype = (torch.bfloat16, torch.float16)[trial % 2]
        w0 = (torch.randn(m, n, generator=g) * 1e-3 * 10.0 ** -(trial % 3)).to(dtype)
        r = 4 + 20 * (trial % 3)  # k past half the rank at the largest r: the complement side
        low = torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g) / r
        w1 = (w0.float() + (low + torch.randn(m, n, generator=g) * 0.5) * 0.05).to(dtype)
        row = precision_probe.project_probe(f"t{trial}", w0, w1, dtype)
        assert row.unsound == {"float32": 0, "mixed": 0}, (trial, row)
        elements, certified = elements + row.elements, certified + row.certified["mixed"]
    assert certified > 0.99 * elements

    for dtype in (torch.bfloat16, torch.float16):
        info = torch.finfo(dtype)
        y = torch.randn(40000, generator=g, dtype=torch.float64) * torch.exp2(
            torch.randint(-30, 14, (40000,), generator=g).to(torch.float64)
        )
        y[:4000] = torch.exp2(torch.randint(-20, 14, (4000,), generator=g).to(torch.float64))  # binade edges
        y[4000:8000] *= info.tiny  # subnormal
        y = y.to(torch.float32).to(torch.float64)  # float32's value, as the float32 path has it
        gap = precision_probe.spacing(y.abs(), dtype)
        e = gap * torch.rand(y.shape, generator=g, dtype=torch.float64) * 1.2
        ok = precision_probe.within_one_step(y, e, dtype)
        assert 0 < int(ok.sum()) < y.numel()
        for side in (1.0, -1.0, 0.999):
            other = y + side * e  # float64's value, anywhere within e
            apart = precision_probe.ulps_apart(y.to(torch.float32).to(dtype), rounded(other, dtype))
            assert int((apart[ok] > 1).sum()) == 0, (dtype, side)


def test_peak_rss_is_the_kernels_high_water_mark_not_only_a_sample():
    """tools/peak_rss.py, which test_memory's budget checks rely on: a peak between two samples (256 MiB touched
    and freed, then the process idles) is counted, from the kernel's own mark; and none of the pytest process's
    memory is (a child's ru_maxrss would hold it: exec records the replaced image's mark)."""
    import sys

    sys.path.insert(0, str(ROOT / "tools"))
    import peak_rss

    touched = 256 * 2**20
    spike = f"b = bytearray({touched}); b[::4096] = b'x' * len(b[::4096]); del b; import time; time.sleep(2.5)"
    result = peak_rss.measure([sys.executable, "-c", spike], interval=1.0)
    assert result["returncode"] == 0
    assert result["kernel_peak_rss_bytes"] >= touched and result["peak_rss_bytes"] >= touched, result
    assert result["peak_rss_bytes"] < touched + 200 * 2**20, result  # an interpreter's worth on top, not ours
    assert peak_rss.measure([sys.executable, "-c", "raise SystemExit(3)"])["returncode"] == 3
