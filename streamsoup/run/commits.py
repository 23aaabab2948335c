"""Finished tensors recorded in batches: one Zarr write for many small tensors instead of one each."""

from __future__ import annotations

import time

from ..io.state import Commit, RunState
from .signals import InterruptGuard

#: the most tensors one batch records
BATCH_SIZE = 512
#: the longest a finished tensor waits to be recorded
BATCH_SECONDS = 1.0


class CommitBatch:
    """Tensors finished but not yet recorded, committed together: one Zarr write per batch, not per tensor.

    Flushed at BATCH_SIZE tensors, BATCH_SECONDS after the oldest (from the progress tick too, so a result
    never waits on a long tensor), before a fault point fires, and when the graph ends or fails: a kill
    loses at most the last BATCH_SECONDS of small results, whose bytes are rewritten identically on resume.
    """

    def __init__(self, state: RunState, guard: InterruptGuard) -> None:
        self.state, self.guard = state, guard
        self.pending: list[Commit] = []
        self.oldest = 0.0

    def add(self, commit: Commit, *, at_once: bool = False) -> None:
        """Queue one finished tensor; `at_once` (a streamed tensor: costly to redo, with mid-tensor progress
        for its own record to drop) records the queue and then it, now."""
        if at_once:
            self.flush()
            with self.guard.critical():
                self.state.commit(commit.key, commit.crc, commit.row, commit.singular_values)
            return
        if not self.pending:
            self.oldest = time.monotonic()
        self.pending.append(commit)
        if len(self.pending) >= BATCH_SIZE:
            self.flush()
        else:
            self.flush_if_due()

    def flush_if_due(self) -> None:
        if self.pending and time.monotonic() - self.oldest >= BATCH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        with self.guard.critical():
            if len(self.pending) == 1:
                c = self.pending[0]
                self.state.commit(c.key, c.crc, c.row, c.singular_values)
            else:
                self.state.commit_many(self.pending)
        self.pending = []
