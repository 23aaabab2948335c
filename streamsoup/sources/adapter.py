"""A PEFT LoRA adapter folder as a fine-tune: its config's semantics and its tensors, by base tensor name.

peft's own rules, read from peft's sources (src/peft/tuners/lora/model.py and layer.py): keys
``base_model.model.<module>.lora_A.weight``
[r, in] and ``.lora_B.weight`` [out, r] (embeddings ``lora_embedding_A`` [r, vocab] and
``lora_embedding_B`` [dim, r], delta transposed); scaling alpha / r, or alpha / sqrt(r) with rslora;
per-module r and alpha from ``rank_pattern`` / ``alpha_pattern`` (first key matching
``(.*\\.)?(key)$``); ``lora_B.bias`` with lora_bias; ``lora_magnitude_vector`` with DoRA; full
tensors (modules_to_save, trained biases, the base embedding saved beside an embedding LoRA).
Whatever else in the config would change the weights is refused by name, never ignored.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import regex

from ..errors import InputError
from ..io.binding import file_identity
from ..io.checkpoint import Checkpoint, TensorRef, matrix_shape
from ..io.dtypes import is_float
from ..io.jsonfile import CONFIG_LIMIT, JsonFileError, read_json
from ..numerics.lowrank import BiasUpdate, LoraUpdate

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
#: key suffix -> role of the tensor in its module
PARTS = {
    ".lora_A.weight": "a",
    ".lora_B.weight": "b",
    ".lora_B.bias": "bias",
    ".lora_embedding_A": "a_emb",
    ".lora_embedding_B": "b_emb",
    ".lora_magnitude_vector": "magnitude",
    ".lora_magnitude_vector.weight": "magnitude",
    ".base_layer.weight": "base_copy",
}
#: a LoRA part whose key carries the adapter's name (`lora_A.default.weight`, a PeftModel's own state_dict)
NAMED_PART = re.compile(
    r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)\.([^.]+)"
    r"(\.weight|\.bias)?$"
)
#: the base model's own tensors inside peft's wrappers, which peft's loader skips: never written to OUT
BASE_OWN = re.compile(r"\.original_module\.|\.base_layer\.bias$")
#: the layers peft saves whole beside their LoRA (`save_embedding_layers`), base_layer.weight included
EMBEDDING_LAYERS = ("embed_tokens", "lm_head")
#: config keys that change the weights in ways streamsoup does not model: refused when set
UNSUPPORTED = {
    "target_parameters": "LoRA on bare parameters (e.g. MoE experts)",
    "layer_replication": "layer replication (the adapted model has more layers than BASE)",
    "trainable_token_indices": "trainable tokens",
    "alora_invocation_tokens": "activated LoRA (applies only after an invocation sequence, not mergeable)",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
    "velora_config": "VeLoRA",
    "lora_ga_config": "LoRA-GA",
}
#: initialisations that rewrite the base weights: the adapter then only fits that rewritten base
BASE_CHANGING_INIT = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fail(root: Path, what: str) -> InputError:
    return InputError(
        f"FINETUNED {root} is a PEFT adapter with {what}, which streamsoup does not support; "
        "merge it into its base with peft (merge_and_unload, then save_pretrained) and pass that "
        "folder as FINETUNED"
    )


#: seconds one rank_pattern / alpha_pattern key may take to match one module name
PATTERN_SECONDS = 1.0
#: seconds all of an adapter's pattern keys may take to match all its modules (keys of a fraction of the
#: limit each, by the thousand, would otherwise add up to hours)
PATTERNS_SECONDS = 10.0


def pattern_key(patterns: dict, module: str, deadline: float) -> str | None:
    """peft's get_pattern_key: the first pattern whose regex matches the end of the module name.

    Matched with `regex` (re's syntax) under a time limit per match and a `deadline` (time.monotonic()) for the
    whole config: a key like ``(([a-z]+)+)+Z`` backtracks exponentially and is refused by name instead of hanging
    the run.
    """
    for key in patterns:
        left = deadline - time.monotonic()
        if left <= 0:
            raise _patterns_too_slow(len(patterns))
        try:
            if regex.match(rf"(.*\.)?({key})$", module, timeout=min(PATTERN_SECONDS, left)):
                return key
        except TimeoutError:
            if left < PATTERN_SECONDS:
                raise _patterns_too_slow(len(patterns)) from None
            raise InputError(
                f"FINETUNED {ADAPTER_CONFIG}: the pattern {key!r} takes more than {PATTERN_SECONDS:g} "
                f"s to match {module!r} (catastrophic backtracking); simplify it"
            ) from None
    return None


def _patterns_too_slow(count: int) -> InputError:
    return InputError(
        f"FINETUNED {ADAPTER_CONFIG}: its rank_pattern / alpha_pattern keys ({count} in one of them) "
        f"take more than {PATTERNS_SECONDS:g} s in all to match the adapter's modules; use fewer or "
        "simpler patterns"
    )


@dataclass
class Module:
    """The adapter's tensors of one targeted module."""

    name: str
    parts: dict[str, TensorRef] = field(default_factory=dict)


@dataclass(frozen=True)
class Adapter:
    root: Path
    config: dict
    weights: Checkpoint
    config_identity: dict[str, int] | None = None  # adapter_config.json's, taken before it was read

    @classmethod
    def open(cls, folder: Path, role: str = "FINETUNED") -> Adapter:
        identity = file_identity(folder / ADAPTER_CONFIG)
        try:
            config = read_json(folder / ADAPTER_CONFIG, CONFIG_LIMIT)
        except OSError as exc:
            raise InputError(f"{role} {folder}: cannot read {ADAPTER_CONFIG} ({exc.strerror})") from None
        except JsonFileError as exc:
            raise InputError(f"{role} {folder}: {ADAPTER_CONFIG} {exc}; save the adapter again with peft") from None
        if not isinstance(config, dict):
            raise InputError(
                f"{role} {folder}: {ADAPTER_CONFIG} is not a JSON object; save the adapter again with peft"
            )
        if not (folder / ADAPTER_WEIGHTS).is_file():
            found = ", ".join(sorted(p.name for p in folder.iterdir() if p.name.startswith("adapter_model")))
            hint = f" (found {found}: convert it with peft to safetensors)" if found else ""
            raise InputError(f"{role} {folder} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}{hint}")
        adapter = cls(folder, config, Checkpoint.from_path(folder / ADAPTER_WEIGHTS, role), identity)
        adapter.check_config()
        return adapter

    @property
    def base_name(self) -> str:
        return str(self.config.get("base_model_name_or_path") or "")

    def check_config(self) -> None:
        c = self.config
        if str(c.get("peft_type", "LORA")).upper() != "LORA":
            raise _fail(self.root, f"peft_type {c.get('peft_type')!r} (only LoRA adapters are supported)")
        for key, what in UNSUPPORTED.items():
            if c.get(key) not in (None, False, {}, [], ""):
                raise _fail(self.root, f"{key} set ({what})")
        init = c.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INIT):
            raise InputError(
                f"FINETUNED {self.root} was initialised with init_lora_weights={init!r}, which rewrites the base "
                "weights: the adapter only fits that rewritten base; convert it to a plain LoRA first (peft's "
                "path_initial_model_for_weight_conversion on save_pretrained) and pass the converted folder"
            )
        if c.get("loftq_config"):
            raise _fail(self.root, "loftq_config set (LoftQ quantizes the base)")
        self.check_numbers()

    def check_numbers(self) -> None:
        """r, lora_alpha and the patterns are what the scaling is made of: each must be a usable number or regex."""
        c = self.config

        def bad(key: str, value: object, want: str) -> InputError:
            return InputError(
                f"FINETUNED {self.root}: {ADAPTER_CONFIG} has {key} = {value!r}, which is not "
                f"{want}; fix the adapter's config"
            )

        if not _positive_int(c.get("r", 8)):
            raise bad("r", c.get("r"), "a positive integer")
        if not _finite_number(c.get("lora_alpha", 8)):
            raise bad("lora_alpha", c.get("lora_alpha"), "a finite number")
        for name, valid, want in (
            ("rank_pattern", _positive_int, "a positive integer"),
            ("alpha_pattern", _finite_number, "a finite number"),
        ):
            patterns = c.get(name) or {}
            if not isinstance(patterns, dict):
                raise bad(name, patterns, "a mapping of module pattern to value")
            for key, value in patterns.items():
                if not valid(value):
                    raise bad(f"{name}[{key!r}]", value, want)
                try:
                    regex.compile(rf"(.*\.)?({key})$")
                except (regex.error, TypeError) as exc:
                    raise bad(f"a {name} key", key, f"a valid regular expression ({exc})") from None

    def reweighed_config(self, base_model_id: str = "") -> dict:
        """The config of the reweighed adapter: same modules and ranks, scaling 1 everywhere (alpha = r); the base
        model named by its Hub repo id when one is known (a local path there does not load elsewhere)."""
        config = dict(self.config)
        if base_model_id:
            config["base_model_name_or_path"] = base_model_id
        ranks = dict(config.get("rank_pattern") or {})
        config.update(lora_alpha=config.get("r", 8), alpha_pattern=ranks, use_rslora=False, use_dora=False)
        return config

    def fingerprint(self) -> dict[str, object]:
        digest = hashlib.sha256((self.root / ADAPTER_CONFIG).read_bytes()).hexdigest()
        return {**self.weights.fingerprint(), ADAPTER_CONFIG: {"sha256": digest}}

    def binding(self, now: bool = False) -> dict[str, object]:
        """The weights' file and the config, by identity as taken before they were read, or `now`."""
        bound = self.weights.binding(now)
        config = file_identity(self.root / ADAPTER_CONFIG) if now else self.config_identity
        return {**bound, "files": {**bound["files"], ADAPTER_CONFIG: config}}

    def modules(self) -> tuple[dict[str, Module], dict[str, TensorRef]]:
        """(module name -> its LoRA tensors, model tensor name -> full tensor saved in the adapter).

        A PeftModel's own state_dict names the adapter in each key (`lora_A.default.weight`): that name is
        dropped, as peft's loader does; keys naming two adapters are refused (which one is meant?).
        """
        modules: dict[str, Module] = {}
        full: dict[str, TensorRef] = {}
        names: set[str] = set()
        for key, ref in self.weights.items():
            name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
            named = NAMED_PART.search(name)
            if named is not None and named.group(2) not in ("weight", "bias"):
                names.add(named.group(2))
                name = name[: named.start()] + f".{named.group(1)}{named.group(3) or ''}"
            for suffix, part in PARTS.items():
                if name.endswith(suffix):
                    module = name[: -len(suffix)]
                    modules.setdefault(module, Module(module)).parts[part] = ref
                    break
            else:
                if BASE_OWN.search(name):  # the base's own tensor inside a peft wrapper: not the adapter's
                    continue
                name = re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)
                full[name] = ref
        if len(names) > 1:
            raise InputError(
                f"FINETUNED {self.root}: its weights name {len(names)} adapters "
                f"({', '.join(map(repr, sorted(names)))}); save the one to merge alone, e.g. "
                "PeftModel.save_pretrained, which writes one adapter per folder"
            )
        return modules, full

    def scaling(self, module: str, rank: int, deadline: float) -> float:
        """alpha / r (alpha / sqrt(r) with rslora), per module through rank_pattern / alpha_pattern, matched before
        `deadline` (pattern_key)."""
        c = self.config
        ranks, alphas = c.get("rank_pattern") or {}, c.get("alpha_pattern") or {}
        r_key, a_key = pattern_key(ranks, module, deadline), pattern_key(alphas, module, deadline)
        r = ranks[r_key] if r_key is not None else c.get("r", 8)
        alpha = alphas[a_key] if a_key is not None else c.get("lora_alpha", 8)
        if r != rank:
            raise InputError(
                f"FINETUNED {self.root}: {ADAPTER_CONFIG} gives module {module!r} rank {r} but its "
                f"lora_A has {rank} rows; the adapter folder is inconsistent"
            )
        return alpha / math.sqrt(r) if c.get("use_rslora") else alpha / r


@dataclass(frozen=True)
class AdapterTensors:
    """What an adapter does to BASE, by base tensor name."""

    updates: dict[str, LoraUpdate]  # base weight -> its low-rank update
    biases: dict[str, BiasUpdate]  # base bias -> lora_B.bias
    full: dict[str, TensorRef]  # base (or new) tensor -> a full tensor of the fine-tune
    keys: dict[str, tuple[str, ...]]  # base weight -> the adapter keys of its module (a, b[, bias])


def base_name(base: Checkpoint, name: str) -> str | None:
    """`name` in BASE, or without its first component (GPT-2 checkpoints exist with and without 'transformer.')."""
    if name in base:
        return name
    head, _, rest = name.partition(".")
    return rest if rest and rest in base else None


def check_not_whole_model(adapter: Adapter, modules: dict[str, Module]) -> None:
    """A PeftModel's whole state_dict saved as the adapter holds the base's weight inside every LoRA-wrapped layer
    (`q_proj.base_layer.weight` beside its lora_A) and every other tensor of the model: none of them is the
    adapter's, and OUT would get them as extra tensors. peft itself saves a base layer only for the embedding
    layers it saves whole. Refused, with the save call that writes the adapter alone."""
    inside = next(
        (
            f"{m.name}.base_layer.weight"
            for m in modules.values()
            if {"a", "base_copy"} <= m.parts.keys() and m.name.rsplit(".", 1)[-1] not in EMBEDDING_LAYERS
        ),
        None,
    )
    if inside is not None:
        raise InputError(
            f"FINETUNED {adapter.root}: its weights are a whole PeftModel's state_dict (they hold the "
            f"base model's own {inside!r}), not an adapter; save the adapter alone with "
            "model.save_pretrained(DIR) and pass DIR, or pass the merged model (merge_and_unload, "
            "then save_pretrained)"
        )


def resolve(adapter: Adapter, base: Checkpoint) -> AdapterTensors:
    """Pair every adapter module with its BASE tensor; anything that does not fit is refused by name."""
    modules, full = adapter.modules()
    check_not_whole_model(adapter, modules)
    updates, biases, keys = {}, {}, {}
    out_full: dict[str, TensorRef] = {}
    deadline = time.monotonic() + PATTERNS_SECONDS
    for name, ref in full.items():
        out_full[base_name(base, name) or name] = ref
    for module in modules.values():
        parts = module.parts
        if "base_copy" in parts and not ({"a", "a_emb"} & parts.keys()):
            out_full[base_name(base, module.name + ".weight") or module.name + ".weight"] = parts.pop("base_copy")
        if not parts:
            continue
        embedding = "a_emb" in parts
        a, b = parts.get("a_emb" if embedding else "a"), parts.get("b_emb" if embedding else "b")
        if a is None or b is None:
            raise InputError(
                f"FINETUNED {adapter.root}: module {module.name!r} has {sorted(parts)} but not both "
                "LoRA factors; the adapter file is incomplete"
            )
        weight = base_name(base, module.name + ".weight")
        if weight is None:
            raise _wrong_base(
                adapter, base, f"the adapter targets {module.name!r} but BASE has no tensor {module.name + '.weight'!r}"
            )
        w0 = base[weight]
        _check_parts(adapter, base, module.name, parts, w0)
        transposed = embedding or _transposed(adapter, module.name, w0, a, b)
        if "magnitude" in parts and (embedding or len(w0.shape) != 2):
            raise _fail(adapter.root, f"DoRA on {'an embedding' if embedding else 'a convolution'} ({module.name})")
        update = LoraUpdate(
            module.name,
            a,
            b,
            adapter.scaling(module.name, a.shape[0], deadline),
            transposed,
            parts.get("magnitude"),
            parts.get("base_copy"),
        )
        _check_shapes(adapter, base, update, w0)
        if update.magnitude is not None:  # DoRA: one norm per output feature
            _check_vector(
                adapter,
                base,
                module.name,
                "lora_magnitude_vector",
                update.magnitude,
                (matrix_shape(w0.shape)[1 if transposed else 0],),
            )
        updates[weight] = update
        keys[weight] = tuple(r.name for r in (a, b, parts.get("bias")) if r is not None)
        if "bias" in parts:
            bias = base_name(base, module.name + ".bias")
            if bias is None:
                raise _wrong_base(
                    adapter,
                    base,
                    f"lora_bias of {module.name!r} needs a base bias {module.name + '.bias'!r}, which BASE lacks",
                )
            _check_vector(adapter, base, module.name, "lora_B.bias", parts["bias"], tuple(base[bias].shape))
            biases[bias] = BiasUpdate(parts["bias"], update.scale)
    if not updates:
        raise InputError(
            f"FINETUNED {adapter.root}: a PEFT adapter with no LoRA update (no lora_A / lora_B pair "
            "in its weights) changes nothing; pass the adapter that was trained"
        )
    return AdapterTensors(updates, biases, out_full, keys)


#: a module's parts as peft names them in the adapter file
PART_NAMES = {
    "a": "lora_A",
    "b": "lora_B",
    "a_emb": "lora_embedding_A",
    "b_emb": "lora_embedding_B",
    "magnitude": "lora_magnitude_vector",
    "bias": "lora_B.bias",
    "base_copy": "base_layer",
}


def _check_parts(adapter: Adapter, base: Checkpoint, module: str, parts: dict[str, TensorRef], w0: TensorRef) -> None:
    """What the arithmetic takes for granted, checked before any shape is indexed: floating-point parts, factors
    that are matrices, a BASE weight that is one."""
    for part, ref in parts.items():
        if not is_float(ref.dtype):
            raise InputError(
                f"FINETUNED {adapter.root}: module {module!r}: its {PART_NAMES[part]} is {ref.dtype}, "
                "not floating point; the adapter file is corrupt"
            )
        if part in ("a", "b", "a_emb", "b_emb") and len(ref.shape) < 2:
            raise InputError(
                f"FINETUNED {adapter.root}: module {module!r}: its {PART_NAMES[part]} is "
                f"{list(ref.shape)}, not a matrix; the adapter file is corrupt"
            )
    if len(w0.shape) < 2:
        raise _wrong_base(
            adapter,
            base,
            f"the adapter updates {module!r}, whose BASE tensor {w0.name!r} is {list(w0.shape)}, not a matrix",
        )


def _check_vector(
    adapter: Adapter, base: Checkpoint, module: str, part: str, ref: TensorRef, want: tuple[int, ...]
) -> None:
    """A per-output vector of the adapter must have BASE's size: torch would broadcast a [1] one silently."""
    if tuple(ref.shape) != want:
        raise _wrong_base(
            adapter, base, f"module {module!r}: its {part} is {list(ref.shape)}, BASE's output size is {list(want)}"
        )


def _transposed(adapter: Adapter, module: str, w0: TensorRef, a: TensorRef, b: TensorRef) -> bool:
    """Linear stores [out, in], GPT-2's Conv1D [in, out]: the shapes decide; a square one follows the config
    (peft itself forces fan_in_fan_out to the layer type, and saves the corrected config)."""
    if len(w0.shape) != 2:
        return False
    plain, flipped = (b.shape[0], a.shape[1]), (a.shape[1], b.shape[0])
    if w0.shape == plain and w0.shape != flipped:
        return False
    if w0.shape == flipped and w0.shape != plain:
        return True
    return bool(adapter.config.get("fan_in_fan_out", False))


def _check_shapes(adapter: Adapter, base: Checkpoint, update: LoraUpdate, w0: TensorRef) -> None:
    m, n = matrix_shape(w0.shape)
    r = update.rank
    a_cols = math.prod(update.a.shape[1:])
    b_rows = update.b.shape[0]
    b_kernel = math.prod(update.b.shape[1:]) // max(r, 1)
    left, right = (a_cols, b_rows) if update.transposed else (b_rows, a_cols)
    if update.b.shape[1:2] != (r,) or b_kernel != 1 or (left, right) != (m, n):
        raise _wrong_base(
            adapter,
            base,
            f"module {update.module!r}: lora_A {list(update.a.shape)} and lora_B "
            f"{list(update.b.shape)} do not fit BASE's {list(w0.shape)}",
        )


def _wrong_base(adapter: Adapter, base: Checkpoint, detail: str) -> InputError:
    named = f" (the adapter names its base {adapter.base_name!r})" if adapter.base_name else ""
    return InputError(
        f"BASE {base.root} does not fit the adapter FINETUNED {adapter.root}: {detail}; pass the "
        f"model the adapter was trained on as BASE{named}"
    )


def is_adapter(path: Path) -> bool:
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file()
