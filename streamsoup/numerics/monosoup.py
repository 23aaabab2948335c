"""MonoSoup's per-tensor rules (arXiv 2602.09689; docs/DESIGN.md, "The math"), device-agnostic torch.

Given the singular values ``s`` of a fine-tuning update ``dW = W1 - W0``:

    k        entropy rule: ceil(exp(H)), H the entropy of p_i = s_i / sum s
             energy rule:  smallest k with sum_{i<=k} s_i^2 / sum s^2 >= R
    P_k      share of the energy in the top-k directions
    rho      (s_{k+1} / s_1)^2
    lam_low  rho + (1 - rho) * sqrt(1 - P_k)       lam_high = 1 - lam_low
    W        W0 + lam_high * dW_high + lam_low * (dW - dW_high)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Coefficients:
    """What MonoSoup decided for one tensor; the report is built from these."""

    k: int
    rank: int
    p_k: float
    rho: float
    lambda_high: float
    lambda_low: float

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def relative_update(dw_norm: float, w0_norm: float) -> float:
    """||dW|| / ||W0||: infinite for an update of an all-zero W0 (a layer trained from zero), 0 for no update."""
    if dw_norm == 0:
        return 0.0
    return math.inf if w0_norm == 0 else dw_norm / w0_norm


def update_is_significant(dw_norm: float, w0_norm: float, min_rel_update: float) -> bool:
    """The edit threshold (docs/DESIGN.md, "The math"): relative to ||W0||, so the same at every scale; any
    update of an all-zero W0 counts, no update never does."""
    return dw_norm > 0 and relative_update(dw_norm, w0_norm) >= min_rel_update


def entropy_rank(s: torch.Tensor) -> int:
    """k = ceil(exp(H)) of the normalised singular values (0 log 0 = 0, as the entropy has it), clamped to [1, r]."""
    p = s / s.sum()
    h = float(-torch.special.xlogy(p, p).sum())
    return min(max(math.ceil(math.exp(h)), 1), s.numel())


def energy_rank(s: torch.Tensor, energy: float) -> int:
    """Smallest k whose top-k directions hold at least `energy` of sum s^2."""
    s2 = s.square()
    share = torch.cumsum(s2, 0) / s2.sum()
    k = int(torch.searchsorted(share, torch.tensor([energy], dtype=share.dtype)).item()) + 1
    return min(max(k, 1), s.numel())


def choose_rank(s: torch.Tensor, rule: str, energy: float) -> int:
    if rule == "entropy":
        return entropy_rank(s)
    if rule == "energy":
        return energy_rank(s, energy)
    raise ValueError(f"unknown rank rule {rule!r}")


def coefficients(s: torch.Tensor, rule: str = "entropy", energy: float = 0.8) -> Coefficients:
    """MonoSoup's layer-wise, data-free coefficients from the descending float64 spectrum `s`."""
    s = s.to(torch.float64)
    if not s.numel() or not s[0] > 0:
        raise ValueError("an all-zero spectrum has no MonoSoup coefficients (the update is copied, not edited)")
    s = s / s[0]  # the paper's ratios, free of the update's scale (no s^2 underflows or overflows)
    r = s.numel()
    k = choose_rank(s, rule, energy)
    s2 = s.square()
    head, tail = float(s2[:k].sum()), float(s2[k:].sum())
    p_k = head / (head + tail)
    rho = 0.0 if k == r else float(s[k] ** 2)
    # 1 - P_k as the tail's own share: exact 0 for an update of rank k, and no cancellation near P_k = 1
    lam_low = rho + (1.0 - rho) * math.sqrt(min(tail / (head + tail), 1.0))
    lam_high = 1.0 - lam_low
    clamp = lambda x: min(max(x, 0.0), 1.0)  # noqa: E731
    return Coefficients(k=k, rank=r, p_k=p_k, rho=rho, lambda_high=clamp(lam_high), lambda_low=clamp(lam_low))


def reweigh(
    w0: torch.Tensor, dw: torch.Tensor, dw_high: torch.Tensor, c: Coefficients, out: torch.Tensor | None = None
) -> torch.Tensor:
    """W = W0 + lam_low * dW + (lam_high - lam_low) * dW_high, in the dtype of the inputs (into `out` if given)."""
    out = torch.mul(dw, c.lambda_low, out=out)
    out.add_(w0)  # = W0 + lam_low * dW, rounded the same way
    out.add_(dw_high, alpha=c.lambda_high - c.lambda_low)
    return out
