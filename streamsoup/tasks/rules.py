"""When an edit candidate is copied after all, and the NaN/Inf policy of every task: each rule written once.

NaN/Inf in an input of an edit: refused, or (--allow-nonfinite) the fine-tune's tensor copied; in a tensor copied
unchanged: refused, or let through; in anything computed (an edit, a decoded or cast copy, a bias): refused.

Both the dense and the low-rank paths decide from the same two sums, ||dW||^2 and ||W0||^2,
so a tensor is edited or copied for the same reason whichever path computed it.
"""

from __future__ import annotations

import math

from ..errors import AS_IS, InputError, RunError, nonfinite
from ..io.checkpoint import TensorRef
from ..numerics.monosoup import relative_update, update_is_significant
from ..options import EditOptions
from ..planning.planner import TensorJob
from ..sources.adapter import ADAPTER_CONFIG

NONFINITE_COPIED = "NaN or Inf in BASE or FINETUNED: the fine-tune's tensor copied unchanged (--allow-nonfinite)"
NO_UPDATE = "no update (FINETUNED equals BASE here): the fine-tune's values are kept"
#: what to do about NaN/Inf in a tensor MonoSoup was to edit
FIX_OR_COPY = (
    "MonoSoup cannot edit it: fix the checkpoint, or rerun with --allow-nonfinite to copy the fine-tune's "
    "values unchanged"
)


def skip_reason(dw_sq: float, w0_sq: float, options: EditOptions) -> tuple[str, float | None]:
    """Why an edit candidate with finite sums is copied after all ("" when it is edited), and its relative update."""
    dw_norm, w0_norm = math.sqrt(dw_sq), math.sqrt(w0_sq)
    rel = relative_update(dw_norm, w0_norm)
    shown = rel if math.isfinite(rel) else None  # a zero W0: no ratio to report (and JSON has no Infinity)
    if not dw_sq > 0:
        return NO_UPDATE, shown
    if not update_is_significant(dw_norm, w0_norm, options.min_rel_update):
        return f"relative update {rel:.3g} below --min-rel-update {options.min_rel_update:g}", shown
    return "", shown


#: the same for an adapter's factors
FIX_ADAPTER_OR_COPY = "fix the adapter, or rerun with --allow-nonfinite to write the fine-tune's values unchanged"


def nonfinite_inputs(job: TensorJob, culprit: TensorRef, options: EditOptions) -> str:
    """NaN/Inf in an input of a tensor to edit: the reason it is copied (--allow-nonfinite), or the refusal naming
    the checkpoint file that holds them (an adapter's factors, when they are the culprit)."""
    if options.allow_nonfinite:
        return NONFINITE_COPIED
    if job.lora is not None and culprit is job.lora.a:
        raise nonfinite(culprit.path, f"the LoRA factors of {job.lora.module!r} contain", FIX_ADAPTER_OR_COPY)
    raise nonfinite(culprit.path, f"tensor {job.name!r} contains", FIX_OR_COPY)


def copied_as_is(job: TensorJob) -> InputError:
    """NaN/Inf in a tensor that would be copied unchanged (the writer says the same of a raw copy)."""
    return nonfinite(job.finetuned.path, f"tensor {job.name!r} contains", AS_IS)


def nonfinite_bias(job: TensorJob) -> InputError:
    """lora_bias: base bias + scale * lora_B.bias overflows the output."""
    assert job.bias is not None
    return nonfinite(
        job.bias.bias.path, f"bias {job.name!r} (base + lora_B.bias) contains", "fix the adapter or the base"
    )


def nonfinite_copy(job: TensorJob) -> RunError:
    """A copy that is not the stored bytes (decoded from FP8/MXFP4, or cast) whose finite values do not fit the
    output dtype: they would be Inf once written."""
    ref = job.finetuned
    if ref.decoded:
        source, then = f"decoded from {ref.encoding}", "check the checkpoint's scales"
    else:
        source, then = f"cast from {ref.dtype}", "choose a --dtype that holds them (bf16, fp32, or keep)"
    return RunError(
        f"tensor {job.name!r}: the fine-tune's values {source} do not fit {job.out_dtype} (NaN or Inf once "
        f"written): {then}; nothing was published"
    )


def nonfinite_edit(job: TensorJob) -> RunError:
    """An edit of finite inputs that gives NaN/Inf: name the tensor and what made it overflow."""
    if job.lora is not None:
        cause = (
            f"the adapter scales this module's update by {job.lora.scale:g} (lora_alpha / r in "
            f"{ADAPTER_CONFIG}), which overflows {job.out_dtype}: fix lora_alpha"
        )
    else:
        cause = f"the edited values overflow {job.out_dtype}"
    return RunError(f"tensor {job.name!r}: the result would contain NaN or Inf ({cause}); nothing was published")
