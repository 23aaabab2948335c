"""Running the CLI as a user does, and comparing outputs byte for byte."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

CLI = [sys.executable, "-m", "streamsoup.cli"]
REPORT = "streamsoup_report.json"


def run(*args: str | Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def start(*args: str | Path, env: dict | None = None) -> subprocess.Popen:
    """The CLI in its own process group, so the test can kill the whole tree."""
    return subprocess.Popen([*CLI, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, **(env or {})})  # fmt: skip


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (the report's timings left out)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            rel = str(path.relative_to(folder))
            if rel == REPORT:
                rows = json.loads(path.read_text())["tensors"]
                stable = [{k: v for k, v in r.items() if k not in ("seconds", "attempt")} for r in rows]
                out[rel] = hashlib.sha256(json.dumps(stable).encode()).hexdigest()
            else:
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def report_rows(out: Path) -> dict[str, dict]:
    return {r["name"]: r for r in json.loads((out / REPORT).read_text())["tensors"]}
