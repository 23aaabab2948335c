"""A float64 eigensolver on the host that back-transforms only the eigenvectors MonoSoup's split needs.

torch's eigh is tridiagonal reduction (``sytrd``), eigenvectors of the tridiagonal (``stedc``,
divide and conquer), then all of them back-transformed by the reduction's reflectors. MonoSoup
needs min(k, c - k) of them, and k is known only once the eigenvalues are. So the reduction and
the tridiagonal solve run first (LAPACK through scipy: torch does not expose them), and the
back-transformation (``ormqr``, a BLAS-3 kernel in torch) is applied to the chosen columns only.
The vectors are the ones eigh would compute, at ~2/3 of its time for a 2048 x 2048 Gram.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

_threads = 0  # what set_threads asked for (0: the libraries' defaults)
_loaded: dict = {}  # "lapack": scipy.linalg.lapack, "blas": a threadpoolctl controller of its BLAS
_load_lock = threading.Lock()


def set_threads(threads: int) -> None:
    """torch's threads and scipy's BLAS threads alike: the lanes share the cores, both libraries run in them."""
    global _threads
    torch.set_num_threads(threads)
    if threads != _threads:
        _threads = threads
        if "blas" in _loaded:
            _loaded["blas"].limit(limits=threads, user_api="blas")


def _lapack():
    """scipy's LAPACK, imported at the first eigensolve (0.2 s of every command's start-up otherwise)."""
    with _load_lock:
        if "lapack" not in _loaded:
            from scipy.linalg import lapack
            from threadpoolctl import ThreadpoolController

            _loaded["blas"] = ThreadpoolController()  # finds the OpenBLAS that scipy just loaded
            if _threads:
                _loaded["blas"].limit(limits=_threads, user_api="blas")
            _loaded["lapack"] = lapack
        return _loaded["lapack"]


class HostEigen:
    """Eigenvalues of a Gram matrix now, its eigenvectors later and only those asked for.

    `evals` ascending, float64. Reads the upper triangle of `gram` and overwrites it with the
    reduction's reflectors: the Gram is consumed (at 2048 columns a copy is 32 MB and the solve needs ~3
    such matrices at its peak, the Gram's included).
    """

    def __init__(self, gram: torch.Tensor) -> None:
        n = gram.shape[0]
        self.n = n
        if n == 1:
            self.evals = gram.reshape(1).clone()
            self._z = np.ones((1, 1))
            return
        lapack = _lapack()
        a = gram.numpy().T  # Fortran order; lower=1 reads gram's upper triangle
        lwork = int(lapack.dsytrd_lwork(n, lower=1)[0])
        reflectors, d, e, tau, info = lapack.dsytrd(a, lower=1, lwork=max(lwork, 1), overwrite_a=1)
        _check("sytrd (tridiagonal reduction)", info)
        w, z, info = lapack.dstevd(d, e, compute_v=1)
        _check("stevd (tridiagonal eigensolve)", info)
        self.evals = torch.from_numpy(w)
        self._z: np.ndarray | None = z
        self._reflectors = torch.from_numpy(reflectors)  # Fortran order: reflector j below the subdiagonal
        self._tau = torch.from_numpy(tau)

    def vectors(self, lo: int, hi: int) -> torch.Tensor:
        """Eigenvectors of the ascending eigenvalues lo..hi-1, as columns [n, hi - lo], contiguous. Once only:
        the tridiagonal's other eigenvectors are dropped before the back-transformation."""
        if self._z is None:
            raise RuntimeError("HostEigen.vectors() was already called")
        z = torch.from_numpy(np.ascontiguousarray(self._z[:, lo:hi]))
        self._z = None
        if self.n == 1 or hi <= lo:
            return z
        # Q = diag(1, Q') with Q' the product of the n-1 reflectors of a QR-shaped matrix: LAPACK's ormtr
        # for lower=1 is exactly this ormqr on the trailing rows.
        a = self._reflectors[1:, :-1]
        z[1:] = torch.ormqr(a, self._tau, z[1:], left=True, transpose=False)
        return z


def _check(what: str, info: int) -> None:
    if info != 0:
        raise ArithmeticError(f"LAPACK {what} failed (info={info})")
