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
#: ... and what to do, for an input / for a path streamsoup writes
COPY_IT = "copy it to a disk first, or mount the bucket (s3fs-fuse, gcsfuse, blobfuse2) and give that path"
WRITE_THEN_UPLOAD = "give a folder on a disk (or a mounted bucket), and upload OUT once it is complete"


def expand_path(path: str | os.PathLike, role: str = "path") -> Path:
    """`~` and $VARIABLES expanded, as a shell would (paths also come from YAML and the API); a URL is refused,
    named by its `role` (BASE, OUT, --work-dir, ...)."""
    text = os.path.expandvars(os.path.expanduser(os.fspath(path)))
    if text.startswith("file://"):  # a local file as a URL names it (file:///data/model)
        text = urllib.parse.unquote(urllib.parse.urlparse(text).path)
    if URL.match(text):
        then = COPY_IT if role in ("BASE", "FINETUNED", "--config", "path") else WRITE_THEN_UPLOAD
        raise UsageError(f"{role} {text} is a URL: {ON_A_FILESYSTEM}, not object storage: {then}")
    return Path(text)
