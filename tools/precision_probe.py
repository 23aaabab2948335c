"""How often a float32 spectrum, with an a-priori error bound, decides MonoSoup's k as float64 does.

A measurement for a certified single-precision path (not a merge): for every matrix a merge of the
pair would edit, the float64 singular values of dW = W1 - W0 (the reference) are compared with two
float32 spectra, each with a bound under LAPACK's standard error model (its "modestly growing
function" of the size taken as the size itself, constant 1; endpoints not rounded outward):

* gram: eigenvalues of dW^T dW formed and solved in float32 (the smaller side). Weyl: each is within
  delta = (2u + u^2) ||dW||_F^2 (rounding dW) + gamma_m ||dW32||_F^2 (an m-term float32 dot product,
  gamma_m = m u / (1 - m u)) + n u ||G||_2 (the eigensolver's backward error) of the exact one.
* svd: singular values of float32 dW: within u ||dW||_F (rounding dW to float32) + max(m, n) u ||dW32||_2
  (the SVD's backward error) of the exact ones.

With every singular value known to an interval, k is *certified* when every spectrum in the intervals
gives the same k: entropy rule, exp(H) bounded by interval arithmetic (H = log S - sum s log s / S);
energy rule, the top-k share bounded on both sides of the threshold. A matrix that does not certify
would be recomputed in float64. The table says how often each certifies, and how long each spectrum takes.

    .venv/bin/python tools/precision_probe.py BASE FINETUNED [--limit N]
    .venv/bin/python tools/precision_probe.py --tiny-llama     # a real tiny Llama fine-tuned a few AdamW steps
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from streamsoup.io.checkpoint import matrix_shape, read_tensor  # noqa: E402
from streamsoup.io.dtypes import torch_dtype  # noqa: E402
from streamsoup.numerics.monosoup import energy_rank, entropy_rank, reweigh, update_is_significant  # noqa: E402
from streamsoup.options import MergeOptions  # noqa: E402
from streamsoup.planning.planner import EDIT, plan_merge  # noqa: E402

U32 = 2.0**-24
U64 = 2.0**-53
ENERGY = 0.8


@dataclass
class Row:
    name: str
    shape: tuple[int, int]
    k64: int
    certified: dict[str, int | None]  # "gram-entropy", "svd-energy", ... -> the k its bound certifies, or None
    wrong: dict[str, bool]  # the float32 k without its bound differs from float64's
    k64s: dict[str, int]
    seconds: dict[str, float]


def entropy_interval(lo: torch.Tensor, hi: torch.Tensor) -> tuple[float, float]:
    """exp(H) over every spectrum with s_i in [lo_i, hi_i] (an enclosure: interval arithmetic)."""

    def f(s: torch.Tensor) -> torch.Tensor:
        return torch.special.xlogy(s, s)

    s_lo, s_hi = float(lo.sum()), float(hi.sum())
    e = 1 / math.e
    f_min = f(torch.clamp(torch.full_like(lo, e), lo, hi)).sum().item()  # s log s is convex, least at 1/e
    f_max = torch.maximum(f(lo), f(hi)).sum().item()
    if s_lo <= 0:
        return 0.0, math.inf
    h_lo = math.log(s_lo) - max(f_max / s_lo, f_max / s_hi)
    h_hi = math.log(s_hi) - min(f_min / s_lo, f_min / s_hi)
    return math.exp(h_lo), math.exp(h_hi)


def entropy_certified(lo: torch.Tensor, hi: torch.Tensor) -> int | None:
    """The k every spectrum in the intervals gives, or None."""
    e_lo, e_hi = entropy_interval(lo, hi)
    k = min(max(math.ceil(e_lo), 1), lo.numel())
    return k if k == min(max(math.ceil(e_hi), 1), lo.numel()) else None


def energy_certified(lo: torch.Tensor, hi: torch.Tensor) -> int | None:
    """The k that is the smallest with share_k >= ENERGY for every spectrum in the intervals, or None."""
    k = energy_rank(hi, ENERGY)  # a candidate; certified below on both sides of the threshold
    lo2, hi2 = lo.square(), hi.square()

    def share_bounds(j: int) -> tuple[float, float]:  # the top-j share's least and greatest value
        head_lo, head_hi = float(lo2[:j].sum()), float(hi2[:j].sum())
        tail_lo, tail_hi = float(lo2[j:].sum()), float(hi2[j:].sum())
        return head_lo / max(head_lo + tail_hi, 1e-300), head_hi / max(head_hi + tail_lo, 1e-300)

    below = k == 1 or share_bounds(k - 1)[1] < ENERGY
    return k if below and share_bounds(k)[0] >= ENERGY else None


def probe(name: str, dw: torch.Tensor) -> Row:
    m, n = dw.shape
    if m < n:
        dw, (m, n) = dw.T, (n, m)
    t = time.perf_counter()
    s64 = torch.linalg.svdvals(dw)
    exact_s = time.perf_counter() - t
    t = time.perf_counter()
    g64 = dw.T @ dw
    torch.linalg.eigvalsh(g64)
    gram64_s = time.perf_counter() - t
    k64 = {"entropy": entropy_rank(s64), "energy": energy_rank(s64, ENERGY)}
    a32 = dw.to(torch.float32)
    fro2 = float(dw.square().sum())

    t = time.perf_counter()
    g32 = a32.T @ a32
    lam = torch.linalg.eigvalsh(g32).to(torch.float64).flip(0)
    gram32_s = time.perf_counter() - t
    g_m = gamma(m, U32)
    fro2_32 = fro2 * (1 + U32) ** 2  # ||dW in float32||_F^2 at most
    g_norm = fro2_32 * (1 + g_m)  # ||G computed||_2 at most (<= its Frobenius norm), not the computed lam[0]
    # rounding dW to float32 moves G by at most (2u + u^2) ||dW||_F^2; the dot products by gamma_m ||dW32||_F^2;
    # the eigensolver by n u ||G||_2 (LAPACK's standard error model, its constant taken as 1)
    delta = (2 * U32 + U32**2) * fro2 + g_m * fro2_32 + n * U32 * g_norm
    gram = (lam.clamp(min=0).sqrt(), (lam - delta).clamp(min=0).sqrt(), (lam + delta).clamp(min=0).sqrt())

    t = time.perf_counter()
    lam = torch.linalg.eigvalsh(g64.to(torch.float32)).to(torch.float64).flip(0)
    eig32_s = time.perf_counter() - t
    # the float64 Gram rounded to float32 moves it by at most u ||G||_F <= u ||dW||_F^2; the float32 eigensolver's
    # backward error n u ||G32||_2 (constant 1)
    delta = gamma(m, U64) * fro2 + U32 * fro2 + n * U32 * fro2 * (1 + U32)  # + forming G in float64
    eig32 = (lam.clamp(min=0).sqrt(), (lam - delta).clamp(min=0).sqrt(), (lam + delta).clamp(min=0).sqrt())

    t = time.perf_counter()
    s32 = torch.linalg.svdvals(a32).to(torch.float64)
    svd32_s = time.perf_counter() - t
    # rounding dW to float32, then the SVD's backward error max(m, n) u ||dW32||_2 (constant taken as 1)
    ds = U32 * math.sqrt(fro2) + max(m, n) * U32 * math.sqrt(fro2) * (1 + U32)
    svd = (s32, (s32 - ds).clamp(min=0), s32 + ds)

    certified, wrong = {}, {}
    for method, (point, lo, hi) in (("gram", gram), ("eig32", eig32), ("svd", svd)):
        certified[f"{method}-entropy"] = entropy_certified(lo, hi)
        certified[f"{method}-energy"] = energy_certified(lo, hi)
        wrong[f"{method}-entropy"] = entropy_rank(point) != k64["entropy"]
        wrong[f"{method}-energy"] = energy_rank(point, ENERGY) != k64["energy"]
    seconds = {"svd64": exact_s, "gram64": gram64_s, "gram32": gram32_s, "eig32": eig32_s, "svd32": svd32_s}
    return Row(name, (m, n), k64["entropy"], certified, wrong, k64s=k64, seconds=seconds)


def gamma(n: int, u: float) -> float:
    """gamma_n = n u / (1 - n u): the relative error bound of an n-term floating-point sum of products."""
    return n * u / (1 - n * u)


def spacing(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The gap between neighbours of `dtype`'s grid at magnitudes x >= 0 (the subnormal gap below its normal
    range). The exponent comes from frexp, exact where a log2 could round up to the next binade."""
    info = torch.finfo(dtype)
    _, e = torch.frexp(x.clamp(min=info.tiny))  # x = f 2^e with f in [0.5, 1): the binade starts at 2^(e-1)
    return torch.ldexp(torch.full_like(x, info.eps), e - 1)


def within_one_step(y: torch.Tensor, e: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Where every value within `e` of `y` rounds to `dtype` within one grid step of y's own rounding: the grid's
    gap at |y| - e exceeds e. The margin 1 - 2^-13 keeps the rule true should either value be rounded through
    float32 first, as torch's own float64 conversion does (the first rounding at most 2^-14 of a 16-bit gap)."""
    return e < spacing((y.abs() - e).clamp(min=0), dtype) * (1 - 2.0**-13)


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many grid steps of their (16-, 32- or 64-bit) dtype lie between a and b, across zero too: sign-magnitude
    bits made monotone integers."""
    bits = {2: (torch.int16, 0x7FFF), 4: (torch.int32, 0x7FFFFFFF), 8: (torch.int64, 0x7FFFFFFFFFFFFFFF)}[
        a.dtype.itemsize
    ]

    def ordered(t: torch.Tensor) -> torch.Tensor:
        raw = t.view(bits[0]).to(torch.int64)
        return torch.where(raw < 0, -(raw & bits[1]), raw)

    return (ordered(a) - ordered(b)).abs()


@dataclass
class Projection:
    """One matrix's projection and reweigh (W = W0 + lam_low dW + (lam_high - lam_low) dW_high) in float32."""

    name: str
    elements: int
    certified: dict[str, int]  # "float32", "mixed" -> elements its bound proves within 1 ulp of float64's output
    over_1ulp: int  # elements the all-float32 output puts more than 1 ulp from float64's (no bound asked)
    over_1ulp_mixed: int
    unsound: dict[str, int]  # certified elements more than 1 ulp from float64's output (a bound that fails)
    seconds: dict[str, float]
    left_by_check: int  # elements the mixed path's float32 check leaves for float64


def project_probe(name: str, w0: torch.Tensor, w1: torch.Tensor, dtype: torch.dtype) -> Projection:
    """Float64 output as streamsoup writes it, against the same projection in float32, with an elementwise bound.

    Error model (LAPACK's: |fl(AB) - AB| <= gamma_n |A||B|, any summation order, FMA included), the float64
    spectrum and lambdas shared by both: the float32 dW_high = X V V^T (X the tall dW, V the c x k side of the
    split) is within gamma_{c+k+6} |X||V||V^T| of the exact one (the roundings of X and V, two products), and
    (|X||V||V^T|)_ij <= ||X_i|| sum_l ||V_l|| |V_jl| by Cauchy-Schwarz: a bound of rank one, cheap to form. The
    reweigh's roundings add gamma_6 (|lam_low X| + |W0| + |alpha dW_high|). The same bound in float64 covers
    streamsoup's own path. An element is certified when the sum of both, E, is below the output grid's gap at
    |y32| - E: then y32 and y64 round to neighbours or to the same value. "mixed" keeps T = X V in float64
    and rounds only T V^T to float32: its bound is gamma_{k+4} ||T_i|| ||V_j|| (Cauchy-Schwarz again).
    """
    from streamsoup.numerics.spectral import MemoryRows, accumulate, eigh_spectrum
    from streamsoup.tasks.dense import reweighed, split
    from streamsoup.tasks.result import Stopwatch

    options = MergeOptions()
    src = MemoryRows(w0, w1)
    spectrum, coef = split(eigh_spectrum(accumulate(src, with_gram=True).gram), options.edit)
    t = time.perf_counter()
    out64 = src.tall_view(reweighed(src, spectrum, coef, dtype, Stopwatch()))
    p64 = time.perf_counter() - t
    complement = spectrum.kept == "complement"
    v64 = spectrum.basis
    lam_low, alpha = coef.lambda_low, coef.lambda_high - coef.lambda_low

    t = time.perf_counter()  # numpy's sgemm (OpenBLAS): ~1.5x faster than torch's here, the best case for float32
    x32, v32 = src.w1.to(torch.float32) - src.w0.to(torch.float32), v64.to(torch.float32).numpy()
    high = torch.from_numpy((x32.numpy() @ v32) @ v32.T)
    high = x32 - high if complement else high
    y32 = reweigh(src.w0.to(torch.float32), x32, high, coef)  # streamsoup's reweigh, in float32
    out32 = y32.to(dtype)
    p32 = time.perf_counter() - t

    x = src.w1.to(torch.float64) - src.w0.to(torch.float64)
    c, k = v64.shape
    rows, a = x.norm(dim=1), (v64.abs() * v64.norm(dim=0)).sum(dim=1)
    shared = abs(lam_low) * x.abs() + src.w0.to(torch.float64).abs()

    def bound(u: float, products: torch.Tensor, high_abs: torch.Tensor) -> torch.Tensor:
        """|y - exact| for a path whose dW_high products are within `products` and |dW_high| within `high_abs`."""
        err = products + (2 * u * (x.abs() + torch.outer(rows, a)) if complement else 0)
        return abs(alpha) * err + gamma(6, u) * (shared + abs(alpha) * (high_abs + err))

    def certify(y: torch.Tensor, high: torch.Tensor, products: torch.Tensor) -> torch.Tensor:
        high_abs = high.to(torch.float64).abs()
        e64 = bound(U64, gamma(c + k + 6, U64) * torch.outer(rows, a), high_abs + products)  # streamsoup's own
        e = (bound(U32, products, high_abs) + e64) * (1 + 1e-9)  # and the bound's own float64 roundings
        return within_one_step(y.to(torch.float64), e, dtype)

    certified = certify(y32, high, gamma(c + k + 6, U32) * torch.outer(rows, a))

    t = time.perf_counter()
    tv = torch.from_numpy(x.numpy() @ v64.numpy())
    high_m = torch.from_numpy(tv.to(torch.float32).numpy() @ v32.T)
    high_m = x32 - high_m if complement else high_m
    y_m = reweigh(src.w0.to(torch.float32), x32, high_m, coef)
    mixed_s = time.perf_counter() - t
    products = gamma(k + 4, U32) * torch.outer(tv.norm(dim=1), v64.norm(dim=1)) + gamma(c, U64) * torch.outer(rows, a)
    certified_m = certify(y_m, high_m, products)
    checked_s, left = mixed_checked_seconds(src, spectrum, coef, dtype)
    far, far_m = ulps_apart(out32, out64) > 1, ulps_apart(y_m.to(dtype), out64) > 1
    return Projection(
        name,
        out64.numel(),
        {"float32": int(certified.sum()), "mixed": int(certified_m.sum())},
        int(far.sum()),
        int(far_m.sum()),
        {"float32": int((far & certified).sum()), "mixed": int((far_m & certified_m).sum())},
        {"project64": p64, "project32": p32, "project_mixed": mixed_s, "project_mixed_checked": checked_s},
        left,
    )


def mixed_checked_seconds(src, spectrum, coef, dtype: torch.dtype) -> tuple[float, int]:
    """The mixed path as a merge would run it, micro block by micro block, with its check in float32 in a
    sufficient form (E kappa < |y|, kappa = (2 + eps) / eps: the gap at |y| - E is at least eps (|y| - E) / 2),
    the bound inflated for its own float32 roundings: its time and how many elements it leaves for float64."""
    import numpy as np

    v64, v32 = spectrum.basis.numpy(), spectrum.basis.to(torch.float32).numpy()
    v_rows = spectrum.basis.norm(dim=1).to(torch.float32)
    lam_low, alpha = coef.lambda_low, coef.lambda_high - coef.lambda_low
    eps = torch.finfo(dtype).eps
    kappa = (2 + eps) / eps * (1 + 1e-5)
    g_k, g_6 = gamma(v64.shape[1] + 4, U32) * abs(alpha), gamma(6, U32)
    seconds, left = 0.0, 0
    for rows in src.micro_blocks(slice(0, src.rows)):
        w0, x = src.read(rows)
        t = time.perf_counter()
        tv = x.numpy() @ v64
        high = torch.from_numpy(tv.astype(np.float32) @ v32.T)
        x32, w32 = x.to(torch.float32), w0.to(torch.float32)
        if spectrum.kept == "complement":
            high = x32 - high
        y = reweigh(w32, x32, high, coef)
        e = torch.outer(torch.from_numpy(np.linalg.norm(tv, axis=1)).to(torch.float32) * g_k, v_rows)
        if spectrum.kept == "complement":
            e.add_(x32.abs(), alpha=4 * U32).add_(high.abs(), alpha=2 * U32)
        e.add_(x32.abs_(), alpha=g_6 * abs(lam_low)).add_(w32.abs_(), alpha=g_6).add_(
            high.abs_(), alpha=g_6 * abs(alpha)
        )
        left += int((e.mul_(kappa) >= y.abs_()).sum())
        seconds += time.perf_counter() - t
    return seconds, left


def edited_matrices(base: Path, ft: Path, limit: int) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.dtype]]:
    """(name, W0, W1, output dtype) of every matrix a default merge of the pair edits (a smaller update is copied)."""
    options = MergeOptions()
    plan = plan_merge(base, ft, options)
    out = []
    for job in plan.jobs:
        if job.action != EDIT or job.base is None or job.part is not None or len(job.finetuned.shape) < 2:
            continue
        w1 = read_tensor(job.edit_source).reshape(matrix_shape(job.edit_source.shape))
        w0 = read_tensor(job.base).reshape(matrix_shape(job.base.shape))
        if w0.shape != w1.shape:
            continue
        dw = w1.to(torch.float64) - w0.to(torch.float64)
        if update_is_significant(float(dw.norm()), float(w0.to(torch.float64).norm()), options.min_rel_update):
            out.append((job.name, w0, w1, torch_dtype(job.out_dtype)))
        if len(out) >= limit:
            break
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("base", nargs="?", type=Path)
    p.add_argument("finetuned", nargs="?", type=Path)
    p.add_argument("--tiny-llama", action="store_true", help="probe a real tiny Llama fine-tuned a few steps")
    p.add_argument("--limit", type=int, default=1000, help="at most this many matrices")
    p.add_argument("--projection", action="store_true", help="also the projection and reweigh in float32")
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny_llama:
            sys.path.insert(0, str(Path(__file__).parent))
            import make_adapters

            base, ft = make_adapters.make_finetune(Path(tmp), "llama")
        elif args.base and args.finetuned:
            base, ft = args.base, args.finetuned
        else:
            p.error("give BASE and FINETUNED, or --tiny-llama")
        matrices = edited_matrices(base, ft, args.limit)
        rows = [probe(name, w1.to(torch.float64) - w0.to(torch.float64)) for name, w0, w1, _ in matrices]
        projections = [project_probe(*matrix) for matrix in matrices] if args.projection else []
    if not rows:
        sys.exit("no matrix to edit in this pair")
    kinds = list(rows[0].certified)
    print(f"{len(rows)} matrices, shapes {sorted({r.shape for r in rows})[:6]}{' ...' if len(rows) > 6 else ''}")
    print("| spectrum | rule | k certified | certified but not float64's k | float32 k differs (no bound) |")
    print("|---|---|---|---|---|")
    names = {"gram": "float32 Gram, float32 eigh", "eig32": "float64 Gram, float32 eigh", "svd": "float32 SVD"}
    for kind in kinds:
        method, rule = kind.split("-")
        certified = sum(r.certified[kind] is not None for r in rows)
        broken = sum(r.certified[kind] not in (None, r.k64s[rule]) for r in rows)  # a bound that does not hold
        wrong = sum(r.wrong[kind] for r in rows)
        print(f"| {names[method]} | {rule} | {certified}/{len(rows)} | {broken} | {wrong}/{len(rows)} |")
    for phase in rows[0].seconds:
        total = sum(r.seconds[phase] for r in rows)
        print(
            f"{phase}: {total:.3f} s in all (median {statistics.median(r.seconds[phase] for r in rows) * 1e3:.2f} ms)"
        )
    if projections:
        total = sum(p.elements for p in projections)
        print(f"projection and reweigh of {len(projections)} matrices, {total:,} output elements:")
        print("| path | elements certified within 1 ulp | certified but over 1 ulp |")
        print("|---|---|---|")
        for path in projections[0].certified:
            certified = sum(p.certified[path] for p in projections)
            unsound = sum(p.unsound[path] for p in projections)
            print(f"| {path} | {certified:,} ({certified / total:.2%}) | {unsound} |")
        left = sum(p.left_by_check for p in projections)
        print(f"mixed, checked in float32 as a merge would: {left:,} elements ({left / total:.2%}) left for float64")
        over = sum(p.over_1ulp for p in projections)
        print(f"all-float32 output over 1 ulp from float64's, no bound asked: {over:,} elements")
        for phase in projections[0].seconds:
            print(f"{phase}: {sum(p.seconds[phase] for p in projections):.3f} s in all")


if __name__ == "__main__":
    main()
