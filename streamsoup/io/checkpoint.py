"""Safetensors checkpoints on disk: headers, tensor references and bounded reads.

A checkpoint is a folder of ``*.safetensors`` shards (with or without
``model.safetensors.index.json``) or a single ``.safetensors`` file. Planning
reads only the headers; tensor data is read one tensor at a time with ``pread``. A Checkpoint
of torch.save files is the same mapping, its shards built by sources/pickled.py.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import stat
import struct
from collections import Counter
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from . import binding, quantized, rawio, store, strided
from .dtypes import item_size, torch_dtype
from .jsonfile import CONFIG_LIMIT, INDEX_LIMIT, JsonFileError, object_bytes, read_json

INDEX_NAME = "model.safetensors.index.json"
#: bytes of each sampled span of a tensor for a checkpoint's content fingerprint
FINGERPRINT_SAMPLE = 64
#: spans sampled per tensor, spread from its first byte to its last: a rewrite of any tenth of it is seen
FINGERPRINT_SPANS = 11
#: a header larger than this is corrupt, not a model (safetensors itself caps it at 100 MB)
MAX_HEADER = 100 * 1024 * 1024
#: the largest dimension or offset a loader (safetensors, torch) can represent
MAX_DIM = 2**63 - 1


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes live; cheap, picklable, and all a task needs to read it."""

    name: str
    path: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int
    #: element strides of a view that is not row-major (torch.save keeps such views); None: row-major
    stride: tuple[int, ...] | None = None
    #: how the stored values become weights (io/quantized.py): "" as they are, FP8 or MXFP4 with `scale`
    encoding: str = ""
    scale: TensorRef | None = None  # FP8: [rows/block, cols/block] scales; MXFP4: the [.., rows, cols/32] exponents
    block: tuple[int, int] = (1, 1)  # FP8: rows and columns one scale covers
    #: the store's version of the object it is in (io/store.py; "" on a disk): every read asks for exactly it
    version: str = ""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def decoded(self) -> bool:
        """Read as float64 weights from quantized storage (its dtype is the storage's)."""
        return bool(self.encoding)

    @property
    def held_bytes(self) -> int:
        """Memory a read of it holds: its bytes, or decoded float64 values and the decoding's temporaries."""
        return 16 * self.numel if self.decoded else self.nbytes

    def part(self, index: int, count: int) -> TensorRef:
        """Slice `index` of `count` along the first dimension (one expert of a stacked tensor), scales included."""
        step = self.nbytes // count
        stride = None
        offset = self.offset + index * step
        if self.stride is not None:
            stride = self.stride[1:]
            offset = self.offset + index * self.stride[0] * (self.nbytes // max(self.numel, 1))
        scale = self.scale.part(index, count) if self.scale is not None else None
        return replace(
            self,
            name=f"{self.name}[{index}]",
            shape=self.shape[1:],
            offset=offset,
            nbytes=step,
            stride=stride,
            scale=scale,
        )

    def rows(self, start: int, stop: int) -> TensorRef:
        """Rows start:stop of a 2-D tensor stored as it is (not encoded): in a row-major tensor (or a view) the
        first rows of [V, h] are a [V0, h] tensor's own bytes."""
        if len(self.shape) != 2 or self.decoded or not 0 <= start < stop <= self.shape[0]:
            raise ValueError(f"rows {start}:{stop} of {self.name} {list(self.shape)} ({self.encoding or self.dtype})")
        item = self.nbytes // max(self.numel, 1)
        step = self.stride[0] if self.stride is not None else self.shape[1]
        return replace(
            self,
            name=f"{self.name}[{start}:{stop}]",
            shape=(stop - start, self.shape[1]),
            offset=self.offset + start * step * item,
            nbytes=(stop - start) * self.shape[1] * item,
        )

    @property
    def span(self) -> int:
        """Bytes from the first element's to the end of the last one's: what lies inside the file."""
        if self.stride is None:
            return self.nbytes
        return strided.span_bytes(self.shape, self.stride, self.nbytes // max(self.numel, 1))


def refs_in(value: object) -> Iterator[TensorRef]:
    """Every TensorRef in plain data (a job, a LoRA update, a list of tasks), FP8 scales included."""
    if isinstance(value, TensorRef):
        yield value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            yield from refs_in(getattr(value, field.name))
    elif isinstance(value, list | tuple):
        for item in value:
            yield from refs_in(item)


def staged_bytes(value: object) -> int:
    """Bytes of object storage a task of `value` stages (store.py): its remote tensors' spans."""
    return sum(r.span for r in refs_in(value) if store.is_url(r.path))


@dataclass(frozen=True)
class ShardHeader:
    path: str
    size: int
    header_sha256: str  # with the size, the fingerprint of this shard for resume checks
    data_start: int
    metadata: dict[str, str]
    tensors: tuple[TensorRef, ...]  # in file-offset order
    identity: dict[str, int]  # the file's, taken before it was read (io/binding.py)


def read_header(path: str | Path) -> ShardHeader:
    """Parse and validate one safetensors header without touching tensor data."""
    path = str(path)
    try:
        size, identity, raw = _remote_header(path) if store.is_url(path) else _local_header(path)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw, object_pairs_hook=_unique_keys)
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        why = exc.args[0] if isinstance(exc, DuplicateKey) else "not valid JSON"
        raise InputError(f"{path}: corrupt safetensors header ({why}); re-download or re-save this shard") from None
    data_start = 8 + len(raw)
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InputError(
            f"{path}: corrupt safetensors header (__metadata__ is not a map of strings); re-download "
            "or re-save this shard"
        )
    refs = []
    for name, entry in header.items():
        refs.append(_tensor_ref(path, name, entry, data_start, identity.get("version", "")))
    refs.sort(key=lambda r: r.offset)
    end = data_start
    for ref in refs:
        if ref.offset != end:
            raise InputError(
                f"{path}: tensor {ref.name!r} does not follow the previous one "
                "(overlapping or gapped data); the file is corrupt"
            )
        end = ref.offset + ref.nbytes
    if end > size:
        raise InputError(f"{path}: file is truncated ({size} bytes, header needs {end}); re-download this shard")
    if end < size:  # safetensors refuses such a file too (its data must end where the file does)
        raise InputError(f"{path}: {size - end} byte(s) after the last tensor's data; the file is corrupt")
    return ShardHeader(path, size, hashlib.sha256(raw).hexdigest(), data_start, dict(metadata), tuple(refs), identity)


def _header_length(path: str, head: bytes, size: int) -> int:
    if len(head) < 8:
        raise InputError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    (hlen,) = struct.unpack("<Q", head)
    if hlen > MAX_HEADER or 8 + hlen > size:
        raise InputError(
            f"{path}: corrupt safetensors header (declares {hlen} header bytes, "
            f"file has {size}); re-download or re-save this shard"
        )
    return hlen


def _local_header(path: str) -> tuple[int, dict, bytes]:
    info = regular_file(path)
    with open(path, "rb") as f:
        hlen = _header_length(path, f.read(8), info.st_size)
        return info.st_size, binding.identity_of(info), f.read(hlen)


def _remote_header(url: str) -> tuple[int, dict, bytes]:
    """Two ranged reads: the length, then the header (its identity taken first, as a file's is)."""
    identity = store.checked_identity(url, "shard")
    size = identity["size"]
    version = identity["version"]
    hlen = _header_length(url, store.read_range(url, 0, min(8, size), version), size)
    return size, identity, store.read_range(url, 8, hlen, version)


class DuplicateKey(ValueError):
    """A JSON object naming one key twice (json keeps the last silently; a loader might keep the first)."""


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out = dict(pairs)
    if len(out) != len(pairs):
        twice = next(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
        raise DuplicateKey(f"{twice!r} appears twice")
    return out


def regular_file(path: str | Path) -> os.stat_result:
    """A checkpoint file's stat; a FIFO or device (which would block or never end) is refused."""
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise InputError(f"{path}: not a regular file; a shard must be a plain file (or a symlink to one)")
    return info


def _tensor_ref(path: str, name: str, entry: object, data_start: int, version: str) -> TensorRef:
    where = f"{path}: tensor {name!r}"
    fields = (entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")) if isinstance(entry, dict) else ()
    if not (
        len(fields) == 3
        and isinstance(fields[0], str)
        and isinstance(fields[1], list)
        and isinstance(fields[2], list)
        and len(fields[2]) == 2
        and all(type(x) is int for x in (*fields[1], *fields[2]))
    ):
        raise InputError(f"{where}: malformed header entry (dtype, shape, data_offsets); the file is corrupt")
    dtype, shape, (begin, end) = fields[0], tuple(fields[1]), fields[2]
    if any(d < 0 for d in shape) or begin < 0 or end < begin:
        raise InputError(f"{where}: negative shape or offsets; the file is corrupt")
    if any(d > MAX_DIM for d in shape) or end > MAX_DIM:  # safetensors reads them as 64-bit unsigned
        raise InputError(f"{where}: a dimension or offset beyond 2**63; the file is corrupt")
    nbytes = math.prod(shape) * item_size(dtype, where)
    if end - begin != nbytes:
        raise InputError(
            f"{where}: header says {end - begin} bytes but {dtype}{list(shape)} needs {nbytes}; the file is corrupt"
        )
    return TensorRef(name, path, dtype, shape, data_start + begin, nbytes, version=version)


class Checkpoint(Mapping[str, TensorRef]):
    """A read-only mapping name -> TensorRef over every shard of a checkpoint, in file order."""

    def __init__(
        self,
        root: Path,
        shards: list[ShardHeader],
        refs: dict[str, TensorRef] | None = None,
        config_identity: dict[str, int] | None = None,
    ) -> None:
        """`refs`: the tensors as read (quantized weights decoded, their scales left out) when not the shards'.
        `config_identity`: its config.json's, when this wraps a checkpoint opened before (taken at the first open,
        before the planner read it)."""
        self.root = root
        self.shards = shards
        self.config_identity = config_identity or binding.file_identity(self.config_path)
        self._refs: dict[str, TensorRef] = {}
        if refs is not None:
            self._refs = dict(refs)
            return
        for shard in shards:
            for ref in shard.tensors:
                if ref.name in self._refs:
                    raise InputError(
                        f"{root}: tensor {ref.name!r} appears in both "
                        f"{Path(self._refs[ref.name].path).name} and {Path(ref.path).name}"
                    )
                self._refs[ref.name] = ref

    @classmethod
    def from_path(cls, path: str | Path, role: str = "checkpoint") -> Checkpoint:
        """A local path, or an object store's (store.remote_root: a pathlib-like handle)."""
        path = path if store.is_url(path) else Path(path)
        remote = store.is_url(path)
        if not remote and not path.exists():
            raise InputError(f"{role} {path} does not exist")
        if not store.is_folder(path):
            if path.suffix != ".safetensors":
                raise InputError(f"{role} {path} is not a .safetensors, .bin, .pt or .pth file, or a folder of them")
            return cls(path, [read_header(path)])
        index = path / INDEX_NAME
        listed = store.files_in(path) if remote else None  # one listing answers all (a missing object is a request)
        if listed is not None:
            has_index, shards = INDEX_NAME in listed, sorted(n for n in listed if n.endswith(".safetensors"))
        else:
            has_index, shards = index.exists(), sorted(p.name for p in path.glob("*.safetensors"))
        weight_map = read_weight_map(index) if has_index else None  # read once: up to 64 MiB
        files = index_files(index, weight_map, listed) if weight_map is not None else shards
        if not files:
            raise InputError(
                f"{role} {path} has no *.safetensors, *.bin, *.pt or *.pth files (nor an index naming them)"
            )
        ckpt = cls(path, [read_header(path / f) for f in files])
        if weight_map is not None:
            ckpt.check_index(index, weight_map)
        return ckpt

    def check_index(self, index: Path, weight_map: dict[str, str]) -> None:
        """Every name of the index's weight_map (read_weight_map) is held by the shard it names."""
        for name, file in weight_map.items():
            ref = self._refs.get(name)
            if ref is None or Path(ref.path).name != file:
                raise InputError(f"{index}: tensor {name!r} is mapped to {file} but that shard does not hold it")

    def __getitem__(self, name: str) -> TensorRef:
        return self._refs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._refs)

    def __len__(self) -> int:
        return len(self._refs)

    @property
    def total_bytes(self) -> int:
        return sum(r.nbytes for r in self._refs.values())

    @property
    def files(self) -> list[str]:
        return [s.path for s in self.shards]

    @functools.cached_property
    def folder(self) -> Path:
        return self.root if store.is_folder(self.root) else self.root.parent

    @property
    def remote(self) -> bool:
        """Read from an object store (io/store.py), not a filesystem."""
        return store.is_url(self.root)

    @property
    def config_path(self) -> Path:
        """The config.json that describes the weights (expert counts, FP8 blocks): the folder's."""
        return self.folder / "config.json"

    def fingerprint(self) -> dict[str, dict[str, object]]:
        """Shard name -> size, header hash and a crc32c of spans spread over every tensor.

        Headers alone do not tell two fine-tunes of one architecture apart (same names, shapes,
        offsets); the sampled bytes do, for the price of a few tiny reads per tensor. What binds a
        run to its files is their identity (`binding`); this is what the report records of them.
        """
        if self.remote:  # the store's version of each object says what sampled bytes would, without a request
            prints: dict[str, dict[str, object]] = {
                Path(s.path).name: {"size": s.size, "header_sha256": s.header_sha256, "version": s.identity["version"]}
                for s in self.shards
            }
        else:
            with ThreadPoolExecutor(min(16, len(self.shards) or 1)) as pool:  # a read waits on the disk, not the GIL
                samples = list(pool.map(sample_crc, self.shards))
            prints = {
                Path(s.path).name: {"size": s.size, "header_sha256": s.header_sha256, "sample_crc32c": crc}
                for s, crc in zip(self.shards, samples, strict=True)
            }
        if self.config_identity is not None:  # it decides how tensors are split and decoded
            try:
                data = (
                    object_bytes(str(self.config_path), CONFIG_LIMIT, self.config_identity)
                    if self.remote
                    else self.config_path.read_bytes()
                )
                prints["config.json"] = {"sha256": hashlib.sha256(data).hexdigest()}
            except (OSError, JsonFileError):
                prints["config.json"] = {"sha256": None}
        return prints

    def binding(self, now: bool = False) -> dict[str, object]:
        """Every file read (the shards, config.json), by identity as taken before it was read, or `now`."""
        files = {Path(s.path).name: binding.file_identity(s.path) if now else s.identity for s in self.shards}
        config = binding.file_identity(self.config_path) if now else self.config_identity
        if config is not None or self.config_identity is not None:
            files["config.json"] = config
        return {"folder": str(self.folder) if self.remote else str(self.folder.absolute()), "files": files}


def sample_crc(shard: ShardHeader) -> int:
    """crc32c of FINGERPRINT_SPANS spans per tensor, the first at its start, the last at its end."""
    fd = os.open(shard.path, os.O_RDONLY)
    try:
        if hasattr(os, "posix_fadvise"):  # a 64-byte read must not pull in a readahead window
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        crc = 0
        for ref in shard.tensors:
            n = min(ref.span, FINGERPRINT_SAMPLE)
            starts = dict.fromkeys((ref.span - n) * i // (FINGERPRINT_SPANS - 1) for i in range(FINGERPRINT_SPANS))
            for start in starts:
                crc = rawio.crc_of(memoryview(os.pread(fd, n, ref.offset + start)), crc)
        return crc
    finally:
        os.close(fd)


def read_weight_map(index: Path) -> dict[str, str]:
    """An index's weight_map (tensor name -> shard file name), read within bounds (io/jsonfile)."""
    try:
        weight_map = read_json(index, INDEX_LIMIT)["weight_map"]
    except OSError as exc:
        raise InputError(f"{index}: cannot read it ({exc.strerror})") from None
    except JsonFileError as exc:
        raise InputError(f"{index} {exc}; download the checkpoint again") from None
    except (KeyError, TypeError):
        raise InputError(f"{index}: not a valid index (needs a 'weight_map' object)") from None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise InputError(f"{index}: not a valid index (its 'weight_map' must map names to shard files)")
    return weight_map


def index_files(index: Path, weight_map: dict[str, str], listed: list[str] | None = None) -> list[str]:
    """The shard files an index's weight_map (read_weight_map) names: plain names of files in its own folder (of
    `listed`, its folder's listing, when it was listed)."""
    files = list(dict.fromkeys(weight_map.values()))
    for file in files:
        there = file in listed if listed is not None else (index.parent / file).is_file()
        if Path(file).name != file or not there:
            raise InputError(f"{index}: names shard {file!r}, which is not a file of {index.parent}")
    return sorted(files)


def read_tensor(ref: TensorRef) -> torch.Tensor:
    """Load one tensor into a fresh buffer, leaving nothing in the page cache (float64 when decoded)."""
    if ref.decoded and len(ref.shape) > 2:  # stacked experts: each is one matrix with its own scales
        return torch.stack([read_tensor(ref.part(e, ref.shape[0])) for e in range(ref.shape[0])])
    if ref.decoded:
        return read_block(ref, 0, ref.shape[0], False)
    if ref.stride is not None:
        return read_block(ref, 0, ref.shape[0], False).reshape(ref.shape)  # a 0-d tensor is never a view
    try:
        fd = os.open(ref.path, os.O_RDONLY)
    except OSError as exc:
        raise InputError(f"{ref.path}: cannot open ({exc.strerror})") from None
    try:
        data = rawio.read_bytes(fd, ref.offset, ref.nbytes)
    except EOFError as exc:
        raise InputError(f"{ref.path}: tensor {ref.name!r}: {exc}; the file is truncated") from None
    finally:
        os.close(fd)
    return torch.from_numpy(data).view(torch_dtype(ref.dtype)).reshape(ref.shape)


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The 2-D view MonoSoup works on: [shape[0], prod(shape[1:])]."""
    return shape[0], math.prod(shape[1:])


def read_block(ref: TensorRef, start: int, stop: int, transposed: bool) -> torch.Tensor:
    """Rows start:stop of the 2-D view (or, transposed, those columns, as rows), read with pread only.

    Rows of a row-major tensor are one contiguous range; columns are one short range per row;
    a view (torch.save's non-contiguous tensors) is gathered in bounded pieces; quantized weights
    come back as float64 with their scales applied.
    """
    if ref.encoding == quantized.FP8:
        return _fp8_block(ref, start, stop, transposed)
    if ref.encoding == quantized.MXFP4:
        return _mxfp4_block(ref, start, stop, transposed)
    dtype = torch_dtype(ref.dtype)
    if ref.stride is not None:
        raw = read_raw_block(ref, start, stop, transposed)
        return torch.from_numpy(raw.reshape(-1)).view(dtype).reshape(raw.shape[0], -1)
    m, n = matrix_shape(ref.shape)
    item = ref.nbytes // max(m * n, 1)
    if store.is_url(ref.path):
        return _remote_block(ref, start, stop, transposed, dtype)
    fd = os.open(ref.path, os.O_RDONLY)
    try:
        if not transposed:
            data = rawio.read_bytes(fd, ref.offset + start * n * item, (stop - start) * n * item)
            return torch.from_numpy(data).view(dtype).reshape(stop - start, n)
        width = (stop - start) * item
        data = np.empty((m, width), dtype=np.uint8)
        for row in range(m):
            rawio.pread_into(fd, memoryview(data[row]), ref.offset + (row * n + start) * item, uncache=False)
        rawio.drop_cache(fd, ref.offset, ref.nbytes)
        return torch.from_numpy(data).view(dtype).reshape(m, stop - start).T
    except EOFError as exc:
        raise InputError(f"{ref.path}: tensor {ref.name!r}: {exc}; the file is truncated") from None
    finally:
        os.close(fd)


def _remote_block(ref: TensorRef, start: int, stop: int, transposed: bool, dtype: torch.dtype) -> torch.Tensor:
    """read_block of a plain tensor in object storage: rows are one ranged read; columns
    (only a few sampled checks at plan time ask for them: a task reads its staged copy) come from the whole
    tensor, read in ranges."""
    m, n = matrix_shape(ref.shape)
    item = ref.nbytes // max(m * n, 1)
    if not transposed:
        data = store.read_range(ref.path, ref.offset + start * n * item, (stop - start) * n * item, ref.version)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(stop - start, n)
    whole = _whole_tensor(ref.path, ref.offset, ref.nbytes, ref.version)
    return torch.frombuffer(bytearray(whole), dtype=torch.uint8).view(dtype).reshape(m, n)[:, start:stop].T


@functools.lru_cache(maxsize=1)
def _whole_tensor(url: str, offset: int, nbytes: int, version: str) -> bytes:
    """A remote tensor's bytes, the last one kept: a sample's three column reads of one expert fetch it once."""
    return b"".join(data for _, data in store.read_chunks(url, offset, nbytes, version))


def _stored(ref: TensorRef, dtype: str, shape: tuple[int, ...]) -> TensorRef:
    """The bytes of a decoded tensor as the plain tensor they are stored as."""
    return replace(ref, dtype=dtype, shape=shape, encoding="", scale=None)


def _fp8_block(ref: TensorRef, start: int, stop: int, transposed: bool) -> torch.Tensor:
    assert ref.scale is not None
    (m, n), (br, bc) = matrix_shape(ref.shape), ref.block
    q = read_block(_stored(ref, ref.dtype, (m, n)), start, stop, transposed)
    scale = _stored(ref.scale, ref.scale.dtype, ((m + br - 1) // br, (n + bc - 1) // bc))
    step = bc if transposed else br
    s = read_block(scale, start // step, (stop - 1) // step + 1, transposed)
    return quantized.fp8_dequantized(q, s, (bc, br) if transposed else (br, bc), (start, 0))


def _mxfp4_block(ref: TensorRef, start: int, stop: int, transposed: bool) -> torch.Tensor:
    """Rows start:stop of one expert's [in, out] matrix, stored transposed as [out, in/32, 16] bytes: a range of
    stored columns (whole 32-element groups, trimmed), or with `transposed` a range of stored rows."""
    if ref.scale is None or len(ref.shape) != 2:  # the planner hands over one expert's slice with its scales
        raise InputError(
            f"{ref.path}: tensor {ref.name!r}: an MXFP4 read needs one expert's 2-D slice and its "
            f"scales, got shape {list(ref.shape)}{' without scales' if ref.scale is None else ''}; "
            "dequantize the checkpoint to bf16 first"
        )
    cols, rows = ref.shape
    groups = cols // quantized.MX_GROUP
    packed = _stored(ref, "U8", (rows, groups * quantized.MX_BYTES))
    scales = _stored(ref.scale, "U8", (rows, groups))
    if transposed:
        b, s = read_block(packed, start, stop, False), read_block(scales, start, stop, False)
        return quantized.mxfp4_dequantized(b, s)
    g0, g1 = start // quantized.MX_GROUP, (stop - 1) // quantized.MX_GROUP + 1
    b = read_block(packed, g0 * quantized.MX_BYTES, g1 * quantized.MX_BYTES, True).T
    s = read_block(scales, g0, g1, True).T
    w = quantized.mxfp4_dequantized(b.contiguous(), s.contiguous())
    first = g0 * quantized.MX_GROUP
    return w[:, start - first : stop - first].T.contiguous()


def read_raw_block(ref: TensorRef, start: int, stop: int, transposed: bool = False) -> np.ndarray:
    """The bytes of rows start:stop of a view (or of its columns, as rows), one row per array row."""
    assert ref.stride is not None
    item = ref.nbytes // max(ref.numel, 1)
    fd = os.open(ref.path, os.O_RDONLY)
    try:
        if transposed:
            return strided.read_columns(fd, ref.offset, ref.shape, ref.stride, item, start, stop)
        return strided.read_rows(fd, ref.offset, ref.shape, ref.stride, item, start, stop)
    except EOFError as exc:
        raise InputError(f"{ref.path}: tensor {ref.name!r}: {exc}; the file is truncated") from None
    finally:
        rawio.drop_cache(fd, ref.offset, ref.span)
        os.close(fd)
