"""One call per input: resolve it (a path, a Hugging Face repo id), open it (safetensors, torch.save, a PEFT
LoRA adapter), check that it is what its role needs, and decode its quantized weights; planning then works on
the values it returns and reads no input file itself."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..io import store
from ..io.checkpoint import Checkpoint
from ..paths import expand_path
from .adapter import ADAPTER_CONFIG, Adapter, is_adapter
from .config import model_config
from .hub import parse_repo_id, resolve_repo
from .pickled import INDEX_NAME as PICKLE_INDEX
from .pickled import SUFFIXES as PICKLE_SUFFIXES
from .pickled import open_pickled, pickle_files
from .quantization import Decoded, decode

#: tensor name parts that only LoRA adapters have
ADAPTER_KEYS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


ADAPTER_AS_BASE = "pass the model the adapter was trained on as BASE and the adapter folder as FINETUNED"


@dataclass(frozen=True)
class Input:
    """One input as planning uses it: a full checkpoint decoded (its config with it), or a LoRA adapter."""

    role: str
    decoded: Decoded | None = None
    adapter: Adapter | None = None
    config: dict | None = None

    @property
    def ckpt(self) -> Checkpoint:
        assert self.decoded is not None, "an adapter has no checkpoint of its own"
        return self.decoded.ckpt


def open_input(spec: str | os.PathLike | Checkpoint | Adapter, role: str) -> Input:
    """BASE or FINETUNED, whole; only FINETUNED may be an adapter (a LoRA adapter as BASE is refused)."""
    if isinstance(spec, Adapter):
        if role == "BASE":
            raise InputError(f"BASE {spec.root} is a PEFT LoRA adapter, not a full model: {ADAPTER_AS_BASE}")
        return Input(role, adapter=spec)
    if isinstance(spec, Checkpoint):
        ckpt = spec
    else:
        path = input_path(spec, role)
        if role == "FINETUNED" and not store.is_url(path) and is_adapter(path):
            return Input(role, adapter=Adapter.open(path))
        ckpt = open_checkpoint(path, role)
    check_not_adapter(ckpt, role)
    config = model_config(ckpt)  # read once: the decoded checkpoint has the same folder
    return Input(role, decode(ckpt, role, config), config=config)


def open_remote(root, role: str) -> Checkpoint:
    """A checkpoint in object storage (io/store.py): safetensors only, read by ranges; an adapter or torch.save
    files are small or need a whole-file read: copied to a disk first."""
    folder = store.is_folder(root)
    names = store.files_in(root) if folder else []
    if not names and (folder or not store.is_file(root)):
        raise InputError(
            f"{role} {root} does not exist (no object of that name, nor a folder its store lists: an HTTP "
            "server must list the folder's files)"
        )
    if ADAPTER_CONFIG in names:
        raise InputError(f"{role} {root} is a PEFT adapter: streamsoup reads adapters from a disk; copy it there")
    if root.suffix in PICKLE_SUFFIXES or (folder and not any(n.endswith(".safetensors") for n in names)):
        raise InputError(
            f"{role} {root} holds no safetensors files: from object storage streamsoup reads safetensors only "
            "(torch.save files need a whole-file read): copy it to a disk, or convert it to safetensors"
        )
    return Checkpoint.from_path(root, role)


def input_path(spec: str | os.PathLike, role: str):
    """A path as given (with ~ and $VARS), made absolute: the tensors' paths go to dask workers, which run in
    folders of their own; a URL of an object store (io/store.py); or the cached snapshot of a repo id when no
    such path exists."""
    text = os.fspath(spec) if not isinstance(spec, str) else spec
    if store.is_url(os.path.expandvars(text)):
        return store.remote_root(os.path.expandvars(text), role)
    path = expand_path(spec, role).absolute()
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
    if store.is_url(path):
        return open_remote(path, role)
    if path.is_file() and path.suffix in PICKLE_SUFFIXES:
        return open_pickled(path, [path])
    if path.is_dir() and not any(path.glob("*.safetensors")):
        files = pickle_files(path)
        if files or (path / PICKLE_INDEX).exists():
            return open_pickled(path, [path / f for f in files])
    return Checkpoint.from_path(path, role)


def check_not_adapter(ckpt: Checkpoint, role: str) -> None:
    """LoRA tensors where a full model is expected: an adapter as BASE, or adapter weights without their config."""
    folder = ckpt.folder
    lora = next((n for n in ckpt if any(f".{key}." in n or n.endswith(f".{key}") for key in ADAPTER_KEYS)), None)
    has_config = store.is_file(folder / ADAPTER_CONFIG) if ckpt.remote else (folder / ADAPTER_CONFIG).exists()
    if not has_config and lora is None:
        return
    found = ADAPTER_CONFIG if has_config else f"tensor {lora!r}"
    if role == "BASE":
        raise InputError(f"BASE {ckpt.root} is a PEFT LoRA adapter ({found}), not a full model: {ADAPTER_AS_BASE}")
    raise InputError(
        f"{role} {ckpt.root} holds LoRA tensors ({found}) but is not an adapter folder with "
        f"{ADAPTER_CONFIG}: pass the PEFT adapter folder itself as {role}"
    )
