#!/usr/bin/env python3
"""A merge beside a busy neighbour: wall time of thread/lane settings alone and with CPU-bound processes.

    python tools/neighbour.py DIR [--preset medium] [--neighbours 1] [--repeat 1]

Writes a pair with tools/make_checkpoints.py's generator (DIR/base, DIR/finetuned), then times
`streamsoup merge` with the default settings (a lane per core, one thread each), one lane on every
core (`--lanes 1`), one lane and one thread, each alone and beside N busy-looping Python processes
(a shared workstation's other job), and with OMP_WAIT_POLICY=ACTIVE (OpenMP threads spin while
they wait) to show its effect. Prints a
Markdown table; never asserts a timing: the numbers go to docs/.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

CORES = len(os.sched_getaffinity(0))
SETTINGS = {
    "default (a lane per core, 1 thread each)": [],
    f"--lanes 1 (one lane, {CORES} threads: the default before 0.5)": ["--lanes", "1"],
    "--lanes 1 --threads 1": ["--lanes", "1", "--threads", "1"],
    "--lanes 1, OMP_WAIT_POLICY=ACTIVE": ["--lanes", "1"],
}
BUSY = "while True: pass"


def merge_seconds(base: Path, ft: Path, out: Path, flags: list[str], env: dict[str, str]) -> float:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "streamsoup.cli", "merge", str(base), str(ft), str(out), "-q", *flags],
        check=True,
        env={**os.environ, **env},
    )
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--preset", default="medium")
    parser.add_argument("--neighbours", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=1, help="best of this many runs per cell")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    import make_checkpoints

    if not (args.dir / "base").exists():
        make_checkpoints.make_pair(args.dir, args.preset)
    base, ft, out = args.dir / "base", args.dir / "finetuned", args.dir / "merged"
    rows = []
    for name, flags in SETTINGS.items():
        env = {"OMP_WAIT_POLICY": "ACTIVE"} if "ACTIVE" in name else {}
        cells = []
        for busy in (0, args.neighbours):
            hogs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(busy)]
            try:
                cells.append(min(merge_seconds(base, ft, out, flags, env) for _ in range(args.repeat)))
            finally:
                for hog in hogs:
                    hog.kill()
                    hog.wait()
        rows.append((name, *cells))
    print(f"| settings | alone | beside {args.neighbours} busy process(es) |")
    print("|---|---|---|")
    for name, alone, busy in rows:
        print(f"| {name} | {alone:.1f} s | {busy:.1f} s |")
    print(f"\ncores {os.cpu_count()}, preset {args.preset}")


if __name__ == "__main__":
    main()
