"""The run options: one dataclass is the single source of truth for CLI flags, YAML keys and the API."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import UsageError

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}  # fmt: skip


def parse_size(value: str | int, flag: str = "size") -> int:
    """'5GB' -> 5e9 (decimal, as Hugging Face counts shards), '8GiB' -> 8*2**30, 123 -> 123."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if not match or match.group(2).lower() not in _UNITS:
            raise UsageError(f"{flag} must be a size like 500MB, 5GB or 8GiB, got {value!r}")
        size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if size <= 0:
        raise UsageError(f"{flag} must be positive, got {value!r}")
    return size


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def _opt(
    default: Any, help: str, *, choices: tuple[str, ...] | None = None, size: bool = False, output: bool = True
) -> Any:
    """A field with the metadata the CLI builds its flags from; `output`: changes the result bytes."""
    return field(default=default, metadata={"help": help, "choices": choices, "size": size, "output": output})


@dataclass(frozen=True)
class MergeOptions:
    """How to merge; every field is a `--flag` of `streamsoup merge` and a key of a `--config` YAML."""

    rank_rule: str = _opt(
        "entropy", "how k, the number of high-energy directions, is chosen", choices=("entropy", "energy")
    )
    energy: float = _opt(0.8, "energy share R kept in the top-k directions under --rank-rule energy")
    min_rel_update: float = _opt(1e-6, "tensors whose ||dW||/||W0|| is below this are copied from the fine-tune")
    shard_size: int = _opt(5 * 10**9, "largest output shard, e.g. 5GB or 2GiB", size=True)
    spectral: str = _opt(
        "auto",
        "how the spectrum is computed: exact Gram eigendecomposition, full SVD, or auto (fastest exact path)",
        choices=("auto", "gram", "svd"),
    )
    max_ram: int | None = _opt(
        None,
        "peak resident memory of the whole run, e.g. 8GiB (default: 70%% of the memory available at start)",
        size=True,
        output=False,
    )
    max_vram: int | None = _opt(
        None, "GPU memory per device, e.g. 40GiB (default: 90%% of what is free)", size=True, output=False
    )
    devices: str = _opt("auto", "auto | cpu | cuda | cuda:0,cuda:1 (one lane per listed device)", output=False)
    lanes: int = _opt(1, "CPU lanes: tensors processed at once on the host", output=False)
    threads: int = _opt(0, "torch threads; 0 = cores / lanes", output=False)
    scheduler: str = _opt(
        "",
        "a dask.distributed scheduler (tcp://host:port); default: an embedded local "
        "cluster. Workers need a shared filesystem and resources, see README",
        output=False,
    )
    checkpoint_seconds: float = _opt(
        60.0, "how often a streamed tensor's partial Gram is saved for resume", output=False
    )

    def __post_init__(self) -> None:
        if self.rank_rule not in ("entropy", "energy"):
            raise UsageError(f"--rank-rule must be entropy or energy, got {self.rank_rule!r}")
        if not 0.0 < float(self.energy) <= 1.0:
            raise UsageError(f"--energy must be in (0, 1], got {self.energy!r}")
        if float(self.min_rel_update) < 0:
            raise UsageError(f"--min-rel-update must be >= 0, got {self.min_rel_update!r}")
        if self.spectral not in ("auto", "gram", "svd"):
            raise UsageError(f"--spectral must be auto, gram or svd, got {self.spectral!r}")
        if int(self.lanes) < 1:
            raise UsageError(f"--lanes must be >= 1, got {self.lanes!r}")
        if float(self.checkpoint_seconds) < 0:
            raise UsageError(f"--checkpoint-seconds must be >= 0, got {self.checkpoint_seconds!r}")
        if int(self.threads) < 0:
            raise UsageError(f"--threads must be >= 0, got {self.threads!r}")

    @classmethod
    def create(cls, config: str | Path | None = None, **overrides: Any) -> MergeOptions:
        """Options from an optional YAML file, then explicit overrides (None means 'not given')."""
        values: dict[str, Any] = load_config(config) if config else {}
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise UsageError(f"unknown option(s): {', '.join(unknown)}; known: {', '.join(known)}")
        typed: dict[str, Any] = {}
        for name, value in values.items():
            typed[name] = _coerce(known[name], value)
        return cls(**typed)

    def output_fingerprint(self) -> dict[str, Any]:
        """The options that change the output bytes (lane and thread counts do not)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["output"]}

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    flag = "--" + f.name.replace("_", "-")
    if f.metadata.get("size"):
        return None if value in (None, "auto") else parse_size(value, flag)
    kind = type(f.default)
    if kind is str:
        return str(value)
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise UsageError(f"{flag} must be a {kind.__name__}, got {value!r}") from None


def load_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise UsageError(f"cannot read --config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"--config {path} is not valid YAML: {exc}".splitlines()[0]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"--config {path} must be a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}
