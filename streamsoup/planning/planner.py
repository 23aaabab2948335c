"""Pair the tensors of two checkpoints and decide what happens to each, from headers alone."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import InputError, OptionError, UsageError
from ..io import store
from ..io.checkpoint import Checkpoint, TensorRef
from ..io.dtypes import is_float
from ..io.layout import Placement, ShardLayout, TensorSpec
from ..numerics.lowrank import BiasUpdate, LoraUpdate
from ..options import PATTERNS_SECONDS, MergeOptions, pattern_finds
from ..sources.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, Adapter, AdapterTensors, resolve
from ..sources.hub import cache_repo_id, hub_model_id
from ..sources.opening import Input, open_input
from .experts import check_stacking_known, stacked, stacked_vectors
from .fused import row_parts
from .preflight import (
    check_adapter_trained,
    check_not_blank,
    check_pairing,
    check_related,
    check_shard_count,
    check_values_differ,
)

EDIT, COPY = "edit", "copy"
#: what torch.nn.parallel.DistributedDataParallel puts before every name of the module it wraps
DDP_PREFIX = "module."


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: where it comes from, what to do with it, and where it goes."""

    index: int
    name: str
    finetuned: TensorRef
    base: TensorRef | None
    action: str  # EDIT candidates may still turn into COPY once the update's norm is known
    reason: str
    placement: Placement
    lora: LoraUpdate | None = None  # dW comes from low-rank factors (an adapter), not from W1 - W0
    bias: BiasUpdate | None = None  # the fine-tune's bias is base bias + lora_B.bias * scaling
    dtype: str = ""  # output dtype when not the fine-tune tensor's (an adapter merge writes the base's)
    factors_out: bool = False  # --save adapter: write the reweighed factors [A', B'(, bias')] at `placement`
    outputs: tuple[str, ...] = ()  # the output tensors the slot holds, when not just `name`
    part: tuple[int, int] | None = None  # (expert, experts): one expert's slice of the stacked tensor outputs[0]
    shared_rows: int = 0  # > 0: the fine-tune has rows past the base's (a resized vocabulary): MonoSoup edits
    #                       these first rows against BASE and the rest are written as the fine-tune has them

    @property
    def edit_source(self) -> TensorRef:
        """The fine-tune's matrix MonoSoup works on: the tensor, or its rows the base has too."""
        return self.finetuned.rows(0, self.shared_rows) if self.shared_rows else self.finetuned

    @property
    def added_rows(self) -> TensorRef | None:
        """The fine-tune's rows past the base's, written unchanged after the edited ones."""
        return self.finetuned.rows(self.shared_rows, self.finetuned.shape[0]) if self.shared_rows else None

    @property
    def key(self) -> str:
        return f"tensor-{self.index:06d}"

    @property
    def shape(self) -> tuple[int, ...]:
        """The matrix MonoSoup sees: the base's for an adapter's update, else the fine-tune tensor's."""
        return self.base.shape if self.lora is not None else self.finetuned.shape

    @property
    def out_dtype(self) -> str:
        return self.dtype or self.finetuned.dtype

    @property
    def dense_w1(self) -> bool:
        """W1 is computed from the adapter (DoRA) rather than read: the dense path on a materialized W1."""
        return self.lora is not None and self.lora.magnitude is not None

    @property
    def lowrank(self) -> bool:
        """dW is taken from the adapter's factors (tasks/lora.py): no eigensolve, W0 streamed once."""
        return self.lora is not None and self.lora.magnitude is None


@dataclass(frozen=True)
class MergePlan:
    base: Checkpoint
    finetuned: Checkpoint
    options: MergeOptions
    jobs: tuple[TensorJob, ...]
    dropped: tuple[str, ...]  # tensors only in the base
    layout: ShardLayout
    warnings: tuple[str, ...] = ()  # said once, before the run (plan and merge alike)
    adapter: Adapter | None = None  # FINETUNED is a PEFT LoRA adapter (`finetuned` is then its weights file)
    side_roots: tuple[Path, ...] = ()  # folders whose non-weight files go into OUT (config, tokenizer, ...)
    dequantized: bool = False  # OUT's config.json comes from a quantized input and OUT is not: it loses it
    base_model_id: str = ""  # BASE's Hugging Face repo id for OUT's metadata ("": none is known)
    base_model_from: str = ""  # where base_model_id was found

    @property
    def save(self) -> str:
        return self.options.save

    @property
    def edits(self) -> list[TensorJob]:
        return [j for j in self.jobs if j.action == EDIT]

    @property
    def bytes_to_write(self) -> int:
        return self.layout.total_size


def editable(ref: TensorRef) -> bool:
    """Float weights, as stored or decoded from a quantized format."""
    return is_float(ref.dtype) or ref.decoded


#: what a decoded (quantized) fine-tune's weights are written as
DECODED_OUT = "BF16"
#: --dtype's names, as safetensors names them
OUT_DTYPES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}


def out_dtype(ref: TensorRef, target: str = "keep") -> str:
    """What a tensor is written as: --dtype for every float tensor, else the input's (bf16 for a decoded one)."""
    if target != "keep" and editable(ref):
        return OUT_DTYPES[target]
    return DECODED_OUT if ref.decoded else ref.dtype


#: the names of a vocabulary's matrices (the last module name): only these grow by the tokens a fine-tune adds
VOCAB_MATRICES = ("embed_tokens", "lm_head", "wte", "word_embeddings", "embed_out", "tok_embeddings", "output")


def resized_rows(ft: TensorRef, base: TensorRef | None) -> int:
    """The base's row count when the fine-tune has the same vocabulary matrix with rows added (embeddings and
    lm_head of a vocabulary that grew: chat templates' tokens), else 0. Other grown matrices (position embeddings
    interpolated, a classifier with more labels) are not a vocabulary: copied, as before."""
    module = ft.name.removesuffix(".weight").split(".")[-1]
    if module not in VOCAB_MATRICES or base is None or len(ft.shape) != 2 or len(base.shape) != 2:
        return 0
    if ft.decoded or base.decoded:
        return 0
    grew = ft.shape[1] == base.shape[1] and ft.shape[0] > base.shape[0] > 0
    return base.shape[0] if grew and editable(ft) and editable(base) else 0


def pair_action(ft: TensorRef, base: TensorRef | None) -> tuple[str, str]:
    """MonoSoup edits float matrices present in both checkpoints with equal shapes; all else is copied."""
    if base is None:
        return COPY, "not in base"
    if base.shape != ft.shape:
        return COPY, f"shape {list(ft.shape)} differs from base {list(base.shape)}"
    if len(ft.shape) < 2:
        return COPY, f"{len(ft.shape)}-D tensor (only matrices and kernels are edited)"
    if ft.numel == 0:
        return COPY, "empty tensor"
    if not (editable(ft) and editable(base)):
        return COPY, f"dtype {ft.dtype}/{base.dtype} is not a float type MonoSoup edits"
    return EDIT, ""


def check_values(plan: MergePlan) -> None:
    """Refuse inputs whose headers are right and whose data cannot make the model (preflight.py), from a few
    sampled values of each: a merge does, before anything of OUT is made; `plan` reads headers alone."""
    if plan.adapter is not None:
        lora = [j for j in plan.jobs if j.lora is not None]
        check_not_blank(plan.base, [j.base for j in lora], "BASE")
        check_adapter_trained(plan.adapter.root, [j.lora for j in lora])
        return
    pairs = [(j.base, j.edit_source) for j in plan.edits if j.base is not None]
    check_not_blank(plan.base, [b for b, _ in pairs], "BASE")
    check_not_blank(plan.finetuned, [f for _, f in pairs], "FINETUNED")
    check_values_differ(plan.base, plan.finetuned, pairs)
    check_related(plan.base, plan.finetuned, pairs)


def plan_merge(
    base: str | Path | Checkpoint, finetuned: str | Path | Checkpoint | Adapter, options: MergeOptions
) -> MergePlan:
    """Pair, decide and lay out from headers; refuse inputs that cannot make a right model (preflight.py)."""
    plan = _paired(base, finetuned, options)
    deadline = time.monotonic() + PATTERNS_SECONDS
    jobs = tuple(filtered(job, options, deadline) for job in plan.jobs)
    notes = [*unmatched(plan.jobs, options, deadline)]
    if options.split_fused and plan.adapter is not None:
        notes.append("--split-fused does not apply to a LoRA adapter's updates (each is low rank per module)")
    return replace(plan, jobs=jobs, warnings=(*plan.warnings, *notes))


def filtered(job: TensorJob, options: MergeOptions, deadline: float) -> TensorJob:
    """An edit candidate that --exclude / --only keep unedited: the fine-tune's values, with the rule as reason
    (an adapter's module: the fine-tune's W0 + scale B A, or its factors; tasks/lora.py)."""
    rule = options.kept_by(job.name, deadline) if job.action == EDIT else ""
    return replace(job, action=COPY, reason=rule) if rule else job


def unmatched(jobs: tuple[TensorJob, ...], options: MergeOptions, deadline: float) -> list[str]:
    """A pattern that finds no edit candidate is most likely a typo: said, as the merge goes on without it."""
    names = [j.name for j in jobs if j.action == EDIT]
    lines = []
    for option, patterns in (("exclude", options.exclude), ("only", options.only)):
        for pattern in patterns:
            if not any(pattern_finds(pattern, name, deadline, option) for name in names):
                lines.append(f"--{option} {pattern!r} finds no tensor to edit (names as `streamsoup plan` lists them)")
    return lines


def _paired(
    base: str | Path | Checkpoint, finetuned: str | Path | Checkpoint | Adapter, options: MergeOptions
) -> MergePlan:
    base_in = open_input(base, "BASE")
    ft_in = open_input(finetuned, "FINETUNED")
    if ft_in.adapter is not None:
        return replace(
            plan_adapter(base_in, ft_in.adapter, options),
            warnings=tuple(decoded_lines(base_in, None)),
            dequantized=base_in.decoded.format is not None and options.save == "model",
        )
    if options.save == "adapter":
        raise UsageError(
            f"--save adapter needs a LoRA adapter as FINETUNED; {ft_in.ckpt.root} is a full checkpoint: use --save "
            "model"
        )
    base_ckpt, ft, renamed = without_ddp_prefix(base_in.ckpt, ft_in.ckpt)
    check_stacking_known(base_ckpt, base_in.config or {}, "BASE")
    experts = check_stacking_known(ft, ft_in.config or {}, "FINETUNED")
    specs = (TensorSpec(r.name, out_dtype(r, options.dtype), r.shape) for r in ft.values())
    layout = ShardLayout.plan(specs, options.shard_size)
    check_shard_count(layout, options.shard_size)
    jobs: list[TensorJob] = []
    config, notes = ft_in.config or {}, {}
    for ref in ft.values():
        placement = layout.placements[ref.name]
        made, note = tensor_jobs(len(jobs), ref, base_ckpt.get(ref.name), placement, experts, options, config)
        jobs.extend(made)
        if note:
            notes[note] = None  # each kind of fused tensor said once
    dropped = tuple(name for name in base_ckpt if name not in ft)
    warning = check_pairing(base_ckpt, ft, sum(j.action == EDIT for j in jobs))
    side, borrowed = side_roots(base_ckpt, ft)
    if base_ckpt.root in side and any(j.shared_rows for j in jobs):  # BASE's vocab_size would not load OUT
        side = tuple(r for r in side if r != base_ckpt.root)
        borrowed = (
            "FINETUNED has no config.json and a larger vocabulary than BASE: BASE's config would not load OUT, "
            "so OUT gets no config or tokenizer; add the fine-tune's own config.json"
        )
    warnings = tuple(w for w in (renamed, warning, *decoded_lines(base_in, ft_in), borrowed, *notes) if w)
    return MergePlan(
        base_ckpt,
        ft,
        options,
        tuple(jobs),
        dropped,
        layout,
        warnings,
        side_roots=side,
        dequantized=ft_in.decoded.format is not None or (base_in.decoded.format is not None and base_ckpt.root in side),
        **hub_base(options, base_in, None),
    )


def side_roots(base: Checkpoint, ft: Checkpoint) -> tuple[tuple[Path, ...], str | None]:
    """The folders whose config, tokenizer and generation files OUT gets: FINETUNED's; BASE's too (FINETUNED's
    own files over them) when FINETUNED has no config.json, so `from_pretrained(OUT)` works; and the line that
    says so."""
    own = (ft.root,) if ft.folder == ft.root else ()
    if (own and store.is_file(ft.root / "config.json")) or not store.is_file(base.root / "config.json"):
        return own, None
    if not own and store.is_file(ft.root.parent / "config.json"):  # a weights file given inside its model folder
        return own, (
            f"FINETUNED is the file {ft.root}: OUT gets no config or tokenizer (not BASE's, nor the files beside "
            f"it); give FINETUNED's folder {ft.root.parent} to carry them"
        )
    what = "a torch.save file" if not own else "a folder without one"
    return (base.root, *own), (
        f"FINETUNED has no config.json ({what}): OUT gets BASE's config, tokenizer and generation files from "
        f"{base.root}" + (", FINETUNED's own files over them" if own else "")
    )


def hub_base(options: MergeOptions, base: Input, adapter: Adapter | None) -> dict[str, str]:
    """BASE's Hugging Face repo id for the metadata OUT carries, and where it was found: --base-model-id, BASE
    as a cache snapshot (a repo id given as BASE is one), the adapter's base_model_name_or_path, BASE's
    config.json _name_or_path. A local path is never Hub metadata: none found is ""."""
    if options.base_model_id:
        if hub_model_id(options.base_model_id) is None:
            raise OptionError(
                "base_model_id", f"must be a Hugging Face repo id (org/name), got {options.base_model_id!r}"
            )
        return {"base_model_id": options.base_model_id, "base_model_from": "--base-model-id"}
    cached = cache_repo_id(base.ckpt.root)
    found = (
        (cached[0] if cached else None, "BASE's Hugging Face cache snapshot"),
        (adapter.base_name if adapter is not None else None, f"the adapter's {ADAPTER_CONFIG}"),
        ((base.config or {}).get("_name_or_path"), "BASE's config.json (_name_or_path)"),
    )
    for value, where in found:
        if hub_model_id(value) is not None:
            return {"base_model_id": str(value), "base_model_from": where}
    return {}


def tensor_jobs(
    index: int,
    ref: TensorRef,
    base: TensorRef | None,
    placement: Placement,
    experts: int | None,
    options: MergeOptions,
    config: dict,
) -> tuple[list[TensorJob], str]:
    """The job of one output tensor, or of each expert of a stacked one, or (--split-fused) of each logical
    matrix of a fused one (numbered from `index`); and a line when a fused tensor is edited whole."""
    dtype = out_dtype(ref, options.dtype) if ref.decoded or options.dtype != "keep" else ""
    if stacked_vectors(ref, experts):
        reason = f"{experts} experts' 1-D tensors stacked (each one is copied, as a bias is)"
        return [TensorJob(index, ref.name, ref, base, COPY, reason, placement, dtype=dtype)], ""
    count = experts if stacked(ref, experts) else 1
    split, note = (0, "")
    plain = not ref.decoded and (base is None or not base.decoded)  # encoded blocks are not cut into rows here
    if options.split_fused and plain and len(ref.shape) in (2, 3) and (count > 1 or len(ref.shape) == 2):
        split, note = row_parts(ref.name, ref.shape[-2], ref.shape[-1], config)
    if count == 1 and not split:
        shared = resized_rows(ref, base)
        action, reason = pair_action(ref.rows(0, shared) if shared else ref, base)
        if action != EDIT:
            shared, reason = 0, reason if not shared else f"{reason} (its first {shared} rows, the base's)"
        job = TensorJob(index, ref.name, ref, base, action, reason, placement, dtype=dtype, shared_rows=shared)
        return [job], note
    same = base is not None and base.shape == ref.shape
    parts = count * max(split, 1)
    size = placement.nbytes // parts
    jobs = []
    for i in range(parts):
        e, piece = divmod(i, max(split, 1))
        part = ref.part(e, count) if count > 1 else ref
        base_part = (base.part(e, count) if count > 1 else base) if same else None
        if split:
            step = part.shape[0] // split
            part = part.rows(piece * step, (piece + 1) * step)
            base_part = base_part.rows(piece * step, (piece + 1) * step) if base_part is not None else None
        action, reason = pair_action(part, base_part)
        if base is not None and not same:
            action, reason = COPY, f"shape {list(ref.shape)} differs from base {list(base.shape)}"
        where = Placement(placement.file, placement.offset + i * size, size)
        jobs.append(
            TensorJob(
                index + i,
                part.name,
                part,
                base_part,
                action,
                reason,
                where,
                dtype=dtype,
                outputs=(ref.name,),
                part=(i, parts),
            )
        )
    return jobs, note


def decoded_lines(base_in: Input, ft_in: Input | None) -> list[str]:
    """What a run says once about quantized inputs: what was decoded, and what OUT is written in."""
    base, ft = base_in.decoded, ft_in.decoded if ft_in is not None else None
    lines = []
    if base.format is not None:
        lines.append(
            f"BASE is quantized ({base.format}): its weights are decoded to float64 with their scales "
            f"({len(base.consumed)} scale tensors consumed, not dropped)"
        )
    if ft is not None and ft.format is not None:
        lines.append(
            f"FINETUNED is quantized ({ft.format}): it is decoded, and OUT is written in "
            f"{DECODED_OUT.lower()} for those tensors (its config.json without quantization_config)"
        )
    return lines


def without_ddp_prefix(base: Checkpoint, ft: Checkpoint) -> tuple[Checkpoint, Checkpoint, str | None]:
    """DistributedDataParallel saves every name under 'module.': on one side only, pair without it.

    OUT then has the plain names; the returned line says so (plan and merge print it as a warning).
    """
    for role, side, other in (("FINETUNED", ft, base), ("BASE", base, ft)):
        if side and all(n.startswith(DDP_PREFIX) for n in side) and not any(n.startswith(DDP_PREFIX) for n in other):
            refs = {n[len(DDP_PREFIX) :]: replace(r, name=n[len(DDP_PREFIX) :]) for n, r in side.items()}
            plain = Checkpoint(side.root, side.shards, refs, side.config_identity)
            note = (
                f"every tensor name of {role} starts with DDP's {DDP_PREFIX!r} and none of the other's does: "
                f"paired without it{', and OUT uses the names without it' if role == 'FINETUNED' else ''}"
            )
            return (base, plain, note) if role == "FINETUNED" else (plain, ft, note)
    return base, ft, None


@dataclass
class _Draft:
    """A job before its placement is known."""

    name: str
    source: TensorRef
    base: TensorRef | None
    action: str
    reason: str
    specs: list[TensorSpec]
    lora: LoraUpdate | None = None
    bias: BiasUpdate | None = None
    dtype: str = ""


LORA_REASON = "low-rank update from the adapter"


def plan_adapter(base_in: Input, adapter: Adapter, options: MergeOptions) -> MergePlan:
    """BASE + a LoRA adapter: the merged model (base's tensors and dtypes), or a reweighed adapter."""
    base = base_in.ckpt
    found = resolve(adapter, base)
    if not found.updates and not found.full:
        raise InputError(f"FINETUNED {adapter.root} holds no LoRA factors and no full tensors: nothing to merge")
    if options.save == "adapter":
        if options.dtype != "keep":
            raise OptionError(
                "dtype",
                f"{options.dtype} is for a merged model; --save adapter writes the factors in the adapter's own "
                "dtypes (peft casts them when it loads): leave --dtype out, or use --save model",
            )
        drafts, side = _adapter_output(base, adapter, found), (adapter.root,)
        layout_size, single = 2**62, ADAPTER_WEIGHTS  # peft reads one adapter_model.safetensors
    else:
        drafts, side = _model_output(base, found, options.dtype), (base.root, adapter.root)
        layout_size, single = options.shard_size, None
        side = tuple(p for p in side if p.is_dir())
    layout = ShardLayout.plan((s for d in drafts for s in d.specs), layout_size, single)
    check_shard_count(layout, layout_size)
    jobs = []
    for i, d in enumerate(drafts):
        first = layout.placements[d.specs[0].name]
        placement = Placement(first.file, first.offset, sum(layout.placements[s.name].nbytes for s in d.specs))
        names = tuple(spec.name for spec in d.specs)
        jobs.append(
            TensorJob(
                i,
                d.name,
                d.source,
                d.base,
                d.action,
                d.reason,
                placement,
                d.lora,
                d.bias,
                d.dtype,
                factors_out=options.save == "adapter" and d.lora is not None,
                outputs=names if names != (d.name,) else (),
            )
        )
    return MergePlan(
        base,
        adapter.weights,
        options,
        tuple(jobs),
        (),
        layout,
        adapter=adapter,
        side_roots=side,
        **hub_base(options, base_in, adapter),
    )


def _model_output(base: Checkpoint, found: AdapterTensors, target: str) -> list[_Draft]:
    drafts = []
    for name, ref in base.items():
        dtype = out_dtype(ref, target)  # the base's (bf16 for a quantized base's decoded weights), or --dtype
        spec = [TensorSpec(name, dtype, ref.shape)]
        if name in found.updates:
            drafts.append(_Draft(name, ref, ref, EDIT, LORA_REASON, spec, lora=found.updates[name], dtype=dtype))
        elif name in found.full:
            full = found.full[name]
            action, reason = pair_action(full, ref)
            if action == EDIT:
                drafts.append(_Draft(name, full, ref, EDIT, "", spec, dtype=dtype))
            else:
                kept = out_dtype(full, target)
                drafts.append(_Draft(name, full, ref, COPY, reason, [TensorSpec(name, kept, full.shape)], dtype=kept))
        elif name in found.biases:
            reason = "1-D tensor: the fine-tune's bias (base bias + lora_B.bias * scaling) is written"
            drafts.append(_Draft(name, ref, ref, COPY, reason, spec, bias=found.biases[name], dtype=dtype))
        else:
            drafts.append(
                _Draft(
                    name,
                    ref,
                    ref,
                    COPY,
                    "not changed by the adapter: the base's tensor",
                    spec,
                    dtype=dtype,
                )
            )
    for name, full in found.full.items():
        if name not in base:
            kept = out_dtype(full, target)
            drafts.append(
                _Draft(name, full, None, COPY, "not in base", [TensorSpec(name, kept, full.shape)], dtype=kept)
            )
    return drafts


def _adapter_output(base: Checkpoint, adapter: Adapter, found: AdapterTensors) -> list[_Draft]:
    """One job per LoRA module writing [A', B'(, bias')] side by side, then the adapter's full tensors."""
    drafts = []
    dora = [u.module for u in found.updates.values() if u.magnitude is not None]
    if dora:
        raise UsageError(
            f"--save adapter: DoRA's result is not low rank (module {dora[0]!r} has a magnitude "
            "vector), so it cannot be written as a LoRA adapter; use --save model"
        )
    for name, update in found.updates.items():
        refs = [adapter.weights[k] for k in found.keys[name]]
        specs = [TensorSpec(r.name, r.dtype, r.shape) for r in refs]
        bias = next((b for b in found.biases.values() if b.bias.name in found.keys[name]), None)
        drafts.append(_Draft(name, update.a, base[name], EDIT, LORA_REASON, specs, lora=update, bias=bias))
        if update.base_copy is not None:
            ref = update.base_copy
            drafts.append(
                _Draft(
                    ref.name,
                    ref,
                    None,
                    COPY,
                    "the base weights peft saves beside an embedding LoRA",
                    [TensorSpec(ref.name, ref.dtype, ref.shape)],
                )
            )
    for name, full in found.full.items():
        action, reason = pair_action(full, base.get(name))
        drafts.append(
            _Draft(full.name, full, base.get(name), action, reason, [TensorSpec(full.name, full.dtype, full.shape)])
        )
    return drafts
