"""PyTorch checkpoints saved by `torch.save` (.bin/.pt/.pth): tensors located from the pickle alone, no code run.

torch's zip format holds a pickle (``<archive>/data.pkl``) and one zip entry per storage
(``<archive>/data/<key>``), stored uncompressed. The pickle is read by an unpickler that knows
only the globals torch's own ``weights_only`` loader allows for a state dict (tensor and
storage rebuilds, OrderedDict, plain containers and scalars), each mapped to a function of
ours that records where a tensor's bytes are instead of building it; any other global is
refused by name. A tensor is then an ordinary TensorRef into the file (a view keeps its
strides), read with bounded preads like a safetensors tensor, so nothing downstream cares
where it came from.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import pickle
import reprlib
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..io.binding import identity_of
from ..io.checkpoint import MAX_DIM, Checkpoint, ShardHeader, TensorRef, index_files, read_weight_map, regular_file
from ..io.dtypes import ITEM_SIZE
from .pickleshape import PickleShapeError, check_pickle_shape

log = logging.getLogger(__name__)

SUFFIXES = (".bin", ".pt", ".pth")
INDEX_NAME = "pytorch_model.bin.index.json"
#: a data.pkl's size: a state dict's pickle takes ~150 bytes per tensor (a 90,000-tensor shard: ~14 MiB)
MAX_PICKLE = 32 << 20
#: the bytes a view that reuses its storage's elements (expand, stride 0) may stand for: small views of this kind
#: are read as they are; a [2^20, 2^20] one over a storage of one element is a crafted file, not a weight
MAX_EXPANDED = 1 << 30
#: the header key safetensors keeps for metadata: no tensor may carry that name into OUT
RESERVED_NAME = "__metadata__"
#: keys under which training scripts keep the state dict beside other entries (epoch, optimizer, ...)
STATE_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "weights")
#: torch's legacy (pre-1.6) files start with a pickled magic number
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
#: torch storage class name -> safetensors dtype name
STORAGE_DTYPES = {
    "DoubleStorage": "F64",
    "FloatStorage": "F32",
    "HalfStorage": "F16",
    "BFloat16Storage": "BF16",
    "LongStorage": "I64",
    "IntStorage": "I32",
    "ShortStorage": "I16",
    "CharStorage": "I8",
    "ByteStorage": "U8",
    "BoolStorage": "BOOL",
    "ComplexFloatStorage": "C64",
    "ComplexDoubleStorage": "C128",  # known, so refused as a dtype, not as a global
}
#: torch dtype name (as `_rebuild_tensor_v3` pickles it) -> safetensors dtype name
TORCH_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "uint16": "U16",
    "uint32": "U32",
    "uint64": "U64",
}


def _short_repr() -> reprlib.Repr:
    """What a message shows of a value from a pickle: bounded in depth, items and length, however large the value
    (Python 3.11's Repr takes no arguments)."""
    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother, short.maxlong = 3, 60, 60, 40
    short.maxtuple = short.maxlist = short.maxdict = short.maxset = short.maxfrozenset = 4
    return short


SHORT = _short_repr()


def shown(value: Any) -> str:
    """A value from a pickle, for a message: bounded, whatever it is (an int of 5,000 digits has no repr)."""
    try:
        return SHORT.repr(value)
    except (ValueError, RecursionError, TypeError):
        return f"a {type(value).__name__}"


class UnsafePickle(InputError):
    """The pickle asks for a global a state dict never needs: loading it could run code."""


@dataclass(frozen=True, slots=True)
class StorageType:
    """What a storage class global stands for; slotted and frozen: a pickle's BUILD on it fails instead of
    rewriting, for every later file this process reads, what torch.HalfStorage means."""

    dtype: str | None  # None: an UntypedStorage, whose dtype the tensor names

    def __setstate__(self, state: object) -> None:  # what BUILD calls (a slotted dataclass's own would set it)
        raise pickle.UnpicklingError("a BUILD on a storage type: a state dict never does that")


class _Sealed:
    """A record the pickle hands back: a BUILD on it (which would rewrite its fields after they were checked, and
    after the pickle's shape was measured) is refused. Not slotted: dataclass(slots=True) would put its own
    __setstate__ over this one."""

    def __setstate__(self, state: object) -> None:
        raise pickle.UnpicklingError(f"a BUILD on a {type(self).__name__.lower()}: a state dict never does that")


@dataclass(frozen=True)
class Storage(_Sealed):
    key: str
    dtype: str | None
    numel: int


@dataclass(frozen=True)
class PickledTensor(_Sealed):
    """What the pickle says of one tensor: its storage, and where in it its elements are."""

    storage: Storage
    dtype: str
    offset: int  # in elements of the storage
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def contiguous(self) -> bool:
        expected, step = [], 1
        for d in reversed(self.shape):
            expected.append(step)
            step *= d
        return all(s == e for s, e, d in zip(self.stride, reversed(expected), self.shape, strict=True) if d != 1)


def _tensor(storage: Any, dtype: Any, offset: Any, shape: Any, stride: Any) -> PickledTensor:
    """A tensor record, its arguments of the types torch pickles (a crafted pickle may put anything there)."""
    if not isinstance(storage, Storage):
        raise pickle.UnpicklingError(f"a tensor rebuilt from a {type(storage).__name__}, not a storage")
    if not isinstance(dtype, str):
        raise pickle.UnpicklingError(f"a tensor whose dtype is a {type(dtype).__name__}")
    if not (isinstance(shape, tuple | list) and isinstance(stride, tuple | list)):
        raise pickle.UnpicklingError("a tensor whose shape or stride is not a tuple")
    return PickledTensor(storage, dtype, offset, tuple(shape), tuple(stride))


def _rebuild_v2(storage: Any, offset: Any, shape: Any, stride: Any, *_: Any) -> PickledTensor:
    if isinstance(storage, Storage) and storage.dtype is None:
        raise pickle.UnpicklingError("an untyped storage without a dtype")
    return _tensor(storage, getattr(storage, "dtype", None), offset, shape, stride)


def _rebuild_v3(
    storage: Any, offset: Any, shape: Any, stride: Any, _grad: Any, _hooks: Any, dtype: Any, *_: Any
) -> PickledTensor:
    return _tensor(storage, dtype, offset, shape, stride)


def _parameter(data: Any, *_: Any) -> PickledTensor:
    if not isinstance(data, PickledTensor):
        raise pickle.UnpicklingError(f"a parameter of a {type(data).__name__}, not of a tensor")
    return data


def _encode(text: Any, encoding: Any = "latin1") -> bytes:
    """How protocol 2 pickles bytes: latin1 (the one codec it writes; others may cost quadratic time)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("bytes encoded otherwise than protocol 2 writes them")
    return text.encode("latin1")


SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_v3,
    ("torch._utils", "_rebuild_parameter"): _parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _parameter,
    ("torch.storage", "UntypedStorage"): StorageType(None),
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("_codecs", "encode"): _encode,
    **{("torch", name): StorageType(dtype) for name, dtype in STORAGE_DTYPES.items()},
    **{("torch", name): dtype for name, dtype in TORCH_DTYPES.items()},
}


class _Unpickler(pickle.Unpickler):
    """Every global comes from SAFE_GLOBALS (our own functions); storages become Storage records."""

    def __init__(self, data: bytes, path: Path) -> None:
        super().__init__(io.BytesIO(data))
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickle(
                f"{self.path}: the pickle asks for {module}.{name}, which a state dict never needs and "
                "which could run code; streamsoup does not load it (re-save only the state dict, "
                "e.g. torch.save(model.state_dict(), path))"
            ) from None

    def persistent_load(self, pid: Any) -> Storage:
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], StorageType)
            and isinstance(pid[2], str)
            and type(pid[4]) is int
            and pid[4] >= 0
        ):
            raise pickle.UnpicklingError(f"unexpected persistent id {shown(pid)}")
        _, kind, key, _location, numel = pid
        return Storage(key, kind.dtype, numel)


def read_pickle_shard(path: Path) -> tuple[ShardHeader, list[str]]:
    """One torch.save file as a shard: its tensors, and the entries beside the state dict that were ignored."""
    try:
        info = regular_file(path)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise _not_zip(path) from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    with archive:
        pkl = [i for i in archive.infolist() if i.filename.endswith("/data.pkl") or i.filename == "data.pkl"]
        if len(pkl) != 1:
            raise InputError(f"{path}: a zip file but not a torch.save checkpoint (no single data.pkl)")
        prefix = pkl[0].filename[: -len("data.pkl")]
        if pkl[0].compress_type != zipfile.ZIP_STORED:
            raise InputError(
                f"{path}: its pickle is compressed; torch.save never compresses: re-save it with torch.save"
            )
        if pkl[0].file_size > MAX_PICKLE:
            raise InputError(
                f"{path}: its pickle is {pkl[0].file_size} bytes, more than a state dict's "
                f"({MAX_PICKLE >> 20} MiB at most); the file is corrupt"
            )
        with archive.open(pkl[0]) as member:
            raw = member.read(MAX_PICKLE + 1)  # the zip header's size may lie
        if len(raw) > MAX_PICKLE:
            raise InputError(f"{path}: its pickle is more than {MAX_PICKLE >> 20} MiB; the file is corrupt")
        try:
            check_pickle_shape(raw)
        except PickleShapeError as exc:
            raise InputError(
                f"{path}: its pickle builds {exc}, which no state dict does; the file is corrupt or crafted"
            ) from None
        except Exception as exc:  # malformed opcodes: the unpickler would fail on them too
            raise _unreadable(path, exc) from None
        try:
            obj = _Unpickler(raw, path).load()
        except InputError:
            raise
        except Exception as exc:  # a truncated or garbled pickle: never a traceback
            raise _unreadable(path, exc) from None
        tensors, ignored = state_dict(obj, path)
        entries = {i.filename: i for i in archive.infolist()}
        with open(path, "rb") as f:
            keys = {t.storage.key for t in tensors.values()}
            spans = {key: _entry_span(f, path, entries, prefix, key, info.st_size) for key in keys}
        ordered = sorted(spans.items(), key=lambda item: item[1])
        for (k0, (s0, n0)), (k1, (s1, _)) in zip(ordered, ordered[1:], strict=False):
            if s1 < s0 + n0:
                raise InputError(f"{path}: storages {k0!r} and {k1!r} share bytes in the file; the file is corrupt")
    refs = [_ref(path, name, t, *spans[t.storage.key]) for name, t in tensors.items()]
    refs.sort(key=lambda r: (r.offset, r.name))
    digest = hashlib.sha256(raw).hexdigest()
    return ShardHeader(
        str(path), info.st_size, digest, refs[0].offset if refs else 0, {}, tuple(refs), identity_of(info)
    ), ignored


def _unreadable(path: Path, exc: Exception) -> InputError:
    return InputError(
        f"{path}: its pickle cannot be read ({type(exc).__name__}: {shown(str(exc))}); the file is corrupt"
    )


def state_dict(obj: Any, path: Path) -> tuple[dict[str, PickledTensor], list[str]]:
    """The flat name -> tensor dict of a checkpoint: the object itself, or the one state dict it holds."""
    if not isinstance(obj, dict):
        raise InputError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors (a state dict)")
    if obj and all(isinstance(v, PickledTensor) for v in obj.values()):
        return _named(obj, path), []
    nested = [
        k for k, v in obj.items() if isinstance(v, dict) and v and all(isinstance(x, PickledTensor) for x in v.values())
    ]
    usual = [k for k in nested if k in STATE_KEYS]
    loose = any(isinstance(v, PickledTensor) for v in obj.values())  # tensors beside other entries
    keys = ", ".join(shown(k) for k in list(obj)[:8]) + (", ..." if len(obj) > 8 else "")
    if len(nested) == 1 and len(usual) == 1 and not loose:
        return _named(obj[usual[0]], path), [k if isinstance(k, str) else shown(k) for k in obj if k != usual[0]]
    if not nested and not loose:
        raise InputError(
            f"{path}: holds no state dict, neither as itself nor under one of its keys ({keys}); "
            "re-save the state dict alone, e.g. torch.save(model.state_dict(), path)"
        )
    raise InputError(
        f"{path}: not one state dict: keys {keys}; re-save the state dict alone, e.g. "
        "torch.save(checkpoint['state_dict'], path)"
    )


def _named(d: dict, path: Path) -> dict[str, PickledTensor]:
    bad = next((k for k in d if not isinstance(k, str)), None)
    if bad is not None:
        raise InputError(f"{path}: a tensor is named {shown(bad)}, not by a string; the file is not a state dict")
    if RESERVED_NAME in d:
        raise InputError(
            f"{path}: a tensor is named {RESERVED_NAME!r}, the one name a safetensors header reserves "
            "(an OUT holding it would not load); rename it in the state dict and save again"
        )
    return dict(d)


def _ref(path: Path, name: str, t: PickledTensor, start: int, entry_bytes: int) -> TensorRef:
    where = f"{path}: tensor {name!r}"
    item = ITEM_SIZE.get(t.dtype)
    if item is None:
        raise InputError(f"{where}: dtype {t.dtype} is not one streamsoup reads")
    if t.storage.dtype is not None and t.storage.dtype != t.dtype:
        raise InputError(f"{where}: a {t.dtype} view of a {t.storage.dtype} storage; re-save it as its own tensor")
    numbers = (*t.shape, *t.stride, t.offset)
    if len(t.stride) != len(t.shape) or not all(type(x) is int and 0 <= x <= MAX_DIM for x in numbers):
        raise InputError(f"{where}: malformed shape, stride or offset; the file is corrupt")
    numel = math.prod(t.shape)
    storage_elems = t.storage.numel if t.storage.dtype is not None else t.storage.numel // item
    if numel > storage_elems and numel * item > MAX_EXPANDED:  # a broadcast (stride 0) or overlapping view
        raise InputError(
            f"{where}: {list(t.shape)} is an expanded or overlapping view of {numel * item} bytes over "
            f"a storage of {storage_elems * item}; no checkpoint stores a weight so: the file is corrupt "
            "or crafted (if it is yours, save the tensor with .contiguous())"
        )
    if storage_elems * item > entry_bytes:  # the pickle's claim against the zip entry that holds the bytes
        raise InputError(
            f"{where}: its storage {t.storage.key!r} is said to hold {storage_elems * item} bytes, "
            f"its entry in the file holds {entry_bytes}; the file is corrupt"
        )
    stride = None if t.contiguous else t.stride
    last = t.offset + sum((d - 1) * x for d, x in zip(t.shape, t.stride, strict=True)) if numel else t.offset - 1
    if last >= storage_elems:
        raise InputError(f"{where}: reaches past the end of its storage; the file is corrupt")
    return TensorRef(name, str(path), t.dtype, t.shape, start + t.offset * item, numel * item, stride)


def _entry_span(
    f: io.BufferedReader, path: Path, entries: dict[str, zipfile.ZipInfo], prefix: str, key: str, file_size: int
) -> tuple[int, int]:
    """Where a storage's bytes begin in the file (after its zip entry's local header), and how many its entry
    holds, which must end inside the file."""
    info = entries.get(f"{prefix}data/{key}")
    if info is None:
        raise InputError(f"{path}: storage {key!r} named by the pickle is missing; the file is corrupt")
    if info.compress_type != zipfile.ZIP_STORED:
        raise InputError(
            f"{path}: storage {key!r} is compressed; torch.save never compresses: re-save it with torch.save"
        )
    f.seek(info.header_offset)
    local = f.read(30)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        raise InputError(f"{path}: storage {key!r} has a broken zip header; the file is corrupt")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    encoding = "utf-8" if info.flag_bits & 0x800 else "cp437"  # the zip's own rule for the names it stores
    if f.read(name_len) != info.orig_filename.encode(encoding, errors="replace"):
        raise InputError(f"{path}: storage {key!r}: its zip entry points at another entry's bytes; the file is corrupt")
    start = info.header_offset + 30 + name_len + extra_len
    if start + info.file_size > file_size:
        raise InputError(f"{path}: storage {key!r} ends past the end of the file; the file is corrupt (truncated?)")
    return start, info.file_size


def _not_zip(path: Path) -> InputError:
    """A non-zip .bin: torch's legacy format (refused with the way out), or not a torch file at all."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        head = b""
    legacy = head.startswith(pickle.dumps(LEGACY_MAGIC, protocol=2)[:-1])  # the magic number, without the STOP
    if legacy:
        return InputError(
            f"{path}: saved in torch's legacy format (torch < 1.6), which streamsoup does not read; "
            "re-save it once with a recent torch: torch.save(torch.load(path, weights_only=True), "
            "new_path)"
        )
    return InputError(f"{path}: not a torch.save checkpoint (neither torch's zip format nor its legacy one)")


def pickle_files(folder: Path) -> list[str]:
    """The torch.save files of a folder: the ones its pytorch_model.bin.index.json names, or all of them."""
    index = folder / INDEX_NAME
    if not index.exists():
        return sorted(p.name for p in folder.iterdir() if p.suffix in SUFFIXES and p.is_file())
    return index_files(index, read_weight_map(index))


def open_pickled(root: Path, files: list[Path]) -> Checkpoint:
    """A checkpoint of torch.save files (one, or a folder's shards), its index checked when it has one."""
    shards = []
    for file in files:
        shard, ignored = read_pickle_shard(file)
        if ignored:
            log.warning(
                "%s: took the state dict and ignored %d other entr%s (%s)",
                file,
                len(ignored),
                "y" if len(ignored) == 1 else "ies",
                ", ".join(ignored[:6]),
            )
        shards.append(shard)
    ckpt = Checkpoint(root, shards)
    if root.is_dir() and (root / INDEX_NAME).exists():
        ckpt.check_index(root / INDEX_NAME, read_weight_map(root / INDEX_NAME))
    return ckpt
