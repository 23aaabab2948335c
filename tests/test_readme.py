"""The README's commands work as written: the CPU ones run, the others (clusters, GPUs) parse.

Commands are taken from the README's code blocks: every line (or `&&` part) that starts with
`.venv/bin/` or `streamsoup `. The `.venv/bin/` ones that need only what the README's own commands
create (demo/, l70/, lora-demo/) are run in order in a scratch folder beside a copy of tools/; the
rest (bare `streamsoup ...` synopses, clusters, GPUs) must be accepted by the command-line parser.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import restore_threads, run, run_tool_here

from streamsoup.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
RUNNABLE = ("demo/", "l70/", "lora-demo/", "lora-demo")


def code_lines() -> list[str]:
    """Lines inside the README's fenced code blocks (python blocks excepted)."""
    lines, fence = [], None
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("```"):
            fence = None if fence is not None else line[3:].strip()
        elif fence is not None and fence != "python":
            lines.append(line)
    return lines


def readme_commands() -> list[str]:
    commands = []
    for line in code_lines():
        for part in line.split("&&"):
            part = part.split("  #")[0].strip()
            if part.startswith((".venv/bin/", "streamsoup ")) and "pip install" not in part:
                commands.append(part)
    return commands


def test_readme_has_commands():
    commands = readme_commands()
    assert any("streamsoup merge demo/base" in c for c in commands)
    assert not [c for c in commands if c.startswith("python ")], "bare python: use .venv/bin/python"


def test_ci_runs_the_readme_test_command_verbatim():
    tests = [line for line in code_lines() if "-m pytest" in line]
    assert len(tests) == 1, tests
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests[0] in ci, "the README's test command must be a line of .ci/run, as written"


def _argv(command: str) -> list[str]:
    words = shlex.split(command)
    if words[0].endswith("streamsoup"):
        return words[1:]
    return []


@pytest.mark.parametrize("command", [c for c in readme_commands() if c.split()[0].endswith("streamsoup")])
def test_every_streamsoup_command_parses(command):
    argv = _argv(command)
    if "..." in argv or "[" in command:  # a synopsis line, not a command
        argv = [w for w in argv if not w.startswith("[") and w != "..." and not w.endswith("]")]
    build_parser().parse_args(argv)


def run_python_here(block: str, cwd: Path) -> None:
    """A README Python block, as `python -c BLOCK` runs it in `cwd`: its own globals, here in this process."""
    import os

    import torch

    old_cwd, threads = Path.cwd(), torch.get_num_threads()
    try:
        os.chdir(cwd)
        exec(compile(block, "<README python block>", "exec"), {"__name__": "__main__"})
    finally:
        os.chdir(old_cwd)
        restore_threads(threads)


@pytest.mark.slow
def test_cpu_commands_run_as_written(tmp_path):
    """In order, in a scratch folder. The first `.venv/bin/streamsoup` command runs the installed script in a
    process of its own; the others run the same `main` in this process (helpers.run), the tools' scripts and
    the Python blocks too (no interpreter start-up for each)."""
    (tmp_path / "tools").symlink_to(ROOT / "tools")
    bindir = Path(sys.executable).parent
    ran = []
    for command in readme_commands():
        words = shlex.split(command)
        if not words[0].startswith(".venv/bin/"):  # a bare `streamsoup ...` line is a synopsis: parsed only
            continue
        if not any(w.startswith(RUNNABLE) or w in ("demo", "l70") for w in words[1:]):
            continue
        program = words[0].removeprefix(".venv/bin/")
        if program == "streamsoup" and not ran:
            proc = subprocess.run(
                [str(bindir / program), *words[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=600
            )
        elif program == "streamsoup":
            proc = run(*words[1:], cwd=tmp_path, timeout=600)
        else:
            assert program == "python" and words[1].startswith("tools/"), command
            proc = run_tool_here(words, tmp_path)
        assert proc.returncode == 0, (command, proc.stderr[-2000:])
        ran.append(command)
    assert any("merge demo/base demo/finetuned demo/merged" in c for c in ran)
    assert any(" plan l70/base" in c for c in ran) and any(" verify demo/merged" in c for c in ran)
    assert any(" report demo/merged --png" in c for c in ran) and (tmp_path / "demo/report.png").exists()
    assert any(c.endswith("streamsoup demo demo") for c in ran) and (tmp_path / "demo/configs").is_dir()
    examples = [block for block in python_blocks() if "demo/" in block]  # the Python API section, on the demo
    assert examples
    for block in examples:
        run_python_here(block, tmp_path)


def python_blocks() -> list[str]:
    blocks, current = [], None
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("```"):
            if current is not None:
                blocks.append("\n".join(current))
                current = None
            elif line[3:].strip() == "python":
                current = []
        elif current is not None:
            current.append(line)
    return blocks
