"""The suite's three ways of running the CLI (helpers.py) agree with a new interpreter, `python -m streamsoup.cli`:
in this process (run_here), forked from a server that imported it (run_forked), and the new interpreter itself
(run_process). Every other test relies on it."""

from __future__ import annotations

import re
import signal

from helpers import run_forked, run_here, run_process, start, tree_digest


def own_use(proc) -> float:
    """The MiB a refused --max-ram says the process itself uses."""
    match = re.search(r"streamsoup itself uses ([\d.]+) MiB", proc.stderr)
    assert proc.returncode == 2 and match, proc.stderr
    return float(match.group(1))


def test_a_forked_process_measures_itself_as_a_new_interpreter_does(awkward_pair, tmp_path):
    """--max-ram is a budget for the whole process: a forked one must count what a new interpreter counts."""
    args = ("merge", *awkward_pair, tmp_path / "out", "--max-ram", "64MiB")
    new, forked = own_use(run_process(*args)), own_use(run_forked(*args))
    assert abs(forked - new) <= 0.05 * new, (forked, new)
    assert not (tmp_path / "out.partial").exists()


def test_the_three_ways_give_the_same_exit_codes_output_and_bytes(awkward_pair, tmp_path):
    outs = {}
    for way in (run_here, run_forked, run_process):
        out = tmp_path / way.__name__
        proc = way("merge", *awkward_pair, out, "--shard-size", "100KB")
        assert proc.returncode == 0, (way.__name__, proc.stderr)
        assert "edited" in proc.stdout, way.__name__
        outs[way.__name__] = tree_digest(out)
        usage = way("merge", *awkward_pair, out, "--energy", "2")
        assert usage.returncode == 2 and usage.stderr.count("\n") == 1 and "--energy" in usage.stderr, usage.stderr
    assert outs["run_here"] == outs["run_forked"] == outs["run_process"]


def test_a_fault_point_kills_a_forked_process_and_a_started_one_can_be_signalled(awkward_pair, tmp_path):
    killed = run_forked("merge", *awkward_pair, tmp_path / "out", "-q", env={"STREAMSOUP_FAULT": "commit:3"})
    assert killed.returncode == -signal.SIGKILL and (tmp_path / "out.partial").exists()
    proc = start("merge", *awkward_pair, tmp_path / "out")
    line = proc.stderr.readline()
    assert line.startswith("streamsoup: max-ram"), line  # a line as it is written, before the end
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode in (0, 130), err  # done before the signal, or stopped by it
    assert "Traceback" not in err


def test_every_command_runs_in_a_new_interpreter_as_in_this_process(reference, tmp_path):
    """What the pytest process has imported (test helpers, tools, safetensors' submodules) must not be what
    makes a command work: each command once in a new interpreter, its output the in-process one's."""
    from concurrent.futures import ThreadPoolExecutor

    base, ft, out, _ = reference
    compared = [
        ("status", out),
        ("status", out, "--json"),
        ("verify", out, "-q"),
        ("report", out),
        ("report", out, "--json"),
    ]
    others = [
        ("report", out, "--png", tmp_path / "r.png"),
        ("plan", base, ft, "--devices", "cpu"),
        ("demo", tmp_path / "demo", "--preset", "tiny"),
    ]
    with ThreadPoolExecutor(4) as pool:  # separate interpreters: their start-ups overlap, nothing else does
        new = dict(zip(compared + others, pool.map(lambda args: run_process(*args), compared + others), strict=True))
    for args in compared:
        here = run_here(*args)
        assert new[args].returncode == here.returncode == 0, (args, new[args].stderr)
        assert new[args].stdout == here.stdout, args
    drawn, planned, demo = (new[args] for args in others)
    assert drawn.returncode == 0 and (tmp_path / "r.png").stat().st_size > 0, drawn.stderr
    assert planned.returncode == 0 and "tensors" in planned.stdout, planned.stderr
    assert demo.returncode == 0 and (tmp_path / "demo" / "finetuned").is_dir(), demo.stderr
