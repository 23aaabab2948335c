"""The run options: one dataclass is the single source of truth for CLI flags, YAML keys and the API."""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import regex
import yaml

from .errors import OptionError, UsageError
from .paths import expand_path
from .units import parse_size

#: the most lanes or threads asked for (more would only exhaust the process's threads)
MAX_WORKERS = 1024
#: where `--dashboard` without an address serves: this machine only
DASHBOARD = "127.0.0.1:8787"
#: the largest --config file read
MAX_CONFIG = 1 << 20


@dataclass(frozen=True)
class EditOptions:
    """How a tensor is edited: the part of MergeOptions that every task is sent (checked by MergeOptions)."""

    rank_rule: str
    energy: float
    min_rel_update: float
    spectral: str
    allow_nonfinite: bool


def _opt(
    default: Any,
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    size: bool = False,
    path: bool = False,
    output: bool = True,
    plan: bool = True,
    shown: str | None = None,
    const: str | None = None,
    patterns: bool = False,
) -> Any:
    """A field with the metadata the CLI builds its flags from.

    `output`: changes the result bytes (part of the resume fingerprint); `plan`: `streamsoup plan`
    uses it too; `shown`: the default as the help text shows it ("" for none); `const`: the flag's value
    when given without one (`--dashboard`); `patterns`: a list of regular expressions, the flag repeatable.
    """
    meta = {
        "help": help,
        "choices": choices,
        "size": size,
        "path": path,
        "output": output,
        "plan": plan,
        "shown": shown,
        "const": const,
        "patterns": patterns,
    }
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class MergeOptions:
    """How to merge; every field is a `--flag` of `streamsoup merge` and a key of a `--config` YAML."""

    rank_rule: str = _opt(
        "entropy", "how k, the number of high-energy directions, is chosen", choices=("entropy", "energy")
    )
    energy: float = _opt(0.8, "energy share R kept in the top-k directions under --rank-rule energy")
    min_rel_update: float = _opt(1e-6, "tensors whose ||dW||/||W0|| is below this are copied from the fine-tune")
    shard_size: int = _opt(5 * 10**9, "largest output shard, e.g. 5GB or 2GiB", size=True)
    save: str = _opt(
        "model",
        "what OUT holds: the merged model, or (FINETUNED a LoRA adapter) a PEFT adapter of the same ranks",
        choices=("model", "adapter"),
    )
    dtype: str = _opt(
        "keep",
        "dtype of OUT's float tensors: keep (each the fine-tune's), or bf16, fp16, fp32 for all of them; edited ones "
        "are the float64 result rounded once (to nearest, ties to even; a LoRA merge's 16-bit product in float32, "
        "within one rounding), copied ones the fine-tune's values converted once",
        choices=("keep", "bf16", "fp16", "fp32"),
    )
    spectral: str = _opt(
        "auto",
        "how the spectrum is computed: exact Gram eigendecomposition, full SVD, or auto (fastest exact path)",
        choices=("auto", "gram", "svd"),
    )
    max_ram: int | None = _opt(
        None,
        "peak resident memory of the whole run, e.g. 8GiB; at most the machine's memory",
        size=True,
        output=False,
        shown="70%% of the memory available at start",
    )
    max_vram: int | None = _opt(
        None,
        "GPU memory per GPU, shared by its two lanes, e.g. 40GiB",
        size=True,
        output=False,
        shown="90%% of what is free",
    )
    devices: str = _opt(
        "auto",
        "auto | cpu | cuda | cuda:0,cuda:1: GPUs get two lanes each (one computes while the other reads or "
        "writes); auto = every GPU torch sees, plus CPU lanes",
        output=False,
    )
    lanes: int = _opt(
        0,
        "CPU lanes: tensors processed at once on the host",
        output=False,
        shown="one per core, each with one thread (1 beside GPU lanes, except for a LoRA adapter)",
    )
    threads: int = _opt(
        0, "torch threads per lane", output=False, shown="cores / lanes; a resume keeps the first run's"
    )
    scheduler: str = _opt(
        "",
        "address of a running dask.distributed scheduler (tcp://host:port); workers need nothing declared, "
        "only a filesystem shared with this machine (see README)",
        output=False,
        plan=False,
        shown="an embedded local cluster",
    )
    scheduler_file: str = _opt(
        "",
        "a scheduler file written by `dask scheduler --scheduler-file` or dask-mpi (instead of --scheduler)",
        path=True,
        output=False,
        plan=False,
        shown="",
    )
    dashboard: str = _opt(
        "",
        "serve dask's dashboard of a local merge at ADDR (host:port) and print its URL; needs bokeh "
        "(pip install 'streamsoup[dashboard]'). A cluster's scheduler serves its own",
        output=False,
        plan=False,
        shown="none: a local merge listens on no network port",
        const=DASHBOARD,
    )
    checkpoint_seconds: float = _opt(
        60.0, "how often a streamed tensor's partial Gram is saved for resume", output=False, plan=False
    )
    work_dir: str = _opt(
        "", "where the Zarr resume state lives", path=True, output=False, plan=False, shown="inside OUT.partial"
    )
    exclude: tuple[str, ...] = _opt(
        (),
        "leave tensors whose name REGEX finds (Python re.search) unedited: the fine-tune's values, e.g. "
        "'embed_tokens|lm_head' or 'mlp\\.gate\\.' for MoE routers; repeatable",
        patterns=True,
        shown="",
    )
    only: tuple[str, ...] = _opt(
        (),
        "edit only tensors whose name one of these REGEXes finds; the others keep the fine-tune's values; repeatable",
        patterns=True,
        shown="every edit candidate",
    )
    split_fused: bool = _opt(
        False,
        "edit fused projections as their logical matrices: gate_up_proj as gate and up, in_proj_weight and "
        "qkv_proj (as many query as key/value heads) as q, k and v; so a model gives the same numbers whichever "
        "of the two layouts it was saved in",
    )
    base_model_id: str = _opt(
        "",
        "the base model's Hugging Face repo id (org/name) for OUT's model card and adapter config; found without it "
        "when BASE is a repo id or cache snapshot, or named by the adapter's or BASE's config",
        output=False,
        shown="",
    )
    allow_nonfinite: bool = _opt(
        False,
        "copy tensors that hold NaN/Inf unchanged instead of stopping (an edited tensor never holds them)",
        output=False,
        plan=False,
    )

    def __post_init__(self) -> None:
        for f in fields(self):
            choices = f.metadata["choices"]
            if choices and getattr(self, f.name) not in choices:
                allowed = ", ".join(choices[:-1]) + f" or {choices[-1]}"
                raise OptionError(f.name, f"must be {allowed}, got {getattr(self, f.name)!r}")
        if not 0.0 < float(self.energy) <= 1.0:
            raise OptionError("energy", f"must be in (0, 1], got {self.energy!r}")
        if not float(self.min_rel_update) >= 0:
            raise OptionError("min_rel_update", f"must be >= 0, got {self.min_rel_update!r}")
        if not 0 <= int(self.lanes) <= MAX_WORKERS:
            raise OptionError("lanes", f"must be between 1 and {MAX_WORKERS} (0: the default), got {self.lanes!r}")
        if not float(self.checkpoint_seconds) >= 0:
            raise OptionError("checkpoint_seconds", f"must be >= 0, got {self.checkpoint_seconds!r}")
        if not 0 <= int(self.threads) <= MAX_WORKERS:
            raise OptionError("threads", f"must be between 1 and {MAX_WORKERS}, got {self.threads!r}")
        if self.dashboard and (self.scheduler or self.scheduler_file):
            raise OptionError(
                "dashboard",
                "is for a local merge: a cluster's scheduler serves its own dashboard "
                "(dask scheduler --dashboard-address)",
            )
        if self.dashboard and not re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[\w.-]+):\d{1,5}", self.dashboard):
            raise OptionError(
                "dashboard",
                f"must be host:port, e.g. {DASHBOARD} (a host is needed: without one dask "
                f"listens on every interface; 0.0.0.0:PORT says so), got {self.dashboard!r}",
            )
        if self.dashboard and importlib.util.find_spec("bokeh") is None:
            raise OptionError("dashboard", "needs bokeh, which is not installed: pip install 'streamsoup[dashboard]'")
        if self.scheduler and self.scheduler_file:
            raise OptionError("scheduler_file", "and scheduler name two clusters; give one of them")

    @classmethod
    def create(cls, config: str | Path | None = None, **overrides: Any) -> MergeOptions:
        """Options from an optional YAML file, then explicit overrides (None means 'not given')."""
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        if config:
            for key, value in load_config(config).items():
                name = key.replace("-", "_")
                if name not in known:
                    valid = ", ".join(n.replace("_", "-") for n in known)
                    raise UsageError(
                        f"--config {expand_path(config)}: unknown key {key!r}"
                        f"{_nearest(name, known, True)}; valid keys: {valid}"
                    )
                values[name] = value
        for name, value in overrides.items():
            if name not in known:
                raise OptionError(name, f"is not an option{_nearest(name, known, False)}; valid: {', '.join(known)}")
            if value is not None:
                values[name] = value
        typed: dict[str, Any] = {}
        for name, value in values.items():
            typed[name] = _coerce(known[name], value)
        return cls(**typed)

    @property
    def edit(self) -> EditOptions:
        """The options a task's arithmetic reads: all a task receives of them."""
        return EditOptions(self.rank_rule, self.energy, self.min_rel_update, self.spectral, self.allow_nonfinite)

    @classmethod
    def for_plan(cls, config: str | Path | None = None, **given: Any) -> MergeOptions:
        """Options of `streamsoup plan`, which plans a merge on this machine: an option only a merge uses is
        refused by name, as plan would silently ignore it."""
        options = cls.create(config, **given)
        plan_names = {f.name for f in cls.plan_fields()}
        unused = [name for name, value in given.items() if value not in (None, "", False) and name not in plan_names]
        if unused:
            raise OptionError(
                unused[0],
                "is not used by plan, which plans a merge on this machine from the headers alone; leave it out",
            )
        return options

    def output_fingerprint(self) -> dict[str, Any]:
        """The options that change the output bytes (lane and thread counts do not), as JSON keeps them."""
        output = {f.name for f in fields(self) if f.metadata["output"]}
        return {k: v for k, v in self.as_dict().items() if k in output}

    def as_dict(self) -> dict[str, Any]:
        """Every option as JSON keeps it (patterns as lists), so a stored copy compares equal."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def kept_by(self, name: str, deadline: float) -> str:
        """Why --exclude / --only keep tensor `name` unedited ("" when they let it be edited); `deadline`
        (time.monotonic()) bounds all the matching of a plan."""
        for pattern in self.exclude:
            if pattern_finds(pattern, name, deadline, "exclude"):
                return f"kept unedited: --exclude {pattern!r}"
        if self.only and not any(pattern_finds(p, name, deadline, "only") for p in self.only):
            return "kept unedited: matches no --only pattern"
        return ""

    @classmethod
    def plan_fields(cls) -> list[dataclasses.Field]:
        """The options `streamsoup plan` uses; the others it rejects rather than ignores."""
        return [f for f in fields(cls) if f.metadata["plan"]]


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    if f.metadata.get("patterns"):
        return _patterns(f.name, value)
    if f.metadata.get("size"):
        return None if value in (None, "auto") else parse_size(value, f.name)
    if f.metadata.get("path"):
        return str(expand_path(value, "--" + f.name.replace("_", "-"))) if value else ""
    kind = type(f.default)
    if kind is str:
        return str(value)
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise OptionError(f.name, f"must be true or false, got {value!r}")
    try:
        return kind(value)
    except (TypeError, ValueError, OverflowError):
        noun = {int: "an integer", float: "a number"}.get(kind, f"a {kind.__name__}")
        raise OptionError(f.name, f"must be {noun}, got {value!r}") from None


#: the longest pattern of --exclude / --only (a tensor name is a few hundred characters at most)
MAX_PATTERN = 1000
#: seconds one --exclude / --only pattern may take on one tensor name, and all of them on a whole plan
PATTERN_SECONDS = 1.0
PATTERNS_SECONDS = 10.0


def pattern_finds(pattern: str, name: str, deadline: float, option: str) -> bool:
    """regex.search under a time limit: a pattern that backtracks for ever is refused by name, not a hang."""
    left = deadline - time.monotonic()
    try:
        if left <= 0:
            raise TimeoutError
        return regex.search(pattern, name, timeout=min(PATTERN_SECONDS, left)) is not None
    except TimeoutError:
        raise OptionError(
            option,
            f"{pattern!r} takes too long to match the tensor names (more than {PATTERNS_SECONDS:g} s in all, or "
            f"{PATTERN_SECONDS:g} s on {name!r}): simplify it",
        ) from None


def _patterns(name: str, value: Any) -> tuple[str, ...]:
    """A regular expression or a list of them, each compiled once to refuse a broken one by name."""
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
        raise OptionError(name, f"must be a regular expression or a list of them, got {value!r}")
    for pattern in values:
        if not pattern or len(pattern) > MAX_PATTERN:
            raise OptionError(name, f"must be a non-empty regular expression of at most {MAX_PATTERN} characters")
        try:
            regex.compile(pattern)
        except (regex.error, ValueError, OverflowError, RecursionError) as exc:
            raise OptionError(name, f"{pattern!r} is not a valid regular expression ({exc})") from None
    return tuple(values)


class YamlAlias(ValueError):
    """A YAML text with an alias: refused, since nested aliases expand exponentially."""


class YamlTooDeep(ValueError):
    """A YAML text nested deeper than YAML_MAX_DEPTH: refused, since yaml's loader recurses that deep."""


#: nesting of mappings and sequences in a YAML text (an options file or a card's front matter nests 1 to 3 deep)
YAML_MAX_DEPTH = 64


def yaml_without_aliases(text: str) -> Any:
    """yaml.safe_load, refusing anchors and aliases (YamlAlias) and deep nesting (YamlTooDeep), both seen in one
    pass over the parser's events (which does not recurse); a YAML error is yaml.YAMLError."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent):
            raise YamlAlias("a YAML alias")
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > YAML_MAX_DEPTH:
                raise YamlTooDeep(f"nests deeper than {YAML_MAX_DEPTH} levels")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
    return yaml.safe_load(text)


def load_config(path: str | Path) -> dict[str, Any]:
    """A YAML mapping of options; anchors and aliases are refused (nested aliases expand exponentially)."""
    path = expand_path(path, "--config")
    try:
        if os.path.getsize(path) > MAX_CONFIG:
            raise UsageError(f"--config {path} is larger than {MAX_CONFIG // 1024} KiB; an options file is a few lines")
        data = yaml_without_aliases(path.read_text())
    except YamlAlias:
        raise UsageError(f"--config {path} uses a YAML alias (*name); write each value out instead") from None
    except YamlTooDeep as exc:
        raise UsageError(f"--config {path} {exc}; an options file is a flat mapping of option: value") from None
    except OSError as exc:
        raise UsageError(f"cannot read --config {path}: {exc.strerror}") from None
    except (yaml.YAMLError, ValueError) as exc:  # UnicodeDecodeError; an int of more digits than Python converts
        raise UsageError(f"--config {path} is not valid YAML: {exc}".splitlines()[0][:300]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"--config {path} must be a mapping of option: value")
    return {str(k): v for k, v in data.items()}


def _nearest(name: str, known: Iterable[str], dashed: bool) -> str:
    """' (did you mean 'rank-rule'?)' for a misspelt option ('rank_rule' for the API); '' when none is close."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    if not close:
        return ""
    suggestion = close[0].replace("_", "-") if dashed else close[0]
    return f" (did you mean {suggestion!r}?)"
