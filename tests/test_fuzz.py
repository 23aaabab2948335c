"""No input reaches an internal error: random mutations of real safetensors headers and torch.save pickles are
either read or refused as corrupt (InputError), never anything else. Bounded: a few hundred examples each."""

from __future__ import annotations

import functools
import io
import json
import math
import os
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamsoup.errors import InputError
from streamsoup.io.checkpoint import read_header
from streamsoup.io.dtypes import ITEM_SIZE
from streamsoup.sources.pickled import read_pickle_shard

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

#: what a hostile header puts where a value belongs
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


def real_header(awkward_pair) -> tuple[dict, bytes]:
    shard = sorted(Path(awkward_pair[1]).glob("*.safetensors"))[0]
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def mutate(header: dict, data: st.DataObject) -> dict:
    """Replace, drop or add one field somewhere in the header."""
    header = json.loads(json.dumps(header))
    names = sorted(header)
    name = data.draw(st.sampled_from(names))
    action = data.draw(st.sampled_from(["value", "field", "drop", "add", "entry", "metadata"]))
    if action == "entry":
        header[name] = data.draw(JSON_VALUES)
    elif action == "metadata":
        header["__metadata__"] = data.draw(JSON_VALUES)
    elif action == "add":
        header[data.draw(st.text(max_size=6))] = data.draw(JSON_VALUES)
    elif isinstance(header[name], dict) and header[name]:
        key = data.draw(st.sampled_from(sorted(header[name]) + ["dtype", "shape", "data_offsets"]))
        if action == "drop":
            header[name].pop(key, None)
        elif action == "field" and isinstance(header[name].get(key), list) and header[name][key]:
            i = data.draw(st.integers(0, len(header[name][key]) - 1))
            header[name][key][i] = data.draw(JSON_VALUES)
        else:
            header[name][key] = data.draw(JSON_VALUES)
    return header


def encode(header: dict) -> bytes:
    text = json.dumps(header, allow_nan=True)  # NaN/Infinity as a careless writer would emit them
    return text.encode()


@FUZZ
@given(data=st.data())
def test_mutated_safetensors_headers_are_read_or_refused(awkward_pair, tmp_path, data):
    header, payload = real_header(awkward_pair)
    raw = encode(mutate(header, data))
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + payload)
    try:
        shard = read_header(path)
    except InputError:
        return
    for ref in shard.tensors:  # what is accepted is what a loader accepts: bounded, consistent, in the file
        assert all(type(d) is int and d >= 0 for d in ref.shape) and ref.offset + ref.nbytes <= shard.size
        assert isinstance(ref.dtype, str) and ref.nbytes == math.prod(ref.shape) * ITEM_SIZE[ref.dtype]


@FUZZ
@given(raw=st.binary(max_size=200))
def test_arbitrary_header_bytes_are_refused_cleanly(tmp_path, raw):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    try:
        read_header(path)  # random bytes that happen to be a valid (empty) header are fine
    except InputError:
        pass


@functools.cache
def small_pickle() -> bytes:
    """One real torch.save zip (made once: saving it again for every example was most of the fuzzer's time)."""
    buf = io.BytesIO()
    torch.save({"w": torch.randn(4, 3), "b": torch.arange(3), "t": torch.randn(3, 4).T}, buf)
    return buf.getvalue()


@FUZZ
@given(data=st.data())
def test_mutated_torch_save_pickles_are_read_or_refused(tmp_path, data):
    """Flip, drop or insert bytes of data.pkl (the zip is rebuilt around it, so the pickle is what is fuzzed)."""
    original = small_pickle()
    with zipfile.ZipFile(io.BytesIO(original)) as zin:
        entries = [(i, zin.read(i)) for i in zin.infolist()]
    pkl_index = next(k for k, (i, _) in enumerate(entries) if i.filename.endswith("data.pkl"))
    pkl = bytearray(entries[pkl_index][1])
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(pkl) - 1))
        op = data.draw(st.sampled_from(["flip", "drop", "insert"]))
        if op == "flip":
            pkl[at] ^= data.draw(st.integers(1, 255))
        elif op == "drop":
            del pkl[at]
        else:
            pkl.insert(at, data.draw(st.integers(0, 255)))
    out = tmp_path / "fuzz.pt"
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for k, (info, body) in enumerate(entries):
            zout.writestr(info, bytes(pkl) if k == pkl_index else body)
    try:
        shard, _ = read_pickle_shard(out)
    except InputError:
        return
    for ref in shard.tensors:
        assert ref.offset + ref.span <= shard.size


def _depth(value) -> int:
    """Nesting of lists and dicts, written here from the definition (not the package's bracket count)."""
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


#: strings full of what a bracket counter could mistake for structure
TRICKY_TEXT = st.text(alphabet='[]{}"\\\n ab', max_size=8)
NESTED = st.recursive(
    st.none() | st.integers() | TRICKY_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TRICKY_TEXT, inner, max_size=3),
    max_leaves=40,
)


@FUZZ
@given(value=NESTED, ascii_only=st.booleans(), indent=st.sampled_from([None, 1]))
def test_json_nesting_is_measured_before_parsing_exactly(tmp_path, monkeypatch, value, ascii_only, indent):
    """The depth streamsoup measures before it parses a JSON file is the document's depth, for any strings in it,
    however its brackets are cut into pieces; past the limit the file is refused as nested too deep, never parsed."""
    from streamsoup.io import jsonfile
    from streamsoup.io.jsonfile import MAX_DEPTH, JsonFileError, nesting, read_json

    text = json.dumps(value, ensure_ascii=ascii_only, indent=indent)
    assert nesting(text) == _depth(value)
    with monkeypatch.context() as m:
        m.setattr(jsonfile, "NESTING_PIECE", 3)
        assert nesting(text) == _depth(value)
    wrap = MAX_DEPTH - _depth(value)  # lists around it: the document exactly as deep as allowed
    expected = value
    for _ in range(wrap):
        expected = [expected]
    deep = tmp_path / "deep.json"
    deep.write_text("[" * wrap + text + "]" * wrap)
    assert read_json(deep, 1 << 20) == expected
    deep.write_text("[" * (wrap + 1) + text + "]" * (wrap + 1))
    with pytest.raises(JsonFileError, match="nests"):
        read_json(deep, 1 << 20)


PICKLED_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=6)
    | st.binary(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=4), inner, max_size=4)
        | st.frozensets(st.integers(min_value=-(2**61 - 2), max_value=2**61 - 2), max_size=3)
    ),  # hashed: no int of 61
    max_leaves=30,  # bits or more (refused by design: such keys can share one hash; tests/test_pickled.py)
)


@FUZZ
@given(value=PICKLED_VALUES, protocol=st.integers(min_value=0, max_value=5), shared=st.booleans())
def test_pickle_shapes_pass_what_python_pickles_and_refuse_nesting_past_the_limit(value, protocol, shared):
    """Whatever plain values pickle writes, in every protocol (memo references included: `shared`), the opcodes
    run on sizes accept them; the same value 65 levels down is refused, never unpickled."""
    import pickle

    from streamsoup.sources.pickleshape import MAX_DEPTH, PickleShapeError, check_pickle_shape

    value = [value, value] if shared else value
    check_pickle_shape(pickle.dumps(value, protocol=protocol))
    deep = value
    for _ in range(MAX_DEPTH + 1):
        deep = [deep]
    with pytest.raises(PickleShapeError, match="nested deeper"):
        check_pickle_shape(pickle.dumps(deep, protocol=protocol))


def test_a_pickle_of_more_objects_than_the_limit_is_refused_before_loading(monkeypatch):
    """The count of objects a pickle creates is bounded (memory: a 10 KB deflated pickle of 10 M opcodes took
    2.5 GB); here the limit is lowered so that a pickle of a few thousand objects shows the mechanism."""
    import pickle

    from streamsoup.sources import pickleshape

    monkeypatch.setattr(pickleshape, "MAX_OBJECTS", 1000)
    pickleshape.check_pickle_shape(pickle.dumps([None] * 900, protocol=2))
    with pytest.raises(pickleshape.PickleShapeError, match="more than 1000 objects"):
        pickleshape.check_pickle_shape(pickle.dumps([None] * 1100, protocol=2))


@pytest.fixture(scope="session")
def plain_lora(tmp_path_factory) -> tuple[Path, Path]:
    import make_adapters
    from conftest import made_once, paths

    make = lambda folder: [str(p) for p in make_adapters.make(folder, "llama", "plain")]  # noqa: E731
    return paths(*made_once(tmp_path_factory, "adapter-llama-plain", make))  # the one test_adapters makes


#: the keys of adapter_config.json that streamsoup reads or refuses
ADAPTER_KEYS = [
    "r",
    "lora_alpha",
    "rank_pattern",
    "alpha_pattern",
    "use_rslora",
    "fan_in_fan_out",
    "target_modules",
    "peft_type",
    "init_lora_weights",
    "lora_bias",
    "use_dora",
    "modules_to_save",
    "loftq_config",
    "base_model_name_or_path",
    "layers_to_transform",
    "task_type",
]
#: each example plans in this process (~0.2 s); a longer hunt: STREAMSOUP_FUZZ_ADAPTERS=1000 pytest -k adapter_configs
ADAPTER_EXAMPLES = int(os.environ.get("STREAMSOUP_FUZZ_ADAPTERS", "30"))
PATTERNS = st.dictionaries(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz_.*+()[]|?0123456789\\", max_size=10), JSON_VALUES, max_size=3
)


@settings(max_examples=ADAPTER_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_adapter_configs_plan_or_are_refused_in_one_line(plain_lora, tmp_path, data):
    """Any value under any key of adapter_config.json (or a key removed): `plan` works or says in one line, exit 2,
    what is wrong; never an internal error."""
    import shutil
    import tempfile

    from helpers import assert_one_line_error, run_here

    base, adapter = plain_lora
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    shutil.copy(adapter / "adapter_model.safetensors", folder)
    config = json.loads((adapter / "adapter_config.json").read_text())
    key = data.draw(st.sampled_from(ADAPTER_KEYS))
    if data.draw(st.booleans()):
        config.pop(key, None)
    else:
        config[key] = data.draw(PATTERNS if key.endswith("_pattern") else JSON_VALUES)
    (folder / "adapter_config.json").write_text(json.dumps(config, allow_nan=True))
    proc = run_here("plan", base, folder)
    if proc.returncode != 0:
        assert_one_line_error(proc, 2)
