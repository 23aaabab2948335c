"""Object stores on loopback for the tests: a plain HTTP server with Range support, and moto's S3 server.

Both are real servers on 127.0.0.1 that streamsoup reaches through fsspec as a user's would; the HTTP one
counts the bytes it sends (a `plan` must read headers only) and can fail requests on purpose.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


@dataclass
class Traffic:
    """What the server did: body bytes sent, requests by kind, and failures it still has to answer with."""

    sent: int = 0
    requests: list[str] = field(default_factory=list)
    failures: int = 0  # answer this many more GETs that `failing` picks with 503
    failing: Callable[[str, int], bool] = lambda path, start: True  # (path, range start) -> fail it
    heads: bool = False  # HEAD requests may fail too (fsspec's http asks one for an object's size and ETag)
    ranges: bool = True  # False: ignore Range headers, as a plain static server does
    validators: bool = True  # False: send neither ETag nor Last-Modified
    lock: threading.Lock = field(default_factory=threading.Lock)


def _handler(root: Path, traffic: Traffic):
    class Handler(SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args) -> None:  # quiet
            pass

        def _etag(self, path: str) -> str:
            info = os.stat(path)
            return '"' + hashlib.md5(f"{info.st_size}-{info.st_mtime_ns}-{info.st_ino}".encode()).hexdigest() + '"'

        def _changed(self, path: str, info: os.stat_result) -> bool:
            match = self.headers.get("If-Match")
            if match is not None and traffic.validators:
                return match != self._etag(path)
            since = self.headers.get("If-Unmodified-Since")
            return since is not None and int(info.st_mtime) > email.utils.parsedate_to_datetime(since).timestamp()

        def do_HEAD(self) -> None:
            self._serve(head=True)

        def do_GET(self) -> None:
            self._serve(head=False)

        def _serve(self, head: bool) -> None:
            path = self.translate_path(self.path)
            wanted = RANGE.match(self.headers.get("Range", "")) if traffic.ranges else None
            with traffic.lock:
                traffic.requests.append(f"{'HEAD' if head else 'GET'} {self.path} {self.headers.get('Range', '')}")
                failing = (traffic.heads or not head) and traffic.failures > 0
                failing = failing and traffic.failing(self.path, int(wanted.group(1)) if wanted else 0)
                if failing:
                    traffic.failures -= 1
            if failing:
                self.send_error(503, "Slow Down")
                return
            if os.path.isdir(path):  # a listing, as fsspec's http filesystem reads one
                return super().do_HEAD() if head else super().do_GET()
            try:
                info = os.stat(path)
            except OSError:
                self.send_error(404, "Not Found")
                return
            size, start, stop = info.st_size, 0, info.st_size
            if self._changed(path, info):  # a conditional request for a version that is no longer there
                self.send_error(412, "Precondition Failed")
                return
            if wanted:
                start = int(wanted.group(1))
                stop = min(size, int(wanted.group(2)) + 1) if wanted.group(2) else size
                if start >= size:
                    self.send_error(416, "Range Not Satisfiable")
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
            else:
                self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(stop - start))
            if traffic.validators:
                self.send_header("ETag", self._etag(path))
                self.send_header("Last-Modified", email.utils.formatdate(info.st_mtime, usegmt=True))
            if traffic.ranges:
                self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if head:
                return
            with open(path, "rb") as f:
                f.seek(start)
                left = stop - start
                while left:
                    chunk = f.read(min(left, 1 << 20))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    left -= len(chunk)
                    with traffic.lock:
                        traffic.sent += len(chunk)

    return Handler


@contextlib.contextmanager
def http_store(root: Path, **settings) -> Iterator[tuple[str, Traffic]]:
    """`root` served at http://127.0.0.1:PORT (the URL returned), with Range requests, ETags and listings (unless
    `settings` of Traffic say otherwise)."""
    traffic = Traffic(**settings)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(root, traffic))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", traffic
    finally:
        server.shutdown()
        server.server_close()


#: what the S3 tests' processes are given: moto's server as the endpoint, through the standard AWS environment
def s3_env(endpoint: str) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


@contextlib.contextmanager
def s3_store() -> Iterator[str]:
    """moto's S3 server on a free loopback port, in a thread of this process; yields its endpoint URL."""
    import s3fs
    from moto.server import ThreadedMotoServer

    s3fs.S3FileSystem.clear_instance_cache()  # one made for an earlier server would ask it, at its old port
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request, into the runs' stderr
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def upload(folder: Path, url: str, env: dict[str, str]) -> None:
    """Every file of `folder` to the S3 prefix `url` (s3://bucket/prefix), the bucket made if missing."""
    import s3fs

    fs = s3fs.S3FileSystem(
        key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"], endpoint_url=env["AWS_ENDPOINT_URL"]
    )
    bucket = url.split("://", 1)[1].split("/", 1)[0]
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fs.put_file(str(path), f"{url}/{path.relative_to(folder)}")
    fs.invalidate_cache()
