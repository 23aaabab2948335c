"""The host's Gram and eigensolver (upper-triangle panels, partial back-transformation) against numpy float64.

numpy's SVD of X is the independent reference: s, k and the split's projector must agree with it, and
where the split is ill-conditioned (clustered values, a tiny gap at k) the backward-error certificates
(residual and orthogonality) must hold, as they do for LAPACK's own eigh.
"""

from __future__ import annotations

import math
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from streamsoup.numerics.hostlinalg import _stevd, _sytrd, matmul, syrk_update
from streamsoup.numerics.monosoup import entropy_rank
from streamsoup.numerics.spectral import eigh_spectrum, gram_update

EPS = np.finfo(np.float64).eps


def _with_singular_values(rows: int, s: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    u = np.linalg.qr(rng.standard_normal((rows, s.size)))[0]
    v = np.linalg.qr(rng.standard_normal((s.size, s.size)))[0]
    return (u * s) @ v.T


def _matrices() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    clustered = np.repeat([3.0, 1.0, 0.2], [20, 25, 15])  # three exact clusters of 20, 25 and 15 values
    tiny_gap = np.linspace(2.0, 0.1, 60)
    k = entropy_rank(torch.from_numpy(tiny_gap))
    tiny_gap[k] = tiny_gap[k - 1] * (1 - 1e-11)  # s_k and s_{k+1} differ in their 11th digit
    low_rank = rng.standard_normal((90, 5)) @ rng.standard_normal((5, 60))
    return {
        "random": rng.standard_normal((120, 70)),
        "decaying": rng.standard_normal((200, 64)) * np.logspace(0, -6, 64),
        "clustered": _with_singular_values(80, clustered, 1),
        "tiny gap at k": _with_singular_values(80, tiny_gap, 2),
        "rank 5 of 60": low_rank,
        "panels (300 columns)": rng.standard_normal((330, 300)) * np.logspace(0, -2, 300),
        "one column": rng.standard_normal((40, 1)),
        "two columns": rng.standard_normal((40, 2)),
    }


MATRICES = _matrices()


def _gram(x: np.ndarray, micro: int = 37) -> torch.Tensor:
    """The merge's Gram: accumulated over row blocks (an odd block size, a partial last block)."""
    xt = torch.from_numpy(x)
    gram = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
    for start in range(0, x.shape[0], micro):
        gram_update(gram, xt[start : start + micro].contiguous())
    return gram


@pytest.mark.parametrize("cols", [1, 40, 256, 300, 769])
def test_gram_update_fills_the_upper_triangle(cols):
    x = np.random.default_rng(cols).standard_normal((150, cols))
    gram = _gram(x).numpy()
    want = x.T @ x
    upper = np.triu_indices(cols)
    np.testing.assert_allclose(gram[upper], want[upper], rtol=0, atol=1e-12 * np.abs(want).max())


def test_syrk_update_leaves_the_lower_triangle_and_reads_any_layout():
    rng = np.random.default_rng(5)
    gram = torch.full((30, 30), 7.0, dtype=torch.float64)
    x = torch.from_numpy(rng.standard_normal((40, 60)))[:, ::2]  # a strided view: copied, not misread
    syrk_update(gram, x)
    want = 7.0 + x.numpy().T @ x.numpy()
    upper, lower = np.triu_indices(30), np.tril_indices(30, -1)
    np.testing.assert_allclose(gram.numpy()[upper], want[upper], rtol=1e-13)
    assert (gram.numpy()[lower] == 7.0).all()
    with pytest.raises(ValueError):
        syrk_update(gram, x[:, :29])


@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "row-strided", "column-strided"])
def test_matmul_equals_float64_products_in_every_layout(transpose_b, layout):
    rng = np.random.default_rng(7)
    a = torch.from_numpy(rng.standard_normal((33, 50)))
    b = torch.from_numpy(rng.standard_normal((21, 17) if transpose_b else (17, 21)))
    if layout == "row-strided":  # rows of a bigger buffer: the leading dimension is the buffer's
        a = torch.from_numpy(rng.standard_normal((33, 64)))[:, :17]
    elif layout == "column-strided":  # not row-contiguous: torch's matmul does it
        a = torch.from_numpy(rng.standard_normal((33, 34)))[:, ::2]
    else:
        a = a[:, :17].contiguous()
    out = torch.empty(33, 21, dtype=torch.float64)
    got = matmul(a, b, out, transpose_b=transpose_b)
    want = a.numpy() @ (b.numpy().T if transpose_b else b.numpy())
    assert got.data_ptr() == out.data_ptr()
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-13, atol=1e-13)
    with pytest.raises(ValueError):
        matmul(a, b, torch.empty(33, 20, dtype=torch.float64), transpose_b=transpose_b)


@pytest.mark.parametrize("name", sorted(MATRICES))
def test_eigensolve_agrees_with_float64_svd(name):
    x = MATRICES[name]
    c = x.shape[1]
    _, s_ref, vt_ref = np.linalg.svd(x, full_matrices=False)
    gram = _gram(x)
    full = gram.clone()
    full = torch.triu(full) + torch.triu(full, 1).T  # the symmetric matrix the upper triangle stands for
    s_eigh = torch.linalg.eigvalsh(full).flip(0).clamp_min(0).sqrt()
    eig = eigh_spectrum(gram)
    # s^2 to within a few ulps of ||X||^2 (the Gram's own rounding): small singular values are inexact in absolute terms
    np.testing.assert_allclose(eig.s.numpy() ** 2, s_ref**2, rtol=0, atol=50 * c * EPS * s_ref[0] ** 2)
    k = entropy_rank(eig.s)
    assert k == entropy_rank(s_eigh) == entropy_rank(torch.from_numpy(s_ref)), "k differs from float64 eigh's"
    for split in sorted({1, k, max(c - 1, 1), c}):
        spectrum = eig_for(gram_of=x, k=split)
        side = spectrum.kept
        lo, hi = (0, split) if side == "top" else (split, c)
        v = spectrum.basis.numpy()
        assert v.shape == (c, hi - lo)
        if v.shape[1] == 0:
            continue
        lam = spectrum.s.numpy()[lo:hi] ** 2
        # the certificates of a backward-stable eigensolver, whatever the gaps
        residual = np.linalg.norm(full.numpy() @ v - v * lam) / max(s_ref[0] ** 2, 1e-300)
        assert residual < 50 * c * EPS, (name, split, residual)
        assert np.abs(v.T @ v - np.eye(v.shape[1])).max() < 50 * c * EPS
        gaps = np.abs(np.diff(s_ref**2))
        boundary = [g for i, g in enumerate(gaps) if i + 1 in (lo, hi) and 0 < i + 1 < c]
        if all(g > 1e-6 * s_ref[0] ** 2 for g in boundary) and s_ref[min(hi, c) - 1] > 1e-6 * s_ref[0]:
            projector = v @ v.T  # a well-separated side: the projector is the reference's
            ref = vt_ref[lo:hi].T @ vt_ref[lo:hi]
            assert np.abs(projector - ref).max() < 1e-8, (name, split)


def eig_for(gram_of: np.ndarray, k: int):
    """A fresh solve for each split: the host solver consumes its Gram and gives its vectors once."""
    return eigh_spectrum(_gram(gram_of)).keep_needed(k)


def test_high_part_is_the_reference_split():
    """X V_k V_k^T through either side of the split equals the SVD's top-k part of X."""
    x = MATRICES["decaying"]
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    for k in (3, 20, 50):
        spectrum = eig_for(x, k)
        assert spectrum.kept == ("top" if k <= x.shape[1] - k else "complement")
        high = spectrum.high_part(torch.from_numpy(x), k).numpy()
        ref = (u[:, :k] * s[:k]) @ vt[:k]
        assert np.abs(high - ref).max() < 1e-9 * s[0]


def test_set_threads_limits_scipys_blas():
    """Before scipy is loaded (it is imported at the first eigensolve) and after: a fresh interpreter."""
    script = """
import torch
from threadpoolctl import threadpool_info
from streamsoup.numerics.hostlinalg import set_threads
from streamsoup.numerics.spectral import eigh_spectrum

def blas():
    return {lib["filepath"]: lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}

set_threads(1)
before = blas()  # numpy's own OpenBLAS, maybe; not scipy's yet
eigh_spectrum(torch.eye(3, dtype=torch.float64)).keep_needed(1)
loaded = set(blas()) - set(before)
assert loaded and all(blas()[lib] == 1 for lib in loaded), blas()
assert torch.get_num_threads() == 1
set_threads(2)
assert all(blas()[lib] == 2 for lib in loaded) and torch.get_num_threads() == 2, blas()
from threadpoolctl import threadpool_limits
threadpool_limits(limits=3, user_api="blas")  # something else in the process changes OpenBLAS's global count
set_threads(2)  # the count asked for last time: it holds again all the same
assert all(blas()[lib] == 2 for lib in loaded), blas()
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_zero_and_single_value_grams():
    gram = torch.zeros(5, 5, dtype=torch.float64)
    eig = eigh_spectrum(gram)
    assert eig.s.tolist() == [0.0] * 5
    one = eigh_spectrum(torch.tensor([[4.0]], dtype=torch.float64))
    assert one.s.tolist() == [2.0] and one.keep_needed(1).basis.shape == (1, 0)
    assert math.isclose(float(eigh_spectrum(torch.tensor([[9.0]], dtype=torch.float64)).s[0]), 3.0)


def _gil_released_during(call) -> bool:
    """Whether the main thread runs while another thread is inside `call`. With a 10 s switch interval
    the main thread gets the GIL only when the caller lets go of it: a C call that keeps it shuts the
    main thread out until it returns (no timing is compared)."""
    state = {"inside": False, "seen": False}

    def work():
        state["inside"] = True
        call()
        state["inside"] = False

    interval = sys.getswitchinterval()
    sys.setswitchinterval(10.0)
    try:
        worker = threading.Thread(target=work)
        worker.start()
        while worker.is_alive():
            time.sleep(0.0005)
            state["seen"] |= state["inside"]
        worker.join()
    finally:
        sys.setswitchinterval(interval)
    return state["seen"]


def test_lapack_calls_let_the_other_lanes_run():
    """A lane in the eigensolve must not stall the other lanes (a GPU lane's driving thread included)."""
    x = np.random.default_rng(0).standard_normal((1200, 1024))
    gram = np.asfortranarray(x.T @ x)
    assert _gil_released_during(lambda: _sytrd(gram.copy(order="F")))
    d, e, _ = _sytrd(gram.copy(order="F"))
    assert _gil_released_during(lambda: _stevd(d.copy(), e.copy()))
    from scipy.linalg import lapack  # the check itself can fail: scipy's own wrappers keep the GIL

    assert not _gil_released_during(lambda: lapack.dsytrd(gram, lower=1, overwrite_a=1))  # in place: no copy
