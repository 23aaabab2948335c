"""Refusals that must come before any tensor is computed: a merge tool's worst failure is a silent one.

From headers alone (so `plan` and `merge` say the same): an adapter folder given where a full
checkpoint is expected, BASE and FINETUNED being the same files, a BASE that pairs with no
tensor of the fine-tune (the wrong model), and a warning when fewer than half pair. Before a
merge writes anything: BASE and FINETUNED holding the same values (a few sampled spans per
matrix, stopping at the first difference), and room on OUT's and the state's filesystems.
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, OptionError, UsageError
from ..io import store
from ..io.checkpoint import Checkpoint, TensorRef, matrix_shape, read_block
from ..io.dtypes import is_float
from ..io.layout import ShardLayout
from ..io.sidefiles import side_files
from ..sources.config import model_config
from ..units import format_size

#: values compared per sampled span (three spans of whole rows per matrix: first, middle, last; one row at least)
SAMPLE_ELEMENTS = 2048
#: matrices sampled for the relatedness of BASE and FINETUNED, spread over the model
SAMPLED_MATRICES = 64
#: matrices of each shard sampled for data that is all zeros
SAMPLED_PER_SHARD = 8
#: a median relative update above this means BASE is not the fine-tune's base (measured: docs/guarantees.md)
UNRELATED_REL_UPDATE = 1.0
#: the report's row of one tensor, at most (a row is ~600 bytes of JSON)
REPORT_PER_TENSOR = 1024
#: the files OUT gets besides shards and side files: index, report, spectra, model card, ownership marker
OUTPUT_FILES = 5
#: the resume state's own files and folders besides the tensors': root and group metadata, the marker
STATE_FILES = 4


def _file_ids(ckpt: Checkpoint) -> set[tuple[int, int] | str]:
    """What makes two shards the same file: its device and inode, or an object's URL."""
    ids: set[tuple[int, int] | str] = set()
    for path in ckpt.files:
        if store.is_url(path):
            ids.add(path)
            continue
        st = os.stat(path)
        ids.add((st.st_dev, st.st_ino))
    return ids


def config_tree(config: Any) -> Iterator[dict]:
    """A config and the configs nested in it (a multimodal model keeps its text model's in text_config)."""
    if isinstance(config, dict):
        yield config
        for value in config.values():
            yield from config_tree(value)


def model_shape_words(ckpt: Checkpoint) -> str:
    """'hidden size 2048, 4 layers' from config.json, else the commonest input width of its matrices."""
    config = model_config(ckpt)
    if config:
        hidden = next((config[k] for k in ("hidden_size", "n_embd", "d_model") if k in config), None)
        layers = next((config[k] for k in ("num_hidden_layers", "n_layer", "num_layers") if k in config), None)
        if hidden:
            return f"hidden size {hidden}" + (f", {layers} layers" if layers else "") + " (config.json)"
    widths = Counter(r.shape[-1] for r in ckpt.values() if len(r.shape) == 2)
    if not widths:
        return "no matrices"
    return f"hidden size ~{widths.most_common(1)[0][0]} (commonest matrix width)"


def check_pairing(base: Checkpoint, finetuned: Checkpoint, edits: int) -> str | None:
    """Refuse a BASE that pairs with nothing; a warning (returned) when fewer than half the matrices pair."""
    if _file_ids(base) == _file_ids(finetuned):
        raise InputError(
            f"BASE {base.root} and FINETUNED {finetuned.root} are the same files: nothing to merge; "
            "pass the pre-trained model as BASE and the fine-tune as FINETUNED"
        )
    matrices = [r for r in finetuned.values() if len(r.shape) >= 2 and r.numel and is_float(r.dtype)]
    if edits == 0:
        shared = [n for n in finetuned if n in base]
        differ = [n for n in shared if base[n].shape != finetuned[n].shape]
        if differ:
            shown = "; ".join(f"{n} {list(finetuned[n].shape)} vs {list(base[n].shape)}" for n in differ[:3])
            detail = f"{len(differ)} shared tensors differ in shape ({shown})"
        elif not shared:
            detail = (
                f"no tensor name in common (FINETUNED has {next(iter(finetuned), 'none')!r}, BASE "
                f"{next(iter(base), 'none')!r})"
            )
        else:
            detail = "no shared tensor is a float matrix"
        raise InputError(
            f"BASE {base.root} does not fit FINETUNED {finetuned.root}: no tensor can be edited, {detail}; "
            f"BASE looks like {model_shape_words(base)}, FINETUNED like {model_shape_words(finetuned)}: "
            "pass the model this fine-tune started from as BASE"
        )
    if edits < len(matrices) / 2:
        return (
            f"only {edits} of the {len(matrices)} float matrices of FINETUNED pair with BASE (same name and "
            "shape); the rest are copied unchanged: check that BASE is the model this fine-tune started from"
        )
    return None


def sampled_values(ref: TensorRef) -> torch.Tensor:
    """float64 values of three spans of rows of a matrix (its first, middle and last), decoded from any dtype,
    layout (a torch.save view) or encoding (FP8, MXFP4): the same elements for two tensors of one shape."""
    m, n = matrix_shape(ref.shape)
    if m * n == 0:
        return torch.zeros(0, dtype=torch.float64)
    rows = max(1, min(m, SAMPLE_ELEMENTS // n))
    starts = sorted({0, (m - rows) // 2, m - rows})
    return torch.cat([read_block(ref, s, s + rows, False).reshape(-1).to(torch.float64) for s in starts])


#: a (base, fine-tune) pair of matrices to be edited
Pair = tuple[TensorRef, TensorRef]


def check_values_differ(base: Checkpoint, finetuned: Checkpoint, pairs: list[Pair]) -> None:
    """Refuse BASE == FINETUNED in value (a copy of the base passed twice, or saved in another dtype): sampled
    values of every matrix. Stops at the first difference, so a real pair costs two small reads."""
    for b, f in pairs:
        if not torch.equal(sampled_values(b), sampled_values(f)):
            return
    if pairs:
        raise InputError(
            f"BASE {base.root} and FINETUNED {finetuned.root} hold the same values (every one of their "
            f"{len(pairs)} shared matrices is equal where sampled): nothing to merge; pass the fine-tune as FINETUNED"
        )


def spread(items: list, count: int = SAMPLED_MATRICES) -> list:
    """At most `count` of `items`, spread over all of them (a model's first layers are not all of it)."""
    return items[:: max(1, len(items) // count)][:count]


def check_not_blank(ckpt: Checkpoint, refs: list[TensorRef], role: str) -> None:
    """Refuse a shard whose sampled matrices hold only zeros: its header is intact but its data is not there (a
    download that stopped, a sparse file's holes). One zero-initialised layer is fine; a whole shard of them is
    a broken file."""
    by_file: dict[str, list[TensorRef]] = {}
    for ref in refs:
        by_file.setdefault(ref.path, []).append(ref)
    for path, mine in by_file.items():
        picks = spread(mine, SAMPLED_PER_SHARD)
        if not any(bool(sampled_values(r).any()) for r in picks):
            where = f"{role} {ckpt.root}" if Path(path) == ckpt.root else f"{role} {ckpt.root}: shard {path}"
            raise InputError(
                f"{where} holds only zeros where sampled ({len(picks)} matrices): its header is "
                "intact but its data is missing (a download that did not finish, a file with holes); "
                "re-download or re-save it"
            )


def sampled_rel_update(base: TensorRef, finetuned: TensorRef) -> float | None:
    """||W1 - W0|| / ||W0|| over the sampled values of one matrix (any dtype or layout on either side); None
    where W0 is zero there or a value is not finite."""
    w0, w1 = sampled_values(base), sampled_values(finetuned)
    den, num = float((w0**2).sum()), float(((w1 - w0) ** 2).sum())
    return math.sqrt(num / den) if den > 0 and math.isfinite(num) and math.isfinite(den) else None


def check_related(base: Checkpoint, finetuned: Checkpoint, pairs: list[Pair]) -> None:
    """Refuse a BASE of the right shapes that is not the fine-tune's starting point (another seed, another family).

    A fine-tune moves its matrices by a few percent; two independent initialisations differ by about
    sqrt(2) of their norm (docs/guarantees.md has the measurements behind UNRELATED_REL_UPDATE).
    """
    rels = [r for b, f in spread(pairs) if (r := sampled_rel_update(b, f)) is not None]
    if len(rels) < 3:
        return
    median = statistics.median(rels)
    if median <= UNRELATED_REL_UPDATE:
        return
    types = [model_config(c).get("model_type") for c in (base, finetuned)]
    family = f"; config.json model_type {types[0]!r} vs {types[1]!r}" if types[0] != types[1] else ""
    raise InputError(
        f"BASE {base.root} does not look like the model FINETUNED {finetuned.root} was fine-tuned from: over "
        f"{len(rels)} sampled matrices the median relative update ||W1-W0||/||W0|| is {median:.2f} (a fine-tune "
        f"moves its weights by a few percent, two independent initialisations by about 1.41){family}; pass the "
        "fine-tune's own base model as BASE"
    )


def check_adapter_trained(root: Path, updates: list) -> None:
    """Refuse an adapter whose every lora_B is zero where sampled (peft starts B at 0): it changes nothing."""
    for update in updates:
        if sampled_values(update.b).any():
            return
    if updates:
        raise InputError(
            f"FINETUNED {root}: every lora_B of the adapter is zero where sampled ({len(updates)} "
            "modules): an untrained adapter (peft initialises B to 0) changes nothing; pass the "
            "trained adapter"
        )


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _allocated(folder: Path, layout: ShardLayout) -> int:
    """Bytes already allocated to output shards of an earlier attempt (preallocation reserves them)."""
    total = 0
    for shard in layout.shards:
        path = folder / shard.file
        if path.exists():
            total += min(path.stat().st_blocks * 512, shard.size)
    return total


@dataclass(frozen=True)
class DiskNeed:
    """What is still to be written somewhere: data bytes, and files and folders that take a block each at least."""

    bytes: int
    files: int

    def __add__(self, other: DiskNeed) -> DiskNeed:
        return DiskNeed(self.bytes + other.bytes, self.files + other.files)

    def on(self, block: int) -> int:
        """Bytes it takes on a filesystem of this block size: every file's last block counts whole."""
        return self.bytes + self.files * block


def check_disk_space(needs: dict[Path, DiskNeed]) -> None:
    """Each filesystem must hold what is still to be written there; refuse naming both numbers."""
    by_fs: dict[int, tuple[Path, DiskNeed, bool]] = {}
    for path, need in needs.items():
        dev = _existing(path).stat().st_dev
        first, total, staging = by_fs.get(dev, (path, DiskNeed(0, 0), False))
        by_fs[dev] = (first, total + need, staging or path == store.stage_root())
    for first, need, staging in by_fs.values():
        anchor = _existing(first)
        free, block = shutil.disk_usage(anchor).free, os.statvfs(anchor).f_frsize or 4096
        if need.on(block) > free:
            also = ", or TMPDIR for the tensors tasks stage from object storage" if staging else ""
            raise UsageError(
                f"not enough disk space for {first}: the merge still needs {format_size(need.on(block))} there "
                f"({format_size(need.bytes)} of data and {need.files} small files or folders of a "
                f"{format_size(block)} block each), its filesystem has {format_size(free)} free; free space or "
                f"choose another place (OUT, or --work-dir for the resume state{also})"
            )


def output_needs(layout: ShardLayout, partial: Path, side_roots: tuple[Path, ...], widths: list[int]) -> DiskNeed:
    """What the output still needs on disk: shards not yet allocated, side files, index, report, spectra, card."""
    shards = sum(s.size for s in layout.shards) - _allocated(partial, layout)
    sides = [f for root in side_roots for f in side_files(root)]
    data = shards + sum(f.size for f in sides) + REPORT_PER_TENSOR * len(layout.placements) + sum(8 * c for c in widths)
    return DiskNeed(data, len(layout.shards) + len(sides) + OUTPUT_FILES)


def state_needs(widths: list[int], streamed_widths: list[int], lanes: int, tensors: int) -> DiskNeed:
    """The resume state: a marker group per tensor; per edit its singular values (an array: metadata, a chunk, two
    folders); the partial Grams and basis (three arrays) of the streamed tensors in flight."""
    grams = sorted((3 * 8 * c * c for c in streamed_widths), reverse=True)[:lanes]
    in_flight = min(lanes, len(streamed_widths))
    return DiskNeed(
        sum(8 * c for c in widths) + sum(grams), 2 * tensors + 4 * len(widths) + 12 * in_flight + STATE_FILES
    )


def small_side(ref: TensorRef) -> int:
    return min(matrix_shape(ref.shape)) if ref.shape else 1


#: the most output shards a merge writes: beyond it, --shard-size is a typo (a model is a few hundred files at most)
MAX_SHARDS = 10_000


def check_shard_count(layout: ShardLayout, shard_size: int) -> None:
    if len(layout.shards) > MAX_SHARDS:
        files = len(layout.shards)
        raise OptionError(
            "shard_size",
            f"{format_size(shard_size)} would split OUT into {files} files (more than "
            f"{MAX_SHARDS}); give a larger size, e.g. the Hugging Face default 5GB",
        )
