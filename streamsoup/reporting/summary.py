"""What MonoSoup did, at a glance: per module kind, the tensors that stand out, totals.

`build_document` derives the summary, per-kind statistics and outliers from the report's
rows; the report file, `streamsoup report --json` and `plan --json` share its structure
(`summary`, `modules`, `tensors`), so one script can read all three.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter
from typing import Any

from ..planning.planner import EDIT
from ..tasks.result import PHASES
from ..units import format_size
from .kinds import KINDS, locate

STATS = ("k_rank", "P_k", "lambda_high", "lambda_low")
#: lambda_low at or beyond these is shown as a tensor that stands out
LAMBDA_EDGE = 0.01
#: a value this far from its kind's median (and more than ROBUST_Z scaled MADs) stands out
MIN_DEVIATION = 0.1
ROBUST_Z = 5.0
SHOWN_OUTLIERS = 10
#: P_k this close to 1: the top-k directions hold the whole update
EXACT_LOW_RANK = 1e-9


def annotate(row: dict[str, Any]) -> dict[str, Any]:
    where = locate(row["name"])
    return {**row, "kind": where.kind, "layer": where.layer, "stack": where.stack}


def reason_category(reason: str) -> str:
    """'shape [2056, 256] differs from base [2048, 256]' -> 'shape differs from base': reasons, counted."""
    text = reason.split(":", 1)[0]
    text = re.sub(r"\([^)]*\)|\[[^\]]*\]", "", text)
    text = re.sub(r"(?<=\s)[-+]?\d[\d.e+-]*(?=\s|$)", "", text)
    return re.sub(r"\s+", " ", text).strip() or reason


def spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def stat_values(row: dict[str, Any]) -> dict[str, float]:
    return {
        "k_rank": row["k"] / row["rank"],
        "P_k": row["P_k"],
        "lambda_high": row["lambda_high"],
        "lambda_low": row["lambda_low"],
    }


def module_stats(rows: list[dict[str, Any]], planned: bool = False) -> dict[str, dict[str, Any]]:
    """Per module kind: counts of its matrices (biases and norms are left to the totals), and the median and
    range of k/rank, P_k, lambda_high, lambda_low over the edited ones."""
    out: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        mine = [r for r in rows if r["kind"] == kind and len(r["shape"]) >= 2]
        if not mine:
            continue
        edited = [stat_values(r) for r in mine if r["action"] == EDIT and r.get("k") is not None]
        entry: dict[str, Any] = {"tensors": len(mine)}
        if planned:
            entry["edit_candidates"] = sum(r["action"] == EDIT for r in mine)
            entry["edited"] = None
        else:
            entry["edited"] = len(edited)
        entry["copied"] = sum(r["action"] != EDIT for r in mine)
        entry.update({s: (None if planned else spread([e[s] for e in edited])) for s in STATS})
        out[kind] = entry
    return out


def _robust_outliers(edited: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found = []
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for r in edited:
        by_kind.setdefault(r["kind"], []).append(r)
    for kind, rows in by_kind.items():
        if len(rows) < 5:
            continue
        for stat in ("k_rank", "lambda_low"):
            values = [stat_values(r)[stat] for r in rows]
            med = statistics.median(values)
            mad = statistics.median(abs(v - med) for v in values) * 1.4826
            for r, v in zip(rows, values, strict=True):
                if abs(v - med) > max(MIN_DEVIATION, ROBUST_Z * mad):
                    found.append((r, f"{stat.replace('_rank', '/rank')} {v:.3f}, median of {kind} {med:.3f}"))
    return [{"row": r, "why": why} for r, why in found]


def outliers(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tensors whose values look off: k = 1, k = rank, a lambda at 0 or 1, far from their kind's median,
    or a matrix left unedited because its update was too small or not finite, or its shape not the base's
    (a resized vocabulary's embeddings and lm_head)."""
    order = {r["name"]: i for i, r in enumerate(rows)}
    edited = [r for r in rows if r["action"] == EDIT and r.get("k") is not None]
    found: list[tuple[dict[str, Any], str]] = []
    for r in edited:
        if r["k"] == 1 and r["rank"] > 1:
            found.append((r, "k = 1: one direction holds the update"))
        if r["k"] == r["rank"] and r["rank"] > 1:
            found.append((r, "k = rank: no low-energy part"))
        if r["P_k"] >= 1 - EXACT_LOW_RANK:
            continue  # the update is exactly rank <= k (a LoRA's): there is no low-energy part for lambda_low to weigh
        if r["lambda_low"] >= 1 - LAMBDA_EDGE:
            found.append((r, f"lambda_low {r['lambda_low']:.3f}: the update is kept almost whole"))
        elif r["lambda_low"] <= LAMBDA_EDGE:
            found.append((r, f"lambda_low {r['lambda_low']:.3f}: the low-energy part is dropped"))
    found += [(o["row"], o["why"]) for o in _robust_outliers(edited)]
    for r in rows:
        if r["action"] != EDIT and any(
            why in r["reason"] for why in ("--min-rel-update", "NaN", "no update", "differs from base")
        ):
            found.append((r, f"not edited: {r['reason']}"))
        elif r["action"] == EDIT and "added rows kept" in r["reason"]:
            found.append((r, f"a resized vocabulary: {r['reason'].split('; ', 1)[1]}"))
    found.sort(key=lambda item: order[item[0]["name"]])
    return [{"name": r["name"], "kind": r["kind"], "layer": r["layer"], "why": why} for r, why in found]


def row_outputs(row: dict[str, Any]) -> list[str]:
    """The output tensors a report row's checksum covers (an adapter's module: [A', B'(, bias')])."""
    return row.get("outputs") or [row["name"]]


def totals(
    rows: list[dict[str, Any]], jobs: list[str], dropped: list[str], output_bytes: int, seconds: float
) -> dict[str, Any]:
    phase: Counter[str] = Counter()
    for r in rows:
        phase.update(r.get("phases") or {})
    edited = sum(r["action"] == EDIT for r in rows)
    return {
        "tensors": len(jobs),
        "tensors_done": len(rows),
        "output_tensors": len({name for r in rows for name in row_outputs(r)}),  # what OUT holds (verify counts)
        "edited": edited,
        "copied": len(rows) - edited,
        "dropped": len(dropped),
        "output_bytes": output_bytes,
        "seconds": round(seconds, 3),
        "phase_seconds": {p: round(phase[p], 3) for p in PHASES if p in phase},
        "copied_because": dict(
            Counter(reason_category(r["reason"]) for r in rows if r["action"] != EDIT).most_common()
        ),
        "devices": dict(Counter(r["device"] for r in rows if r["action"] == EDIT).most_common()),
    }


def build_document(
    head: dict[str, Any],
    rows: list[dict[str, Any]],
    jobs: list[str],
    dropped: list[str],
    output_bytes: int,
    seconds: float,
) -> dict[str, Any]:
    """`head` (who, what, where, when) + summary, modules, outliers and the annotated rows."""
    rows = [annotate(r) for r in rows]
    done = {r["name"] for r in rows}
    return {
        **head,
        "summary": totals(rows, jobs, dropped, output_bytes, seconds),
        "modules": module_stats(rows),
        "outliers": outliers(rows),
        "tensors": rows,
        "remaining": [name for name in jobs if name not in done],
        "dropped": [{"name": n, "action": "drop", "reason": "only in base"} for n in dropped],
    }


# ---- the terminal summary ----


def format_spread(s: dict[str, float] | None) -> str:
    """A kind's median [min-max], as the report and the model card show it."""
    if s is None:
        return "-"
    if f"{s['min']:.3f}" == f"{s['max']:.3f}":
        return f"{s['median']:.3f}"
    return f"{s['median']:.3f} [{s['min']:.3f}-{s['max']:.3f}]"


def _input_line(role: str, info: dict[str, Any]) -> str:
    where = f"{info['repo']} @ {info['commit'][:12]}" if info.get("repo") else info["path"]
    kind = " (LoRA adapter)" if info.get("kind") == "LoRA adapter" else ""
    return f"{role:<10}{where}{kind}, fingerprint {info['fingerprint']}"


def _when(doc: dict[str, Any]) -> str:
    run = doc["run"]
    start = (run["started_at"] or "?").replace("T", " ").replace("+00:00", "")
    end = run["finished_at"] or run.get("last_commit_at")
    end_text = end.replace("T", " ").replace("+00:00", "") if end else "?"
    if end_text[:10] == start[:10]:
        end_text = end_text[11:]
    verb = "->" if run["finished_at"] else "-> last commit"
    work = f"{doc['summary']['seconds']:.1f} s of work"
    return f"{start} {verb} {end_text} UTC, {work}, {len(run['attempts'])} attempt(s)"


def _machine(doc: dict[str, Any]) -> str:
    m = doc.get("machine") or {}
    if not m:
        return "not recorded"
    gpus = f", {', '.join(m['gpus'])}" if m.get("gpus") else ""
    return f"{m.get('host', '?')} ({m.get('cpus', '?')} CPUs{gpus}): {m.get('lanes', '?')}; torch {m.get('torch', '?')}"


def shaping_flags(opts: dict[str, Any]) -> list[str]:
    """The options besides the rank rule that shaped the numbers, as flags (the others only when given)."""
    flags = [f"--min-rel-update {opts['min_rel_update']:g}", f"--save {opts['save']}"]
    if opts.get("dtype", "keep") != "keep":
        flags.append(f"--dtype {opts['dtype']}")
    flags += [f"--{name} {pattern!r}" for name in ("exclude", "only") for pattern in opts.get(name) or ()]
    return flags + (["--split-fused"] if opts.get("split_fused") else [])


def format_report(doc: dict[str, Any]) -> str:
    """The compact terminal summary of a report document (finished or interrupted run)."""
    s, opts = doc["summary"], doc["options"]
    state = doc["state"]
    head = (
        f"{state}: {s['tensors']} tensors"
        if state == "complete"
        else f"{state}: {s['tensors_done']} of {s['tensors']} tensors done"
    )
    rule = opts["rank_rule"] + (f" (energy {opts['energy']:g})" if opts["rank_rule"] == "energy" else "")
    lines = [
        f"report    {doc['out']} ({head}; {s['edited']} edited, {s['copied']} copied, {s['dropped']} dropped)",
        _input_line("base", doc["inputs"]["base"]),
        _input_line("finetuned", doc["inputs"]["finetuned"]),
        f"options   {rule} rank rule, {', '.join(shaping_flags(opts))}; streamsoup {doc['streamsoup']}",
        f"run       {_when(doc)}",
        f"machine   {_machine(doc)}",
        "",
        f"{'kind':<8}{'matrices':>9}{'edited':>7}  {'k/rank':<22}{'P_k':<22}{'lambda_high':<22}{'lambda_low'}",
        f"{'':<8}{'':>9}{'':>7}  median [min-max]",
    ]
    for kind, m in doc["modules"].items():
        spreads = "".join(f"{format_spread(m[key]):<22}" for key in ("k_rank", "P_k", "lambda_high"))
        lines.append(f"{kind:<8}{m['tensors']:>9}{m['edited']:>7}  {spreads}{format_spread(m['lambda_low'])}")
    lines.append("")
    found = doc["outliers"]
    if found:
        lines.append(
            f"stand out {len(found)} tensor(s)"
            + (":" if len(found) <= SHOWN_OUTLIERS else f", the first {SHOWN_OUTLIERS} (--json lists all):")
        )
        for o in found[:SHOWN_OUTLIERS]:
            where = f"{o['kind']}, layer {o['layer']}" if o["layer"] is not None else o["kind"]
            lines.append(f"  {o['name']} ({where}): {o['why']}")
    else:
        lines.append("stand out none (no k = 1 or k = rank, no lambda at 0 or 1, none far from its kind's median)")
    why = ", ".join(f"{n} {reason}" for reason, n in s["copied_because"].items())
    lines.append(f"copied    {s['copied']}" + (f": {why}" if why else ""))
    phases = ", ".join(f"{p} {sec:.1f} s" for p, sec in s["phase_seconds"].items())
    devices = ", ".join(f"{n} on {d}" for d, n in s["devices"].items()) or "none"
    lines.append(f"time      {phases or 'no phase recorded'} (summed over tensors); edited: {devices}")
    lines.append(f"output    {format_size(s['output_bytes'])}")
    if state != "complete":
        rest = doc["remaining"]
        shown = ", ".join(rest[:3]) + (" ..." if len(rest) > 3 else "")
        lines.append(f"remaining {len(rest)} tensor(s)" + (f": {shown}" if rest else ""))
        if state == "interrupted":
            lines.append("rerun the same `streamsoup merge` command to resume")
    return "\n".join(lines)
