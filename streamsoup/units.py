"""Sizes and durations as users type and read them: one parser, one formatter of each."""

from __future__ import annotations

import math
import re
import time

from .errors import OptionError

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "t": 2**40,
}


def parse_size(value: str | int, name: str = "size") -> int:
    """'5GB' -> 5e9 (decimal, as Hugging Face counts shards), '8GiB' -> 8*2**30, 123 -> 123."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if not match or match.group(2).lower() not in _UNITS:
            raise OptionError(name, f"must be a size like 500MB, 5GB or 8GiB, got {value!r}")
        number = float(match.group(1)) * _UNITS[match.group(2).lower()]
        if not math.isfinite(number):
            raise OptionError(name, f"is not a usable size: {value!r}")
        size = int(number)
    if size <= 0:
        raise OptionError(name, f"must be positive, got {value!r}")
    return size


def binary_unit(n: float) -> tuple[str, int]:
    """The binary unit that suits `n` bytes, and its size: ('GiB', 2**30) for 3e9."""
    for unit, power in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if abs(n) >= 2**power:
            return unit, 2**power
    return "B", 1


def format_size(n: float, digits: int = 2) -> str:
    """'3.73 GiB', '512 B': bytes in the unit that suits them."""
    unit, scale = binary_unit(n)
    return f"{n:.0f} B" if unit == "B" else f"{n / scale:.{digits}f} {unit}"


def format_part(done: float, total: float) -> str:
    """'1.2 of 3.0 GiB': both in the unit that suits the total."""
    unit, scale = binary_unit(total)
    return f"{done / scale:.1f} of {total / scale:.1f} {unit}"


def format_duration(seconds: float) -> str:
    """'0:01:10', '33:05:12': whole seconds, hours past a day counted on (timedelta says '1 day, 9:05:12'), for
    progress lines and estimates alike."""
    minutes, secs = divmod(int(max(seconds, 0)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def utc_stamp() -> str:
    """'2026-12-03T10:41:07Z': the time a batch log line was written, whatever the machine's time zone."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
