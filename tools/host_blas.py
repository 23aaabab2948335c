#!/usr/bin/env python3
"""The host's float64 Gram and projection: torch's MKL against scipy's OpenBLAS, one lane and lanes side by side.

    .venv/bin/python tools/host_blas.py                    # a 5632 x 2048 update, 1000 vectors, 2 lanes
    .venv/bin/python tools/host_blas.py --rows 32000 --lanes 1

What a merge's task does per micro block of 256 rows (numerics/spectral.py): the Gram's upper triangle
(`syrk`; torch has none, so MKL runs GEMMs on column panels of 256), then X V and (X V) V^T. Every lane
runs one thread, like the CPU default. Prints seconds per update and the largest difference between
the two libraries' results.
"""

from __future__ import annotations

import argparse
import threading
import time

import torch

from streamsoup.numerics.hostlinalg import matmul, set_threads, syrk_update

PANEL = 256


def mkl_gram(gram: torch.Tensor, x: torch.Tensor) -> None:
    """torch's best without a syrk: each panel of the upper block triangle one GEMM (streamsoup 0.5)."""
    for i in range(0, gram.shape[0], PANEL):
        gram[i : i + PANEL, i:].addmm_(x[:, i : i + PANEL].T, x[:, i:])


def one_update(lib: str, blocks: list[torch.Tensor], v: torch.Tensor) -> tuple[float, torch.Tensor]:
    c, m = v.shape
    gram = torch.zeros(c, c, dtype=torch.float64)
    xv = torch.empty(blocks[0].shape[0], m, dtype=torch.float64)
    out = torch.empty(blocks[0].shape[0], c, dtype=torch.float64)
    t0 = time.perf_counter()
    for x in blocks:
        if lib == "mkl":
            mkl_gram(gram, x)
            torch.matmul(x, v, out=xv)
            torch.matmul(xv, v.T, out=out)
        else:
            syrk_update(gram, x)
            matmul(x, v, xv)
            matmul(xv, v, out, transpose_b=True)
    return time.perf_counter() - t0, gram


def side_by_side(lib: str, lanes: int, blocks: list[torch.Tensor], v: torch.Tensor) -> float:
    """Wall time of `lanes` threads each doing one update (the GIL is released in both libraries)."""
    threads = [threading.Thread(target=one_update, args=(lib, blocks, v)) for _ in range(lanes)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=5632)
    p.add_argument("--cols", type=int, default=2048)
    p.add_argument("--vectors", type=int, default=1000)
    p.add_argument("--lanes", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    set_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.rows, args.cols, dtype=torch.float64, generator=g)
    v = torch.linalg.qr(torch.randn(args.cols, args.vectors, dtype=torch.float64, generator=g))[0].contiguous()
    blocks = [x[s : s + 256].contiguous() for s in range(0, args.rows, 256)]
    grams = {lib: one_update(lib, blocks, v)[1] for lib in ("mkl", "openblas")}  # warm-up and the results
    diff = (grams["mkl"].triu() - grams["openblas"].triu()).abs().max().item()
    print(
        f"{args.rows} x {args.cols}, {args.vectors} vectors, micro blocks of 256 rows; Gram max |MKL - OpenBLAS| "
        f"{diff:.2e} (its largest entry {grams['mkl'].abs().max().item():.2e})"
    )
    for lib in ("mkl", "openblas"):
        alone = min(one_update(lib, blocks, v)[0] for _ in range(args.repeat))
        print(f"{lib:>8}: one lane {alone:.3f} s", end="")
        if args.lanes > 1:
            both = min(side_by_side(lib, args.lanes, blocks, v) for _ in range(args.repeat))
            print(f", {args.lanes} lanes side by side {both:.3f} s", end="")
        print()


if __name__ == "__main__":
    main()
