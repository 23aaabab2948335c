#!/usr/bin/env python3
"""Run a command and report its wall time and the peak RSS of its whole process tree.

    python tools/peak_rss.py -- streamsoup merge BASE FT OUT

The peak is the larger of two, both sampled every 20 ms: the kernel's own high-water mark of the command's
process (VmHWM in /proc/PID/status: a peak between two samples is in the next one, so a sampler the load
starves of CPU misses nothing but the last 20 ms before the process exits), and the sum of the RSS of the
process and all its children (what a process tree holds at once). Both count file-backed mmap pages, as the
kernel does. Not the ru_maxrss of the reaped process: exec records there the high-water mark of the image it
replaced, which for a child of a large process (a pytest worker) is that process's.
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


def high_water_mark(pid: int) -> int:
    """VmHWM of a live process, in bytes (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(cmd: list[str], interval: float = 0.02) -> dict:
    start = time.perf_counter()
    child = subprocess.Popen(cmd)
    proc = psutil.Process(child.pid)
    sampled = kernel = 0
    while child.poll() is None:
        kernel = max(kernel, high_water_mark(child.pid))
        try:
            sampled = max(sampled, tree_rss(proc))
        except psutil.Error:
            pass
        time.sleep(interval)
    return {
        "returncode": child.returncode,
        "seconds": time.perf_counter() - start,
        "peak_rss_bytes": max(sampled, kernel),
        "kernel_peak_rss_bytes": kernel,
        "sampled_peak_rss_bytes": sampled,
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
