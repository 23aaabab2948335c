"""What the resume state stores, checked: records sealed with the run's id, float64 arrays with their crc32c.

Nothing read back from the state is trusted unchecked: a record's digest covers every field and
the run's id (an edited, truncated or foreign record no longer verifies), an array's crc32c is
recorded where it is named.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from . import rawio


class StateDamaged(Exception):
    """A record of the state did not verify; its work is redone."""


def seal(run_id: str, record: dict[str, Any]) -> dict[str, Any]:
    """`record` plus a digest of it and of the run: an edited, truncated or foreign record no longer verifies."""
    return {**record, "digest": _digest(run_id, record)}


def unseal(run_id: str, record: object) -> dict[str, Any]:
    """The record without its digest; StateDamaged unless the digest matches."""
    if not isinstance(record, dict) or "digest" not in record:
        raise StateDamaged("record without a digest")
    body = {k: v for k, v in record.items() if k != "digest"}
    if record["digest"] != _digest(run_id, body):
        raise StateDamaged("record digest mismatch")
    return body


def _digest(run_id: str, record: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps([run_id, record], sort_keys=True).encode()).hexdigest()


def array_crc(value: np.ndarray) -> int:
    raw = np.ascontiguousarray(value, dtype=np.float64).view(np.uint8).reshape(-1)  # no copy; empty arrays too
    return rawio.crc_of(memoryview(raw))


def read_array(group: zarr.Group, name: str, crc: int) -> np.ndarray:
    """A float64 array of the state, checked against the crc32c recorded when it was written."""
    try:
        value = group[name][...]
    except Exception as exc:  # a damaged chunk (crc32c codec), a missing array, a torn zarr.json
        raise StateDamaged(f"{name} unreadable ({type(exc).__name__})") from None
    if array_crc(value) != crc:
        raise StateDamaged(f"{name} checksum mismatch")
    return value


def put_array(group: zarr.Group, name: str, value: np.ndarray) -> int:
    """Store a float64 array (chunks of <= 64 MiB, crc32c codec); returns the crc32c of its values."""
    value = np.asarray(value, dtype=np.float64)
    rows = max(1, min(value.shape[0] if value.ndim else 1, (64 * 2**20) // max(8 * math.prod(value.shape[1:]), 1)))
    chunks = (rows, *value.shape[1:]) if value.ndim else ()
    arr = group.create_array(
        name,
        shape=value.shape,
        dtype="float64",
        chunks=chunks or (1,) * value.ndim,
        compressors=[Crc32cCodec()],
        fill_value=0.0,
        overwrite=True,
    )
    arr[...] = value
    return array_crc(value)
