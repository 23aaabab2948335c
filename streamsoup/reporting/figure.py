"""The picture of a merge: k/rank and the two lambdas per layer and module kind, and a few spectra.

matplotlib is an optional extra (``pip install 'streamsoup[report]'``); without it `--png`
fails with one line saying so. The figure is drawn on a bare `Figure` (no pyplot, no GUI backend).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UsageError
from ..planning.planner import EDIT
from .kinds import KINDS

#: spectra drawn: one per module kind (its middle layer), plus this many tensors that stand out
SPECTRA_OUTLIERS = 2
STACK_STYLES = ("-", "--", ":", "-.")


def _name(info: dict[str, Any]) -> str:
    """A repo id, or the last two parts of the path ("runs/llama-ft")."""
    return info.get("repo") or "/".join(Path(info["path"]).parts[-2:])


def _series(rows: list[dict[str, Any]]) -> dict[str, tuple[str, list[dict[str, Any]]]]:
    """Edited tensors inside the blocks, by line to draw: label -> (line style, rows by layer). A model with
    several stacks of layers (CLIP's towers, T5's encoder and decoder) gets one line style per stack."""
    layered = [r for r in rows if r["action"] == EDIT and r.get("k") is not None and r["layer"] is not None]
    stacks = list(dict.fromkeys(r["stack"] for r in layered))
    out: dict[str, tuple[str, list[dict[str, Any]]]] = {}
    for kind in KINDS:
        for i, stack in enumerate(stacks):
            mine = sorted((r for r in layered if r["kind"] == kind and r["stack"] == stack), key=lambda r: r["layer"])
            if mine:
                label = kind if len(stacks) == 1 else f"{stack.split('.')[0]} {kind}"
                out[label] = (STACK_STYLES[i % len(STACK_STYLES)], mine)
    return out


def chosen_spectra(
    rows: list[dict[str, Any]], outliers: list[dict[str, Any]], spectra: dict[str, np.ndarray]
) -> list[tuple[str, dict[str, Any]]]:
    """(label, row) of the spectra to draw: each kind's middle-layer tensor, then a few that stand out."""
    edited = [r for r in rows if r["action"] == EDIT and r["name"] in spectra]
    chosen: list[tuple[str, dict[str, Any]]] = []
    for kind in KINDS:
        mine = [r for r in edited if r["kind"] == kind]
        if mine:
            row = mine[len(mine) // 2]
            chosen.append((f"{kind}" + (f" (layer {row['layer']})" if row["layer"] is not None else ""), row))
    names = {r["name"] for _, r in chosen}
    by_name = {r["name"]: r for r in edited}
    extra = [o["name"] for o in outliers if o["name"] in by_name and o["name"] not in names]
    for name in list(dict.fromkeys(extra))[:SPECTRA_OUTLIERS]:
        chosen.append((f"stands out: {name}", by_name[name]))
    return chosen


def require_matplotlib() -> None:
    """Fail in one line, before anything is printed or computed, when the figure cannot be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError(
            "--png needs matplotlib, which is not installed: pip install 'streamsoup[report]' "
            "(or pip install matplotlib)"
        ) from None


def check_png_path(path: Path, force: bool = False) -> None:
    """The figure's file must be new (or, with `force`, an existing file) in an existing folder (no folder is
    made for it): `--png OUT/model.safetensors` must not destroy a model."""
    if path.is_dir():
        raise UsageError(f"--png {path} is a folder; give the figure a file name, e.g. {path / 'report.png'}")
    if os.path.lexists(path) and not force:
        raise UsageError(
            f"--png {path} already exists; streamsoup does not replace a file: choose a new name, "
            "or add --force to replace it"
        )
    if not path.parent.is_dir():
        raise UsageError(f"--png {path}: the folder {path.parent} does not exist; create it first")
    if not os.access(path.parent, os.W_OK):
        raise UsageError(f"--png {path}: cannot write into {path.parent}")


def save_figure(doc: dict[str, Any], spectra: dict[str, np.ndarray], path: Path, force: bool = False) -> Path:
    require_matplotlib()
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

    rows, opts, s = doc["tensors"], doc["options"], doc["summary"]
    fig = Figure(figsize=(14, 9), dpi=100, layout="constrained")
    (ax_k, ax_lam), (ax_s, ax_txt) = fig.subplots(2, 2)
    colors = dict(zip(KINDS, [f"C{i}" for i in range(10)] + ["darkgoldenrod", "black"], strict=True))
    series = _series(rows)
    for label, (style, mine) in series.items():
        kind = mine[0]["kind"]
        x = [r["layer"] for r in mine]
        ax_k.plot(x, [r["k"] / r["rank"] for r in mine], style, marker="o", ms=3, color=colors[kind], label=label)
        ax_lam.plot(x, [r["lambda_low"] for r in mine], style, marker="o", ms=3, color=colors[kind], label=label)
    ax_k.set(
        xlabel="layer",
        ylabel="k / rank (share of directions kept as high-energy)",
        ylim=(0, 1.02),
        title="high-energy directions k per layer",
    )
    ax_lam.set(
        xlabel="layer",
        ylabel="lambda_low (weight of the low-energy part)",
        ylim=(0, 1.02),
        title="re-weighting per layer",
    )
    right = ax_lam.secondary_yaxis("right", functions=(lambda v: 1 - v, lambda v: 1 - v))
    right.set_ylabel("lambda_high = 1 - lambda_low (weight of the top-k part)")
    for ax in (ax_k, ax_lam):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if series:
            ax.legend(fontsize=8, ncol=2)
        else:
            ax.text(0.5, 0.5, "no edited tensor inside numbered layers", ha="center", transform=ax.transAxes)

    chosen = chosen_spectra(rows, doc["outliers"], spectra)
    for i, (label, row) in enumerate(chosen):
        sv = np.asarray(spectra[row["name"]], dtype=np.float64)
        sv = sv[sv > 0]
        if not sv.size:
            continue
        idx = np.arange(1, sv.size + 1)
        color = colors[row["kind"]] if not label.startswith("stands out") else f"C{(i + 3) % 10}"
        line = ax_s.loglog(
            idx,
            sv / sv[0],
            color=color,
            lw=1.2,
            ls="-" if not label.startswith("stands") else ":",
            label=f"{label}: k={row['k']} of {row['rank']}",
        )[0]
        k = min(row["k"], sv.size)
        ax_s.plot([k], [sv[k - 1] / sv[0]], "o", color=line.get_color(), ms=5)
    ax_s.set(
        xlabel="index i of the singular value",
        ylabel="s_i / s_1 (log)",
        title="spectrum of the update dW = W1 - W0 (dot: k)",
    )
    ax_s.grid(alpha=0.3, which="both")
    ax_s.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax_s.xaxis.set_minor_formatter(NullFormatter())
    if chosen:
        ax_s.legend(fontsize=7)
    else:
        ax_s.text(0.5, 0.5, "no spectrum stored", ha="center", transform=ax_s.transAxes)

    ax_txt.axis("off")
    ax_txt.text(0, 1, _panel_text(doc), va="top", ha="left", family="monospace", fontsize=8, transform=ax_txt.transAxes)
    rule = opts["rank_rule"] + (f" (energy {opts['energy']:g})" if opts["rank_rule"] == "energy" else "")
    state = "" if doc["state"] == "complete" else f" [{doc['state']}: {s['tensors_done']} of {s['tensors']} tensors]"
    fig.suptitle(
        f"MonoSoup on {_name(doc['inputs']['finetuned'])} (base {_name(doc['inputs']['base'])}), "
        f"{rule} rank rule{state}\n"
        "lambda_low = rho + (1 - rho) sqrt(1 - P_k), lambda_high = 1 - lambda_low",
        fontsize=12,
    )
    check_png_path(path, force)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")  # a name no one has
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as to any new file
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png")
        if force:
            tmp.replace(path)
        else:
            _publish_new(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _publish_new(tmp: Path, path: Path) -> None:
    """`tmp` becomes `path` only if no file took that name meanwhile: a hard link cannot replace one (a rename
    where the filesystem has no hard links, after one more look)."""
    try:
        os.link(tmp, path)
    except OSError as exc:
        if isinstance(exc, FileExistsError) or os.path.lexists(path):
            raise UsageError(f"--png {path} appeared while the figure was drawn; it was left as it is") from None
        tmp.replace(path)


def _panel_text(doc: dict[str, Any]) -> str:
    """The numbers beside the curves: per kind medians, tensors outside the layers, what stands out."""
    s = doc["summary"]
    lines = [
        f"{s['tensors_done']} of {s['tensors']} tensors: {s['edited']} edited, {s['copied']} copied, "
        f"{s['dropped']} dropped",
        "",
        "medians per module kind:",
        f"{'kind':<8}{'edited':>7}{'k/rank':>9}{'P_k':>8}{'l_high':>8}{'l_low':>8}",
    ]
    for kind, m in doc["modules"].items():
        if not m["edited"]:
            lines.append(f"{kind:<8}{0:>7}   (copied: {m['copied']})")
            continue
        lines.append(
            f"{kind:<8}{m['edited']:>7}{m['k_rank']['median']:>9.3f}{m['P_k']['median']:>8.3f}"
            f"{m['lambda_high']['median']:>8.3f}{m['lambda_low']['median']:>8.3f}"
        )
    outside = [r for r in doc["tensors"] if r["action"] == EDIT and r["layer"] is None and r.get("k") is not None]
    if outside:
        lines += ["", "outside the layers:"]
        lines += [
            f"  {_short(r['name'])}: k/rank {r['k'] / r['rank']:.3f}, l_low {r['lambda_low']:.3f}" for r in outside[:6]
        ]
    found = doc["outliers"]
    lines += ["", f"stand out: {len(found)}"]
    lines += [f"  {_short(o['name'])}:\n    {o['why'][:70]}" for o in found[:4]]
    if len(found) > 4:
        lines.append(f"  ... and {len(found) - 4} more (streamsoup report)")
    if s["copied_because"]:
        because = [f"  {n} {reason[:60]}" for reason, n in s["copied_because"].items()]
        more = len(because) - 3
        lines += ["", "copied because:", *because[:3]] + ([f"  ... {more} more reason(s)"] if more > 0 else [])
    return "\n".join(lines)


def _short(name: str, width: int = 44) -> str:
    return name if len(name) <= width else "..." + name[-(width - 3) :]
