"""Mid-tensor progress of a streamed tensor, kept in the resume state so a resumed merge continues it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from .records import StateDamaged, put_array, read_array, seal, unseal
from .runlock import Fence

log = logging.getLogger(__name__)


class TensorProgress:
    """Mid-tensor progress of one streamed tensor, in ``tensors/<key>/partial`` (written by its task only).

    phase "gram":    the Gram sums of rows [0, next_row), double-buffered (gram_0 / gram_1):
                     a kill while one buffer is written leaves the other, named by the attrs, intact
    phase "project": the eigenbasis columns in use and the coefficients; rows [0, next_row) written,
                     with the crc32c of each written block of rows ("written": [[start, stop, crc], ...])

    The attrs are sealed with the run's id and hold the crc32c of every array they name: whatever
    does not verify reads as no progress (`attrs` is then {}), and the tensor starts over.
    """

    def __init__(self, state_path: str | Path, key: str, fence: Fence | None = None) -> None:
        self.fence = fence
        self._fenced()  # opening in mode "a" would make the state anew where it is gone
        root = zarr.open_group(str(state_path), mode="a")
        self.run_id = str(root.attrs.get("run_id", ""))
        self.key = key
        self.group = root["tensors"].require_group(key).require_group("partial")

    @property
    def attrs(self) -> dict[str, Any]:
        """The saved progress, or {} when there is none or it does not verify."""
        raw = dict(self.group.attrs)
        if not raw:
            return {}
        try:
            return unseal(self.run_id, raw)
        except StateDamaged as exc:
            self.damaged(str(exc))
            return {}

    def damaged(self, why: str) -> None:
        """Say it once and forget the progress: the tensor starts over."""
        log.warning("%s: saved mid-tensor progress is damaged (%s); recomputing the tensor", self.key, why)
        self._fenced()
        self.group.attrs.put({})

    def _fenced(self) -> None:
        if self.fence is not None:
            self.fence.check()

    def _put(self, record: dict[str, Any]) -> None:
        self._fenced()
        self.group.attrs.put(seal(self.run_id, record))

    def save_gram(self, gram: np.ndarray, next_row: int, dw_sq: float, w0_sq: float) -> None:
        self._fenced()
        slot = 1 - int(self.attrs.get("slot", 1))
        crc = put_array(self.group, f"gram_{slot}", gram)
        self._put({"phase": "gram", "slot": slot, "next_row": next_row, "dw_sq": dw_sq, "w0_sq": w0_sq, "crc": crc})

    def load_gram(self, saved: dict[str, Any]) -> np.ndarray:
        return read_array(self.group, f"gram_{saved['slot']}", saved["crc"])

    def save_basis(self, s: np.ndarray, basis: np.ndarray, info: dict[str, Any]) -> None:
        self._fenced()
        crcs = {"s_crc": put_array(self.group, "s", s), "basis_crc": put_array(self.group, "basis", basis)}
        self._put({"phase": "project", "next_row": 0, "written": [], **info, **crcs})

    def load_basis(self, saved: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        return read_array(self.group, "s", saved["s_crc"]), read_array(self.group, "basis", saved["basis_crc"])

    def save_progress(self, saved: dict[str, Any], start: int, stop: int, crc: int) -> dict[str, Any]:
        """Rows start:stop are durable in the slot with this crc32c; returns the new record."""
        record = {**saved, "next_row": stop, "written": [*saved["written"], [start, stop, crc]]}
        self._put(record)
        return record
