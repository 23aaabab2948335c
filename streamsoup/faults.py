"""Named crash points for the kill tests: ``STREAMSOUP_FAULT=name[:n]`` SIGKILLs the process there.

Killing at a chosen instant (the n-th time a point is reached) makes "a kill at any
instant loses at most the work in flight" testable deterministically, publish included.
Unset in normal use; costs one dict lookup per point.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from collections.abc import Callable

_seen: Counter[str] = Counter()


def fault_point(name: str, before: Callable[[], None] | None = None) -> None:
    """SIGKILL here the n-th time; `before` runs first (what must be durable by then, e.g. earlier commits)."""
    spec = os.environ.get("STREAMSOUP_FAULT")
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    _seen[name] += 1
    if _seen[name] >= int(nth or 1):
        if before is not None:
            before()
        os.kill(os.getpid(), signal.SIGKILL)
