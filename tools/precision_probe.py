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
from streamsoup.numerics.monosoup import energy_rank, entropy_rank, update_is_significant  # noqa: E402
from streamsoup.options import MergeOptions  # noqa: E402
from streamsoup.planning.planner import EDIT, plan_merge  # noqa: E402

U32 = 2.0**-24
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
    gamma = m * U32 / (1 - m * U32)
    fro2_32 = fro2 * (1 + U32) ** 2  # ||dW in float32||_F^2 at most
    g_norm = fro2_32 * (1 + gamma)  # ||G computed||_2 at most (<= its Frobenius norm), not the computed lam[0]
    # rounding dW to float32 moves G by at most (2u + u^2) ||dW||_F^2; the dot products by gamma_m ||dW32||_F^2;
    # the eigensolver by n u ||G||_2 (LAPACK's standard error model, its constant taken as 1)
    delta = (2 * U32 + U32**2) * fro2 + gamma * fro2_32 + n * U32 * g_norm
    gram = (lam.clamp(min=0).sqrt(), (lam - delta).clamp(min=0).sqrt(), (lam + delta).clamp(min=0).sqrt())

    t = time.perf_counter()
    s32 = torch.linalg.svdvals(a32).to(torch.float64)
    svd32_s = time.perf_counter() - t
    # rounding dW to float32, then the SVD's backward error max(m, n) u ||dW32||_2 (constant taken as 1)
    ds = U32 * math.sqrt(fro2) + max(m, n) * U32 * math.sqrt(fro2) * (1 + U32)
    svd = (s32, (s32 - ds).clamp(min=0), s32 + ds)

    certified, wrong = {}, {}
    for method, (point, lo, hi) in (("gram", gram), ("svd", svd)):
        certified[f"{method}-entropy"] = entropy_certified(lo, hi)
        certified[f"{method}-energy"] = energy_certified(lo, hi)
        wrong[f"{method}-entropy"] = entropy_rank(point) != k64["entropy"]
        wrong[f"{method}-energy"] = energy_rank(point, ENERGY) != k64["energy"]
    seconds = {"svd64": exact_s, "gram64": gram64_s, "gram32": gram32_s, "svd32": svd32_s}
    return Row(name, (m, n), k64["entropy"], certified, wrong, k64s=k64, seconds=seconds)


def edited_matrices(base: Path, ft: Path, limit: int) -> list[tuple[str, torch.Tensor]]:
    options = MergeOptions()
    plan = plan_merge(base, ft, options)
    out = []
    for job in plan.jobs:
        if job.action != EDIT or job.base is None or job.part is not None or len(job.finetuned.shape) < 2:
            continue
        w1 = read_tensor(job.edit_source).to(torch.float64).reshape(matrix_shape(job.edit_source.shape))
        w0 = read_tensor(job.base).to(torch.float64).reshape(matrix_shape(job.base.shape))
        dw = w1 - w0 if w0.shape == w1.shape else None
        if dw is not None and update_is_significant(float(dw.norm()), float(w0.norm()), options.min_rel_update):
            out.append((job.name, dw))  # what a merge edits (a smaller update is copied)
        if len(out) >= limit:
            break
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("base", nargs="?", type=Path)
    p.add_argument("finetuned", nargs="?", type=Path)
    p.add_argument("--tiny-llama", action="store_true", help="probe a real tiny Llama fine-tuned a few steps")
    p.add_argument("--limit", type=int, default=1000, help="at most this many matrices")
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
        rows = [probe(name, dw) for name, dw in edited_matrices(base, ft, args.limit)]
    if not rows:
        sys.exit("no matrix to edit in this pair")
    kinds = list(rows[0].certified)
    print(f"{len(rows)} matrices, shapes {sorted({r.shape for r in rows})[:6]}{' ...' if len(rows) > 6 else ''}")
    print("| spectrum | rule | k certified | certified but not float64's k | float32 k differs (no bound) |")
    print("|---|---|---|---|---|")
    for kind in kinds:
        method, rule = kind.split("-")
        certified = sum(r.certified[kind] is not None for r in rows)
        broken = sum(r.certified[kind] not in (None, r.k64s[rule]) for r in rows)  # a bound that does not hold
        wrong = sum(r.wrong[kind] for r in rows)
        print(f"| float32 {method} | {rule} | {certified}/{len(rows)} | {broken} | {wrong}/{len(rows)} |")
    for phase in rows[0].seconds:
        total = sum(r.seconds[phase] for r in rows)
        print(
            f"{phase}: {total:.3f} s in all (median {statistics.median(r.seconds[phase] for r in rows) * 1e3:.2f} ms)"
        )


if __name__ == "__main__":
    main()
