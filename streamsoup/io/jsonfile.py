"""The JSON files streamsoup parses (a model's config.json, an adapter's config, a shard index, its own report):
bounded in size and depth, so a crafted or damaged file is one line naming it, never a RecursionError, a
traceback deep in a reader, or gigabytes of Python objects from a file of megabytes.

Parsed JSON takes up to ~30 times its size in Python objects; the limits keep the worst case well inside the
smallest --max-ram while passing every real file (the largest configs are ~1 MiB, DeepSeek-V3's index ~9 MiB).
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

import numpy as np

from ..units import format_size
from . import store

#: a config.json, adapter_config.json or generation config
CONFIG_LIMIT = 4 << 20
#: a shard index (model.safetensors.index.json): one entry per tensor
INDEX_LIMIT = 64 << 20
#: streamsoup_report.json: one row per tensor (~600 bytes each)
REPORT_LIMIT = 256 << 20
#: nesting of objects and arrays; real files nest 2 to 5 deep
MAX_DEPTH = 64


class JsonFileError(ValueError):
    """What is wrong with the file, in words that follow its path ("is not valid JSON (...)")."""


def read_json(path: Path, limit: int, bound: dict | None = None) -> Any:
    """The parsed file; JsonFileError when it is too large, not UTF-8, not JSON or nested too deep. OSError as is.
    An object in a store is read as the version `bound` names (its identity when it was opened), else as it is."""
    raw = object_bytes(str(path), limit, bound) if store.is_url(path) else _local_bytes(path, limit)
    return _parsed(raw)


def object_bytes(url: str, limit: int, bound: dict | None = None) -> bytes:
    """An object's bytes (of the `bound` identity, when given), within `limit`."""
    found = bound or store.identity(url)
    if found is None:
        raise FileNotFoundError(2, "No such object", url)
    _check_size(found["size"], limit)
    return store.read_range(url, 0, found["size"], found["version"])


def _check_size(size: int, limit: int) -> None:
    if size > limit:
        raise JsonFileError(f"is {format_size(size, 1)}, larger than any such file ({format_size(limit, 1)} at most)")


def _local_bytes(path: Path, limit: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO in its place must not block the run
    with open(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise JsonFileError("is not a regular file")
        _check_size(info.st_size, limit)
        raw = f.read(limit + 1)
    if len(raw) > limit:  # it grew since the stat
        raise JsonFileError(f"is larger than any such file ({format_size(limit, 1)} at most)")
    return raw


def _parsed(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JsonFileError(f"is not UTF-8 text (byte {exc.start})") from None
    depth = nesting(text)
    if depth > MAX_DEPTH:
        raise JsonFileError(f"nests {depth} levels deep, deeper than any such file ({MAX_DEPTH} at most)")
    try:
        return json.loads(text)
    except ValueError as exc:
        raise JsonFileError(f"is not valid JSON ({exc})") from None


def nesting(text: str) -> int:
    """The deepest nesting of [ and { outside strings: measured before parsing, which would recurse that deep.

    The brackets are counted in pieces of NESTING_PIECE, so that a file of brackets costs a few times the piece,
    not tens of times the file."""
    unescaped = _ESCAPES.sub("", text)  # then a string is "..." with no quote inside
    brackets = _BRACKETS.sub("", _STRINGS.sub("", unescaped)).encode()
    depth = deepest = 0
    for start in range(0, len(brackets), NESTING_PIECE):
        piece = np.frombuffer(brackets, np.uint8, min(NESTING_PIECE, len(brackets) - start), start)
        running = depth + np.cumsum(np.where(np.isin(piece, _OPENING), 1, -1).astype(np.int32), dtype=np.int64)
        deepest, depth = max(deepest, int(running.max())), int(running[-1])
    return deepest


#: brackets counted at once by `nesting`
NESTING_PIECE = 1 << 22
_ESCAPES = re.compile(r"\\.", re.DOTALL)
_STRINGS = re.compile(r'"[^"]*"')
_BRACKETS = re.compile(r"[^\[\]{}]+")
_OPENING = np.frombuffer(b"[{", np.uint8)
