"""End to end through the `streamsoup` command, as a user runs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_folder, raw_bytes
from helpers import assert_one_line_error, run
from safetensors import safe_open


def test_merge_produces_a_valid_hf_checkpoint(awkward_pair, tmp_path):
    base, ft = awkward_pair
    out = tmp_path / "merged"
    proc = run("merge", base, ft, out, "--shard-size", "120KB")
    assert proc.returncode == 0, proc.stderr
    assert "edited" in proc.stdout and "copied" in proc.stdout
    assert not (tmp_path / "merged.partial").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1 and all(p.name.startswith("model-") and "-of-" in p.name for p in shards)
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    tensors = load_folder(out)
    assert set(index["weight_map"]) == set(tensors) == set(load_folder(ft))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for p in shards:
        with safe_open(str(p), "pt") as h:
            assert h.metadata() == {"format": "pt"}
            for name in h.keys():
                assert index["weight_map"][name] == p.name
    for side in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / side).read_bytes() == (ft / side).read_bytes()
    report = json.loads((out / "streamsoup_report.json").read_text())
    keys = {
        "name",
        "shape",
        "dtype",
        "action",
        "reason",
        "k",
        "rank",
        "P_k",
        "rho",
        "lambda_high",
        "lambda_low",
        "device",
        "seconds",
    }
    assert len(report["tensors"]) == len(tensors)
    assert all(keys <= set(row) for row in report["tensors"])
    assert [r["name"] for r in report["tensors"]] == list(raw_bytes(ft))  # the fine-tune's order
    assert list(raw_bytes(out)) == list(raw_bytes(ft))


def test_single_file_output_and_config(awkward_pair, tmp_path):
    base, ft = awkward_pair
    cfg = tmp_path / "c.yaml"
    cfg.write_text("rank-rule: energy\nenergy: 0.6\n")
    proc = run("merge", base, ft, tmp_path / "m", "--config", cfg, "-q")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert sorted(p.name for p in (tmp_path / "m").glob("*.safetensors")) == ["model.safetensors"]
    assert not (tmp_path / "m" / "model.safetensors.index.json").exists()
    report = json.loads((tmp_path / "m" / "streamsoup_report.json").read_text())
    assert report["options"]["rank_rule"] == "energy" and report["options"]["energy"] == 0.6


@pytest.mark.parametrize(
    "args,needles",
    [
        (["--rank-rule", "median"], ["--rank-rule", "median"]),
        (["--energy", "1.5"], ["--energy"]),
        (["--energy", "lots"], ["--energy"]),
        (["--shard-size", "5 parsecs"], ["--shard-size"]),
        (["--min-rel-update", "-1"], ["--min-rel-update"]),
        (["--bogus"], ["--bogus"]),
    ],
)
def test_bad_arguments_exit_2_with_one_line(awkward_pair, tmp_path, args, needles):
    base, ft = awkward_pair
    proc = run("merge", base, ft, tmp_path / "o", *args)
    assert_one_line_error(proc, 2, *needles)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_bad_inputs_exit_2_with_one_line(awkward_pair, tmp_path):
    base, ft = awkward_pair
    assert_one_line_error(run("merge", tmp_path / "nope", ft, tmp_path / "o"), 2, "nope", "does not exist")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run("merge", base, tmp_path / "empty", tmp_path / "o"), 2, "empty", "no *.safetensors")
    assert_one_line_error(run("merge", base, ft, ft / "inside"), 2, "inside FINETUNED")
    (tmp_path / "exists").mkdir()
    assert_one_line_error(run("merge", base, ft, tmp_path / "exists"), 2, "already exists")
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text("rank_rul: entropy\n")
    assert_one_line_error(run("merge", base, ft, tmp_path / "o", "--config", bad_cfg), 2, "rank_rul")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()
    assert not (ft / "inside").exists() and not (ft / "inside.partial").exists()


def test_usage_errors_are_one_line():
    assert_one_line_error(run(), 2, "command")
    assert_one_line_error(run("merge", "only-one"), 2, "required")


@pytest.mark.slow
def test_a_pip_user_gets_the_demo_and_the_example_configs_from_the_wheel(tmp_path):
    """Built as a wheel and installed alone (no repository beside it): `streamsoup demo` writes a pair that merges."""
    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    shutil.copytree(root / "streamsoup", src / "streamsoup", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    pip = [sys.executable, "-m", "pip", "-q"]
    built = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "wheel", src],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "wheel").glob("*.whl"))
    installed = subprocess.run(
        [*pip, "install", "--no-deps", "--target", tmp_path / "site", wheel], capture_output=True, text=True
    )
    assert installed.returncode == 0, installed.stderr
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    code = (
        "import os, sys, streamsoup.cli as c; assert c.__file__.startswith(os.environ['PYTHONPATH']), c.__file__; "
        "sys.exit(c.main(sys.argv[1:]))"
    )  # the wheel's copy, not the repository's
    cli = [sys.executable, "-c", code]
    demo = subprocess.run([*cli, "demo", "d"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert demo.returncode == 0, demo.stderr
    assert "next: streamsoup merge" in demo.stdout
    configs = sorted(p.name for p in (tmp_path / "d" / "configs").glob("*.yaml"))
    assert configs == sorted(p.name for p in (root / "streamsoup" / "configs").glob("*.yaml")) and configs
    merge = [*cli, "merge", "d/base", "d/finetuned", "d/merged", "-q", "--config", "d/configs/energy-rule.yaml"]
    merged = subprocess.run(merge, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert merged.returncode == 0, merged.stderr
    assert (tmp_path / "d" / "merged" / "README.md").exists()
    again = subprocess.run([*cli, "demo", "d"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_a_local_merge_listens_on_loopback_only(awkward_pair, tmp_path):
    """The embedded dask scheduler and worker serve HTTP (dask always starts it): never on a network interface."""
    import time

    import psutil
    from helpers import start

    proc = start("merge", *awkward_pair, tmp_path / "out", "-q")
    listening: set[tuple[str, int]] = set()
    try:
        while proc.poll() is None:
            try:
                conns = psutil.Process(proc.pid).net_connections(kind="inet")
            except psutil.NoSuchProcess:
                break
            listening |= {(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN}
            time.sleep(0.05)
    finally:
        proc.wait(timeout=300)
    assert proc.returncode == 0
    assert listening, "the probe saw no listening socket: dask's HTTP servers should be there, on loopback"
    assert all(ip in ("127.0.0.1", "::1") for ip, _ in listening), listening


@pytest.mark.slow
def test_dashboard_only_when_asked_on_the_address_given(big_pair, tmp_path):
    """--dashboard ADDR: dask's dashboard served there (port 0: a free one), its URL printed, and it answers;
    with a cluster it is refused (the user's scheduler serves its own)."""
    import re
    import urllib.request

    from helpers import start

    proc = start(
        "merge",
        *big_pair,
        tmp_path / "out",
        "--dashboard",
        "127.0.0.1:0",
        "--max-ram",
        "450MB",
        "--devices",
        "cpu",
        "-q",
    )
    try:
        line = proc.stderr.readline()
        url = re.fullmatch(r"streamsoup: dashboard at (http://127\.0\.0\.1:(\d+)/status)\n", line)
        assert url and int(url.group(2)) > 0, line
        with urllib.request.urlopen(url.group(1), timeout=60) as page:  # the merge streams for seconds more
            assert page.status == 200 and b"Dask" in page.read()
    finally:
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    refused = run("merge", *big_pair, tmp_path / "o2", "--dashboard", "--scheduler", "tcp://127.0.0.1:1")
    assert_one_line_error(refused, 2, "--dashboard", "scheduler serves its own dashboard")
    bad = run("merge", *big_pair, tmp_path / "o3", "--dashboard", "everywhere")
    assert_one_line_error(bad, 2, "--dashboard", "host:port")


def test_demo_help_gives_every_presets_size(tmp_path):
    """`demo --help` says how big each preset's checkpoints are (a 70B-shaped demo is 131 GiB a side)."""
    from streamsoup.synthetic import PRESETS, preset_bytes
    from streamsoup.units import format_size

    text = " ".join(run("demo", "--help").stdout.split())
    for name in PRESETS:
        assert f" {name} {format_size(preset_bytes(name), 1)}" in text, name
    assert run("demo", tmp_path / "d", "--preset", "tiny").returncode == 0
    written = sum(f.stat().st_size for f in (tmp_path / "d" / "base").glob("*.safetensors"))
    assert 0.9 < preset_bytes("tiny") / written <= 1, "the tensors' bytes: all of a shard but its header"


def test_a_cluster_start_line_says_what_its_workers_give():
    """A cluster run not given --threads says the workers' own threads (not "0 torch thread(s)"), and workers of
    one memory limit whose RSS differs a little get one size, not '7.97 GiB to 8.00 GiB'."""
    from streamsoup.planning.budget import Lanes
    from streamsoup.run.clients import ram_span

    assert Lanes(cpu=4, devices=(), threads=0).describe() == "4 CPU lane(s), each worker's own torch threads"
    assert Lanes(cpu=4, devices=(), threads=2).describe() == "4 CPU lane(s), 2 torch thread(s)"
    assert ram_span([8161, 8192]) == "8.00 GiB"
    assert ram_span([2048, 8192]) == "2.00 GiB to 8.00 GiB"
