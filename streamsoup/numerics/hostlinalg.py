"""Float64 linear algebra on the host through scipy's OpenBLAS: the Gram, the projections, the eigensolve.

The Gram X^T X is a symmetric rank-k update (``syrk``: half a GEMM's flops, its upper triangle), and
the projections X V V^T two GEMMs; OpenBLAS does them faster than the MKL inside torch's CPU wheel
(docs/benchmarks.md), and its packed kernels give the same bits wherever the operands sit in memory.

torch's eigh is tridiagonal reduction (``sytrd``), eigenvectors of the tridiagonal (``stedc``,
divide and conquer), then all of them back-transformed by the reduction's reflectors. MonoSoup
needs min(k, c - k) of them, and k is known only once the eigenvalues are. So the reduction and
the tridiagonal solve run first (LAPACK through scipy: torch does not expose them), and the
back-transformation (``ormqr``, a BLAS-3 kernel in torch) is applied to the chosen columns only.
The vectors are the ones eigh would compute, at ~2/3 of its time for a 2048 x 2048 Gram.

The routines are called through scipy's Cython BLAS and LAPACK (`scipy.linalg.cython_blas`,
`cython_lapack`: their public C entry points) by ctypes, which lets go of the GIL for the call: scipy's
Python wrappers hold it, and a lane in `sytrd` would stall every other lane (a GPU's included) for ~0.3 s.
"""

from __future__ import annotations

import ctypes
import os
import threading

import numpy as np
import torch

_threads = 0  # what set_threads asked for (0: the libraries' defaults)
_loaded: dict = {}  # "routines": {routine name: ctypes function}, "blas": a threadpoolctl controller of its BLAS
_load_lock = threading.Lock()


def set_threads(threads: int) -> None:
    """torch's threads and scipy's BLAS threads alike: the lanes share the cores, both libraries run in them.

    The BLAS count is read back and set whenever it differs, not only when `threads` does: OpenBLAS's count is
    global to the process, anything else in it (threadpoolctl in a user's code, a test) may change it, and a
    Gram's bits depend on it (docs/guarantees.md, "Same bytes")."""
    global _threads
    torch.set_num_threads(threads)
    _threads = threads
    blas = _loaded.get("blas")
    if blas is not None and threads > 0 and any(lib.num_threads != threads for lib in blas.lib_controllers):
        blas.limit(limits=threads, user_api="blas")


#: OpenBLAS's spin before an idle thread sleeps, as 2^N cycles (4, its least: no spin)
OPENBLAS_TIMEOUT_VAR = "OPENBLAS_THREAD_TIMEOUT"
#: (module, routine, arguments) called here; each a Fortran routine, every argument a pointer
_ROUTINES = (
    ("cython_lapack", "dsytrd", 10),
    ("cython_lapack", "dstevd", 11),
    ("cython_blas", "dsyrk", 10),
    ("cython_blas", "dgemm", 13),
)


def _routines() -> dict:
    """scipy's BLAS and LAPACK routines, loaded at the first use (scipy adds 0.2 s to every command's start-up)."""
    with _load_lock:
        if "routines" not in _loaded:
            # read once, when scipy loads its OpenBLAS: its idle threads sleep at once instead of spinning after
            # every call, which took the cores from torch's OpenMP threads in a lane of several threads
            # (docs/benchmarks-shared-machine.md)
            os.environ.setdefault(OPENBLAS_TIMEOUT_VAR, "4")
            from scipy.linalg import cython_blas, cython_lapack
            from threadpoolctl import ThreadpoolController

            _loaded["blas"] = ThreadpoolController().select(user_api="blas")  # with the OpenBLAS scipy just loaded
            if _threads:
                _loaded["blas"].limit(limits=_threads, user_api="blas")
            modules = {"cython_blas": cython_blas, "cython_lapack": cython_lapack}
            _loaded["routines"] = {
                name: _c_function(modules[module].__pyx_capi__[name], args) for module, name, args in _ROUTINES
            }
        return _loaded["routines"]


def _c_function(capsule, nargs: int):
    """A ctypes function (Fortran convention: every argument a pointer) from a Cython C-API capsule."""
    api = ctypes.pythonapi
    api.PyCapsule_GetName.restype, api.PyCapsule_GetName.argtypes = ctypes.c_char_p, [ctypes.py_object]
    api.PyCapsule_GetPointer.restype = ctypes.c_void_p
    api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    address = api.PyCapsule_GetPointer(capsule, api.PyCapsule_GetName(capsule))
    return ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * nargs)(address)  # CFUNCTYPE: the GIL is released


def _ptr(a: np.ndarray) -> ctypes.c_void_p:
    return a.ctypes.data_as(ctypes.c_void_p)


def _ints(*values: int) -> list[ctypes.c_int]:
    return [ctypes.c_int(v) for v in values]


def _sytrd(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reduce the symmetric `a` (Fortran order, its lower triangle read) to tridiagonal (d, e) in place:
    the reflectors are left below its subdiagonal, their scalars in tau."""
    n = a.shape[0]
    d, e, tau = np.empty(n), np.empty(n - 1), np.empty(n - 1)
    query = np.empty(1)
    nn, lda, lwork, info = _ints(n, n, -1, 0)
    sytrd = _routines()["dsytrd"]
    args = [ctypes.c_char_p(b"L"), ctypes.byref(nn), _ptr(a), ctypes.byref(lda), _ptr(d), _ptr(e), _ptr(tau)]
    sytrd(*args, _ptr(query), ctypes.byref(lwork), ctypes.byref(info))
    work = np.empty(max(int(query[0]), 1))
    lwork.value = work.size
    sytrd(*args, _ptr(work), ctypes.byref(lwork), ctypes.byref(info))
    _check("sytrd (tridiagonal reduction)", info.value)
    return d, e, tau


def _stevd(d: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All eigenvalues (ascending, in d) and eigenvectors (columns of z, Fortran order) of the tridiagonal."""
    n = d.size
    z = np.empty((n, n), order="F")
    query, iquery = np.empty(1), np.empty(1, dtype=np.intc)
    nn, ldz, lwork, liwork, info = _ints(n, n, -1, -1, 0)
    stevd = _routines()["dstevd"]
    head = [ctypes.c_char_p(b"V"), ctypes.byref(nn), _ptr(d), _ptr(e), _ptr(z), ctypes.byref(ldz)]
    stevd(*head, _ptr(query), ctypes.byref(lwork), _ptr(iquery), ctypes.byref(liwork), ctypes.byref(info))
    work, iwork = np.empty(max(int(query[0]), 1)), np.empty(max(int(iquery[0]), 1), dtype=np.intc)
    lwork.value, liwork.value = work.size, iwork.size
    stevd(*head, _ptr(work), ctypes.byref(lwork), _ptr(iwork), ctypes.byref(liwork), ctypes.byref(info))
    _check("stevd (tridiagonal eigensolve)", info.value)
    return d, z


def _row_major(t: torch.Tensor) -> int:
    """The leading dimension of a float64 host matrix whose rows are contiguous, 0 for any other layout."""
    if t.device.type != "cpu" or t.dtype != torch.float64 or t.dim() != 2 or t.shape[1] == 0:
        return 0
    if t.stride(1) != 1 and t.shape[1] > 1:
        return 0
    lead = t.stride(0) if t.shape[0] > 1 else t.shape[1]
    return lead if lead >= t.shape[1] else 0


def syrk_update(gram: torch.Tensor, x: torch.Tensor) -> None:
    """gram += X^T X on gram's upper triangle only (below the diagonal is left as it was).

    Row-major X [rows, c] is column-major X^T, so this is ``dsyrk('L', 'N')`` on the column-major
    picture, whose lower triangle is gram's upper one.
    """
    c, rows = gram.shape[0], x.shape[0]
    if x.shape[1] != c or gram.shape != (c, c):
        raise ValueError(f"a Gram {list(gram.shape)} cannot take X {list(x.shape)}")
    if rows == 0:
        return
    lg, lx = _row_major(gram), _row_major(x)
    if not lg:
        raise ValueError("the Gram must be a float64 host matrix with contiguous rows")
    if not lx:
        x, lx = x.to(torch.float64).contiguous(), c
    n, k, lda, ldc = _ints(c, rows, lx, lg)
    alpha, beta = ctypes.c_double(1.0), ctypes.c_double(1.0)
    _routines()["dsyrk"](
        ctypes.c_char_p(b"L"),
        ctypes.c_char_p(b"N"),
        ctypes.byref(n),
        ctypes.byref(k),
        ctypes.byref(alpha),
        ctypes.c_void_p(x.data_ptr()),
        ctypes.byref(lda),
        ctypes.byref(beta),
        ctypes.c_void_p(gram.data_ptr()),
        ctypes.byref(ldc),
    )


def matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *, transpose_b: bool = False) -> torch.Tensor:
    """out = a @ b (or a @ b^T) for float64 host matrices with contiguous rows, by OpenBLAS's dgemm;
    torch's matmul for any other layout. Row-major out = a b is column-major out^T = b^T a^T."""
    rows, inner = a.shape
    cols = b.shape[0] if transpose_b else b.shape[1]
    if (b.shape[1] if transpose_b else b.shape[0]) != inner or tuple(out.shape) != (rows, cols):
        raise ValueError(f"{list(a.shape)} @ {list(b.shape)}{'^T' if transpose_b else ''} -> {list(out.shape)}")
    la, lb, lc = _row_major(a), _row_major(b), _row_major(out)
    if not (la and lb and lc) or rows == 0 or cols == 0:
        return torch.matmul(a, b.T if transpose_b else b, out=out)
    if inner == 0:
        return out.zero_()
    m, n, k, ld_b, ld_a, ld_out = _ints(cols, rows, inner, lb, la, lc)  # b's picture comes first
    alpha, beta = ctypes.c_double(1.0), ctypes.c_double(0.0)
    _routines()["dgemm"](
        ctypes.c_char_p(b"T" if transpose_b else b"N"),
        ctypes.c_char_p(b"N"),
        ctypes.byref(m),
        ctypes.byref(n),
        ctypes.byref(k),
        ctypes.byref(alpha),
        ctypes.c_void_p(b.data_ptr()),
        ctypes.byref(ld_b),
        ctypes.c_void_p(a.data_ptr()),
        ctypes.byref(ld_a),
        ctypes.byref(beta),
        ctypes.c_void_p(out.data_ptr()),
        ctypes.byref(ld_out),
    )
    return out


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
        if gram.dtype != torch.float64 or not gram.is_contiguous():  # LAPACK gets raw pointers: no other layout
            gram = gram.to(torch.float64).contiguous()
        a = gram.numpy().T  # the same memory in Fortran order: its lower triangle is gram's upper one
        d, e, tau = _sytrd(a)
        w, z = _stevd(d, e)
        self.evals = torch.from_numpy(w)
        self._z: np.ndarray | None = z
        self._reflectors = torch.from_numpy(a)  # Fortran order: reflector j below the subdiagonal
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
