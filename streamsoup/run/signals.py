"""Ctrl-C and SIGTERM stop a merge cleanly: never in the middle of a state commit."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from ..errors import Interrupted

MESSAGE = "interrupted — rerun the same command to resume"


class InterruptGuard:
    """While active, SIGINT/SIGTERM raise Interrupted in the main thread, deferred out of critical sections."""

    def __init__(self) -> None:
        self._depth = 0
        self._pending: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._depth:
            self._pending = signum
            return
        raise Interrupted(MESSAGE)

    @contextmanager
    def critical(self) -> Iterator[None]:
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if not self._depth and self._pending is not None:
                self._pending = None
                raise Interrupted(MESSAGE)

    def __enter__(self) -> InterruptGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM outside a merge's guard (planning, calibrating, reading) stops the command as Ctrl-C does:
    one line and exit 130, not the default action's silent death; a guard, once entered, takes over."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
