"""Inputs in object storage (s3://, gs://, az://, http(s)://...), read through fsspec by byte ranges.

Nothing here downloads a whole object: headers, indexes and configs are read by ranges on the client,
and a task stages exactly its tensors' bytes (coalesced into large ranges, in file order) into a
sparse scratch file at their own offsets, so every local reader works on it unchanged. An object's
identity is its size and the store's version of it (ETag, version id, generation, Last-Modified):
what binds a run to its inputs, as a file's inode and times do on a disk.

Credentials and endpoints are each store's own (for S3 the AWS environment, AWS_ENDPOINT_URL
included); the libraries are optional extras (`pip install 'streamsoup[s3]'`, ...).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import socket
import stat
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import cloudpickle

from ..errors import InputError, RunError, UsageError
from . import rawio

log = logging.getLogger(__name__)
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # `object_identity` runs on workers that lack streamsoup

#: the protocols whose URLs BASE and FINETUNED may be, and the extra that brings each one's library
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure"}
HTTP = ("http", "https")
#: the fields of a store's listing that change when its object's bytes do, most specific first (the first found
#: is the version: S3's ETag of a plain upload is the bytes' MD5, so re-uploading the same bytes keeps it)
VALIDATORS = ("VersionId", "version_id", "generation", "ETag", "etag", "md5Hash", "Last-Modified", "LastModified")
#: every question asked of the store now: a listing remembered from an earlier merge in this process (a dask worker,
#: an API caller) would hide an object rewritten since
FRESH = {"use_listings_cache": False}
#: one ranged read: large enough that a request's latency is small against its transfer, small enough to hold
RANGE_BYTES = 32 * 1024 * 1024
#: ranges of one object closer than this are fetched as one (the gap is read and dropped)
COALESCE_GAP = 1024 * 1024
#: seconds between tries of a read that failed for a reason that may pass (a dropped connection, a 5xx)
RETRY_DELAYS = (0.5, 2.0, 8.0)
#: a stage's scratch folders, under the worker's temporary folder (TMPDIR), by this prefix
STAGE_PREFIX = "streamsoup-stage-"


def is_url(path: object) -> bool:
    """A path that names an object in a store (not a `file://` path, which is a local path)."""
    text = str(path)
    return "://" in text and not text.lower().startswith("file://")


def is_folder(path) -> bool:
    """A folder (or prefix) of a checkpoint, not one of its files. A remote root is one unless it names a
    `.safetensors` object: asking an HTTP server whether a file is a folder reads the whole file."""
    return Path(str(path)).suffix != ".safetensors" if is_url(path) else path.is_dir()


def files_in(root) -> list[str]:
    """The names of the objects directly under a remote folder (its listing: one request for most stores)."""
    return [name for name, _ in _entries(root)]


def listing(root) -> list[tuple[str, dict[str, Any]]]:
    """(name, identity) of each object directly under a remote folder: files_in, with each one's size and version
    (an HTTP listing gives neither: each object's own answer does)."""
    names = []
    for name, entry in _entries(root):
        found = object_identity(entry) if entry.get("size") is not None else {"size": None, "version": ""}
        if found["size"] is None or not found["version"]:
            found = identity(joined(str(root), name)) or found
        if found["size"] is not None:
            names.append((name, found))
    return names


def _entries(root) -> list[tuple[str, dict[str, Any]]]:
    """(name, listing entry) of each object directly under a remote folder; names decoded, a listing's own links
    (`?C=N;O=D` sort links, `../`, a subfolder's files) left out."""
    fs, path = filesystem(str(root))
    denied = None
    try:
        found = _tried(str(root), "list", lambda: fs.ls(path, detail=True))
    except FileNotFoundError:
        return []
    except PermissionError as exc:
        denied = exc  # raised below, outside the handler
    if denied is not None:
        raise access_denied(str(root), denied)
    entries = []
    for entry in found:
        raw = str(entry["name"])
        name = urllib.parse.unquote(raw.rstrip("/").rsplit("/", 1)[-1])
        if entry.get("type") != "file" or raw.endswith("/") or not name or any(c in name for c in "?#/\\"):
            continue
        if urllib.parse.unquote(raw) != f"{path.rstrip('/')}/{name}":  # a link out of the folder, or deeper
            continue
        entries.append((name, entry))
    return entries


def access_denied(url: str, exc: BaseException) -> InputError:
    """A store's refusal, in one line (raise it outside the handler: a dask task's error carries its context)."""
    return InputError(f"{url}: access denied ({clean(str(exc))}); check the credentials this process reads")


def is_file(path) -> bool:
    """A file, or an object (asked by its metadata: fsspec's http `isfile` downloads it)."""
    return identity(str(path)) is not None if is_url(path) else Path(path).is_file()


def joined(folder: str, name: str) -> str | Path:
    """A file of a folder or of a prefix (pathlib would fold `s3://b` into `s3:/b`)."""
    return f"{folder.rstrip('/')}/{name}" if is_url(folder) else Path(folder, name)


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0].lower()


def remote_root(url: str, role: str):
    """BASE or FINETUNED as a URL: a pathlib-like handle (universal_pathlib) on the object or prefix it names (its
    scheme in lower case, as fsspec knows them)."""
    protocol = protocol_of(url)
    if protocol not in EXTRAS and protocol not in HTTP:
        raise UsageError(
            f"{role} {url}: streamsoup reads inputs from object storage over s3://, gs://, az:// and http(s):// "
            f"only, not {protocol}://: copy it to a disk (or mount it) and give that path"
        )
    try:
        parts = urllib.parse.urlsplit(url)
        secret = parts.username or parts.password or parts.query or parts.fragment
    except ValueError as exc:
        raise UsageError(f"{role} {clean(url)} is not a valid URL ({exc})") from None
    if secret:
        raise UsageError(
            f"{role} {parts.scheme}://{parts.hostname or ''}{parts.path}...: a URL with credentials, a query or a "
            "fragment would be written into OUT's report and card (and cannot name the files of a folder): give "
            "credentials through the store's own settings (for S3: the AWS environment or profile)"
        )
    extra = EXTRAS.get(protocol, "http")
    try:
        import fsspec
        from upath import UPath

        fsspec.get_filesystem_class(protocol)  # imports the store's library (s3fs, gcsfs, adlfs, aiohttp)
    except ImportError as exc:
        raise UsageError(
            f"{role} {url}: reading {protocol}:// needs a library this Python lacks ({exc.name or exc}): "
            f"pip install 'streamsoup[{extra}]'"
        ) from None
    return UPath(protocol + url[len(protocol) :].rstrip("/"), **FRESH)


def filesystem(url: str):
    import fsspec

    return fsspec.core.url_to_fs(url, **FRESH)


def object_identity(info: dict[str, Any]) -> dict[str, Any]:
    """{size, version}: what a store's listing says of an object that changes when it is rewritten (a suspended
    versioning's `null` is no version)."""
    found = [f"{key}={info[key]}" for key in VALIDATORS if info.get(key) not in (None, "", "null")]
    return {"size": int(info["size"]), "version": found[0] if found else ""}


def identity(url: str) -> dict[str, Any] | None:
    """An object's identity now (io/binding.py's word), None when it is gone."""
    fs, path = filesystem(url)
    denied = None
    try:
        info = _tried(url, "look at", lambda: fs.info(path))
    except (FileNotFoundError, IsADirectoryError):
        return None
    except PermissionError as exc:
        denied = exc  # raised below, outside the handler
    if denied is not None:  # S3 without ListBucket answers 403 for a key that is not there
        raise access_denied(url, denied)
    if info.get("type") == "directory":
        return None
    return object_identity(info)


def checked_identity(url: str, role: str) -> dict[str, Any]:
    """The identity of an input object, which must have a version: without one a change between reads is unseen."""
    found = identity(url)
    if found is None:
        raise InputError(f"{role} {url} does not exist (or is not an object)")
    if not found["version"]:
        raise InputError(
            f"{role} {url}: its server gives no ETag, version or Last-Modified, so streamsoup cannot tell whether "
            "it changes between reads: serve it from a store that does, or copy it to a disk"
        )
    return found


class Changed(Exception):
    """The object is no longer the version a read asked for."""


def _opened(fs, path: str, url: str, end: int, version: str):
    """A file object of exactly `version` of the object, or Changed: HTTP asks with If-Match (or
    If-Unmodified-Since) on every request; other stores' metadata is compared (s3fs then pins its reads to that
    ETag with IfMatch). Without a version, what is there now."""
    key, _, value = version.partition("=")
    settings = {"cache_type": "none", "block_size": RANGE_BYTES}
    if protocol_of(url) in HTTP:
        condition = {"ETag": "If-Match", "etag": "If-Match", "Last-Modified": "If-Unmodified-Since"}.get(key)
        if value.startswith("W/"):  # a weak ETag never matches If-Match: the binding's checks stand alone
            condition = None
        return fs.open(path, "rb", size=end, headers={condition: value} if condition else {}, **settings)
    if not version:
        return fs.open(path, "rb", size=end, **settings)
    f = fs.open(path, "rb", **settings)
    details = getattr(f, "details", None)
    if not isinstance(details, dict) or object_identity(details)["version"] != version:
        f.close()
        raise Changed(version)
    return f


def read_range(url: str, offset: int, length: int, version: str = "") -> bytes:
    """Bytes offset:offset+length of the object (of `version`, when given), in one ranged request."""
    if length <= 0:
        return b""
    fs, path = filesystem(url)

    def fetch() -> bytes:
        with _opened(fs, path, url, offset + length, version) as f:
            f.seek(offset)
            return f.read(length)

    refused = None
    try:
        data = _tried(url, f"read bytes {offset}-{offset + length} of", fetch)
    except (FileNotFoundError, PermissionError, Changed) as exc:
        refused = exc  # raised below, outside this handler: an error sent back from a dask task carries its context
    if isinstance(refused, Changed):
        raise InputError(
            f"{url} changed while streamsoup read it (it is no longer {version}): the tensors read so far are not "
            "mixed with its new contents; rerun with its original contents, or with --fresh to start over"
        )
    if isinstance(refused, FileNotFoundError):
        raise InputError(f"{url} is gone: it was removed while streamsoup read it; restore it, then rerun")
    if refused is not None:
        raise access_denied(url, refused)
    if len(data) != length:
        raise InputError(
            f"{url}: ends {length - len(data)} bytes early at offset {offset + len(data)}: the object is truncated "
            "or was replaced; restore it, then rerun"
        )
    return data


#: HTTP statuses that say the object is not there, not ours to read, or no longer the version asked for
GONE, DENIED, PRECONDITION = (404, 410), (401, 403), 412
#: errors of a store's library that asking again cannot mend (a typo, missing credentials)
FINAL = ("NoCredentialsError", "PartialCredentialsError", "ParamValidationError", "InvalidURL", "NoRegionError")


def read_chunks(url: str, offset: int, length: int, version: str = "") -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) of offset:offset+length in requests of RANGE_BYTES, in order: one held at a time."""
    for at in range(offset, offset + length, RANGE_BYTES):
        yield at, read_range(url, at, min(RANGE_BYTES, offset + length - at), version)


def _tried(url: str, doing: str, call):
    """`call()`, tried again after a failure that may pass; a missing object (FileNotFoundError), a refusal
    (PermissionError) or a changed one (Changed) is not retried, nor a setting asking again cannot mend."""
    for attempt, delay in enumerate((*RETRY_DELAYS, None)):
        try:
            return call()
        except (PermissionError, IsADirectoryError, Changed):
            raise
        except ValueError as exc:  # fsspec's http: the server answered a range with the whole object
            ranges = "range" in str(exc).lower()
            why = "the server does not answer byte ranges as asked" if ranges else type(exc).__name__
            failure = f"cannot {doing} {url}: {why} ({clean(str(exc))})"
            break
        except Exception as exc:  # a dropped connection, a timeout, a 5xx, each library's own class for them
            cause = exc.__cause__ if isinstance(exc, FileNotFoundError) else exc  # fsspec's http: any failure
            status = getattr(cause, "status", None)
            if isinstance(exc, FileNotFoundError) and not _passing(cause):
                raise
            if status in GONE:
                raise FileNotFoundError(2, f"{status} from the server", url) from None
            if status in DENIED:
                raise PermissionError(13, f"{status} from the server", url) from None
            if status == PRECONDITION or type(exc).__name__ == "FileExpired":
                raise Changed(url) from None
            if type(cause).__name__ in FINAL or not _may_pass(cause):
                failure = f"cannot {doing} {url}: {clean(str(cause))}; check the store's settings (credentials, region)"
                break
            if delay is None:
                failure = (
                    f"cannot {doing} {url} after {attempt + 1} tries ({type(cause).__name__}: {clean(str(cause))}); "
                    "check the endpoint, the credentials and the network, then rerun (a merge keeps the work done)"
                )
                break
            log.warning("%s: %s failed (%s); trying again in %.1f s", url, doing, type(cause).__name__, delay)
        time.sleep(delay)
    raise InputError(failure)  # outside the handler: a dask task's error is sent back with its context


def _passing(cause: BaseException | None) -> bool:
    """A failure behind a FileNotFoundError that says nothing of the object (fsspec's http raises one for any
    failed HEAD): a status other than 404/410, a dropped connection, a timeout."""
    status = getattr(cause, "status", None)
    if status is not None:
        return status not in GONE
    name = type(cause).__name__
    return isinstance(cause, TimeoutError | ConnectionError) or any(w in name for w in ("Connect", "Timeout"))


def _may_pass(cause: BaseException) -> bool:
    """A failure worth another try: a 5xx, 408 or 429, or one with no status (a dropped connection, a timeout,
    a library's own class for them); s3fs's EINVAL (an invalid range or argument) is not."""
    status = getattr(cause, "status", None)
    if status is not None:
        return status >= 500 or status in (408, 429)
    return not (isinstance(cause, OSError) and cause.errno == errno.EINVAL)


def clean(text: str) -> str:
    """A library's message on one line, without the secrets a URL in it may carry (user:password@, a query)."""
    text = re.sub(r"//[^/@\s'\"]+@", "//", " ".join(text.split()))
    return re.sub(r"(\w+://[^\s?#'\"]*)[?#][^\s'\"]*", r"\1?...", text)


def coalesced(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """(offset, length) spans merged where they overlap or nearly touch, in file order."""
    merged: list[list[int]] = []
    for start, length in sorted(spans):
        if merged and start <= merged[-1][1] + COALESCE_GAP:
            merged[-1][1] = max(merged[-1][1], start + length)
        else:
            merged.append([start, start + length])
    return [(a, b - a) for a, b in merged if b > a]


def stage_object(url: str, spans: list[tuple[int, int]], version: str, folder: Path, name: str) -> Path:
    """A sparse local file holding the object's bytes of `spans` (of `version`) at their own offsets, holes
    elsewhere."""
    local = folder / name
    fd = _local(url, folder, lambda: os.open(local, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        _local(url, folder, lambda: os.ftruncate(fd, max(start + length for start, length in spans)))
        for start, length in coalesced(spans):
            for at, data in read_chunks(url, start, length, version):
                _local(url, folder, lambda d=data, a=at: rawio.pwrite_all(fd, memoryview(d), a))
    finally:
        os.close(fd)
    return local


def _local(url: str, folder: Path, call):
    """A write into the scratch folder; its failure (a full TMPDIR) is named as the scratch's, not the store's."""
    failure = None
    try:
        return call()
    except OSError as exc:
        failure = exc
    raise RunError(
        f"cannot stage {url} in {folder} ({failure.strerror}): TMPDIR ({stage_root()}) needs room for the tensors "
        "the lanes read at once; free space there or point TMPDIR at a larger disk, then rerun"
    )


def stage_root() -> Path:
    """Where tasks stage: TMPDIR, read now (a worker lives longer than one setting of it)."""
    return Path(os.environ.get("TMPDIR") or tempfile.gettempdir())


def stage_folder() -> Path:
    """A new folder of the task's own under stage_root, named by its process (after sweeping the folders of
    processes that are gone: a worker killed mid-task leaves its scratch behind)."""
    root = stage_root()
    sweep(root)
    return Path(tempfile.mkdtemp(prefix=f"{STAGE_PREFIX}{socket.gethostname()}-{os.getpid()}-", dir=root))


def sweep(root: Path) -> None:
    """Remove the scratch folders this user's processes on this machine left when they died (a worker killed
    mid-task), and only those that hold nothing but what a stage writes (`N.bin`): what streamsoup can prove it
    made. Opened without following links, files removed relative to the opened folder."""
    host = socket.gethostname()
    try:
        entries = list(os.scandir(root))
    except OSError:
        return
    for entry in entries:
        match = STAGED.fullmatch(entry.name)
        if match is None or match.group(1) != host or _alive(int(match.group(2))):
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue  # not a folder (a link), or gone
        try:
            if os.fstat(fd).st_uid != os.getuid():
                continue
            names = os.listdir(fd)
            if all(
                STAGED_FILE.fullmatch(n) and stat.S_ISREG(os.stat(n, dir_fd=fd, follow_symlinks=False).st_mode)
                for n in names
            ):
                for n in names:
                    os.unlink(n, dir_fd=fd)
                os.rmdir(entry.path)
        except OSError:
            continue  # another process sweeping it, or not ours to touch
        finally:
            os.close(fd)


#: a stage folder (its machine and process id) and the files a stage writes into it
STAGED = re.compile(re.escape(STAGE_PREFIX) + r"(.+)-(\d{1,9})-[A-Za-z0-9_]+")
STAGED_FILE = re.compile(r"\d{1,6}\.bin")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's, or not a pid: not ours to judge
    return True
