#!/usr/bin/env python3
"""Run a command and report its wall time and the peak RSS of its whole process tree.

    python tools/peak_rss.py -- streamsoup merge BASE FT OUT

The peak is the larger of two: the kernel's own high-water mark of the command's process (its ru_maxrss
when it is reaped: exact whatever the machine's load, where a sampler starved of CPU could miss a short
peak), and the sum over the process and all its children sampled with psutil every 20 ms (what a process
tree holds at once). Both count file-backed mmap pages, as the kernel does.
"""

from __future__ import annotations

import argparse
import json
import os
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
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)  # reaped here, to read its rusage
        if pid:
            child.returncode = os.waitstatus_to_exitcode(status)
            break
        try:
            peak = max(peak, tree_rss(proc))
        except psutil.Error:
            pass
        time.sleep(interval)
    kernel_peak = usage.ru_maxrss * 1024  # Linux: KiB
    return {
        "returncode": child.returncode,
        "seconds": time.perf_counter() - start,
        "peak_rss_bytes": max(peak, kernel_peak),
        "kernel_peak_rss_bytes": kernel_peak,
        "sampled_peak_rss_bytes": peak,
    }


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
