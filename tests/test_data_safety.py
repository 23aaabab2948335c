"""Never lose a user's data, never publish a wrong model: each case here was seen on an earlier version."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import time
from pathlib import Path

import pytest
import torch
import zarr
from conftest import made_once, paths
from helpers import (
    assert_merged_exactly,
    assert_one_line_error,
    edited_adapter,
    report_rows,
    rewrite_in_place,
    run,
    run_here,
    start,
    tree_digest,
)
from test_bad_input import small_disk

import streamsoup
from streamsoup.errors import RunError
from streamsoup.io.state import BATCHES, STATE_NAME, RunState
from streamsoup.run import driver as api

ARGS = ("--shard-size", "100KB", "-q")


def folder_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- 1-3: deleting only what streamsoup made ---------------------------------------------------------------


def test_existing_work_dir_is_never_deleted(reference, tmp_path):
    base, ft, _, digest = reference
    work = tmp_path / "s"
    (work / "keep").mkdir(parents=True)
    (work / "keep" / "f").write_text("x")
    out = tmp_path / "O"
    killed = run("merge", base, ft, out, *ARGS, "--work-dir", work, env={"STREAMSOUP_FAULT": "commit:4"})
    assert killed.returncode == -signal.SIGKILL
    assert (work / "keep" / "f").read_text() == "x"
    assert len([p for p in work.iterdir() if p.name.startswith("streamsoup-state-")]) == 1
    assert run("merge", base, ft, out, *ARGS, "--work-dir", work).returncode == 0
    assert tree_digest(out) == digest
    assert sorted(p.name for p in work.iterdir()) == ["keep"] and (work / "keep" / "f").read_text() == "x"


def test_a_new_work_dir_that_will_hold_out_gets_a_state_subfolder(reference, tmp_path):
    """--work-dir new with OUT new/m: `new` becomes OUT's folder (the user's), the state a subfolder of it that
    goes once OUT is published (it was a refusal naming `new`, after leaving new/m.partial behind)."""
    base, ft, _, digest = reference
    work = tmp_path / "new"
    proc = run("merge", base, ft, work / "m", *ARGS, "--work-dir", work)
    assert proc.returncode == 0, proc.stderr
    assert tree_digest(work / "m") == digest and sorted(p.name for p in work.iterdir()) == ["m"]


def test_work_dir_dot_keeps_the_folder_and_the_inputs(reference, tmp_path):
    base, ft, _, digest = reference
    d = tmp_path / "d"
    shutil.copytree(base, d / "pair" / "base")
    shutil.copytree(ft, d / "pair" / "finetuned")
    (d / "notes.txt").write_text("mine")
    before = tree_digest(d)
    killed = run(
        "merge",
        "pair/base",
        "pair/finetuned",
        "out",
        *ARGS,
        "--work-dir",
        ".",
        cwd=d,
        env={"STREAMSOUP_FAULT": "commit:3"},
    )
    assert killed.returncode == -signal.SIGKILL
    assert run("merge", "pair/base", "pair/finetuned", "out", *ARGS, "--work-dir", ".", cwd=d).returncode == 0
    weights = lambda digests: {k: v for k, v in digests.items() if k != "README.md"}  # noqa: E731
    assert weights(tree_digest(d / "out")) == weights(digest)  # the model card names these inputs' other paths
    after = tree_digest(d)
    assert {k: v for k, v in after.items() if not k.startswith("out/")} == before


@pytest.mark.parametrize("restart", ["--fresh", "damaged zarr.json"])
def test_files_a_user_put_into_a_work_dir_streamsoup_made_are_kept(reference, tmp_path, restart):
    """A --work-dir streamsoup made, into which the user then put files: starting over (--fresh, or a state that
    does not read) removes only what streamsoup wrote; the user's files stay, and one line says so."""
    base, ft, _, digest = reference
    work, out = tmp_path / "wd", tmp_path / "out"
    killed = run("merge", base, ft, out, *ARGS, "--work-dir", work, env={"STREAMSOUP_FAULT": "commit:4"})
    assert killed.returncode == -signal.SIGKILL and (work / "zarr.json").exists()
    (work / "notes.txt").write_text("mine")
    (work / "mydata").mkdir()
    (work / "mydata" / "x").write_text("also mine")
    if restart == "--fresh":
        extra = ("--fresh",)
    else:
        extra = ()
        (work / "zarr.json").write_text("{ not json")
    proc = run("merge", base, ft, out, "--shard-size", "100KB", "--work-dir", work, *extra)
    assert proc.returncode == 0, proc.stderr
    assert tree_digest(out) == digest
    assert (work / "notes.txt").read_text() == "mine" and (work / "mydata" / "x").read_text() == "also mine"
    assert sorted(p.name for p in work.iterdir()) == ["mydata", "notes.txt"]  # streamsoup's state is gone
    said = [line for line in proc.stderr.splitlines() if "notes.txt" in line]
    assert len(said) >= 1 and all("mydata" in line for line in said), proc.stderr


@pytest.mark.parametrize("rerun", [(), ("--fresh",)], ids=["resume", "fresh"])
@pytest.mark.parametrize("planted", ["notes.txt", "symlink", "mine.safetensors", ".streamsoup-state.zarr/notes.txt"])
def test_files_a_user_put_into_an_out_partial_are_never_deleted(reference, tmp_path, rerun, planted):
    """OUT.partial becomes OUT: a user's file in it (or a symlink a write would follow) is neither deleted nor
    published nor written through, on a resume as on --fresh; one line."""
    base, ft, _, _ = reference
    out = tmp_path / "out"
    partial = tmp_path / "out.partial"
    killed = run("merge", base, ft, out, *ARGS, env={"STREAMSOUP_FAULT": "commit:4"})
    assert killed.returncode == -signal.SIGKILL
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    if planted == "symlink":  # a shard's own name, pointing at the user's file: O_TRUNC would go through it
        name = sorted(p.name for p in partial.glob("*.safetensors"))[0]
        (partial / name).unlink()
        (partial / name).symlink_to(victim)
    else:  # a file of the user's: any name, a shard-like one, or inside a folder streamsoup made there
        name = planted.split("/")[0]
        (partial / planted).write_text("mine")
    files = lambda: {k: v for k, v in tree_digest(partial).items() if k != ".streamsoup.lock"}  # noqa: E731
    before = files()  # the lock names its holder: the rerun that takes it rewrites it
    proc = run("merge", base, ft, out, *ARGS, *rerun)
    assert_one_line_error(proc, 2, str(partial), name, "did not write")
    assert files() == before and not out.exists() and victim.read_text() == "precious"


def test_a_users_file_in_a_side_folder_of_out_partial_is_kept(pair, tmp_path):
    """FINETUNED's side files in a folder (`original/params.json`) go to OUT.partial/original/: a file of the
    user's put in there is not streamsoup's, so --fresh keeps it and the run refuses to publish it."""
    base, ft = pair
    (ft / "original").mkdir()
    (ft / "original" / "params.json").write_text("{}")
    out, partial = tmp_path / "out", tmp_path / "out.partial"
    assert run("merge", base, ft, out, *ARGS, env={"STREAMSOUP_FAULT": "commit:4"}).returncode == -signal.SIGKILL
    (partial / "original").mkdir()
    (partial / "original" / "params.json").write_text("{}")  # as a killed copy of the side files leaves it
    (partial / "original" / "mine.txt").write_text("mine")
    assert_one_line_error(run("merge", base, ft, out, *ARGS, "--fresh"), 2, "original", "did not write")
    assert (partial / "original" / "mine.txt").read_text() == "mine" and not out.exists()
    (partial / "original" / "mine.txt").unlink()  # only the side file left: streamsoup's, replaced by the run
    assert run("merge", base, ft, out, *ARGS).returncode == 0
    assert (out / "original" / "params.json").read_text() == "{}"


@pytest.mark.parametrize("where", ["OUT", "inside OUT", "OUT.partial", "inside FINETUNED", "BASE"])
def test_a_work_dir_in_out_or_in_an_input_is_refused_up_front(pair, tmp_path, where):
    """The state would be published with OUT, or be written into an input (whose files the run binds): refused
    before anything is computed or written."""
    base, ft = pair
    out = tmp_path / "out"
    work = {
        "OUT": out,
        "inside OUT": out / "state",
        "OUT.partial": tmp_path / "out.partial",
        "inside FINETUNED": ft / "state",
        "BASE": base,
    }[where]
    inputs = tree_digest(base), tree_digest(ft)
    proc = run("merge", base, ft, out, "--work-dir", work)
    assert_one_line_error(proc, 2, "--work-dir", str(work))
    assert not out.exists() and not (tmp_path / "out.partial").exists()
    assert where == "BASE" or not work.exists()
    assert (tree_digest(base), tree_digest(ft)) == inputs


def test_foreign_or_symlinked_partial_is_refused(awkward_pair, tmp_path):
    base, ft = awkward_pair
    mine = tmp_path / "O.partial"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    proc = run_here("merge", base, ft, tmp_path / "O")
    assert_one_line_error(proc, 2, str(mine), "did not make")
    assert (mine / "thesis.tex").read_text() == "years of work"
    victim = tmp_path / "F"
    shutil.copytree(ft, victim)
    before = tree_digest(victim)
    (tmp_path / "P.partial").symlink_to(victim)
    proc = run_here("merge", base, ft, tmp_path / "P")
    assert_one_line_error(proc, 2, "P.partial", "a symlink")
    assert tree_digest(victim) == before and not (tmp_path / "P").exists()


def test_work_dir_pointer_in_out_is_not_trusted(reference, tmp_path):
    base, ft, ref, digest = reference
    out = tmp_path / "O"
    shutil.copytree(ref, out)
    victim = tmp_path / "any" / "dir"
    victim.mkdir(parents=True)
    (victim / "data").write_text("precious")
    (out / ".streamsoup-workdir").write_text(f"{victim}\n")
    proc = run("merge", base, ft, out, "--shard-size", "100KB")
    assert proc.returncode == 0, proc.stderr
    assert (victim / "data").read_text() == "precious"
    assert "left" in proc.stderr and str(victim) in proc.stderr
    assert not (out / ".streamsoup-workdir").exists() and tree_digest(out) == digest


# --- round two, 4: inputs bound by identity, checked at resume and before publishing -------------------------


@pytest.mark.parametrize(
    "change", ["first tenth of the rows", "one unsampled value, mtime set back", "config.json edited"]
)
def test_an_input_rewritten_between_two_runs_is_refused_by_name(pair, tmp_path, change):
    base, ft = pair
    out = tmp_path / "out"
    killed = run("merge", base, ft, out, *ARGS, env={"STREAMSOUP_FAULT": "commit:4"})
    assert killed.returncode == -signal.SIGKILL
    times = {p: p.stat() for p in ft.glob("*.safetensors")}
    if change == "config.json edited":  # it says how tensors are split and decoded: bound like a shard
        (ft / "config.json").write_text((ft / "config.json").read_text().replace("}", ', "note": 1}', 1))
        times = {ft / "config.json": None}
    changed = [] if change == "config.json edited" else rewrite_in_place(ft, only_one_value=change.startswith("one"))
    if "mtime set back" in change:  # a copy with -p, or a tool keeping times: the ctime still moves
        for p, st in times.items():
            os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert all(p.stat().st_mtime_ns == st.st_mtime_ns for p, st in times.items())
    proc = run("merge", base, ft, out, *ARGS)
    assert_one_line_error(proc, 2, "FINETUNED", "--fresh")
    assert str(ft) in proc.stderr or any(p.name in proc.stderr for p in times), proc.stderr
    assert not out.exists()
    assert run("merge", base, ft, out, *ARGS, "--fresh").returncode == 0
    report = assert_merged_exactly(base, ft, out)  # every tensor from the new contents, none from the old
    assert {r["attempt"] for r in report["tensors"]} == {1} and (changed or change == "config.json edited")


def test_a_resume_through_another_path_to_the_same_files_goes_on(reference, tmp_path):
    """The inputs are bound by name in their folder and identity: the same files reached through a symlink (or
    `~` against `/home/...`) are the same inputs, and the rerun resumes to the same bytes."""
    base, ft, _, digest = reference
    out = tmp_path / "out"
    assert run("merge", base, ft, out, *ARGS, env={"STREAMSOUP_FAULT": "commit:4"}).returncode == -signal.SIGKILL
    (tmp_path / "alias").symlink_to(base.parent)
    proc = run("merge", tmp_path / "alias" / base.name, tmp_path / "alias" / ft.name, out, *ARGS)
    assert proc.returncode == 0, proc.stderr
    card = "README.md"  # the model card names the inputs as this command gave them
    assert {k: v for k, v in tree_digest(out).items() if k != card} == {k: v for k, v in digest.items() if k != card}
    rows = report_rows(out)
    assert sum(r["attempt"] == 1 for r in rows.values()) == 3  # the first attempt's tensors were kept


def test_a_zarr_temporary_file_in_the_state_is_the_states(reference, tmp_path):
    """zarr writes zarr.json through `zarr.<uuid hex>.partial`: a kill in between leaves it in the state, which is
    still streamsoup's (it was refused as a user's file, blocking the resume and --fresh alike)."""
    base, ft, _, digest = reference
    out = tmp_path / "out"
    assert run("merge", base, ft, out, *ARGS, env={"STREAMSOUP_FAULT": "commit:4"}).returncode == -signal.SIGKILL
    (tmp_path / "out.partial" / STATE_NAME / f"zarr.{'0' * 31}a.partial").write_text("{")
    proc = run("merge", base, ft, out, *ARGS)
    assert proc.returncode == 0, proc.stderr
    assert tree_digest(out) == digest


def test_an_input_replaced_while_the_merge_plans_is_never_published(pair, tmp_path, monkeypatch):
    """A fine-tune re-exported just after streamsoup read its headers (a large model's planning takes a while):
    the identity taken before the headers were read binds the run, so the publish check sees the new file."""
    base, ft = pair
    fingerprint = api.run_fingerprint

    def replace_then_fingerprint(plan):  # a new file of the same layout, other values, renamed over the old one
        staging = tmp_path / "staging"
        staging.mkdir()
        for shard in ft.glob("*.safetensors"):
            shutil.copy(shard, staging)
        rewrite_in_place(staging)
        for shard in staging.iterdir():
            os.replace(shard, ft / shard.name)
        return fingerprint(plan)

    monkeypatch.setattr(api, "run_fingerprint", replace_then_fingerprint)
    with pytest.raises(
        RunError, match="FINETUNED file .* was modified or replaced .* during this merge.*work done so far is kept"
    ):
        streamsoup.merge(base, ft, tmp_path / "out", shard_size="100KB")
    assert not (tmp_path / "out").exists()


def test_an_input_removed_during_the_run_is_named_not_an_io_error(pair, tmp_path, monkeypatch):
    base, ft = pair
    execute = api.execute
    gone = sorted(ft.glob("*.safetensors"))[-1]
    monkeypatch.setattr(api, "execute", lambda *a, **k: (execute(*a, **k), gone.unlink())[0])
    with pytest.raises(
        RunError, match=f"FINETUNED file {gone} was removed during this merge.*work done so far is kept"
    ):
        streamsoup.merge(base, ft, tmp_path / "out", shard_size="100KB")
    assert not (tmp_path / "out").exists()


def test_an_input_changed_during_the_run_is_never_published(pair, tmp_path, monkeypatch):
    base, ft = pair
    out = tmp_path / "out"
    execute = api.execute

    def execute_then_rewrite(*args, **kwargs):
        results = execute(*args, **kwargs)
        rewrite_in_place(ft)  # the tensors were read before this: OUT.partial holds the old contents' merge
        return results

    monkeypatch.setattr(api, "execute", execute_then_rewrite)
    with pytest.raises(RunError, match=f"FINETUNED file {ft}/.* during this merge.*--fresh"):
        streamsoup.merge(base, ft, out, shard_size="100KB")
    monkeypatch.undo()
    assert not out.exists() and (tmp_path / "out.partial").exists()
    assert_one_line_error(run("merge", base, ft, out, *ARGS), 2, "FINETUNED shard model-00001", "--fresh")
    assert run("merge", base, ft, out, *ARGS, "--fresh").returncode == 0
    assert_merged_exactly(base, ft, out)
    rewrite_in_place(ft, rows=0.01)  # OUT now holds another contents' merge: not "already complete"
    assert_one_line_error(run("merge", base, ft, out, *ARGS), 2, "already holds a different merge", "FINETUNED")


# --- round two, 6: BASE checked on decoded values, whatever its dtype or layout; data holes refused ----------


def holes(folder: Path) -> None:
    """Every shard's data replaced by holes (reads as zeros), its header and size intact: a download that
    allocated the files and stopped."""
    for shard in folder.glob("*.safetensors"):
        size = shard.stat().st_size
        with open(shard, "r+b") as f:
            keep = 8 + struct.unpack("<Q", f.read(8))[0]
            f.truncate(keep)
            f.truncate(size)


@pytest.mark.parametrize("role", ["BASE", "FINETUNED", "adapter's BASE"])
def test_a_checkpoint_of_zeros_with_intact_headers_is_refused_by_name(pair, plain_adapter, tmp_path, role):
    base, ft = pair
    if role == "adapter's BASE":
        base, ft = tmp_path / "abase", plain_adapter[1]
        shutil.copytree(plain_adapter[0], base)
    target = ft if role == "FINETUNED" else base
    holes(target)
    out = tmp_path / "out"
    assert_one_line_error(run("merge", base, ft, out), 2, f"{role.split()[-1]} {target}", "only zeros", "re-download")
    assert not out.exists() and not (tmp_path / "out.partial").exists()


# --- 4 and 7: state that does not verify is recomputed, never trusted -------------------------------------


def killed_partial(base: Path, ft: Path, out: Path, at: int = 12) -> tuple[Path, RunState]:
    killed = run("merge", base, ft, out, *ARGS, env={"STREAMSOUP_FAULT": f"commit:{at}"})
    assert killed.returncode == -signal.SIGKILL
    partial = out.with_name(out.name + ".partial")
    return partial, RunState.read(partial / STATE_NAME)


def flip(path: Path, at: int = -3) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def _record(state: RunState, key: str) -> Path:
    """The folder holding a committed tensor's record: its own group, or the batch it was committed in."""
    marker = state.committed()[key]
    return state.path / BATCHES / marker.batch if marker.batch else state.path / "tensors" / key


def _spectrum_chunk(state: RunState, key: str) -> Path:
    return next(p for p in (_record(state, key) / "s").rglob("*") if p.is_file() and p.name != "zarr.json")


def _rewrite_marker(state: RunState, key: str, change) -> None:
    marker = state.committed()[key]
    root = zarr.open_group(str(state.path), mode="a")
    if marker.batch is None:
        group = root["tensors"][key]
        group.attrs.put({"marker": change(dict(group.attrs["marker"]))})
        return
    group = root[BATCHES][marker.batch]
    records = dict(group.attrs["markers"])
    records[key] = change(dict(records[key]))
    group.attrs.put({"markers": records})


def _edit_marker(state: RunState, key: str) -> None:
    _rewrite_marker(state, key, lambda m: {**m, "row": {**m["row"], "lambda_low": 0.123, "action": "edit"}})


def _drop_row_key(state: RunState, key: str) -> None:
    _rewrite_marker(state, key, lambda m: {**m, "row": {k: v for k, v in m["row"].items() if k != "crc32c"}})


DAMAGE = {
    "deleted spectrum chunk": lambda state, key: _spectrum_chunk(state, key).unlink(),
    "flipped spectrum byte": lambda state, key: flip(_spectrum_chunk(state, key), 10),
    "edited marker row": _edit_marker,
    "marker row missing a key": _drop_row_key,
    "truncated marker zarr.json": lambda state, key: (_record(state, key) / "zarr.json").write_text('{"zar'),
    "deleted marker zarr.json": lambda state, key: (_record(state, key) / "zarr.json").unlink(),
}


@pytest.fixture(scope="module")
def killed_at_22(reference, tmp_path_factory):
    """Restores, for each test, OUT.partial as a run killed at its 22nd commit left it (the kill runs once)."""
    base, ft, _, _ = reference
    root = tmp_path_factory.mktemp("killed")
    out = root / "out"
    partial, _ = killed_partial(base, ft, out, at=22)
    pristine = root / "pristine"
    shutil.copytree(partial, pristine, symlinks=True)

    def restore() -> tuple[Path, Path, RunState]:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(pristine, partial, symlinks=True)
        return out, partial, RunState.read(partial / STATE_NAME)

    return restore


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_state_is_recomputed(reference, killed_at_22, case):
    """Damage to a committed tensor's record (its own, or the batch it was committed with): the damage is named,
    what it covers is recomputed, the rest resumed; the result is the uninterrupted run's bytes."""
    import streamsoup

    base, ft, _, digest = reference
    out, partial, state = killed_at_22()
    done = list(state.committed().values())
    edited = sorted((m for m in done if m.row["action"] == "edit"), key=lambda m: m.key)
    victim = edited[len(edited) // 2]
    whole_batch = victim.batch is not None and case in (
        "deleted spectrum chunk",
        "flipped spectrum byte",
        "truncated marker zarr.json",
        "deleted marker zarr.json",
    )
    hurt = {m.key for m in done if whole_batch and m.batch == victim.batch} | {victim.key}
    DAMAGE[case](state, victim.key)
    assert streamsoup.status(out).state == "interrupted"  # looking at a damaged run never crashes
    assert streamsoup.report(out).state == "interrupted"
    proc = run("merge", base, ft, out, "--shard-size", "100KB")
    assert proc.returncode == 0, proc.stderr
    assert "record(s) of the resume state did not verify" in proc.stderr, proc.stderr
    assert tree_digest(out) == digest
    rows = report_rows(out)
    assert rows[victim.row["name"]]["attempt"] == 2
    assert all(rows[m.row["name"]]["attempt"] == 1 for m in done if m.key not in hurt)
    assert streamsoup.verify(out).ok


def test_damaged_state_root_is_started_over(reference, tmp_path):
    base, ft, _, digest = reference
    out = tmp_path / "out"
    partial, state = killed_partial(base, ft, out)
    (state.path / "zarr.json").write_text("{")
    looked = run("status", out)
    assert_one_line_error(looked, 2, "damaged", "rerunning")
    proc = run("merge", base, ft, out, "--shard-size", "100KB")
    assert proc.returncode == 0 and "unreadable" in proc.stderr, proc.stderr
    assert tree_digest(out) == digest


# --- 5: no NaN/Inf from an adapter's scaling ----------------------------------------------------------------


@pytest.fixture(scope="module")
def plain_adapter(tmp_path_factory) -> tuple[Path, Path]:
    import make_adapters

    make = lambda folder: [str(p) for p in make_adapters.make(folder, "llama", "plain")]  # noqa: E731
    return paths(*made_once(tmp_path_factory, "adapter-llama-plain", make))  # the one test_adapters makes


@pytest.mark.parametrize("save", ["model", "adapter"])
def test_huge_lora_alpha_is_an_error_not_inf(plain_adapter, tmp_path, save):
    base, adapter = plain_adapter
    bad = edited_adapter(adapter, tmp_path, lora_alpha=1e200)
    proc = run("merge", base, bad, tmp_path / "out", "--save", save)
    assert_one_line_error(proc, 1, "NaN or Inf", "lora_alpha")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "changes, needle",
    [
        ({"lora_alpha": None}, "lora_alpha"),
        ({"lora_alpha": "sixteen"}, "lora_alpha"),
        ({"r": 0}, "r = 0"),
        ({"rank_pattern": {"q_proj(": 4}}, "regular expression"),
        ({"alpha_pattern": {"q_proj": "x"}}, "alpha_pattern"),
    ],
)
def test_bad_adapter_numbers_are_refused(plain_adapter, tmp_path, changes, needle):
    base, adapter = plain_adapter
    bad = edited_adapter(adapter, tmp_path, **changes)
    proc = run_here("merge", base, bad, tmp_path / "out")
    assert_one_line_error(proc, 2, needle)
    assert not (tmp_path / "out.partial").exists()


def test_backtracking_pattern_does_not_hang(plain_adapter, tmp_path):
    """re takes exponential time on this key; the match is made with `regex`, under a time limit."""
    base, adapter = plain_adapter
    bad = edited_adapter(adapter, tmp_path, rank_pattern={"(([a-z_.0-9]+)+)+Z": 4})
    t0 = time.time()
    proc = run("merge", base, bad, tmp_path / "out", "-q", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert time.time() - t0 < 60


# --- 6: verify reads shards as a loader would; shapes a loader cannot read are refused ---------------------


def test_verify_checks_headers_and_sizes(reference, tmp_path):
    _, _, ref, _ = reference
    for damage in ("header byte", "appended byte"):
        out = tmp_path / damage.replace(" ", "-")
        shutil.copytree(ref, out)
        shard = sorted(out.glob("model-*.safetensors"))[0]
        if damage == "header byte":
            data = bytearray(shard.read_bytes())
            at = data.index(b'"format":"pt"') + len('"format":"p')
            data[at] = ord("u")  # still valid JSON, still the same tensors: safetensors' metadata changed
            shard.write_bytes(bytes(data))
        else:
            with open(shard, "ab") as f:
                f.write(b"\0")
        bad = run("verify", out, "-q")
        assert bad.returncode == 1 and "MISMATCH" in bad.stdout and shard.name in bad.stdout, (damage, bad.stdout)


def test_shape_beyond_64_bits_is_refused(pair, tmp_path):
    base, ft = pair
    for folder in (base, ft):
        header = json.dumps({"huge.weight": {"dtype": "BF16", "shape": [0, 2**70], "data_offsets": [0, 0]}}).encode()
        header += b" " * (-len(header) % 8)
        (folder / "zz-huge.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
        index = folder / "model.safetensors.index.json"
        if index.exists():
            doc = json.loads(index.read_text())
            doc["weight_map"]["huge.weight"] = "zz-huge.safetensors"
            index.write_text(json.dumps(doc))
    proc = run_here("merge", base, ft, tmp_path / "out")
    assert_one_line_error(proc, 2, "huge.weight", "corrupt")


# --- 8: side files: no symlink out of the folder, modes kept -----------------------------------------------


def test_side_file_symlink_out_of_the_folder_is_refused(pair, tmp_path):
    base, ft = pair
    secret = tmp_path / "secret"
    secret.write_text("token")
    secret.chmod(0o600)
    (ft / "notes.txt").symlink_to(secret)
    proc = run_here("merge", base, ft, tmp_path / "out")
    assert_one_line_error(proc, 2, "notes.txt", "outside")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_side_files_keep_their_mode_and_inner_links(pair, tmp_path):
    base, ft = pair
    (ft / "tokenizer.json").chmod(0o600)
    (ft / "sub").mkdir()
    (ft / "sub" / "vocab.txt").write_text("a b c")
    (ft / "vocab-link.txt").symlink_to("sub/vocab.txt")  # inside the folder: allowed, copied as a file
    out = tmp_path / "out"
    assert run("merge", base, ft, out, "-q").returncode == 0
    assert stat.S_IMODE((out / "tokenizer.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "config.json").stat().st_mode) == stat.S_IMODE((ft / "config.json").stat().st_mode)
    assert (out / "vocab-link.txt").read_text() == "a b c" and not (out / "vocab-link.txt").is_symlink()


# --- 9: concurrent finishers and a vanished OUT.partial ----------------------------------------------------


def test_out_published_meanwhile_by_the_same_merge(reference, tmp_path, monkeypatch):
    """Another run of the same merge publishes OUT after this one planned: this one discards its partial."""
    base, ft, ref, digest = reference
    out = tmp_path / "out"
    claim = api.claim_partial

    def claim_then_other_finishes(partial: Path, target: Path) -> None:
        claim(partial, target)
        shutil.copytree(ref, target)  # what a concurrent run of the same merge publishes

    monkeypatch.setattr(api, "claim_partial", claim_then_other_finishes)
    summary = streamsoup.merge(base, ft, out, shard_size="100KB")
    assert summary.already_complete and tree_digest(out) == digest
    assert not (tmp_path / "out.partial").exists()


def test_publish_never_replaces_an_existing_out(tmp_path):
    from streamsoup.io import writer

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("new")
    (tmp_path / "b").mkdir()  # empty: os.replace would silently replace it
    assert writer.publish(tmp_path / "a", tmp_path / "b") is False
    assert (tmp_path / "a" / "x").exists() and list((tmp_path / "b").iterdir()) == []
    assert writer.publish(tmp_path / "a", tmp_path / "c") is True and (tmp_path / "c" / "x").exists()


@pytest.mark.slow
def test_partial_removed_mid_run_is_a_clear_error(medium_pair, tmp_path):
    base, ft = medium_pair
    root = tmp_path
    out, partial = root / "out", root / "out.partial"
    proc = start("merge", base, ft, out, "-q")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if len(RunState.read(partial / STATE_NAME).committed()) >= 2:
                break
        except Exception:
            pass
        time.sleep(0.05)
    shutil.rmtree(partial, ignore_errors=True)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    lines = [line for line in err.strip().splitlines() if line.startswith("streamsoup: error")]
    assert len(lines) == 1 and "vanished" in lines[0] and "Traceback" not in err, err
    assert not out.exists()


# --- 10: unbounded or hanging inputs -----------------------------------------------------------------------


def test_yaml_aliases_are_refused(awkward_pair, tmp_path):
    base, ft = awkward_pair
    config = tmp_path / "bomb.yaml"
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    config.write_text("\n".join(lines) + "\nrank_rule: *a8\n")
    proc = run_here("merge", base, ft, tmp_path / "out", "--config", config)
    assert_one_line_error(proc, 2, str(config), "alias")


def test_fifo_shard_is_refused_not_waited_for(pair, tmp_path):
    base, ft = pair
    os.mkfifo(ft / "zz-fifo.safetensors")
    (ft / "model.safetensors.index.json").unlink()
    proc = run_here("merge", base, ft, tmp_path / "out")
    assert_one_line_error(proc, 2, "zz-fifo.safetensors", "not a regular file")


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--threads", "100000"),
        ("--lanes", "100000"),
        ("--threads", "1e400"),
        ("--lanes", "1000"),
        ("--threads", str((os.cpu_count() or 1) + 1)),
    ],
)
def test_thread_counts_are_bounded(awkward_pair, tmp_path, flag, value):
    base, ft = awkward_pair
    proc = run_here("merge", base, ft, tmp_path / "out", flag, value)
    assert_one_line_error(proc, 2, flag)
    assert not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("text", ["threads: 1e400", "threads: 1.0e400", "lanes: .inf", "threads: 100000"])
def test_thread_counts_in_a_config_are_bounded(awkward_pair, tmp_path, text):
    (tmp_path / "c.yaml").write_text(text + "\n")
    proc = run_here("merge", *awkward_pair, tmp_path / "out", "--config", tmp_path / "c.yaml")
    assert_one_line_error(proc, 2, "--" + text.split(":")[0])


@pytest.mark.slow
def test_a_shard_size_that_would_write_thousands_of_files_is_refused(tmp_path):
    from safetensors.torch import save_file

    tensors = {f"layers.{i}.weight": torch.full((2, 2), float(i)) for i in range(10_001)}
    for side in ("base", "ft"):
        (tmp_path / side).mkdir()
        save_file(tensors, tmp_path / side / "model.safetensors")
    proc = run_here("plan", tmp_path / "base", tmp_path / "ft", "--shard-size", "1B")
    assert_one_line_error(proc, 2, "--shard-size 1 B", "10001 files", "5GB")
    proc = run_here("plan", tmp_path / "base", tmp_path / "ft", "--shard-size", "4KB")  # a few hundred files: sane
    assert proc.returncode == 0, proc.stderr


def raw_header(path: Path, header: str, data: bytes = b"\0" * 4) -> Path:
    raw = header.encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


ENTRY = '"dtype": "F32", "shape": [1], "data_offsets": [0, 4]'
HOSTILE_HEADERS = {
    "nested 100,000 deep": "[" * 100_000 + "]" * 100_000,
    "a dtype that is a list": '{"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}',
    "Infinity in a shape": '{"w": {"dtype": "F32", "shape": [Infinity], "data_offsets": [0, 4]}}',
    "a float in a shape": '{"w": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}}',
    "true in a shape": '{"w": {"dtype": "F32", "shape": [true], "data_offsets": [0, 4]}}',
    "__metadata__ an int": '{"__metadata__": 5, "w": {' + ENTRY + "}}",
    "__metadata__ a string": '{"__metadata__": "abc", "w": {' + ENTRY + "}}",
    "__metadata__ not of strings": '{"__metadata__": {"a": {"b": 1}}, "w": {' + ENTRY + "}}",
    "a tensor named twice": '{"w": {' + ENTRY + '}, "w": {' + ENTRY + "}}",
}


@pytest.mark.parametrize("case", sorted(HOSTILE_HEADERS))
def test_hostile_headers_are_refused_as_corrupt(awkward_pair, tmp_path, case):
    shard = raw_header(tmp_path / "x.safetensors", HOSTILE_HEADERS[case])
    proc = run_here("plan", awkward_pair[0], shard)
    assert_one_line_error(proc, 2, "x.safetensors", "corrupt")


# --- 11: found up front, worded right -------------------------------------------------------------------


def test_unreadable_side_files_are_found_before_any_work(pair, tmp_path):
    base, ft = pair
    (ft / "tokenizer.json").unlink()
    (ft / "tokenizer.json").symlink_to("missing-blob")  # inside the folder, but nothing to read
    proc = run_here("merge", base, ft, tmp_path / "out")
    assert_one_line_error(proc, 2, "tokenizer.json", "cannot read")
    assert not (tmp_path / "out.partial").exists()
    (ft / "tokenizer.json").unlink()
    os.mkfifo(ft / "tokenizer.json")
    assert_one_line_error(run_here("merge", base, ft, tmp_path / "out"), 2, "tokenizer.json", "regular")


def test_read_only_parent_says_nothing_was_written(awkward_pair, tmp_path):
    base, ft = awkward_pair
    with small_disk(tmp_path / "ro", "64m") as disk:
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        proc = run("merge", base, ft, disk / "out")
        assert_one_line_error(proc, 1, "nothing was written", str(disk / "out.partial"))
        assert "kept" not in proc.stderr


def test_side_file_copy_on_a_full_disk_names_the_output(tmp_path):
    from streamsoup.io.sidefiles import copy_side_files, side_files

    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer.json").write_bytes(b"t" * 300_000)
    with small_disk(tmp_path / "full", "100k") as disk:
        with pytest.raises(OSError) as info:
            copy_side_files(side_files(src), disk)
        assert info.value.filename == str(disk / "tokenizer.json")


def test_report_png_paths(reference, tmp_path):
    pytest.importorskip("matplotlib")
    _, _, ref, _ = reference
    folder = tmp_path / "figs"
    folder.mkdir()
    assert_one_line_error(run_here("report", ref, "--png", folder), 2, "is a folder")
    assert list(folder.iterdir()) == []
    missing = tmp_path / "nonexistent" / "dir" / "x.png"
    assert_one_line_error(run_here("report", ref, "--png", missing), 2, "does not exist")
    assert not (tmp_path / "nonexistent").exists()


def test_a_task_of_an_attempt_that_is_over_writes_nothing(tmp_path):
    """A worker frozen mid-task, taken out of its cluster, may wake after its merge ended and another began on the
    same OUT.partial: its task's next write to a slot or to the state is refused, the new attempt's files intact."""
    from streamsoup.io.layout import ShardLayout, TensorSpec
    from streamsoup.io.runlock import RunLock
    from streamsoup.io.tensorprogress import TensorProgress
    from streamsoup.io.writer import OutputFiles, preallocate, write_tensor

    partial = tmp_path / "out.partial"
    layout = ShardLayout.plan([TensorSpec("w", "F32", (4, 4))], 1 << 20)
    placement = layout.placements["w"]
    with RunLock(partial) as first:
        preallocate(layout, partial)
        old = first.fence()
        with OutputFiles(partial, fence=old) as files:  # while its attempt holds OUT.partial, the task writes
            write_tensor(files, placement, torch.ones(4, 4))
    shard = partial / placement.file
    with RunLock(partial) as second:  # the next attempt (a rerun), its own line in the lock
        assert second.fence() != old
        before = shard.read_bytes()
        with pytest.raises(RunError, match="is over"), OutputFiles(partial, fence=old) as files:
            write_tensor(files, placement, torch.zeros(4, 4))
        assert shard.read_bytes() == before
        with pytest.raises(RunError, match="is over"):
            TensorProgress(tmp_path / "state", "w", old)
        assert not (tmp_path / "state").exists(), "the state is not made anew by the stale task"
        with OutputFiles(partial, fence=second.fence()) as files:
            write_tensor(files, placement, torch.zeros(4, 4))
    shutil.rmtree(partial)
    with pytest.raises(RunError, match="is over"), OutputFiles(partial, fence=old) as files:  # published, gone
        write_tensor(files, placement, torch.zeros(4, 4))
