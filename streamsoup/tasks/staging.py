"""A task whose inputs are in object storage works on local copies of exactly its tensors' bytes.

Each remote object the task reads becomes one sparse scratch file holding the task's byte spans at their
own offsets (io/store.py), so every reader (whole, streamed in row blocks, columns, FP8 scales) runs as
on a local file. The scratch folder is the task's own, under the worker's TMPDIR, and goes with the task.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from collections.abc import Iterator
from typing import TypeVar

from ..io import store
from ..io.checkpoint import TensorRef, refs_in

T = TypeVar("T")


def remote_refs(value: object) -> Iterator[TensorRef]:
    """Every TensorRef in a task's plain data (jobs, LoRA updates, FP8 scales) whose bytes are in a store."""
    return (ref for ref in refs_in(value) if store.is_url(ref.path))


def _moved(value: T, paths: dict[str, str]) -> T:
    """`value` with every remote TensorRef's path replaced by its staged copy's."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type) and any(remote_refs(value)):
        changes = {f.name: _moved(getattr(value, f.name), paths) for f in dataclasses.fields(value) if f.init}
        if isinstance(value, TensorRef) and value.path in paths:
            changes.update(path=paths[value.path], version="")  # a local file now: its version was read
        return dataclasses.replace(value, **changes)
    if isinstance(value, list | tuple) and any(remote_refs(value)):
        return type(value)(_moved(v, paths) for v in value)  # type: ignore[return-value]
    return value


@contextlib.contextmanager
def staged(items: T) -> Iterator[T]:
    """`items` reading local copies of their remote bytes for the time of the block (themselves when all local)."""
    spans: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for ref in remote_refs(items):
        spans.setdefault((ref.path, ref.version), []).append((ref.offset, ref.span))
    if not spans:
        yield items
        return
    folder = store.stage_folder()
    try:
        paths = {
            url: str(store.stage_object(url, found, version, folder, f"{i}.bin"))
            for i, ((url, version), found) in enumerate(spans.items())
        }
        yield _moved(items, paths)
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # made by this task, under a name of its own (mkdtemp)
