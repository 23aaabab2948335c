"""Every worker of a user's cluster must run this streamsoup and see the merge's files as this machine does.

Found before any compute, each in one line naming the worker, the path and what to do; the
alternative is a task failing mid-run on a file it cannot see, or a worker of another version
computing other bytes. A worker that joins later is checked as it joins (clients.py's plugin).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distributed import Client

from .._version import __version__
from ..errors import UsageError
from ..io import store
from ..io.owned import MARKER
from . import remote

#: the same file seen through two filesystems may round its modification time differently
MTIME_SLACK_NS = 10**9


@dataclass(frozen=True)
class Expected:
    """What every worker must see: input files (role, size, and mtime or an object's version), paths it writes,
    streamsoup's markers."""

    files: dict[str, tuple[str, int, int | str]] = field(default_factory=dict)
    writable: list[str] = field(default_factory=list)
    markers: dict[str, bytes] = field(default_factory=dict)

    def merged(self, other: Expected) -> Expected:
        return Expected(
            {**self.files, **other.files}, [*self.writable, *other.writable], {**self.markers, **other.markers}
        )


def inputs_expected(binding: dict[str, Any], out: Path) -> Expected:
    """The input files as this machine sees them (their bound identity), and the folder OUT.partial goes in (or
    its nearest existing parent: streamsoup makes the missing ones)."""
    files = {}
    for role, side in binding.items():
        for name, identity in side["files"].items():
            if identity is not None:
                seen = identity["version"] if "version" in identity else identity["mtime_ns"]
                files[str(store.joined(side["folder"], name))] = (role.upper(), identity["size"], seen)
    folder = out.parent
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    return Expected(files=files, writable=[str(folder)])


def folders_expected(folders: list[Path], written: list[Path], lock: Path) -> Expected:
    """Folders streamsoup made, by their marker (a worker reading the same bytes sees the same folder), the lock
    whose line every task checks before it writes (runlock.Fence), and the files and folders tasks write."""
    markers = {str(p): p.read_bytes() for p in [*(f / MARKER for f in folders), lock]}
    return Expected(writable=[str(p) for p in written], markers=markers)


def lost_cluster(address: str, doing: str, exc: BaseException) -> UsageError:
    """The cluster went away before any compute (dask's comm errors are OSErrors: this is not a disk's)."""
    return UsageError(
        f"lost the dask cluster at {address} while streamsoup {doing} ({type(exc).__name__}: {exc}); check that "
        "the scheduler and its workers run, then rerun"
    )


def check_workers(client: Client, expected: Expected, workers: list[str] | None = None) -> None:
    """Refuse, in one line, the first worker (of `workers`, or all) that does not see what it must."""
    problems = worker_problems(client, expected, workers)
    if problems:
        address, problem = min(problems.items())
        raise UsageError(f"dask worker {address} {problem}")


def worker_problems(client: Client, expected: Expected, workers: list[str] | None = None) -> dict[str, str]:
    """Worker address -> what is wrong with it, for every worker that has a problem."""
    try:
        views = client.run(
            remote.worker_view,
            files=list(expected.files),
            writable=expected.writable,
            markers=list(expected.markers),
            workers=workers,
            on_error="return",
        )
    except (OSError, TimeoutError) as exc:
        raise lost_cluster(client.scheduler.address, "checked its workers", exc) from None
    problems = {}
    for address, view in views.items():
        problem = (
            f"could not run streamsoup's check ({type(view).__name__}: {view}): is its Python the same version as "
            "this machine's?"
            if isinstance(view, BaseException)
            else worker_problem(view, expected)
        )
        if problem:
            problems[address] = problem
    return problems


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
    if "hung" in view:
        return (
            f"did not answer in {view['hung']:.0f} s when it looked at the merge's files (a hung filesystem?): "
            "fix or stop that worker, then rerun"
        )
    for path, (role, size, version) in expected.files.items():
        seen = view["files"].get(path)
        if isinstance(seen, str) and store.is_url(path):
            return (
                f"cannot read {role} object {path} ({store.clean(seen)}): install the store's library there "
                "(pip install 'streamsoup[s3]', [gcs], [azure] or [http]) and give it the same credentials and endpoint"
            )
        if isinstance(seen, str):
            return f"cannot read {role} file {path} ({seen}): {SHARED}; mount it there, or run only workers that do"
        if store.is_url(path):
            if seen != [size, version]:
                return f"sees another {role} object at {path} than this machine does (its size or version differ)"
        elif seen[0] != size or abs(seen[1] - version) > MTIME_SLACK_NS:
            return (
                f"sees another {role} file at {path} than this machine does (its size or modification time "
                f"differ): {SHARED}, not a copy of its own"
            )
    for path, data in expected.markers.items():
        if view["markers"].get(path) != data:
            return (
                f"does not see {Path(path).parent} as this machine does (streamsoup's marker in it is missing or "
                f"differs): OUT and --work-dir must be on a filesystem every worker shares"
            )
    for path, writable in view["writable"].items():
        if not writable:
            return f"may not write {path}: {SHARED}, and may write in (as the same user, or with the same rights)"
    return ""
