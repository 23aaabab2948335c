"""The device path on a real GPU (skipped without CUDA; the same code runs on CPU in test_scale.py)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_merged_exactly, report_rows, run

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("spectral", ["gram", "svd"])
def test_gpu_merge_is_exact(awkward_pair, tmp_path, spectral):
    out = tmp_path / "out"
    proc = run("merge", *awkward_pair, out, "--devices", "cuda:0", "--spectral", spectral, "-q")
    assert proc.returncode == 0, proc.stderr
    assert_merged_exactly(*awkward_pair, out)
    assert {r["device"] for r in report_rows(out).values() if r["action"] == "edit"} == {"cuda:0"}


def test_gpu_streamed_is_exact(big_pair, big_expected, tmp_path):
    """Tensors over the host budget stream row blocks through the GPU."""
    import json

    probe = json.loads(run("plan", *big_pair, "--devices", "cuda:0", "--max-ram", "64GiB", "--json").stdout)
    est = probe["estimate"]
    own = est["max_ram"] - est["task_ram"]  # a CUDA process's own baseline plus the driver reserve
    out = tmp_path / "out"
    proc = run("merge", *big_pair, out, "--devices", "cuda:0", "--max-ram", str(own + 80 * 2**20), "-q")
    assert proc.returncode == 0, proc.stderr
    rows = report_rows(out)
    assert any(r["blocks"] > 1 for r in rows.values())
    assert_merged_exactly(*big_pair, out, expected=big_expected)


def test_gpu_and_cpu_lanes_together(big_pair, big_expected, tmp_path):
    out = tmp_path / "out"
    proc = run("merge", *big_pair, out, "--devices", "auto", "--lanes", "2", "-q")
    assert proc.returncode == 0, proc.stderr
    assert_merged_exactly(*big_pair, out, expected=big_expected)
