#!/usr/bin/env python3
"""Wall time of the same merge locally and on a flag-less loopback dask cluster, and whether the bytes agree.

Starts `dask scheduler` and N plain `dask worker ADDR --nthreads 1` (nothing declared), runs
`streamsoup merge --scheduler-file`, then the same merge locally with `--devices cpu --threads 1`
(the workers' thread count), and compares every output file byte for byte.

    .venv/bin/python tools/cluster_wall.py [--preset medium] [--workers 2] [--dir bench-data/cluster]
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_checkpoints  # noqa: E402

BIN = Path(sys.executable).parent


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="medium")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--dir", default="bench-data/cluster")
    args = ap.parse_args()
    root = Path(args.dir)
    base, ft = root / "base", root / "finetuned"
    if not (ft / "model.safetensors.index.json").exists():
        make_checkpoints.make_pair(root, args.preset, seed=5)
    for out in ("local", "cluster"):
        shutil.rmtree(root / out, ignore_errors=True)
    sched_file = root / "scheduler.json"
    sched_file.unlink(missing_ok=True)
    procs = [
        subprocess.Popen(
            [
                BIN / "dask",
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--scheduler-file",
                sched_file,
                "--no-dashboard",
            ],
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    ]
    try:
        while not sched_file.exists():
            time.sleep(0.1)
        address = json.loads(sched_file.read_text())["address"]
        procs += [
            subprocess.Popen(
                [BIN / "dask", "worker", address, "--nthreads", "1", "--no-dashboard"],
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            for _ in range(args.workers)
        ]
        from distributed import Client

        with Client(address) as client:
            client.wait_for_workers(args.workers, timeout=120)
        merge = [str(BIN / "streamsoup"), "merge", str(base), str(ft)]
        remote = timed([*merge, str(root / "cluster"), "--scheduler-file", str(sched_file), "-q"])
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)
    local = timed([*merge, str(root / "local"), "--devices", "cpu", "--threads", "1", "-q"])
    files = sorted(p.name for p in (root / "local").glob("*.safetensors"))
    same = all(filecmp.cmp(root / "local" / f, root / "cluster" / f, shallow=False) for f in files)
    print(
        f"preset {args.preset}: local {local:.1f} s, flag-less cluster of {args.workers} x 1-thread workers "
        f"{remote:.1f} s (includes connecting), shards byte-identical: {same}"
    )


if __name__ == "__main__":
    main()
