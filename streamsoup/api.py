"""The Python API: ``streamsoup.merge(base, finetuned, out, **options)``; the CLI is a thin layer over it."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from . import writer
from .errors import Interrupted, UsageError
from .executor import local_client, run_graph
from .graph import GraphTask, build_graph
from .layout import INDEX_NAME
from .options import MergeOptions
from .plan import EDIT, MergePlan, plan_merge
from .report import MergeSummary, build_report, write_report
from .tasks import TensorResult

log = logging.getLogger(__name__)


def merge(
    base: str | Path,
    finetuned: str | Path,
    out: str | Path,
    *,
    config: str | Path | None = None,
    fresh: bool = False,
    progress: bool = False,
    **options: Any,
) -> MergeSummary:
    """MonoSoup-edit FINETUNED against BASE into the new folder OUT; returns a summary.

    `options` are the fields of MergeOptions (``rank_rule="energy"``, ``shard_size="2GB"``, ...),
    layered over the YAML file `config`. OUT appears only when complete; until then the
    work lives in ``OUT.partial/``.
    """
    start = time.perf_counter()
    opts = MergeOptions.create(config, **options)
    out = Path(out).absolute()
    plan = plan_merge(base, finetuned, opts)
    check_output(out, plan)
    partial = writer.partial_dir(out)
    if fresh and partial.exists():
        shutil.rmtree(partial)
    log.info(
        "planned %d tensors (%d to edit) into %d shard(s)", len(plan.jobs), len(plan.edits), len(plan.layout.shards)
    )
    writer.preallocate(plan.layout, partial)
    results = execute(plan, partial, opts, progress)
    seconds = time.perf_counter() - start
    report_path = finish(plan, partial, out, results, seconds)
    edited = sum(r.action == EDIT for r in results)
    return MergeSummary(
        out,
        len(results),
        edited,
        len(results) - edited,
        len(plan.dropped),
        plan.bytes_to_write,
        time.perf_counter() - start,
        out / report_path.name,
    )


def check_output(out: Path, plan: MergePlan) -> None:
    """OUT must be new and must not sit inside either input (we never write into an input)."""
    if out.exists():
        raise UsageError(f"OUT {out} already exists; streamsoup never overwrites: choose a new folder or remove it")
    target = out.resolve()
    for role, ckpt in (("BASE", plan.base), ("FINETUNED", plan.finetuned)):
        root = ckpt.root.resolve()
        if target == root or (root.is_dir() and root in target.parents):
            raise UsageError(f"OUT {out} is inside {role} {ckpt.root}; write the merged model elsewhere")


def execute(plan: MergePlan, partial: Path, opts: MergeOptions, progress: bool) -> list[TensorResult]:
    tasks = build_graph(plan, partial, opts)
    results: dict[str, TensorResult] = {}
    with tqdm(
        total=plan.bytes_to_write,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="merging",
        disable=not progress,
        dynamic_ncols=True,
    ) as bar:

        def on_done(task: GraphTask, result: TensorResult) -> None:
            results[task.key] = result
            bar.update(task.nbytes)
            bar.set_postfix_str(f"{len(results)}/{len(tasks)} tensors", refresh=False)

        try:
            with local_client(opts.lanes, opts.threads) as client:
                run_graph(client, tasks, on_done)
        except KeyboardInterrupt:
            raise Interrupted("interrupted — rerun the same command to resume") from None
    return [results[job.key] for job in plan.jobs]


def finish(plan: MergePlan, partial: Path, out: Path, results: list[TensorResult], seconds: float) -> Path:
    """Side files, index, report; then the atomic rename that makes OUT appear."""
    if plan.finetuned.root.is_dir():
        writer.copy_side_files(plan.finetuned.root, partial)
    index = plan.layout.index_json()
    if index is not None:
        writer.write_json(partial / INDEX_NAME, index)
    report_path = write_report(partial, build_report(plan, results, seconds))
    writer.publish(partial, out)
    return report_path
