"""Running the CLI as a user does, and comparing outputs byte for byte."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

CLI = [sys.executable, "-m", "streamsoup.cli"]
REPORT = "streamsoup_report.json"


def run(*args: str | Path, env: dict | None = None, timeout: int = 300, cwd: Path | None = None
        ) -> subprocess.CompletedProcess:  # fmt: skip
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=cwd)  # fmt: skip


def start(*args: str | Path, env: dict | None = None) -> subprocess.Popen:
    """The CLI in its own process group, so the test can kill the whole tree."""
    return subprocess.Popen([*CLI, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, **(env or {})})  # fmt: skip


#: what a run prints to a non-terminal stderr before it fails mid-run: the budget line and the progress trail
#: a batch log's progress lines begin with the UTC time
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ "
PROGRESS = re.compile(rf"^{STAMP}(merging|resuming): |^streamsoup: (max-ram|cluster) ")


def progress_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if PROGRESS.match(line)]


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    """Exit `code`, no traceback, and one line besides the progress trail, naming every needle."""
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = [line for line in proc.stderr.strip().splitlines() if not PROGRESS.match(line)]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def poison(folder: Path, name: str, value: float, at: int = 17) -> None:
    """Overwrite element `at` of a bf16 tensor of a checkpoint folder with `value` (NaN, Inf)."""
    import torch

    from streamsoup.io.checkpoint import Checkpoint

    ref = Checkpoint.from_path(folder)[name]
    raw = torch.tensor([value], dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes()
    with open(ref.path, "r+b") as f:
        f.seek(ref.offset + 2 * at)
        f.write(raw)


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (the report's run-dependent fields left out)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            rel = str(path.relative_to(folder))
            if rel == REPORT:
                rows = json.loads(path.read_text())["tensors"]
                run_dependent = ("seconds", "attempt", "blocks", "phases")  # how it ran, not what it computed
                stable = [{k: v for k, v in r.items() if k not in run_dependent} for r in rows]
                out[rel] = hashlib.sha256(json.dumps(stable).encode()).hexdigest()
            else:
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def report_rows(out: Path) -> dict[str, dict]:
    return {r["name"]: r for r in json.loads((out / REPORT).read_text())["tensors"]}


def assert_merged_exactly(base: Path, ft: Path, out: Path, rule: str = "entropy", energy: float = 0.8) -> dict:
    """Every output tensor against the float64 reference; copies byte-identical. Returns the report."""
    import pytest
    from conftest import load_folder, raw_bytes
    from reference import assert_within_rounding, monosoup_reference

    folder = lambda p: p if p.is_dir() else p.parent  # noqa: E731
    b, f, o = load_folder(folder(base)), load_folder(folder(ft)), load_folder(out)
    f_raw, o_raw = raw_bytes(folder(ft)), raw_bytes(out)
    report = json.loads((out / REPORT).read_text())
    rows = {r["name"]: r for r in report["tensors"]}
    assert set(o) == set(f) == set(rows)
    for name, w1 in f.items():
        assert o[name].dtype == w1.dtype and o[name].shape == w1.shape, name
        exp = monosoup_reference(b[name], w1, rule, energy) if name in b else None
        if exp is not None and exp.edited:
            assert rows[name]["action"] == "edit", name
            assert rows[name]["k"] == exp.k and rows[name]["rank"] == exp.rank, name
            assert rows[name]["lambda_high"] == pytest.approx(exp.lambda_high, abs=1e-9), name
            assert_within_rounding(o[name], exp, name)
        else:
            assert rows[name]["action"] == "copy", name
            assert o_raw[name] == f_raw[name], f"{name}: copied tensor is not byte-identical"
    return report


def run_here(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The CLI's own `main` in this process, for refusals that stop before any work: the same code path and
    output as `run`, without a new interpreter's start-up (seconds, mostly torch's import)."""
    import contextlib
    import io

    from streamsoup.cli import main

    out, err = io.StringIO(), io.StringIO()
    old = Path.cwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as exc:  # argparse refuses bad flags by exiting, as the CLI does
                code = int(exc.code or 0)
    finally:
        os.chdir(old)
    return subprocess.CompletedProcess(["streamsoup", *map(str, args)], code, out.getvalue(), err.getvalue())


def edited_adapter(adapter: Path, tmp_path: Path, **changes) -> Path:
    """A copy of an adapter folder with `changes` made to its adapter_config.json."""
    import shutil

    copy = tmp_path / "edited-adapter"
    shutil.copytree(adapter, copy)
    config = json.loads((copy / "adapter_config.json").read_text())
    config.update(changes)
    (copy / "adapter_config.json").write_text(json.dumps(config))
    return copy
