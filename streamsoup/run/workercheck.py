"""Every worker of a user's cluster must run this streamsoup and see the merge's files as this machine does.

Found before any compute, each in one line naming the worker, the path and what to do; the
alternative is a task failing mid-run on a file it cannot see, or a worker of another version
computing other bytes. Workers that join later are not checked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cloudpickle
from distributed import Client

from .._version import __version__
from ..errors import UsageError
from ..io.owned import MARKER
from . import workerview

cloudpickle.register_pickle_by_value(workerview)  # runs where streamsoup is missing: sent by value


@dataclass(frozen=True)
class Expected:
    """What every worker must see: input files (role, size, mtime in s), writable folders, markers' bytes."""

    files: dict[str, tuple[str, int, int]] = field(default_factory=dict)
    folders: list[str] = field(default_factory=list)
    markers: dict[str, bytes] = field(default_factory=dict)


def inputs_expected(binding: dict[str, Any], out: Path) -> Expected:
    """The input files as this machine sees them (their bound identity), and OUT's folder."""
    files = {}
    for role, side in binding.items():
        for name, identity in side["files"].items():
            if identity is not None:
                files[str(Path(side["folder"], name))] = (role.upper(), identity["size"], identity["mtime_ns"] // 10**9)
    return Expected(files=files, folders=[str(out.parent)])


def folders_expected(folders: list[Path]) -> Expected:
    """Folders streamsoup made, by their marker: a worker reading the same bytes sees the same folder."""
    return Expected(markers={str(f / MARKER): (f / MARKER).read_bytes() for f in folders})


def lost_cluster(address: str, doing: str, exc: BaseException) -> UsageError:
    """The cluster went away before any compute (dask's comm errors are OSErrors: this is not a disk's)."""
    return UsageError(
        f"lost the dask cluster at {address} while streamsoup {doing} ({type(exc).__name__}: {exc}); check that "
        "the scheduler and its workers run, then rerun"
    )


def check_workers(client: Client, expected: Expected) -> None:
    try:
        views = client.run(
            workerview.worker_view, files=list(expected.files), folders=expected.folders, markers=list(expected.markers)
        )
    except (OSError, TimeoutError) as exc:
        raise lost_cluster(client.scheduler.address, "checked its workers", exc) from None
    for address, view in sorted(views.items()):
        problem = worker_problem(view, expected)
        if problem:
            raise UsageError(f"dask worker {address} {problem}")


SHARED = "every worker must see it at the same path, on a filesystem they share"


def worker_problem(view: dict[str, Any], expected: Expected) -> str:
    """What is wrong with one worker, or ""."""
    python = view.get("python", "?")
    if not view.get("version"):
        return (
            f"cannot import streamsoup ({view.get('missing')}; its Python: {python}): install streamsoup=={__version__}"
            " in the environment the workers run in"
        )
    if view["version"] != __version__:
        return (
            f"runs streamsoup {view['version']} and this machine {__version__} (its Python: {python}): install the "
            "same version on both, then rerun"
        )
    for path, (role, size, mtime_s) in expected.files.items():
        seen = view["files"].get(path)
        if isinstance(seen, str):
            return f"cannot read {role} file {path} ({seen}): {SHARED}; mount it there, or run only workers that do"
        if seen != [size, mtime_s]:
            return (
                f"sees another {role} file at {path} than this machine does (its size or modification time "
                f"differ): {SHARED}, not a copy of its own"
            )
    for folder, writable in view["folders"].items():
        if not writable:
            return f"cannot write in {folder}, OUT's folder: {SHARED}, and may write in"
    for path, data in expected.markers.items():
        if view["markers"].get(path) != data:
            return (
                f"does not see {Path(path).parent} as this machine does (streamsoup's marker in it is missing or "
                f"differs): OUT and --work-dir must be on a filesystem every worker shares"
            )
    return ""
