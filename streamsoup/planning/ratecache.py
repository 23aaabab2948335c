"""Calibrations of this machine reused for a few minutes: `plan` asked again while options are tuned, or a big
merge started right after its plan, does not measure the same machine again (~3 s each time).

One small JSON file in the user's cache folder (``$STREAMSOUP_CACHE_DIR``, else ``$XDG_CACHE_HOME/streamsoup``
or ``~/.cache/streamsoup``), keyed by what a rate depends on: the host and its CPUs, the threads per lane and the
devices, the scratch filesystem, torch's and streamsoup's versions. Not the load of the moment: it changes from
one minute to the next, and REUSE_S bounds how old the machine's picture can be.
A cache that cannot be read or written is only a cache: the machine is measured.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

#: how long a calibration stands for this machine (its load changes; a merge's own time is what counts)
REUSE_S = 600
CACHE_FILE = "calibration.json"


def cache_dir() -> Path:
    explicit = os.environ.get("STREAMSOUP_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "streamsoup"


def key_of(facts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _entries() -> dict[str, Any]:
    try:
        entries = json.loads((cache_dir() / CACHE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def load(key: str) -> tuple[dict[str, float], float] | None:
    """(rates, measured at) of a calibration of this key younger than REUSE_S, else None."""
    entry = _entries().get(key)
    if not isinstance(entry, dict) or not isinstance(entry.get("rates"), dict):
        return None
    at, rates = entry.get("at"), entry["rates"]
    if not isinstance(at, (int, float)) or not 0 <= time.time() - at < REUSE_S:
        return None
    if not all(isinstance(v, (int, float)) and (v > 0 or v == math.inf) for v in rates.values()):
        return None  # a damaged entry: measure again
    return rates, float(at)


def store(key: str, rates: dict[str, float]) -> None:
    """Keep this calibration (expired ones go); written whole by a rename, never half."""
    now = time.time()
    entries = {k: v for k, v in _entries().items() if isinstance(v, dict) and now - v.get("at", 0) < REUSE_S}
    entries[key] = {"at": now, "host": socket.gethostname(), "rates": rates}
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=folder, prefix=".calibration-", delete=False) as f:
            json.dump(entries, f)
        os.replace(f.name, folder / CACHE_FILE)
    except OSError:
        return
