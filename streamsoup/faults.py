"""Named crash points for the kill tests: ``STREAMSOUP_FAULT=name[:n]`` SIGKILLs the process there.

Killing at a chosen instant (the n-th time a point is reached) makes "a kill at any
instant loses at most the work in flight" testable deterministically, publish included.
Unset in normal use; costs one dict lookup per point.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_seen: Counter[str] = Counter()


def fault_point(name: str) -> None:
    spec = os.environ.get("STREAMSOUP_FAULT")
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    _seen[name] += 1
    if _seen[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
