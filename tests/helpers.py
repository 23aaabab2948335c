"""Running the CLI as a user does, and comparing outputs byte for byte."""

from __future__ import annotations

import collections.abc
import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

CLI = [sys.executable, "-m", "streamsoup.cli"]
REPORT = "streamsoup_report.json"


#: environment variables a run cannot be given in this process: a fault point SIGKILLs its process, and
#: huggingface_hub and dask read their settings once, at import
PROCESS_ONLY_ENV = ("STREAMSOUP_FAULT", "HF_", "DASK_")
#: flags a run cannot be given in this process: --max-ram is a budget for the whole process, which here would
#: count pytest's own memory
PROCESS_ONLY_FLAGS = ("--max-ram",)


def needs_own_process(args: tuple, env: dict | None) -> bool:
    """A flag (or an abbreviation argparse accepts, or a --config file's key) or an environment variable, given
    here or already set, that this process cannot take (PROCESS_ONLY_ENV, PROCESS_ONLY_FLAGS)."""
    words = [str(a) for a in args]
    flags = [w.split("=")[0] for w in words if w.startswith("--")]
    if any(len(f) > 4 and flag.startswith(f) for f in flags for flag in PROCESS_ONLY_FLAGS):
        return True
    configs = [Path(words[i + 1]) for i, w in enumerate(words[:-1]) if w == "--config"]
    if any(c.is_file() and re.search(r"max[-_]ram", c.read_text(errors="replace")) for c in configs):
        return True
    return any(key.startswith(PROCESS_ONLY_ENV) for key in {**os.environ, **(env or {})})


def run(
    *args: str | Path, env: dict | None = None, timeout: int = 300, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """The CLI as a user runs it: its exit code, stdout and stderr. In this process (`run_here`: the same `main`,
    without a new interpreter's seconds of start-up) unless the run needs a process of its own (run_forked)."""
    if needs_own_process(args, env):
        return run_forked(*args, env=env, timeout=timeout, cwd=cwd)
    t0 = time.monotonic()
    proc = run_here(*args, env=env, cwd=cwd)
    if time.monotonic() - t0 > timeout:  # what the process's timeout would have said (a hang: pytest-timeout)
        raise subprocess.TimeoutExpired(proc.args, timeout, proc.stdout, proc.stderr)
    return proc


def run_process(
    *args: str | Path, env: dict | None = None, timeout: int = 300, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """The CLI in a new interpreter (`python -m streamsoup.cli`): where its start-up or its shutdown is tested."""
    return subprocess.run(
        [*CLI, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


_forkserver: list = []  # multiprocessing's forkserver context, made at the first use


def forkserver():
    """multiprocessing's forkserver, its server started once with the CLI imported (imports only: no thread,
    no state), from which each CLI process is forked."""
    import multiprocessing

    if not _forkserver:
        import multiprocessing.forkserver

        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["streamsoup.cli", "helpers", "cli_server"])
        # the server imports them by name: it needs this folder on its path (it inherits the environment)
        old = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), *([old] if old else [])])
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            os.environ.pop("PYTHONPATH") if old is None else os.environ.update(PYTHONPATH=old)
        _forkserver.append(context)
    return _forkserver[0]


def run_forked(
    *args: str | Path, env: dict | None = None, timeout: int = 300, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """The CLI in a process of its own, forked from a server that imported it once (multiprocessing's
    forkserver): its own pid, environment, signals, exit code (-9 when a fault point SIGKILLs it) and
    stdout/stderr at the file-descriptor level, and the RSS of a new interpreter (cli_server), without its
    start-up. Not its shutdown: the process ends with os._exit once the command returns (run_process)."""
    proc = ForkedCLI([str(a) for a in args], {**os.environ, **(env or {})}, cwd=cwd)
    try:
        proc.wait(timeout)
    finally:  # a timeout, pytest-timeout or ^C: the process goes too, as subprocess.run's does
        if proc.poll() is None:
            proc.kill()
    out, err = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def cli_child(argv: list[str], env: dict, cwd: Path | None, out: Path, err: Path, new_session: bool = False) -> None:
    """In the forked process: the environment, folder and standard streams `python -m streamsoup.cli` would
    have (stdout block-buffered, stderr line-buffered, both files), then the command line's own entry."""
    if new_session:
        os.setsid()
    import cli_server

    cli_server.map_parents_pages()  # its RSS: a new interpreter's (cli_server's docstring)
    os.environ.clear()
    os.environ.update(env)
    import dask.config

    dask.config.refresh()  # a new interpreter reads DASK_* at its import of dask: the server imported it before
    if cwd is not None:
        os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):
        opened = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(opened, fd)
        os.close(opened)
    sys.stdout = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115 (the process's own stream)
    sys.stderr = open(2, "w", encoding="utf-8", buffering=1, closefd=False)  # noqa: SIM115
    sys.argv = ["streamsoup", *argv]
    from streamsoup.cli import entry

    entry()


def start(*args: str | Path, env: dict | None = None) -> ForkedCLI:
    """The CLI running in a session of its own (its process group), so the test can signal or kill the whole tree."""
    return ForkedCLI([str(a) for a in args], {**os.environ, **(env or {})}, new_session=True)


class ForkedCLI:
    """A CLI process forked from the server of `forkserver` (see run_forked), still running: what the tests use
    of subprocess.Popen (pid, poll, wait, communicate, send_signal, kill, returncode, stderr.readline)."""

    def __init__(self, argv: list[str], env: dict, cwd: Path | None = None, new_session: bool = False) -> None:
        import shutil
        import tempfile
        import weakref

        self.args = ["streamsoup", *argv]
        self._folder = Path(tempfile.mkdtemp(prefix="streamsoup-test-cli-"))
        weakref.finalize(self, shutil.rmtree, self._folder, True)  # also when a test kills it and never reads
        self._out, err = self._folder / "stdout", self._folder / "stderr"
        self._out.touch()
        err.touch()
        self._child = forkserver().Process(
            target=cli_child, args=(argv, env, cwd, self._out, err, new_session), daemon=True
        )
        self._child.start()
        self.pid = self._child.pid
        self.stderr = _Lines(err, self.poll)

    @property
    def returncode(self) -> int | None:
        return self._child.exitcode

    def poll(self) -> int | None:
        return self._child.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._child.join(timeout)
        if self._child.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        return self._child.exitcode

    def send_signal(self, sig: int) -> None:
        """As Popen's: nothing once the process has ended (its server reaps it at once)."""
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        self._child.kill()
        self._child.join()

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Wait for the end; stdout, and what stderr.readline has not yet returned."""
        self.wait(timeout)
        return self._out.read_text(), self.stderr.rest()


class _Lines:
    """A running process's stderr file read as a pipe reads: readline waits for a whole line or the end."""

    def __init__(self, path: Path, poll) -> None:
        self._file = open(path, "rb")  # noqa: SIM115 (read as the process writes it, closed by rest())
        self._poll = poll
        self._pending = b""

    def readline(self) -> str:
        while True:
            ended = self._poll() is not None  # before reading: what an ended process wrote is all there
            self._pending += self._file.read()
            if b"\n" in self._pending:
                line, self._pending = self._pending.split(b"\n", 1)
                return line.decode() + "\n"
            if ended:
                line, self._pending = self._pending, b""
                return line.decode()
            time.sleep(0.02)

    def rest(self) -> str:
        text = (self._pending + self._file.read()).decode()
        self._pending = b""
        self._file.close()
        return text


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


def rewrite_in_place(folder: Path, rows: float = 0.1, only_one_value: bool = False) -> list[str]:
    """Rewrite the first `rows` of the rows of every float matrix of a safetensors folder in place (or, with
    `only_one_value`, one value of the largest, 5% into it): the same header, size and file, as a re-export into
    the same folder leaves them. Returns the tensors changed."""
    import struct

    import torch
    from safetensors import safe_open

    edits = []
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
            start = f.tell()
        with safe_open(path, "pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if t.dim() == 2 and t.numel() and t.dtype in (torch.float16, torch.bfloat16, torch.float32):
                    edits.append((t.numel(), path, name, t.clone(), start + header[name]["data_offsets"][0]))
    if only_one_value:
        edits = [max(edits, key=lambda e: e[0])]
    for numel, path, _name, t, offset in edits:
        flat = t.reshape(-1)
        first = numel // 20 if only_one_value else 0
        count = 1 if only_one_value else max(1, int(t.shape[0] * rows)) * t.shape[1]
        wiggle = 1 + 0.03 * torch.cos(torch.arange(count, dtype=torch.float64))  # a few percent, of full rank
        new = (flat[first : first + count].to(torch.float64) * wiggle).to(t.dtype)
        with open(path, "r+b") as f:
            f.seek(offset + first * t.element_size())
            f.write(new.view(torch.uint8).numpy().tobytes())
    return [name for _, _, name, _, _ in edits]


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


def folder_of(path: Path) -> Path:
    return path if path.is_dir() else path.parent


def expected_merge(base: Path, ft: Path, rule: str = "entropy", energy: float = 0.8) -> dict:
    """name -> the float64 reference's Expected for every tensor of FT (None where BASE lacks it)."""
    from conftest import load_folder
    from reference import monosoup_reference

    b, f = load_folder(folder_of(base)), load_folder(folder_of(ft))
    expected = {}
    for name, w1 in f.items():
        w0 = b.get(name)
        if w0 is not None and resized(w0, w1):  # the README's rule: the base's rows edited, the added ones kept
            expected[name] = monosoup_reference(w0, w1[: w0.shape[0]], rule, energy)
        else:
            expected[name] = monosoup_reference(w0, w1, rule, energy) if w0 is not None else None
    return expected


def resized(w0, w1) -> bool:
    """A matrix the fine-tune grew by rows (a vocabulary that gained tokens), as the README defines it."""
    return (
        w0.dim() == w1.dim() == 2
        and w0.shape[1] == w1.shape[1]
        and w1.shape[0] > w0.shape[0] > 0
        and w0.is_floating_point()
        and w1.is_floating_point()
    )


def assert_merged_exactly(
    base: Path, ft: Path, out: Path, rule: str = "entropy", energy: float = 0.8, expected: dict | None = None
) -> dict:
    """Every output tensor against the float64 reference (`expected_merge`, or the same computed once and
    passed in); copies byte-identical. Returns the report."""
    import pytest
    import torch
    from conftest import load_folder, raw_bytes
    from reference import assert_within_rounding

    expected = expected_merge(base, ft, rule, energy) if expected is None else expected
    f, o = load_folder(folder_of(ft)), load_folder(out)
    f_raw, o_raw = raw_bytes(folder_of(ft)), raw_bytes(out)
    report = json.loads((out / REPORT).read_text())
    rows = {r["name"]: r for r in report["tensors"]}
    assert set(o) == set(f) == set(rows) == set(expected)
    for name, w1 in f.items():
        assert o[name].dtype == w1.dtype and o[name].shape == w1.shape, name
        exp = expected[name]
        if exp is not None and exp.edited:
            assert rows[name]["action"] == "edit", name
            assert rows[name]["k"] == exp.k and rows[name]["rank"] == exp.rank, name
            assert rows[name]["lambda_high"] == pytest.approx(exp.lambda_high, abs=1e-9), name
            shared = exp.values.shape[0]  # all rows, or a resized matrix's first (the base's) ones
            assert_within_rounding(o[name][:shared], exp, name)
            assert torch.equal(o[name][shared:], w1[shared:]), f"{name}: the added rows are the fine-tune's"
        else:
            assert rows[name]["action"] == "copy", name
            assert o_raw[name] == f_raw[name], f"{name}: copied tensor is not byte-identical"
    return report


def startup_warning_filters() -> list:
    """The warning filters a new interpreter starts with (pytest sets its own inside each test): CPython's
    default filters (the `warnings` module's docs), then any -W options and PYTHONWARNINGS, as Python adds them."""
    with warnings.catch_warnings():
        warnings.resetwarnings()
        for category in (ResourceWarning, ImportWarning, PendingDeprecationWarning, DeprecationWarning):
            warnings.simplefilter("ignore", category)
        warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
        for option in sys.warnoptions:
            warnings._setoption(option)  # what Python's start-up does with each
        return list(warnings.filters)


def run_here(*args: str | Path, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The CLI's own `main` in this process: the same code path, exit code and output as a new interpreter,
    without its start-up (seconds, mostly torch's import).

    What a new process would not inherit from this one is set as it would be and put back afterwards: the
    environment and working folder given, warnings shown as a fresh interpreter shows them (pytest records
    them inside a test), logging, torch's thread count and the BLAS thread limit a merge sets.
    """
    import io
    import logging

    import torch

    from streamsoup.cli import main

    out, err = io.StringIO(), io.StringIO()
    old_cwd, old_env, threads = Path.cwd(), dict(os.environ), torch.get_num_threads()
    root = logging.getLogger()
    old_handlers, old_level = root.handlers[:], root.level
    levels = {name: lg.level for name, lg in logging.root.manager.loggerDict.items() if isinstance(lg, logging.Logger)}
    streams = stderr_handlers()
    try:
        for handler in streams:  # made with the stderr of their import (dask's): here, the run's stderr
            handler.setStream(err)
        os.environ.update(env or {})
        if cwd is not None:
            os.chdir(cwd)
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            warnings.filters[:] = startup_warning_filters()
            logging.captureWarnings(False)  # main() routes warnings to its log, as it does in a new process
            try:
                code = main([str(a) for a in args])
            except SystemExit as exc:  # argparse refuses bad flags by exiting, as the CLI does
                code = int(exc.code or 0)
            finally:
                logging.captureWarnings(False)
    finally:
        os.chdir(old_cwd)
        os.environ.clear()
        os.environ.update(old_env)
        root.handlers[:], root.level = old_handlers, old_level
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        for handler, stream in streams.items():
            handler.setStream(stream)
        restore_threads(threads)
    return subprocess.CompletedProcess(["streamsoup", *map(str, args)], code, out.getvalue(), err.getvalue())


def stderr_handlers() -> dict:
    """Libraries' own log handlers writing to a stream (dask's, made at its import), with that stream: in a new
    process they write to its stderr. Not files, not pytest's."""
    import logging

    handlers = {}
    for logger in logging.root.manager.loggerDict.values():
        for handler in getattr(logger, "handlers", []):
            if type(handler) is logging.StreamHandler:
                handlers[handler] = handler.stream
    return handlers


def restore_threads(threads: int) -> None:
    """torch's threads and the BLAS limit back to this process's own (a merge or plan sets its lanes' threads)."""
    from streamsoup.numerics.hostlinalg import set_threads

    set_threads(threads)


def edited_adapter(adapter: Path, tmp_path: Path, **changes) -> Path:
    """A copy of an adapter folder with `changes` made to its adapter_config.json."""
    import shutil

    copy = tmp_path / "edited-adapter"
    shutil.copytree(adapter, copy)
    config = json.loads((copy / "adapter_config.json").read_text())
    config.update(changes)
    (copy / "adapter_config.json").write_text(json.dumps(config))
    return copy


def run_tool_here(words: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`python tools/X.py ARGS` as its command line runs it (its `__main__`, argv as typed, in `cwd`), in this
    process: the tools are scripts run for their files and numbers, not for their process."""
    import io
    import runpy

    import torch

    script, argv = words[1], words[1:]
    old_argv, old_cwd, out, err = sys.argv, Path.cwd(), io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    try:
        os.chdir(cwd)
        sys.argv = argv
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(script, run_name="__main__")
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)
        restore_threads(threads)
    return subprocess.CompletedProcess(words, code, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> collections.abc.Iterator[Path]:
    """A real tmpfs of `size` at `path` for the test's duration (skips where mounting needs root)."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        import pytest

        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
