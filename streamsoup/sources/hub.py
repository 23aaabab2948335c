"""Hugging Face repo ids (``org/name``, ``org/name@revision``) as inputs, resolved with huggingface_hub.

The local cache is tried first (no network); ``HF_HUB_OFFLINE=1`` is honoured by huggingface_hub
itself. Online, only the files a merge needs are fetched: weights in safetensors (torch.save
``*.bin``/``*.pt``/``*.pth`` only for a repo that has no safetensors), JSON configs and indexes,
tokenizer files.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import InputError
from ..io import store

#: what a merge reads from a repo (never *.gguf or other weight formats; see PICKLED)
NEEDED = ["*.safetensors", "*.json", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
#: the weights fetched instead when a repo has no safetensors at all
PICKLED = ["*.bin", "*.pt", "*.pth"]
REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")


#: a model's id as the Hub's metadata names it: org/name, each part starting and ending with a letter or digit
HUB_MODEL_ID = re.compile(r"[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?/[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?")


def parse_repo_id(spec: str) -> tuple[str, str | None] | None:
    """('org/name', 'revision' or None) when `spec` reads as a repo id, else None."""
    match = REPO_ID.match(spec)
    if match is None or spec.startswith((".", "/", "~")):
        return None
    return match.group("repo"), match.group("revision")


def cache_repo_id(root: Path) -> tuple[str, str] | None:
    """(repo id, commit) of a Hugging Face cache snapshot (``.../models--org--name/snapshots/<commit>``, or a file
    in one), else None."""
    if store.is_url(root):
        return None
    folder = root if root.is_dir() else root.parent
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent.name[len("models--") :].replace("--", "/"), folder.name
    return None


def hub_model_id(value: object) -> str | None:
    """`value` when it can name a model on the Hub as metadata does (``org/name``: no revision, no path); a bare
    name or a path that a training run wrote into a config is not taken for one."""
    if not isinstance(value, str) or len(value) > 96 or HUB_MODEL_ID.fullmatch(value) is None:
        return None
    return value if ".." not in value and "--" not in value else None


def resolve_repo(spec: str, role: str) -> Path:
    """The local snapshot folder of a repo id: from the cache, else (when online) downloaded."""
    try:
        from huggingface_hub import HfApi, constants, snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ValueError as exc:  # it parses HF_ENDPOINT and friends when imported
        raise InputError(
            f"{role} {spec} is read as a Hugging Face repo id, and huggingface_hub cannot start "
            f"({exc}); check HF_ENDPOINT"
        ) from None

    repo, revision = parse_repo_id(spec)  # type: ignore[misc]
    shown = f"{repo}@{revision}" if revision else repo
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=NEEDED, local_files_only=True))
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise InputError(
                f"{role} {shown} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                "HF_HUB_OFFLINE=1 forbids downloading it; download it first or unset "
                "HF_HUB_OFFLINE"
            ) from None
    unreachable = endpoint_unreachable(constants.ENDPOINT)
    if unreachable:
        raise InputError(
            f"{role} {shown} is not in the Hugging Face cache and the Hub cannot be reached "
            f"({unreachable}); check the network, or download it first"
        ) from None
    try:
        files = HfApi().list_repo_files(repo, revision=revision)
        wanted = NEEDED if any(f.endswith(".safetensors") for f in files) else NEEDED + PICKLED
        return Path(snapshot_download(repo, revision=revision, allow_patterns=wanted))
    except RevisionNotFoundError:
        raise InputError(
            f"{role} {shown}: the repo has no revision {revision!r}; check the branch, tag or commit after '@'"
        ) from None
    except GatedRepoError:
        raise InputError(
            f"{role} {shown} is gated: accept its terms on huggingface.co and log in (hf auth login or HF_TOKEN)"
        ) from None
    except RepositoryNotFoundError:
        raise InputError(
            f"{role} {shown}: no such repo on the Hugging Face Hub (or it is private: log in with "
            "hf auth login or set HF_TOKEN)"
        ) from None
    except Exception as exc:
        if not isinstance(exc, HfHubHTTPError | LocalEntryNotFoundError | OSError) and not from_http_stack(exc):
            raise
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"{role} {shown} could not be fetched from the Hugging Face Hub ({first}); check the "
            "network, or set HF_HUB_OFFLINE=1 to use the cache only"
        ) from None


#: the HTTP libraries huggingface_hub has used (its errors are theirs, not its own, when the network fails)
HTTP_STACKS = {"httpx", "httpx2", "httpcore", "requests", "urllib3", "h11", "h2"}
PROXY_VARS = ("https_proxy", "http_proxy", "all_proxy")


def from_http_stack(exc: BaseException) -> bool:
    """An exception of the HTTP client under huggingface_hub (a refused or reset connection, a timeout)."""
    return any(cls.__module__.split(".")[0] in HTTP_STACKS for cls in type(exc).__mro__)


def endpoint_unreachable(endpoint: str, timeout: float = 5.0) -> str:
    """Why the Hub's endpoint surely cannot be reached (a connection to it fails), at once; "" when it may be.

    huggingface_hub retries a failed connection for ~25 s before it gives up. Behind a proxy the endpoint is
    reached through it, so nothing is said here."""
    if any(os.environ.get(v) or os.environ.get(v.upper()) for v in PROXY_VARS):
        return ""
    try:
        url = urlsplit(endpoint)
        host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    except ValueError as exc:  # a malformed HF_ENDPOINT (a port out of range, an unclosed bracket)
        return f"HF_ENDPOINT {endpoint!r:.100} is not a URL: {exc}"
    if not host:
        return ""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return f"{host}:{port}: {exc.strerror or exc}"
    except UnicodeError as exc:  # a host name that IDNA cannot encode (an empty or 64-character label)
        return f"{host!r:.100} is not a host name ({exc})"
    return ""
