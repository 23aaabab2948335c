"""An input's config.json, as every later step reads it."""

from __future__ import annotations

from ..errors import InputError
from ..io.checkpoint import Checkpoint
from ..io.jsonfile import CONFIG_LIMIT, JsonFileError, read_json


def model_config(ckpt: Checkpoint) -> dict:
    """The checkpoint's config.json (beside a single file: its folder's), {} when there is none or it is no map.

    One that cannot be parsed (too large, too deep, not JSON) is refused here, at plan time: it would be copied
    into OUT, where it breaks `from_pretrained`, and the model card reads it at the very end."""
    path = ckpt.folder / "config.json"
    try:
        config = read_json(path, CONFIG_LIMIT, ckpt.config_identity if ckpt.remote else None)
    except OSError:
        return {}
    except JsonFileError as exc:
        raise InputError(
            f"{path} {exc}; a model's config.json is a small JSON object: fix it, or download the model again"
        ) from None
    return config if isinstance(config, dict) else {}
