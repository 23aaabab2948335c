"""Progress a person can follow: a tqdm bar on a terminal, plain lines in a batch log.

A SLURM log, nohup or CI has no terminal: there a line such as
``2026-12-03T10:41:07Z merging: 40/111 tensors, 1.2 of 3.0 GiB, 0:01:10 elapsed, ETA 0:01:45`` is printed at
each tenth of the work and at least every minute. After a resume the tensors already
done are announced once and left out of the rate, so the ETA is right from the start.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm

from ..units import format_duration, format_part, format_size, utc_stamp

#: a batch log gets a line at least this often (seconds), whatever happens
LOG_EVERY_S = 60.0


class Progress:
    """Counts tensors and output bytes; shows them as a bar (terminal) or as log lines (anything else)."""

    def __init__(
        self, tensors: int, nbytes: int, done_tensors: int = 0, done_bytes: int = 0, *, enabled: bool = True
    ) -> None:
        self.stream: TextIO = sys.stderr
        self.total_tensors, self.total_bytes = tensors, nbytes
        self.tensors, self.bytes = done_tensors, done_bytes
        self.start_bytes = done_bytes
        self.desc = "merging"
        self.started = self.last_line = time.monotonic()
        self.next_tenth = 1
        self.terminal = enabled and self.stream.isatty()
        self.lines = enabled and not self.terminal
        self.bar = None
        if done_tensors and enabled:
            stamp = "" if self.terminal else f"{utc_stamp()} "
            self.stream.write(
                f"{stamp}resuming: {done_tensors}/{tensors} tensors already done "
                f"({format_size(done_bytes)} of {format_size(nbytes)}); {tensors - done_tensors} "
                "to go\n"
            )
            self.stream.flush()
        if self.terminal:
            self.bar = tqdm(
                total=nbytes,
                initial=done_bytes,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=self.desc,
                dynamic_ncols=True,
                file=self.stream,
            )
            self.bar.set_postfix_str(f"{done_tensors}/{tensors} tensors", refresh=False)
        elif self.lines:
            self._line()

    def advance(self, nbytes: int, tensors: int = 1, counted: bool = False) -> None:
        """One more tensor done; `counted`: its bytes were already in the resumed total (not new work)."""
        self.tensors += tensors
        if not counted:
            self.bytes += nbytes
        if self.bar is not None:
            self.bar.update(0 if counted else nbytes)
            self.bar.set_postfix_str(f"{self.tensors}/{self.total_tensors} tensors", refresh=False)
        elif self.lines:
            new_total = max(self.total_bytes - self.start_bytes, 1)
            tenth = int(10 * (self.bytes - self.start_bytes) / new_total)
            if tenth >= self.next_tenth or self.tensors == self.total_tensors:
                self.next_tenth = tenth + 1
                self._line()

    def tick(self) -> None:
        """Called while nothing finishes: a batch log still hears from us every minute."""
        if self.lines and time.monotonic() - self.last_line >= LOG_EVERY_S:
            self._line()

    def _line(self) -> None:
        elapsed = time.monotonic() - self.started
        new = self.bytes - self.start_bytes
        left = self.total_bytes - self.bytes
        eta = format_duration(elapsed / new * left) if new > 0 else "unknown"
        self.stream.write(
            f"{utc_stamp()} {self.desc}: {self.tensors}/{self.total_tensors} tensors, "
            f"{format_part(self.bytes, self.total_bytes)}, {format_duration(elapsed)} elapsed, ETA {eta}\n"
        )
        self.stream.flush()
        self.last_line = time.monotonic()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
