"""Peak RSS of the whole process tree follows --max-ram, not the model's size."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from helpers import CLI, report_rows

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from make_checkpoints import Writer  # noqa: E402
from peak_rss import measure  # noqa: E402

from streamsoup.io.layout import TensorSpec  # noqa: E402

MAX_RAM = 640 * 2**20

#: alone, after the parallel part: their 7 GiB of writes and reads slowed it by more than they take alone (the
#: peak itself is the kernel's high-water mark, tools/peak_rss.py: exact under any load)
pytestmark = [pytest.mark.serial, pytest.mark.slow]


class Noise:
    """Random 262144 x 64 blocks at the cost of a copy: a few drawn once, each use rolled by another offset.

    The peak RSS under test depends on shapes and dtypes, not values; drawing every block cost ~30 s.
    """

    def __init__(self, seed: int, drawn: int = 3):
        g = torch.Generator().manual_seed(seed)
        self.pool = [0.02 * torch.randn(262144, 64, generator=g) for _ in range(drawn)]
        self.used = 0

    def block(self) -> torch.Tensor:
        self.used += 1
        return self.pool[self.used % len(self.pool)].roll(self.used, 0)

    def tensor(self, *shape: int) -> torch.Tensor:
        """Whole blocks, laid end to end in `shape` (a multiple of a block)."""
        blocks = math.prod(shape) // (262144 * 64)
        return torch.cat([self.block().reshape(-1) for _ in range(blocks)]).reshape(shape)


def write_pair(root: Path, n_small: int, seed: int) -> tuple[Path, Path]:
    """`n_small` 32 MiB tensors and two 256 MiB ones; the base random, the fine-tune 1% away from it."""
    specs = [TensorSpec(f"layers.{i}.weight", "BF16", (262144, 64)) for i in range(n_small)]
    specs += [TensorSpec(f"big.{i}.weight", "BF16", (2097152, 64)) for i in range(2)]
    base = Writer(root / "base", specs, 1 << 30, with_index=True)
    ft = Writer(root / "ft", specs, 1 << 30, with_index=True)
    noise = Noise(seed)
    for spec in specs:
        for start in range(0, spec.shape[0], 262144):
            block = noise.block()
            base.write(spec.name, "BF16", start, block)
            ft.write(spec.name, "BF16", start, block * 1.01)
    base.close(sync=False)  # inputs of this test only: the page cache may keep them (no fsync of 2-5 GiB)
    ft.close(sync=False)
    return root / "base", root / "ft"


def peak_of_merge(root: Path, n_small: int) -> tuple[int, int]:
    base, ft = write_pair(root, n_small, seed=n_small)
    result = measure([*CLI, "merge", str(base), str(ft), str(root / "out"), "--max-ram", str(MAX_RAM), "-q"])
    assert result["returncode"] == 0
    rows = report_rows(root / "out")
    assert sum(r["blocks"] > 1 for r in rows.values()) == 2  # the 256 MiB tensors were streamed
    size = sum(p.stat().st_size for p in (root / "ft").glob("*.safetensors"))
    return result["peak_rss_bytes"], size


def test_peak_rss_stays_under_budget_and_does_not_grow(tmp_path):
    peak_a, size_a = peak_of_merge(tmp_path / "a", n_small=16)  # 1 GiB per checkpoint
    peak_b, size_b = peak_of_merge(tmp_path / "b", n_small=64)  # 2.5 GiB per checkpoint
    assert 2 * size_a >= 3 * MAX_RAM and size_b >= 2.4 * size_a
    assert peak_a <= MAX_RAM, f"peak {peak_a / 2**20:.0f} MiB over --max-ram {MAX_RAM / 2**20:.0f} MiB"
    assert peak_b <= MAX_RAM, f"peak {peak_b / 2**20:.0f} MiB over --max-ram {MAX_RAM / 2**20:.0f} MiB"
    assert math.isclose(peak_a, peak_b, rel_tol=0.10), (peak_a, peak_b)
    print(
        f"peak RSS {peak_a / 2**20:.0f} MiB (pair {2 * size_a / 2**30:.1f} GiB), "
        f"{peak_b / 2**20:.0f} MiB (pair {2 * size_b / 2**30:.1f} GiB), --max-ram {MAX_RAM / 2**20:.0f} MiB"
    )


def write_bin_pair(root: Path, n_small: int) -> tuple[Path, Path]:
    """The same shapes as torch.save shards (.bin, no index); the big tensors stored transposed: views."""
    noise = Noise(n_small)
    for side in ("base", "ft"):
        (root / side).mkdir(parents=True)
    for first in range(0, n_small, 8):  # the base random, the fine-tune 1% away from it
        names = [f"layers.{i}.weight" for i in range(first, min(first + 8, n_small))]
        part = {name: noise.tensor(262144, 64) for name in names}
        for side, factor in (("base", 1.0), ("ft", 1.01)):
            shard = {n: (factor * t).to(torch.bfloat16) for n, t in part.items()}
            torch.save(shard, root / side / f"part-{first:03d}.bin")
    for i in range(2):
        big = noise.tensor(64, 2097152)
        for side, factor in (("base", 1.0), ("ft", 1.01)):
            torch.save({f"big.{i}.weight": (factor * big).to(torch.bfloat16).T}, root / side / f"big-{i}.bin")
    return root / "base", root / "ft"


def test_peak_rss_of_a_bin_pair_four_times_the_budget_stays_under_it(tmp_path):
    base, ft = write_bin_pair(tmp_path, n_small=26)
    size = sum(p.stat().st_size for p in [*base.glob("*.bin"), *ft.glob("*.bin")])
    assert size >= 4 * MAX_RAM
    result = measure([*CLI, "merge", str(base), str(ft), str(tmp_path / "out"), "--max-ram", str(MAX_RAM), "-q"])
    assert result["returncode"] == 0
    rows = report_rows(tmp_path / "out")
    assert sum(r["blocks"] > 1 for r in rows.values()) == 2  # the transposed 256 MiB views were streamed
    assert result["peak_rss_bytes"] <= MAX_RAM, f"peak {result['peak_rss_bytes'] / 2**20:.0f} MiB over --max-ram"
    print(
        f"peak RSS {result['peak_rss_bytes'] / 2**20:.0f} MiB, .bin pair {size / 2**30:.2f} GiB, "
        f"--max-ram {MAX_RAM / 2**20:.0f} MiB"
    )
