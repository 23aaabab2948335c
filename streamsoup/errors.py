"""One exception hierarchy for user-facing failures; the CLI maps each to one line and an exit code."""

from __future__ import annotations


class StreamsoupError(Exception):
    """Base of every failure a user should see as one clear line."""

    exit_code = 1


class UsageError(StreamsoupError):
    """Bad options or arguments: nothing was written."""

    exit_code = 2


class OptionError(UsageError):
    """A bad option value: named as the API keyword (`rank_rule`), or as the CLI flag by `for_cli`."""

    def __init__(self, name: str, problem: str) -> None:
        self.name, self.problem = name, problem
        super().__init__(f"{name} {problem}")

    def for_cli(self) -> str:
        return f"--{self.name.replace('_', '-')} {self.problem}"


class InputError(StreamsoupError):
    """A checkpoint is missing, malformed or inconsistent: nothing was written."""

    exit_code = 2


class RunError(StreamsoupError):
    """A failure while merging (I/O, numerics): the partial state is kept for a rerun."""

    exit_code = 1


class Interrupted(StreamsoupError):
    """Ctrl-C or SIGTERM: the partial state is kept for a rerun."""

    exit_code = 130


def nonfinite(path: object, what: str, then: str) -> InputError:
    """The one wording for NaN/Inf found in an input: the file, what holds them, what to do."""
    return InputError(f"{path}: {what} NaN or Inf; {then}")


#: what a NaN/Inf in a tensor that would be passed through unchanged asks of the user
AS_IS = "it would go into the output as is: fix the checkpoint, or rerun with --allow-nonfinite to copy it unchanged"
