"""What streamsoup runs on the scheduler and the workers of a user's cluster, outside its tasks.

These functions are sent by value (cloudpickle, registered below), not by name: they run on a
scheduler or a worker whose Python lacks streamsoup or has another version (to say so). Hence
the standard library only in them, and each reads nothing but its arguments and the dask object
it is given.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
import time
from typing import Any

import cloudpickle

from ..io.store import FRESH, object_identity

cloudpickle.register_pickle_by_value(sys.modules[__name__])

#: how long a worker may take to look at the merge's files (a hung mount answers never)
LOOK_SECONDS = 30.0


def _look(files: list[str], writable: list[str], markers: list[str]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for path in files:
        if "://" in path:  # an object in a store, through the same library as the tasks (io/store.py)
            seen[path] = _look_at_object(path)
            continue
        try:
            info = os.stat(path)
        except OSError as exc:
            seen[path] = exc.strerror or str(exc)
            continue
        seen[path] = [info.st_size, info.st_mtime_ns] if os.access(path, os.R_OK) else "Permission denied"
    may_write = {p: os.access(p, os.W_OK | (os.X_OK if os.path.isdir(p) else 0)) for p in writable}
    marks: dict[str, bytes | None] = {}
    for path in markers:
        try:
            with open(path, "rb") as f:
                marks[path] = f.read()
        except OSError:
            marks[path] = None
    return {"files": seen, "writable": may_write, "markers": marks}


def _look_at_object(url: str) -> list | str:
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(url, **FRESH)
        found = object_identity(fs.info(path))
    except Exception as exc:  # no library, no credentials, no route to the store: said by the client
        return f"{type(exc).__name__}: {exc}"
    return [found["size"], found["version"]]


async def worker_view(files: list[str], writable: list[str], markers: list[str]) -> dict[str, Any]:
    """On a worker: streamsoup's version there ("" and why when it cannot be imported), each file's size and
    mtime or why it cannot be seen, whether each path may be written, each marker's bytes. The files are looked
    at in a thread, so a hung mount stalls neither the worker's event loop nor the merge."""
    try:
        version, missing = str(importlib.import_module("streamsoup._version").__version__), ""
    except Exception as exc:  # not installed, or broken: the client names the worker and the cause
        version, missing = "", f"{type(exc).__name__}: {exc}"
    view: dict[str, Any] = {"python": sys.executable, "version": version, "missing": missing}
    try:
        seen = await asyncio.wait_for(asyncio.to_thread(_look, files, writable, markers), LOOK_SECONDS)
    except TimeoutError:
        return {**view, "hung": LOOK_SECONDS}
    return {**view, **seen}


def scheduler_settings(dask_scheduler) -> dict[str, Any]:
    """On the scheduler: its own worker-ttl (None: off) and allowed-failures, which the watch applies."""
    return {"worker_ttl": dask_scheduler.worker_ttl, "allowed_failures": dask_scheduler.allowed_failures}


def lost_counts(dask_scheduler, keys: list[str]) -> dict[str, int]:
    """On the scheduler: how often each task's worker died while running it (dask's `suspicious` count)."""
    return {k: ts.suspicious for k in keys if (ts := dask_scheduler.tasks.get(k)) is not None}


async def drop_worker(dask_scheduler, address: str) -> str:
    """On the scheduler: take a worker that stopped answering out of the cluster, as its worker-ttl does, so its
    tasks run elsewhere at once (worker-ttl first asks the worker's nanny to restart it, and waits for it)."""
    return await dask_scheduler.remove_worker(address=address, stimulus_id=f"streamsoup-silent-{time.time()}")
