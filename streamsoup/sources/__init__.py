"""Where the inputs come from: a local folder or file (safetensors or torch.save), a Hugging Face repo id,
a PEFT LoRA adapter.

Everything downstream sees a `Checkpoint` for BASE and a `Checkpoint` or an `Adapter` for FINETUNED.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputError
from ..io.checkpoint import Checkpoint
from ..paths import expand_path
from .adapter import ADAPTER_CONFIG, Adapter, is_adapter
from .hub import parse_repo_id, resolve_repo
from .pickled import INDEX_NAME as PICKLE_INDEX
from .pickled import SUFFIXES as PICKLE_SUFFIXES
from .pickled import open_pickled, pickle_files

__all__ = ["Adapter", "ADAPTER_CONFIG", "local_path", "open_base", "open_finetuned"]


def local_path(spec: str | os.PathLike, role: str) -> Path:
    """A path as given (with ~ and $VARS), made absolute: the tensors' paths go to dask workers, which run in
    folders of their own; or the cached snapshot of a repo id when no such path exists."""
    path = expand_path(spec).absolute()
    if isinstance(spec, str) and not path.exists() and parse_repo_id(spec) is not None:
        if path.parent.is_dir():  # `demo/finetunedd` beside a folder demo/: a mistyped path, not a repo to ask for
            raise InputError(
                f"{role} {spec} does not exist ({path.parent}/ is a folder here, so this names a path "
                "in it, not a Hugging Face repo id)"
            )
        return resolve_repo(spec, role)
    return path


def open_checkpoint(path: Path, role: str) -> Checkpoint:
    """safetensors where there are any (a repo may ship both), else torch.save files (.bin/.pt/.pth)."""
    if path.is_file() and path.suffix in PICKLE_SUFFIXES:
        return open_pickled(path, [path])
    if path.is_dir() and not any(path.glob("*.safetensors")):
        files = pickle_files(path)
        if files or (path / PICKLE_INDEX).exists():
            return open_pickled(path, [path / f for f in files])
    return Checkpoint.from_path(path, role)


def open_base(spec: str | os.PathLike | Checkpoint) -> Checkpoint:
    return spec if isinstance(spec, Checkpoint) else open_checkpoint(local_path(spec, "BASE"), "BASE")


def open_finetuned(spec: str | os.PathLike | Checkpoint | Adapter) -> Checkpoint | Adapter:
    if isinstance(spec, (Checkpoint, Adapter)):
        return spec
    path = local_path(spec, "FINETUNED")
    return Adapter.open(path) if is_adapter(path) else open_checkpoint(path, "FINETUNED")
