"""OUT/README.md: the Hugging Face model card of a merge, from its report.

Hub users expect a card: YAML front matter (``base_model``, ``tags``, ``library_name``, the
license), what was done and how to load it. A fine-tune that ships its own card keeps it: its
front matter is carried over (ours sets ``base_model`` and adds tags) and its text follows ours
under its own heading, so nothing the fine-tune's authors wrote is lost or silently replaced.
"""

from __future__ import annotations

import keyword
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..io.jsonfile import CONFIG_LIMIT, JsonFileError, read_json
from ..options import yaml_without_aliases
from .summary import format_spread, shaping_flags

CARD_NAME = "README.md"
TAGS = ["monosoup", "merge", "streamsoup"]
PAPER = "https://arxiv.org/abs/2602.09689"
FOLDED_HEADING = "## The fine-tune's own model card"


@dataclass(frozen=True)
class CardSource:
    """What a card is made of besides the report: the fine-tune's card, what OUT holds, BASE's Hub id."""

    finetuned_card: str | None  # the text of FINETUNED's README.md, if it has one
    config: dict[str, Any] | None  # OUT's config.json, if any (a transformers model's)
    adapter_config: dict[str, Any] | None = None  # OUT's adapter_config.json: OUT is a PEFT adapter (--save adapter)
    base_config: dict[str, Any] | None = None  # BASE's config.json (which model an adapter OUT goes on)
    base_model_id: str = ""  # BASE's Hugging Face repo id ("": none known; a path is never Hub metadata)
    base_model_from: str = ""

    @property
    def adapter_out(self) -> bool:
        return self.adapter_config is not None


#: the transformers class each peft task_type loads its base model with (peft's PeftModelFor* expect them)
TASK_MODELS = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


def input_id(info: dict[str, Any]) -> str:
    """How the card names an input: its Hugging Face repo id, or its path."""
    return info.get("repo") or info["path"]


def split_front_matter(text: str) -> tuple[dict[str, Any], str]:
    """A card's YAML front matter and its body; a card without valid front matter is all body."""
    if not text.startswith("---"):
        return {}, text
    end = text.find("\n---", 3)
    if end < 0:
        return {}, text
    try:
        meta = yaml_without_aliases(text[3:end])
    except (yaml.YAMLError, ValueError):  # YamlAlias, YamlTooDeep, an int of more digits than Python converts
        return {}, text
    if not isinstance(meta, dict):
        return {}, text
    rest = text[end + 4 :]
    return meta, rest.split("\n", 1)[1] if "\n" in rest else ""


def front_matter(doc: dict[str, Any], source: CardSource, theirs: dict[str, Any]) -> dict[str, Any]:
    """The fine-tune's front matter with ours over it. base_model is a Hub repo id or absent (the Hub refuses a
    path); tags the Hub derives from base_model ("base_model:...") are dropped, as they may name another."""
    meta = {str(k): v for k, v in theirs.items() if k != "base_model"}
    if source.base_model_id:
        meta["base_model"] = source.base_model_id
    tags = meta.get("tags") if isinstance(meta.get("tags"), list) else []
    meta["tags"] = list(dict.fromkeys([*(str(t) for t in tags if not str(t).startswith("base_model:")), *TAGS]))
    if source.adapter_out:
        meta["library_name"] = "peft"
    elif source.config is not None and ("model_type" in source.config or "architectures" in source.config):
        meta["library_name"] = "transformers"
    else:
        meta.pop("library_name", None)  # a fine-tune's "peft" no longer describes a merged model
    return meta


def model_card(doc: dict[str, Any], source: CardSource) -> str:
    """The card's text: front matter, what was done, the per-kind table, how to load, the fine-tune's own card.

    Nothing in it depends on how or when the run went, so a resumed merge writes the same card.
    """
    theirs, body = split_front_matter(source.finetuned_card) if source.finetuned_card else ({}, "")
    meta = front_matter(doc, source, theirs)
    s, opts = doc["summary"], doc["options"]
    base, ft = source.base_model_id or input_id(doc["inputs"]["base"]), input_id(doc["inputs"]["finetuned"])
    ft_kind = " (a PEFT LoRA adapter)" if doc["inputs"]["finetuned"].get("kind") == "LoRA adapter" else ""
    rule = opts["rank_rule"] + (f", energy {opts['energy']:g}" if opts["rank_rule"] == "energy" else "")
    flags = [*shaping_flags(opts), f"--spectral {opts['spectral']}"]
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        "",
        f"# MonoSoup of {Path(ft).name}",
        "",
        f"[MonoSoup]({PAPER}) (Abdollahpoorrostam, Dimitriadis, Hazimeh, Frossard, ICML 2026, *Model soups need only "
        f"one ingredient*) applied by streamsoup {doc['streamsoup']} to the fine-tune `{ft}`{ft_kind} of `{base}`. "
        f"Each {'selected ' if opts.get('exclude') or opts.get('only') else ''}weight matrix's fine-tuning update "
        "was split by its singular value decomposition into high-energy and low-energy directions, re-weighed "
        "with the paper's data-free, layer-wise coefficients, and added back to the base weights (exact float64 "
        f"arithmetic, {cast_words(opts)}). No training and no data were used.",
        "",
        "| | |",
        "| --- | --- |",
        f"| base model | `{base}`{base_note(source)} |",
        f"| fine-tune | `{ft}`{ft_kind} |",
        f"| rank rule | {rule} |",
        f"| options | {', '.join(f'`{flag}`' for flag in flags)} |",
        f"| tensors | {s['tensors']}: {s['edited']} edited, {s['copied']} copied, {s['dropped']} dropped |",
        f"| made by | streamsoup {doc['streamsoup']} (when and where: `streamsoup_report.json`) |",
        "",
        "## What MonoSoup did, per module kind",
        "",
        "Medians and [min-max] over the edited matrices of each kind: `k/rank`, the share of directions kept as "
        "high-energy; `P_k`, their share of the update's energy; `lambda_high` and `lambda_low`, the weights of "
        "the two parts.",
        "",
        "| kind | matrices | edited | k/rank | P_k | lambda_high | lambda_low |",
        "| --- | ---: | ---: | --- | --- | --- | --- |",
    ]
    for kind, m in doc["modules"].items():
        cells = " | ".join(format_spread(m[key]) for key in ("k_rank", "P_k", "lambda_high", "lambda_low"))
        lines.append(f"| {kind} | {m['tensors']} | {m['edited']} | {cells} |")
    lines += [
        "",
        "Every tensor's decision, `k`, `P_k` and lambdas are in `streamsoup_report.json` "
        "(`streamsoup report DIR` prints and draws them).",
        "",
        "## How to load it",
        "",
        "```python",
        *loading(source, base),
        "```",
        "",
    ]
    if source.finetuned_card is not None:
        lines += [
            FOLDED_HEADING,
            "",
            "Kept as the fine-tune shipped it (its front matter is merged into the one above):",
            "",
            body.strip(),
            "",
        ]
    return utf8_text("\n".join(lines))


def utf8_text(text: str) -> str:
    """UTF-8 text for a file: a path's bytes that are not UTF-8 (Python keeps them as surrogates) as \\xNN."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def cast_words(opts: dict[str, Any]) -> str:
    dtype = opts.get("dtype", "keep")
    return "cast to the fine-tune's dtypes" if dtype == "keep" else f"rounded once to {dtype}"


def python_name(value: object) -> bool:
    """A name the loading code can import and call (a class name from a config is not trusted)."""
    return isinstance(value, str) and value.isidentifier() and not keyword.iskeyword(value)


def base_note(source: CardSource) -> str:
    """Where the base model's repo id came from, or why the metadata has none."""
    if source.base_model_id:
        return f" (repo id from {source.base_model_from})"
    return " (no Hugging Face repo id known, so the metadata names no base_model: merge with --base-model-id ORG/NAME)"


def loading(source: CardSource, base: str) -> list[str]:
    """Python that loads OUT (tests run it): a transformers class from config.json, a PEFT adapter on its base."""
    if source.adapter_out:
        task = str((source.adapter_config or {}).get("task_type") or "").upper()
        architectures = (source.base_config or {}).get("architectures")
        if task in TASK_MODELS:
            cls = TASK_MODELS[task]
        elif isinstance(architectures, list) and architectures and python_name(architectures[0]):
            cls = str(architectures[0])
        else:
            cls = "AutoModel"
        return [
            "from peft import PeftModel",
            f"from transformers import {cls}",
            "",
            f"base = {cls}.from_pretrained({base!r})",
            'model = PeftModel.from_pretrained(base, "path/to/this/folder")',
        ]
    architectures = (source.config or {}).get("architectures")
    if isinstance(architectures, list) and architectures and python_name(architectures[0]):
        return [
            f"from transformers import {architectures[0]}",
            f'model = {architectures[0]}.from_pretrained("path/to/this/folder")',
        ]
    if source.config is not None and "model_type" in source.config:
        return ["from transformers import AutoModel", 'model = AutoModel.from_pretrained("path/to/this/folder")']
    return [
        "from pathlib import Path",
        "",
        "from safetensors.torch import load_file",
        "",
        'shards = sorted(Path("path/to/this/folder").glob("*.safetensors"))',
        "state_dict = {name: tensor for shard in shards for name, tensor in load_file(shard).items()}",
        "# model.load_state_dict(state_dict), with `model` the torch module the fine-tune was saved from",
    ]


def read_config(folder: Path, name: str = "config.json") -> dict[str, Any] | None:
    """OUT's config.json (or another JSON config of it) as a dict (None when absent or not a JSON object)."""
    try:
        config = read_json(folder / name, CONFIG_LIMIT)
    except (OSError, JsonFileError):
        return None
    return config if isinstance(config, dict) else None
