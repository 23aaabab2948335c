"""Paths as users give them, from the shell, a YAML file or the API."""

from __future__ import annotations

import os
from pathlib import Path


def expand_path(path: str | os.PathLike) -> Path:
    """`~` and $VARIABLES expanded, as a shell would (paths also come from YAML and the API)."""
    return Path(os.path.expandvars(os.path.expanduser(os.fspath(path))))
