#!/usr/bin/env python3
"""Run a command and report its wall time and the peak RSS of its whole process tree.

    python tools/peak_rss.py -- streamsoup merge BASE FT OUT

RSS is sampled with psutil every 20 ms over the process and all its children
(file-backed mmap pages included, as the kernel counts them).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import psutil


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def measure(cmd: list[str], interval: float = 0.02) -> dict:
    start = time.perf_counter()
    child = subprocess.Popen(cmd)
    proc = psutil.Process(child.pid)
    peak = 0
    while child.poll() is None:
        try:
            peak = max(peak, tree_rss(proc))
        except psutil.Error:
            pass
        time.sleep(interval)
    return {"returncode": child.returncode, "seconds": time.perf_counter() - start, "peak_rss_bytes": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    args = p.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    result = measure(cmd)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"wall {result['seconds']:.1f} s, peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB", file=sys.stderr)
    sys.exit(result["returncode"])


if __name__ == "__main__":
    main()
