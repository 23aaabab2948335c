"""The end of a merge: side files, index, spectra and report into OUT.partial, the rename that makes OUT
appear, and the cleanup of a published OUT (also what a rerun finds after a kill around the rename)."""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import InputError, RunError, UsageError
from ..faults import fault_point
from ..io import owned, store, writer
from ..io.checkpoint import INDEX_NAME
from ..io.runlock import LOCK_NAME
from ..io.sidefiles import SideFile, copy_side_files, side_file, side_files
from ..io.state import POINTER_NAME, STATE_NAME, RunState, describe_changes, is_state_entry, kept_line
from ..planning.planner import MergePlan
from ..reporting import REPORT_NAME, SPECTRA_NAME, MergeSummary, read_report, write_report, write_spectra
from ..reporting.card import CARD_NAME, CardSource, model_card, read_config
from ..reporting.record import Outcome, assemble
from ..sources.adapter import ADAPTER_CONFIG
from ..sources.config import model_config
from ..tasks.result import TensorResult

log = logging.getLogger(__name__)


def finish(plan: MergePlan, partial: Path, out: Path, results: list[TensorResult], state: RunState) -> bool:
    """Side files, index, spectra, report; then the atomic rename that makes OUT appear.

    False: OUT appeared meanwhile (a concurrent run published it), and nothing was replaced.
    """
    copy_side_files(plan_side_files(plan), partial)
    out_config(partial, plan)
    if plan.save == "adapter":
        writer.write_json(partial / ADAPTER_CONFIG, plan.adapter.reweighed_config(plan.base_model_id))
    index = plan.layout.index_json()
    if index is not None:
        writer.write_json(partial / INDEX_NAME, index)
    committed = sorted(state.committed().items())  # in plan order: the same merge writes the same bytes
    spectra, damaged = state.spectra([m for _, m in committed])
    if damaged:
        raise RunError(
            f"the resume state {state.path} changed during the run (the spectrum of {damaged[0]} does "
            "not verify); rerun the same command: what does not verify is recomputed"
        )
    write_spectra(partial, spectra)
    outcome = Outcome("complete", out, state.elapsed(), time.time(), state.fingerprint)
    # the head is the one this attempt stored when it opened the state
    report = assemble(state.head, state.attempts, [r.as_dict() for r in results], outcome)
    report["shards"] = plan.layout.records()
    write_report(partial, report)
    source = CardSource(
        finetuned_card(plan),
        read_config(partial),
        read_config(partial, ADAPTER_CONFIG) if plan.save == "adapter" else None,
        model_config(plan.base),
        plan.base_model_id,
        plan.base_model_from,
    )
    writer.write_text(partial / CARD_NAME, model_card(report, source))
    fault_point("publish.before-rename")
    if not writer.publish(partial, out):
        return False
    fault_point("publish.after-rename")
    return True


#: --dtype's names, as a transformers config.json names them
CONFIG_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def out_config(partial: Path, plan: MergePlan) -> None:
    """OUT's config.json says what OUT holds, read and written once. Decoded weights (bf16): no
    quantization_config, which would make loaders expect scales that are no longer there. --dtype: every tensor
    in it, as `from_pretrained(dtype="auto")` reads (the key the file has, "dtype" or the older "torch_dtype";
    "dtype" when it has neither)."""
    config = read_config(partial)
    if config is None:
        return
    changed = plan.dequantized and "quantization_config" in config
    if changed:
        del config["quantization_config"]
    if plan.options.dtype != "keep":
        for key in [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]:
            config[key] = CONFIG_DTYPES[plan.options.dtype]
        changed = True
    if changed:
        writer.write_json(partial / "config.json", config)


def plan_side_files(plan: MergePlan) -> list[SideFile]:
    """The config and tokenizer files OUT gets (not an adapter's own config in a merged model), all checked.

    No README.md: OUT's is the model card, with the fine-tune's own card folded into it.
    """
    adapter_root = plan.adapter.root if plan.adapter is not None and plan.save == "model" else None
    files = [
        f
        for root in plan.side_roots
        for f in side_files(root, skip=(ADAPTER_CONFIG, CARD_NAME) if root == adapter_root else (CARD_NAME,))
    ]
    bound = {str(c.config_path): c.config_identity for c in (plan.base, plan.finetuned) if c.remote}
    for f in files:  # the config that decided how tensors were split and decoded is the one OUT gets
        if str(f.path) in bound and (bound[str(f.path)] or {}).get("version") != f.version:
            raise InputError(
                f"{f.path} changed since this merge began (its version is no longer the one its tensors were "
                "planned with); rerun with its original contents, or with --fresh to start over"
            )
    return files


#: the size of a fine-tune's README.md folded into OUT's card (its YAML front matter is parsed in pure Python)
CARD_LIMIT = 1 << 20


def finetuned_card(plan: MergePlan) -> str | None:
    """FINETUNED's (or the adapter's) README.md, held to the side-file rules; None when it has none."""
    root = (plan.adapter or plan.finetuned).root
    card = side_file(root, CARD_NAME) if store.is_folder(root) else None
    if card is not None and card.size > CARD_LIMIT:
        log.warning(
            "FINETUNED %s is %.1f MiB, more than a model card; OUT's card does not fold it in",
            CARD_NAME,
            card.size / 2**20,
        )
        return None
    return card.path.read_text(errors="replace") if card is not None else None


def cleanup(out: Path, external_state: Path | None) -> None:
    """Remove the run's bookkeeping from a published OUT (a kill here is finished by a rerun).

    A state folder is removed only when streamsoup made it for this OUT and it holds nothing else.
    """
    for state in (external_state, out / STATE_NAME):
        if state is None or not os.path.lexists(state):
            continue
        kept = owned.remove(state, out, "state", is_state_entry)
        if kept is None:
            log.warning("left %s in place: it is not a resume state streamsoup made for %s", state, out)
        elif kept:
            log.warning(kept_line(state, kept, f"removed the resume state of {out}"))
    for name in (POINTER_NAME, LOCK_NAME, owned.MARKER):
        path = out / name
        if os.path.lexists(path) and not owned.is_dir(path):
            path.unlink()


#: the output shards a merge writes, of any plan (--fresh may follow an attempt with another shard count)
SHARD_NAME = re.compile(r"(model|adapter_model)(-\d{5}-of-\d{5})?\.safetensors")


def partial_entry(plan: MergePlan, partial: Path) -> Callable[[str], bool]:
    """Whether an entry of OUT.partial is one streamsoup writes there, all of it: a folder (the state, a side
    file's folder) only while it holds nothing else. Anything else is a user's, which would be published with
    OUT, or deleted by --fresh."""
    sides = plan_side_files(plan)
    files = {
        LOCK_NAME,
        POINTER_NAME,
        REPORT_NAME,
        SPECTRA_NAME,
        CARD_NAME,
        ADAPTER_CONFIG,
        INDEX_NAME,
        "config.json",
        *(str(f.rel) for f in sides if len(f.rel.parts) == 1),
    }
    nested = {f.rel for f in sides if len(f.rel.parts) > 1}

    def ours(name: str) -> bool:
        path = partial / name
        if owned.is_dir(path):
            if name == STATE_NAME:
                return not owned.strangers(path, is_state_entry)
            return any(rel.parts[0] == name for rel in nested) and only_side_files(path, partial, nested)
        if os.path.islink(path):
            return False
        bare = name.removesuffix(".tmp")
        return bare in files or SHARD_NAME.fullmatch(bare) is not None

    return ours


def only_side_files(folder: Path, partial: Path, nested: set[Path]) -> bool:
    """Every file under `folder` is one of the side files copied there (no link, nothing else)."""
    for root, dirs, names in os.walk(folder):
        if any(os.path.islink(os.path.join(root, d)) for d in dirs):
            return False
        for name in names:
            path = Path(root, name)
            if os.path.islink(path) or path.relative_to(partial) not in nested:
                return False
    return True


def existing_output(out: Path, fingerprint: dict[str, Any]) -> MergeSummary:
    """OUT exists. The same merge (its report records the fingerprint): nothing to do, or only the cleanup a
    kill after the publish rename left. Anything else is refused: streamsoup never overwrites."""
    try:
        recorded = read_report(out).get("fingerprint")
    except (OSError, InputError):  # no report, or one streamsoup cannot read: not an output to trust
        recorded = None
    if not isinstance(recorded, dict):
        raise UsageError(
            f"OUT {out} already exists and is not a streamsoup output; streamsoup never overwrites: "
            "choose a new folder or remove it"
        )
    if recorded != fingerprint:
        changes = "; ".join(describe_changes(recorded, fingerprint)) or "a different fingerprint"
        raise UsageError(
            f"OUT {out} already holds a different merge ({changes}); streamsoup never overwrites: "
            "choose a new folder or remove it"
        )
    pointer = out / POINTER_NAME
    leftovers = [p for p in (out / STATE_NAME, pointer, out / LOCK_NAME, out / owned.MARKER) if os.path.lexists(p)]
    if leftovers:
        cleanup(out, read_pointer(pointer))
    return MergeSummary.from_report(out, already_complete=not leftovers)


def published_meanwhile(partial: Path, out: Path, fingerprint: dict[str, Any]) -> MergeSummary:
    """OUT appeared while this run held its own OUT.partial: the same merge finished elsewhere, or refused."""
    summary = existing_output(out, fingerprint)  # refuses a different merge, naming the difference
    owned.remove(partial, out, "partial", lambda name: True)  # ours, made by this very run: its work is not needed
    log.warning("%s was published by another run of the same merge meanwhile; this run's work is discarded", out)
    return summary


def read_pointer(pointer: Path) -> Path | None:
    """The --work-dir an OUT's pointer names (only a hint: `cleanup` deletes nothing it cannot prove is ours)."""
    try:
        text = pointer.read_text(errors="replace").strip() if pointer.is_file() else ""
    except OSError:
        return None
    return Path(text) if text.startswith("/") and "\0" not in text else None
