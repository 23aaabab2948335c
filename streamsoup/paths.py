"""Paths as users give them, from the shell, a YAML file or the API."""

from __future__ import annotations

import os
import re
import urllib.parse
from pathlib import Path

from .errors import UsageError

#: `s3://`, `gs://`, `https://`, ...: a URL, which pathlib would quietly turn into a relative path `s3:/...`
URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
#: what a URL given as a path is told: streamsoup reads and writes files on a filesystem
ON_A_FILESYSTEM = "streamsoup reads and writes files on a filesystem (local, or one a cluster's workers share)"
#: ... and what to do, for a file streamsoup reads / for a path it writes
COPY_IT = "copy it to a disk first, or mount the bucket (s3fs-fuse, gcsfuse, blobfuse2) and give that path"
WRITE_THEN_UPLOAD = "give a folder on a disk (or a mounted bucket), and upload OUT once it is complete"
#: the roles whose paths streamsoup only reads
READ_ROLES = ("BASE", "FINETUNED", "--config", "--scheduler-file", "path")


def expand_path(path: str | os.PathLike, role: str = "path") -> Path:
    """`~` and $VARIABLES expanded, as a shell would (paths also come from YAML and the API); a `file:` URL is the
    local path it names; any other URL is refused, named by its `role` (BASE, OUT, --work-dir, ...)."""
    text = os.path.expandvars(os.path.expanduser(os.fspath(path)))
    if text[:7].lower() == "file://":
        text = local_file(text, role)
    if URL.match(text):
        then = COPY_IT if role in READ_ROLES else WRITE_THEN_UPLOAD
        raise UsageError(f"{role} {text} is a URL: {ON_A_FILESYSTEM}, not object storage: {then}")
    return Path(text)


def local_file(url: str, role: str) -> str:
    """The path of `file:///p` (or `file://localhost/p`); a host, a query or a fragment would name another file
    than the one a user means (`file://out/m` is /m on host out): refused."""
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost") or parts.query or parts.fragment or "?" in url or "#" in url:
        raise UsageError(f"{role} {url} is not a local file URL (file:///absolute/path): give the path itself instead")
    return urllib.parse.unquote(parts.path)
