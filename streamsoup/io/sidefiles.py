"""The fine-tune's non-weight files (config, tokenizer, ...) that OUT carries: which, checked up front, copied.

A side file is a regular file under the input folder (dotfiles and weights left out). A symlink
is read only when its target stays inside the folder, or inside the Hugging Face cache repo the
folder is a snapshot of (snapshots/<commit>/x -> ../../blobs/<hash>); a link out of it (a
`notes.txt -> ~/secret`) is refused by name, never followed. Each copy keeps its source's mode.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from . import store
from .checkpoint import INDEX_NAME

#: files of a model folder that are weights (never copied from the fine-tune: we write our own)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
WEIGHT_INDEXES = (INDEX_NAME, "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class SideFile:
    rel: Path  # where it goes, relative to OUT
    path: Path  # what is read (the link's target when it is a symlink)
    size: int
    mode: int  # permission bits, kept on the copy
    version: str = ""  # an object's, as listed (io/store.py): the copy asks for exactly it


def is_weight_file(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES) or name in WEIGHT_INDEXES


def allowed_roots(root: Path) -> tuple[Path, ...]:
    """Where a side file's symlink may point: the folder, and its Hugging Face cache repo if it is a snapshot."""
    real = root.resolve()
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith(("models--", "datasets--")):
        return real, real.parent.parent
    return (real,)


def side_files(root: Path, skip: tuple[str, ...] = ()) -> list[SideFile]:
    """Every side file of `root`, each checked to be readable; InputError names the first that is not."""
    if store.is_url(root):
        return remote_side_files(root, skip)
    if not root.is_dir():
        return []
    roots = allowed_roots(root)
    found = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(folder) / name
            if name.startswith(".") or is_weight_file(name) or name in skip:
                continue
            found.append(_checked(root, path, roots))
    return [f for f in found if f is not None]


def remote_side_files(root, skip: tuple[str, ...] = ()) -> list[SideFile]:
    """The side files of a folder in object storage: its own objects (a store's "subfolders" are not walked)."""
    if not store.is_folder(root):
        return []
    return [
        SideFile(Path(name), root / name, found["size"], 0o644, found["version"])
        for name, found in sorted(store.listing(root), key=lambda item: item[0])
        if not (name.startswith(".") or is_weight_file(name) or name in skip)
    ]


def side_file(root: Path, name: str) -> SideFile | None:
    """One file of the folder's top level, checked like every side file; None when there is none."""
    if store.is_url(root):
        return next((f for f in remote_side_files(root) if f.rel.name == name), None)
    path = root / name
    return _checked(root, path, allowed_roots(root)) if os.path.lexists(path) else None


def _checked(root: Path, path: Path, roots: tuple[Path, ...]) -> SideFile | None:
    rel = path.relative_to(root)
    if path.is_symlink():
        target = path.resolve()
        if not any(target == r or r in target.parents for r in roots):
            raise InputError(
                f"{path} is a symlink to {target}, outside {root}; streamsoup copies no file from "
                "outside the checkpoint into OUT: replace the link with the file, or remove it"
            )
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            info = os.fstat(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise InputError(
            f"{path}: cannot read ({exc.strerror}); OUT would lack it: fix its permissions or remove it, then rerun"
        ) from None
    if stat.S_ISDIR(info.st_mode):
        return None  # a symlink to a folder: its files are not walked (they could be anywhere)
    if not stat.S_ISREG(info.st_mode):
        raise InputError(
            f"{path}: not a regular file (a FIFO, socket or device); remove it from the checkpoint folder, then rerun"
        )
    return SideFile(rel, path.resolve() if path.is_symlink() else path, info.st_size, stat.S_IMODE(info.st_mode))


def copy_side_files(files: list[SideFile], folder: Path) -> None:
    """Copy them into `folder`, durably, each with its source's permission bits (umask aside)."""
    for f in files:
        dst = folder / f.rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if os.path.lexists(dst):
            dst.unlink()
        try:
            with contextlib.nullcontext() if store.is_url(f.path) else open(f.path, "rb") as src:
                fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as out:
                    if src is not None:
                        shutil.copyfileobj(src, out, 1 << 20)
                    else:  # by ranges, retried, as listed: a store's failure is named as the store's
                        for _, data in store.read_chunks(str(f.path), 0, f.size, f.version):
                            out.write(data)
                    os.fchmod(out.fileno(), f.mode)
                    out.flush()
                    os.fsync(out.fileno())
        except OSError as exc:  # a full disk is the output's: name the copy, not its source
            raise OSError(exc.errno, exc.strerror, str(dst)) from exc
