"""BASE and FINETUNED read where they are: an S3 server (moto) and a plain HTTP server with Range support, both
real servers on loopback that streamsoup reaches through fsspec as a user's would."""

from __future__ import annotations

import json
import shutil
import signal
import struct
import subprocess
from pathlib import Path

import pytest
from helpers import assert_merged_exactly, assert_one_line_error, run, small_disk, tree_digest
from hypothesis import given
from hypothesis import strategies as st
from stores import http_store, upload

from streamsoup.errors import InputError
from streamsoup.io import store

pytest.importorskip("s3fs")
pytest.importorskip("moto")

#: what a merge from a store writes differently from one of the same files on a disk: the card names the inputs
NAMES_INPUTS = ("README.md",)


def weights_digest(out: Path) -> dict[str, str]:
    return {k: v for k, v in tree_digest(out).items() if k not in NAMES_INPUTS}


@pytest.fixture
def staging(tmp_path) -> dict[str, str]:
    """TMPDIR for a run, where its tasks stage what they read (and must leave nothing)."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    return {"TMPDIR": str(folder)}


def test_a_merge_from_s3_is_the_merge_of_the_same_files_on_disk(reference, s3, staging, tmp_path):
    """Exact against the float64 reference, byte-identical to the local merge; the report records where the
    inputs were and their stores' versions; the tasks' staged bytes are gone."""
    base, ft, _, digest = reference
    out = tmp_path / "out"
    proc = run("merge", "s3://models/base", "s3://models/ft", out, "--shard-size", "100KB", "-q", env={**s3, **staging})
    assert proc.returncode == 0, proc.stderr
    assert weights_digest(out) == {k: v for k, v in digest.items() if k not in NAMES_INPUTS}
    report = assert_merged_exactly(base, ft, out)
    assert report["inputs"]["base"]["path"] == "s3://models/base"
    assert "s3://models/ft" in (out / "README.md").read_text()
    assert list(Path(staging["TMPDIR"]).iterdir()) == []
    assert run("verify", out, "-q").returncode == 0


def test_a_killed_merge_from_s3_resumes_to_the_same_bytes_and_refuses_a_rewritten_object(reference, s3, tmp_path):
    """Killed, then a shard re-uploaded with other bytes (same size, so only its ETag tells): the resume refuses,
    naming the shard, the work kept; with the first bytes back (a plain upload's ETag is their MD5) it resumes to
    the bytes of an uninterrupted run, the committed tensors kept."""
    import s3fs

    base, ft, _, digest = reference
    fs = s3fs.S3FileSystem(endpoint_url=s3["AWS_ENDPOINT_URL"], key="testing", secret="testing")
    upload(ft, "s3://models/ft-mut", s3)
    out = tmp_path / "out"
    args = ("merge", "s3://models/base", "s3://models/ft-mut", out, "--shard-size", "100KB", "-q")
    assert run(*args, env={**s3, "STREAMSOUP_FAULT": "commit:7"}).returncode == -signal.SIGKILL
    assert not out.exists()
    shard = sorted(p.name for p in ft.glob("*.safetensors"))[0]
    data = bytearray((ft / shard).read_bytes())
    data[-5] ^= 0x40  # one byte of the last tensor's data
    fs.pipe_file(f"s3://models/ft-mut/{shard}", bytes(data))
    proc = run(*args, env=s3)
    assert_one_line_error(proc, 2, f"FINETUNED shard {shard} changed", "--fresh")
    assert (tmp_path / "out.partial").is_dir() and not out.exists()
    fs.pipe_file(f"s3://models/ft-mut/{shard}", (ft / shard).read_bytes())
    proc = run(*args, env=s3)
    assert proc.returncode == 0, proc.stderr
    assert weights_digest(out) == {k: v for k, v in digest.items() if k not in NAMES_INPUTS}
    rows = json.loads((out / "streamsoup_report.json").read_text())["tensors"]
    assert {r["attempt"] for r in rows} == {1, 2}, (
        "committed work kept, the rest done by the next attempt (a refusal is none)"
    )


@pytest.fixture(scope="module")
def served(awkward_pair, tmp_path_factory):
    """A private copy of the awkward pair (its parent folder, holding base/ and finetuned/) for HTTP servers."""
    root = tmp_path_factory.mktemp("served")
    for side in awkward_pair:
        shutil.copytree(side, root / side.name)
    return root, awkward_pair[0].name, awkward_pair[1].name


def header_end(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def test_plan_of_a_url_pair_reads_headers_only(served):
    """Each shard's 8-byte length and its header, once, by range: never a byte of tensor data."""
    root, base, ft = served
    with http_store(root) as (url, traffic):
        proc = run("plan", f"{url}/{base}", f"{url}/{ft}")
        assert proc.returncode == 0, proc.stderr
        shard_reads = [r.split() for r in traffic.requests if r.startswith("GET") and ".safetensors " in r + " "]
    assert shard_reads, traffic.requests
    assert all(len(r) == 3 and r[2].startswith("bytes=") for r in shard_reads), "a shard read without a range"
    for _, path, wanted in shard_reads:
        start, stop = map(int, wanted.removeprefix("bytes=").split("-"))
        assert stop < header_end(root / path.lstrip("/")), f"{path}: bytes {start}-{stop} are tensor data"
    shards = {p for _, p, _ in shard_reads}
    assert len(shard_reads) == 2 * len(shards), "each shard's header read once (its length, then the header)"


def test_failed_requests_are_tried_again(reference, served, tmp_path, monkeypatch):
    """A 503 on two tensor reads (a store's "slow down"): said, tried again, the merge exact."""
    monkeypatch.setattr(store, "RETRY_DELAYS", (0.0, 0.0, 0.0))  # the tries, not their waits, are under test
    root, base, ft = served
    _, _, _, digest = reference
    ends = {f"/{p.parent.name}/{p.name}": header_end(p) for p in root.rglob("*.safetensors")}
    with http_store(root, failures=2, failing=lambda path, start: start >= ends.get(path, 1 << 62)) as (url, traffic):
        proc = run("merge", f"{url}/{base}", f"{url}/{ft}", tmp_path / "out", "--shard-size", "100KB")
    assert proc.returncode == 0, proc.stderr
    assert traffic.failures == 0 and proc.stderr.count("trying again") == 2, proc.stderr
    assert weights_digest(tmp_path / "out") == {k: v for k, v in digest.items() if k not in NAMES_INPUTS}


def test_a_store_that_stays_down_stops_the_merge_with_the_work_kept(reference, served, tmp_path, monkeypatch):
    """Every tensor read failing after some succeeded: exit 1 after the last try, one line naming the object;
    OUT.partial kept; once the store is back the rerun finishes with the same bytes."""
    monkeypatch.setattr(store, "RETRY_DELAYS", (0.0, 0.0, 0.0))  # the tries, not their waits, are under test
    root, base, ft = served
    _, _, _, digest = reference
    out = tmp_path / "out"
    ends = {f"/{p.parent.name}/{p.name}": header_end(p) for p in root.rglob("*.safetensors")}
    reads = []

    def after_some(path: str, start: int) -> bool:
        """Tensor reads once the merge has made OUT.partial (its checks' sampled reads pass) and read a few."""
        if start < ends.get(path, 1 << 62) or not (tmp_path / "out.partial").exists():
            return False
        reads.append(path)
        return len(reads) > 3

    with http_store(root, failures=10**6, failing=after_some) as (url, traffic):
        args = ("merge", f"{url}/{base}", f"{url}/{ft}", out, "--shard-size", "100KB", "-q")
        proc = run(*args)
        assert proc.returncode == 1, proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert "after 4 tries" in last and url in last and "Traceback" not in proc.stderr, proc.stderr
        assert (tmp_path / "out.partial").is_dir() and not out.exists()
        traffic.failures = 0  # the store is back
        proc = run(*args)
    assert proc.returncode == 0, proc.stderr
    assert weights_digest(out) == {k: v for k, v in digest.items() if k not in NAMES_INPUTS}


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"ranges": False}, "does not answer byte ranges"),
        ({"validators": False}, "no ETag, version or Last-Modified"),
    ],
)
def test_a_server_streamsoup_cannot_trust_is_refused(served, tmp_path, settings, words):
    root, base, ft = served
    with http_store(root, **settings) as (url, _):
        proc = run("merge", f"{url}/{base}", f"{url}/{ft}", tmp_path / "out", "-q", cwd=tmp_path)
    assert_one_line_error(proc, 2, words)
    assert list(tmp_path.iterdir()) == [], "nothing made"


def test_what_object_storage_does_not_hold_is_named(served, llama_lora, tmp_path):
    """An adapter or torch.save files at a URL: one line each, saying to copy them to a disk."""
    root, base, _ = served
    shutil.copytree(llama_lora[1], root / "adapter")
    (root / "pickled").mkdir()
    (root / "pickled" / "pytorch_model.bin").write_bytes(b"\x80")
    with http_store(root) as (url, _):
        proc = run("plan", f"{url}/{base}", f"{url}/adapter", cwd=tmp_path)
        assert_one_line_error(proc, 2, "is a PEFT adapter", "copy it")
        proc = run("plan", f"{url}/{base}", f"{url}/pickled", cwd=tmp_path)
        assert_one_line_error(proc, 2, "holds no safetensors files", "copy it to a disk")
        proc = run("plan", f"{url}/{base}", f"{url}/missing", cwd=tmp_path)
        assert_one_line_error(proc, 2, f"{url}/missing does not exist")


@given(st.lists(st.tuples(st.integers(0, 1 << 24), st.integers(1, 1 << 22)), min_size=1, max_size=30))
def test_coalesced_ranges_cover_every_span_once_in_order(spans):
    merged = store.coalesced(spans)
    assert merged == sorted(merged)
    for (a, n), (b, _) in zip(merged, merged[1:], strict=False):
        assert a + n + store.COALESCE_GAP < b, "ranges that nearly touch are one"
    for start, length in spans:
        assert any(a <= start and start + length <= a + n for a, n in merged), (start, length)
    assert sum(n for _, n in merged) <= sum(n for _, n in spans) + store.COALESCE_GAP * len(spans)


def test_a_url_with_credentials_or_a_query_is_refused_without_repeating_them(awkward_pair, tmp_path):
    """A secret in a URL would be printed, and written into OUT's report and card: refused, the secret unsaid."""
    for url in ("https://user:s3cret@host/model", "https://host/model?X-Amz-Signature=s3cret", "s3://b/m#s3cret"):
        proc = run("plan", url, awkward_pair[1], cwd=tmp_path)
        assert_one_line_error(proc, 2, "BASE", "credentials through the store's own settings")
        assert "s3cret" not in proc.stderr


def test_an_adapter_on_disk_over_a_base_in_s3(llama_lora, s3, tmp_path):
    """BASE read by ranges from the store, the LoRA adapter from a disk: the same bytes as both from disk."""
    base, adapter = llama_lora
    upload(base, "s3://models/llama-base", s3)
    remote = run("merge", "s3://models/llama-base", adapter, tmp_path / "remote", "-q", env=s3)
    local = run("merge", base, adapter, tmp_path / "local", "-q")
    assert remote.returncode == 0 and local.returncode == 0, remote.stderr + local.stderr
    assert weights_digest(tmp_path / "remote") == weights_digest(tmp_path / "local")


@pytest.mark.parametrize("change", ["rewritten", "removed"])
def test_an_object_changed_during_the_merge_is_never_published(awkward_pair, tmp_path, change):
    """A shard rewritten while the merge reads the pair (a new ETag: its bytes may differ) is found by the check
    before publish; one removed is named when a task reads it. Exit 1, the work kept, OUT not made."""
    root = tmp_path / "served"
    for side in awkward_pair:
        shutil.copytree(side, root / side.name)
    shards = sorted((root / awkward_pair[1].name).glob("*.safetensors"))
    victim = shards[-1] if change == "rewritten" else shards[0]
    ends = {f"/{p.parent.name}/{p.name}": header_end(p) for p in root.rglob("*.safetensors")}

    def change_once(path: str, start: int) -> bool:
        if start >= ends.get(path, 1 << 62) and (tmp_path / "out.partial").exists() and victim.exists():
            if change == "rewritten":
                victim.write_bytes(victim.read_bytes())  # the same bytes, written anew: another version
            else:
                victim.unlink()
        return False

    out = tmp_path / "out"
    with http_store(root, failures=10**6, failing=change_once) as (url, _):
        proc = run("merge", f"{url}/{root.joinpath(awkward_pair[0].name).name}", f"{url}/{victim.parent.name}", out)
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    said = ("changed while streamsoup read it", "modified or replaced") if change == "rewritten" else ("is gone",)
    assert victim.name in last and any(words in last for words in said), last
    assert "Traceback" not in proc.stderr and not out.exists() and (tmp_path / "out.partial").is_dir()


def test_a_tmpdir_too_small_for_the_staged_tensors_is_refused_up_front(s3, tmp_path):
    """TMPDIR on a tmpfs too small for the tensors the lanes stage at once: refused before any work, naming it and
    TMPDIR; with room, the merge stages there and leaves nothing."""
    with small_disk(tmp_path / "tmp", "16k") as tmp:
        args = ("merge", "s3://models/base", "s3://models/ft", tmp_path / "out", "--shard-size", "100KB")
        proc = run(*args, env={**s3, "TMPDIR": str(tmp)})
        assert_one_line_error(proc, 2, f"not enough disk space for {tmp}", "TMPDIR for the tensors tasks stage")
        assert not (tmp_path / "out.partial").exists() and list(tmp.iterdir()) == []
        subprocess.run(["mount", "-o", "remount,size=8m", str(tmp)], check=True)
        assert run(*args, "-q", env={**s3, "TMPDIR": str(tmp)}).returncode == 0
        assert list(tmp.iterdir()) == []


def test_a_read_asks_for_the_version_the_merge_began_with(s3, tmp_path):
    """Every ranged read names the object's version (S3: its ETag, which s3fs sends as IfMatch): bytes of a version
    uploaded since are never returned, even where the size did not change."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3["AWS_ENDPOINT_URL"], key="testing", secret="testing")
    url = "s3://models/pinned/blob.bin"
    fs.pipe_file(url, b"a" * 4096)
    with pytest.MonkeyPatch.context() as env:
        for key, value in s3.items():
            env.setenv(key, value)
        version = store.identity(url)["version"]
        assert version.startswith("ETag=") and store.read_range(url, 10, 5, version) == b"aaaaa"
        fs.pipe_file(url, b"b" * 4096)
        with pytest.raises(InputError, match="changed while streamsoup read it"):
            store.read_range(url, 10, 5, version)
        fs.rm(url)
        with pytest.raises(InputError, match="is gone"):
            store.read_range(url, 10, 5, version)


def test_a_failed_head_request_is_tried_again_not_taken_for_a_missing_object(served, tmp_path, monkeypatch):
    """fsspec's http raises FileNotFoundError for any failed HEAD: a 503 there is retried, not "does not exist"."""
    monkeypatch.setattr(store, "RETRY_DELAYS", (0.0, 0.0, 0.0))
    root, base, ft = served
    with http_store(root, failures=3, heads=True) as (url, traffic):
        proc = run("plan", f"{url}/{base}", f"{url}/{ft}")
    assert proc.returncode == 0, proc.stderr
    assert traffic.failures == 0


def test_scratch_left_by_a_killed_task_is_swept_and_nothing_else(tmp_path):
    """A worker killed mid-task leaves its stage folder: the next stage on the machine removes it when its process
    is gone and it holds only what a stage writes; a live process's folder, one of another machine, one holding a
    file of yours, a link, or a name with no real pid stays."""
    import os
    import socket

    dead = subprocess.Popen(["true"])
    dead.wait()
    here = f"{store.STAGE_PREFIX}{socket.gethostname()}"
    mine = tmp_path / f"{here}-{dead.pid}-abc123"
    mine.mkdir()
    (mine / "0.bin").write_bytes(b"x")
    yours = tmp_path / f"{here}-{dead.pid}-def456"
    yours.mkdir()
    (yours / "notes.txt").write_text("keep")
    live = tmp_path / f"{here}-{os.getpid()}-ghi789"
    live.mkdir()
    (live / "1.bin").write_bytes(b"y")
    elsewhere = tmp_path / f"{store.STAGE_PREFIX}another-host-{dead.pid}-jkl012"  # a TMPDIR machines share
    elsewhere.mkdir()
    (elsewhere / "2.bin").write_bytes(b"z")
    (tmp_path / f"{here}-2147483648-x").mkdir()  # not a pid this machine has: left, not a crash
    link = tmp_path / f"{here}-{dead.pid}-lnk345"
    link.symlink_to(yours)
    store.sweep(tmp_path)
    assert not mine.exists() and (yours / "notes.txt").exists() and (live / "1.bin").exists()
    assert (elsewhere / "2.bin").exists() and link.is_symlink()


def test_a_side_file_gone_when_the_merge_publishes_keeps_the_work(awkward_pair, tmp_path):
    """tokenizer.json removed from the store after the tensors were merged, before OUT got its copy: exit 1, the
    object named, OUT.partial kept (was: exit 2, "nothing written", with the whole merge in OUT.partial)."""
    root = tmp_path / "served"
    for side in awkward_pair:
        shutil.copytree(side, root / side.name)
    victim = root / awkward_pair[1].name / "tokenizer.json"
    assert victim.exists()

    def remove_when_copied(path: str, start: int) -> bool:
        if path.endswith("/tokenizer.json") and victim.exists():
            victim.unlink()
        return False

    with http_store(root, failures=10**6, failing=remove_when_copied) as (url, _):
        proc = run("merge", f"{url}/{awkward_pair[0].name}", f"{url}/{awkward_pair[1].name}", tmp_path / "out")
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "tokenizer.json is gone" in last and "kept" in last, last
    assert (tmp_path / "out.partial").is_dir() and not (tmp_path / "out").exists()


STAGE_AND_MEASURE = """
import resource, sys
from pathlib import Path
from streamsoup.io import store
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
version = store.identity(sys.argv[1])["version"]
store.stage_object(sys.argv[1], [(0, int(sys.argv[2]))], version, Path(sys.argv[3]), "0.bin")
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_staging_a_large_object_holds_one_request_in_memory(tmp_path):
    """A 320 MiB object staged from the store: the process's peak memory grows by a request and its copy (60 MiB
    measured), not by the object (measured in a process of its own, whose high-water mark is its own)."""
    import sys

    size = 320 << 20
    (tmp_path / "served").mkdir()
    with open(tmp_path / "served" / "big.bin", "wb") as f:
        f.truncate(size)
    (tmp_path / "stage").mkdir()
    with http_store(tmp_path / "served") as (url, traffic):
        proc = subprocess.run(
            [sys.executable, "-c", STAGE_AND_MEASURE, f"{url}/big.bin", str(size), str(tmp_path / "stage")],
            capture_output=True,
            text=True,
            timeout=120,
        )
    staged = tmp_path / "stage" / "0.bin"
    staged_size = staged.stat().st_size if staged.exists() else None
    for big in (staged, tmp_path / "served" / "big.bin"):  # the suite leaves no large files behind
        big.unlink(missing_ok=True)
    assert proc.returncode == 0, proc.stderr
    grown = int(proc.stdout.split()[-1])
    assert traffic.sent == size and staged_size == size
    assert grown < size // 3, f"peak memory grew by {grown >> 20} MiB staging {size >> 20} MiB"
