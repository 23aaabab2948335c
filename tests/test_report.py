"""`streamsoup report`, its figure, and the Python API (plan, status, verify, report) against the CLI.

The numbers the report shows are checked against the rows of streamsoup_report.json, grouped here by
a kind table written out per architecture (not streamsoup's own classifier), and with the statistics
computed here.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

import make_adapters
import numpy as np
import pytest
from helpers import REPORT, assert_one_line_error, run

import streamsoup
from streamsoup.errors import UsageError
from streamsoup.reporting import RunReport
from streamsoup.reporting.kinds import locate

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

#: the kind of each matrix of the awkward generated pair, by the module name before `.weight`
AWKWARD_KINDS = {
    "q_proj": "q",
    "k_proj": "k",
    "v_proj": "v",
    "o_proj": "o",
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
    "embed_tokens": "embed",
    "patch_embed.proj": "embed",
    "lm_head": "lm_head",
    "linear": "other",
    "wide": "other",
    "score": "other",
    "position_ids": "other",
    "empty_buffer": "other",
}


def kind_of(name: str, table: dict[str, str]) -> str:
    module = name.removesuffix(".weight")
    return next(kind for suffix, kind in table.items() if module.endswith(suffix))


def expected_modules(rows: list[dict], table: dict[str, str]) -> dict[str, dict]:
    """Per kind, from the report's rows: matrix count, edited count, median/min/max of each statistic."""
    out: dict[str, dict] = {}
    for row in rows:
        if len(row["shape"]) < 2:
            continue
        entry = out.setdefault(kind_of(row["name"], table), {"tensors": 0, "edited": 0, "values": []})
        entry["tensors"] += 1
        if row["action"] == "edit":
            entry["edited"] += 1
            entry["values"].append(
                {
                    "k_rank": row["k"] / row["rank"],
                    "P_k": row["P_k"],
                    "lambda_high": row["lambda_high"],
                    "lambda_low": row["lambda_low"],
                }
            )
    for entry in out.values():
        values = entry.pop("values")
        for stat in ("k_rank", "P_k", "lambda_high", "lambda_low"):
            xs = [v[stat] for v in values]
            entry[stat] = {"median": statistics.median(xs), "min": min(xs), "max": max(xs)} if xs else None
    return out


def table_line(text: str, kind: str) -> str:
    return next(line for line in text.splitlines() if re.match(rf"{kind}\s+\d", line))


def assert_report_matches(out: Path, table: dict[str, str], kinds: set[str]) -> dict:
    """`report OUT` and `report OUT --json` show the numbers of the report file's rows, for every kind."""
    text = run("report", out)
    assert text.returncode == 0, text.stderr
    as_json = run("report", out, "--json")
    assert as_json.returncode == 0, as_json.stderr
    doc = json.loads(as_json.stdout)
    rows = json.loads((out / REPORT).read_text())["tensors"]
    expected = expected_modules(rows, table)
    assert set(doc["modules"]) == set(expected) == kinds
    for kind, want in expected.items():
        got = doc["modules"][kind]
        assert got["tensors"] == want["tensors"] and got["edited"] == want["edited"], kind
        line = table_line(text.stdout, kind)
        assert line.split()[1:3] == [str(want["tensors"]), str(want["edited"])], line
        for stat in ("k_rank", "P_k", "lambda_high", "lambda_low"):
            if want[stat] is None:
                assert got[stat] is None
                continue
            assert got[stat] == pytest.approx(want[stat], rel=1e-12, abs=0), (kind, stat)
            assert f"{want[stat]['median']:.3f}" in line, (kind, stat, line)
    assert RunReport.from_dict(doc).as_dict() == doc  # --json round-trips
    assert str(RunReport.from_dict(doc)) == text.stdout.rstrip("\n")
    return doc


def assert_png(path: Path) -> None:
    """A PNG that decodes, with lines and text on it (not a blank canvas)."""
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_MAGIC
    pixels = imread(path)[..., :3]
    assert pixels.shape[0] > 400 and pixels.shape[1] > 600
    ink = (pixels < 0.9).any(axis=-1).mean()
    colors = len(np.unique((pixels * 255).astype(np.uint8).reshape(-1, 3), axis=0))
    assert ink > 0.02 and colors > 20, (ink, colors)


@pytest.fixture(scope="module")
def merged(awkward_pair, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "out"
    assert run("merge", *awkward_pair, out, "-q").returncode == 0
    return out


def test_report_on_the_awkward_pair(merged, tmp_path):
    doc = assert_report_matches(
        merged, AWKWARD_KINDS, {"q", "k", "v", "o", "gate", "up", "down", "embed", "lm_head", "other"}
    )
    s, rows = doc["summary"], json.loads((merged / REPORT).read_text())["tensors"]
    edited = sum(r["action"] == "edit" for r in rows)
    assert (s["tensors"], s["edited"], s["copied"], s["dropped"]) == (len(rows), edited, len(rows) - edited, 1)
    assert s["copied_because"]["1-D tensor"] == sum(len(r["shape"]) == 1 for r in rows)
    assert "shape differs from base" not in s["copied_because"], "a resized vocabulary is edited"
    assert f"copied    {len(rows) - edited}: " in run("report", merged).stdout
    assert {o["name"] for o in doc["outliers"]} >= {"model.layers.0.mlp.up_proj.weight"}  # its update is zero
    resized = {o["name"] for o in doc["outliers"] if o["why"].startswith("a resized vocabulary: ")}
    assert resized == {r["name"] for r in rows if "added rows kept" in r["reason"]} and len(resized) == 2
    inputs = doc["inputs"]
    assert inputs["base"]["path"] == str(Path(doc["base"])) and Path(inputs["base"]["path"]).is_absolute()
    assert re.fullmatch(r"[0-9a-f]{12}", inputs["finetuned"]["fingerprint"])
    assert doc["streamsoup"] == streamsoup.__version__ and doc["options"]["rank_rule"] == "entropy"
    assert doc["machine"]["cpus"] >= 1 and re.match(r"\d+ CPU lane", doc["machine"]["lanes"])
    assert doc["run"]["started_at"] <= doc["run"]["finished_at"] and len(doc["run"]["attempts"]) == 1
    with np.load(merged / "streamsoup_spectra.npz") as spectra:  # every edited tensor's singular values
        edited = [r for r in doc["tensors"] if r["action"] == "edit"]
        assert sorted(spectra.files) == sorted(r["name"] for r in edited)
        for r in edited:
            assert spectra[r["name"]].shape == (r["rank"],) and np.all(np.diff(spectra[r["name"]]) <= 0)
    png = tmp_path / "fig" / "r.png"
    png.parent.mkdir()  # the figure goes into an existing folder (report makes none)
    proc = run("report", merged, "--png", png)
    assert proc.returncode == 0 and f"figure written to {png}" in proc.stderr
    assert_png(png)


def test_report_of_an_interrupted_run_shows_the_tensors_done(awkward_pair, tmp_path):
    out = tmp_path / "out"
    killed = run(
        "merge", *awkward_pair, out, "--work-dir", tmp_path / "state", "-q", env={"STREAMSOUP_FAULT": "commit:9"}
    )
    assert killed.returncode != 0
    status = json.loads(run("status", out, "--json").stdout)
    total = status["tensors_total"]
    assert status["tensors_done"] == 8
    proc = run("report", out)
    assert proc.returncode == 0, proc.stderr
    for where in (tmp_path / "out.partial", tmp_path / "state"):  # the same run, found from its other folders
        assert str(streamsoup.report(where)) == proc.stdout.rstrip("\n")
    assert f"report    {out} (interrupted: 8 of {total} tensors done" in proc.stdout
    assert f"remaining {total - 8} tensor(s)" in proc.stdout
    assert "rerun the same `streamsoup merge`" in proc.stdout
    doc = streamsoup.report(out, png=tmp_path / "p.png").as_dict()
    assert doc["state"] == "interrupted" and len(doc["tensors"]) == 8
    assert doc["remaining"] == status["remaining"]
    assert doc["run"]["finished_at"] is None and doc["run"]["last_commit_at"]
    assert_png(tmp_path / "p.png")
    assert run("merge", *awkward_pair, out, "--work-dir", tmp_path / "state", "-q").returncode == 0
    final = json.loads((out / REPORT).read_text())
    assert len(final["run"]["attempts"]) == 2 and final["summary"]["tensors_done"] == total


def test_report_on_a_real_transformers_merge(tmp_path):
    pytest.importorskip("transformers")
    base, ft = make_adapters.make_finetune(tmp_path / "llama", "llama")
    out = tmp_path / "out"
    assert run("merge", base, ft, out, "-q").returncode == 0
    llama = {
        "q_proj": "q",
        "k_proj": "k",
        "v_proj": "v",
        "o_proj": "o",
        "gate_proj": "gate",
        "up_proj": "up",
        "down_proj": "down",
        "embed_tokens": "embed",
        "lm_head": "lm_head",
    }
    doc = assert_report_matches(out, llama, set(llama.values()))
    assert all(m["edited"] == m["tensors"] for m in doc["modules"].values())  # a full fine-tune edits them all
    assert run("report", out, "--png", tmp_path / "r.png").returncode == 0
    assert_png(tmp_path / "r.png")


def test_report_on_an_adapter_merge(tmp_path):
    pytest.importorskip("peft")
    base, adapter = make_adapters.make(tmp_path / "gpt2", "gpt2", "plain")
    out = tmp_path / "out"
    assert run("merge", base, adapter, out, "-q").returncode == 0
    doc = json.loads(run("report", out, "--json").stdout)
    assert doc["inputs"]["finetuned"]["kind"] == "LoRA adapter"
    assert {k: m["edited"] for k, m in doc["modules"].items() if m["edited"]} == {"qkv": 2, "o": 2, "up": 2, "down": 2}
    assert run("report", out, "--png", tmp_path / "a.png").returncode == 0
    assert_png(tmp_path / "a.png")


def _tiny(arch: str):
    import transformers as tf

    small = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
    if arch in ("llama", "qwen2", "mistral"):
        cls = {
            "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
            "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
            "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        }[arch]
        return cls[1](cls[0](**small, num_key_value_heads=2, tie_word_embeddings=False))
    if arch == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16))
    if arch == "bert":
        return tf.BertForMaskedLM(tf.BertConfig(**small, max_position_embeddings=16))
    if arch == "clip":
        text = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
        vision = dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=16,
            patch_size=8,
        )
        return tf.CLIPModel(tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    if arch == "t5":
        return tf.T5ForConditionalGeneration(
            tf.T5Config(
                vocab_size=64, d_model=32, d_ff=48, d_kv=8, num_layers=2, num_heads=4, tie_word_embeddings=False
            )
        )
    raise ValueError(arch)


#: per architecture: module name (before .weight) -> kind, for every matrix its state dict holds
ARCH_KINDS = {
    "llama": {
        "q_proj": "q",
        "k_proj": "k",
        "v_proj": "v",
        "o_proj": "o",
        "gate_proj": "gate",
        "up_proj": "up",
        "down_proj": "down",
        "embed_tokens": "embed",
        "lm_head": "lm_head",
    },
    "gpt2": {
        "attn.c_attn": "qkv",
        "attn.c_proj": "o",
        "mlp.c_fc": "up",
        "mlp.c_proj": "down",
        "wte": "embed",
        "wpe": "embed",
        "lm_head": "lm_head",
    },
    "bert": {
        "self.query": "q",
        "self.key": "k",
        "self.value": "v",
        "attention.output.dense": "o",
        "intermediate.dense": "up",
        "layer.0.output.dense": "down",
        "layer.1.output.dense": "down",
        "word_embeddings": "embed",
        "position_embeddings": "embed",
        "token_type_embeddings": "embed",
        "transform.dense": "other",
        "predictions.decoder": "lm_head",
    },
    "clip": {
        "q_proj": "q",
        "k_proj": "k",
        "v_proj": "v",
        "out_proj": "o",
        "fc1": "up",
        "fc2": "down",
        "token_embedding": "embed",
        "position_embedding": "embed",
        "patch_embedding": "embed",
        "visual_projection": "other",
        "text_projection": "other",
    },
    "t5": {
        "SelfAttention.q": "q",
        "SelfAttention.k": "k",
        "SelfAttention.v": "v",
        "SelfAttention.o": "o",
        "EncDecAttention.q": "q",
        "EncDecAttention.k": "k",
        "EncDecAttention.v": "v",
        "EncDecAttention.o": "o",
        "relative_attention_bias": "other",
        "DenseReluDense.wi": "up",
        "DenseReluDense.wo": "down",
        "shared": "embed",
        "embed_tokens": "embed",
        "lm_head": "lm_head",
    },
}
ARCH_KINDS["qwen2"] = ARCH_KINDS["mistral"] = ARCH_KINDS["llama"]


@pytest.mark.parametrize("arch", sorted(ARCH_KINDS))
def test_module_kinds_of_real_architectures(arch):
    pytest.importorskip("transformers")
    names = [n for n, t in _tiny(arch).state_dict().items() if t.dim() >= 2]
    got = {n: locate(n).kind for n in names}
    want = {n: kind_of(n, ARCH_KINDS[arch]) for n in names}
    assert got == want
    layered = [n for n in names if locate(n).layer is not None]
    assert {locate(n).layer for n in layered} == {0, 1}


@pytest.mark.slow
def test_api_returns_what_the_cli_prints(merged, awkward_pair, tmp_path):
    assert str(streamsoup.status(merged)) == run("status", merged).stdout.rstrip("\n")
    assert streamsoup.status(merged).as_dict() == json.loads(run("status", merged, "--json").stdout)
    result = streamsoup.verify(merged)
    assert result.ok and str(result) == run("verify", merged, "-q").stdout.rstrip("\n")
    report = streamsoup.report(merged, png=tmp_path / "api.png")
    assert str(report) == run("report", merged).stdout.rstrip("\n")
    assert report.as_dict() == json.loads(run("report", merged, "--json").stdout)
    assert_png(tmp_path / "api.png")
    plan = streamsoup.plan(*awkward_pair, devices="cpu")
    cli = json.loads(run("plan", *awkward_pair, "--devices", "cpu", "--json").stdout)
    mine = plan.as_dict()
    measured = ("estimate",)  # calibration timings and the process's own RSS differ from run to run
    assert {k: v for k, v in mine.items() if k not in measured} == {k: v for k, v in cli.items() if k not in measured}
    stable = ("tensors ", "I/O ", "largest ")
    text = run("plan", *awkward_pair, "--devices", "cpu").stdout.splitlines()
    assert [line for line in str(plan).splitlines() if line.startswith(stable)] == [
        line for line in text if line.startswith(stable)
    ]
    # plan and report share names and structure
    done = report.as_dict()
    assert set(mine["summary"]) >= {"tensors", "edited", "copied", "dropped", "output_bytes"}
    assert [r["name"] for r in mine["tensors"]] == [r["name"] for r in done["tensors"]]
    assert set(mine["modules"]) == set(done["modules"])
    for kind, m in mine["modules"].items():
        assert set(m) - {"edit_candidates"} == set(done["modules"][kind])
        assert m["tensors"] == done["modules"][kind]["tensors"]


def test_png_without_matplotlib_is_one_line(merged, tmp_path):
    """With matplotlib not importable (as on an install without the `report` extra): one line, exit 2, no file."""
    code = (
        "import sys; sys.modules['matplotlib'] = None; from streamsoup.cli import main; "
        f"sys.exit(main(['report', {str(merged)!r}, '--png', {str(tmp_path / 'x.png')!r}]))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert_one_line_error(proc, 2, "--png needs matplotlib", "pip install 'streamsoup[report]'")
    assert proc.stdout == "" and not (tmp_path / "x.png").exists()
    assert run("report", merged).returncode == 0  # the text needs no matplotlib


def test_png_never_replaces_a_file_unless_forced(merged, tmp_path):
    """`--png OUT/model.safetensors` must not destroy the model: an existing file is refused (one line, exit 2,
    its bytes untouched) unless --force, which replaces it whole (the figure is written beside it, then renamed)."""
    shard = sorted(merged.glob("*.safetensors"))[0]
    before = shard.read_bytes()
    assert_one_line_error(run("report", merged, "--png", shard), 2, "already exists", "--force")
    assert shard.read_bytes() == before and run("verify", merged, "-q").returncode == 0
    mine = tmp_path / "figure.png"
    mine.write_bytes(b"a user's file")
    assert_one_line_error(run("report", merged, "--png", mine), 2, str(mine), "already exists")
    assert mine.read_bytes() == b"a user's file"
    with pytest.raises(UsageError, match="already exists"):
        streamsoup.report(merged, png=mine)
    forced = run("report", merged, "--png", mine, "--force")
    assert forced.returncode == 0, forced.stderr
    assert_png(mine)
    streamsoup.report(merged, png=mine, force=True)
    assert_png(mine)


def test_report_errors_are_one_line(tmp_path, merged):
    assert_one_line_error(run("report", tmp_path / "nothing"), 2, "no merge at")
    (tmp_path / "plain").mkdir()
    assert_one_line_error(run("report", tmp_path / "plain"), 2, "is not a streamsoup output")
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / REPORT).write_text("{not json")
    assert_one_line_error(run("report", copy), 2, "is not valid JSON")
