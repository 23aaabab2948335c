"""What one dask worker sees of a merge's files and of streamsoup, measured on the worker.

The function is sent to the workers by value (cloudpickle), not by name: it runs on a worker
whose Python lacks streamsoup or has another version, to say so. Hence the standard library only.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any


def worker_view(files: list[str], folders: list[str], markers: list[str]) -> dict[str, Any]:
    """streamsoup's version here ("" and why when it cannot be imported), each file's size and mtime or why it
    cannot be seen, whether each folder is one we may write in, and each marker's bytes."""
    try:
        version, missing = str(importlib.import_module("streamsoup._version").__version__), ""
    except Exception as exc:  # not installed, or broken: the client names the worker and the cause
        version, missing = "", f"{type(exc).__name__}: {exc}"
    seen: dict[str, Any] = {}
    for path in files:
        try:
            info = os.stat(path)
        except OSError as exc:
            seen[path] = exc.strerror or str(exc)
            continue
        seen[path] = [info.st_size, info.st_mtime_ns // 10**9] if os.access(path, os.R_OK) else "Permission denied"
    writable = {path: os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK) for path in folders}
    marks: dict[str, bytes | None] = {}
    for path in markers:
        try:
            with open(path, "rb") as f:
                marks[path] = f.read()
        except OSError:
            marks[path] = None
    return {
        "python": sys.executable,
        "version": version,
        "missing": missing,
        "files": seen,
        "folders": writable,
        "markers": marks,
    }
