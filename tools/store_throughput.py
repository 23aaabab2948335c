"""Reading inputs from object storage against reading them from a disk, on loopback servers.

Two measurements, each against the same bytes on this machine's disk (page cache dropped first):

* read: one large file read whole, from the disk in 64 MiB preads, and from a loopback HTTP server with
  Range support (tests/stores.py, a thread of this process) and moto's S3 server (a process of its own), as a
  task stages it (io/store.py: 32 MiB ranged GETs into a sparse
  scratch file);
* merge: `streamsoup merge` of a synthetic pair from the disk, the HTTP server and the S3 server (wall time).

Loopback servers measure streamsoup's own overhead (requests, copies, the scratch file), not a network's:
a real store adds its latency and bandwidth, which RANGE_BYTES-sized requests amortise.

    .venv/bin/python tools/store_throughput.py [--size-mib 512] [--preset medium]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from stores import http_store, s3_env, upload  # noqa: E402

from streamsoup.io import rawio, store  # noqa: E402
from streamsoup.synthetic import make_pair  # noqa: E402


def uncache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages are not dropped
        rawio.drop_cache(fd, 0, path.stat().st_size)
    finally:
        os.close(fd)


def local_read(path: Path) -> float:
    uncache(path)
    size = path.stat().st_size
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        for at in range(0, size, rawio.IO_CHUNK):
            rawio.read_bytes(fd, at, min(rawio.IO_CHUNK, size - at))
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def staged_read(url: str, size: int, scratch: Path) -> float:
    t0 = time.perf_counter()
    staged = store.stage_object(url, [(0, size)], scratch, f"s{time.monotonic_ns()}")
    seconds = time.perf_counter() - t0
    staged.unlink()
    return seconds


def merge_seconds(base: str, ft: str, out: Path, env: dict) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "streamsoup.cli", "merge", base, ft, str(out), "-q"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        raise SystemExit(f"merge of {base} failed: {proc.stderr}")
    return time.perf_counter() - t0


@contextlib.contextmanager
def moto_process():
    """moto's S3 server in a process of its own (in a thread here, it would share this process's GIL)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--preset", default="medium")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="store-throughput-") as tmp:
        tmp = Path(tmp)
        blob = tmp / "data" / "blob.bin"
        blob.parent.mkdir()
        with open(blob, "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(1 << 20))
        size = blob.stat().st_size
        base, ft = make_pair(tmp / "pair", args.preset, seed=3)
        scratch = tmp / "scratch"
        scratch.mkdir()
        rows = []
        with http_store(tmp) as (url, _), moto_process() as endpoint:
            env = s3_env(endpoint)
            os.environ.update(env)
            upload(blob.parent, "s3://bench/data", env)
            upload(base, "s3://bench/base", env)
            upload(ft, "s3://bench/ft", env)
            for name, read in (
                ("disk", lambda: local_read(blob)),
                ("HTTP, loopback", lambda: staged_read(f"{url}/data/blob.bin", size, scratch)),
                ("S3 (moto), loopback", lambda: staged_read("s3://bench/data/blob.bin", size, scratch)),
            ):
                best = min(read() for _ in range(3))
                rows.append((f"read {args.size_mib} MiB", name, best, size / best / 2**20))
            pair = sum(p.stat().st_size for side in (base, ft) for p in side.glob("*.safetensors"))
            for name, (b, f) in (
                ("disk", (str(base), str(ft))),
                ("HTTP, loopback", (f"{url}/pair/{base.name}", f"{url}/pair/{ft.name}")),
                ("S3 (moto), loopback", ("s3://bench/base", "s3://bench/ft")),
            ):
                for side in (base, ft):
                    for p in side.glob("*.safetensors"):
                        uncache(p)
                seconds = min(merge_seconds(b, f, tmp / f"out-{time.monotonic_ns()}", env) for _ in range(2))
                what = f"merge {args.preset} ({pair / 2**20:.0f} MiB read)"
                rows.append((what, name, seconds, pair / seconds / 2**20))
    print("| what | from | seconds (best) | MiB/s |")
    print("|---|---|---|---|")
    for what, source, seconds, rate in rows:
        print(f"| {what} | {source} | {seconds:.2f} | {rate:.0f} |")


if __name__ == "__main__":
    main()
