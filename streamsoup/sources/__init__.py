"""Where the inputs come from: a local folder or file (safetensors or torch.save), a Hugging Face repo id,
a PEFT LoRA adapter; each opened whole by `open_input` (opening.py).

Everything downstream sees an `Input`: a decoded `Checkpoint` for BASE, a decoded `Checkpoint` or an
`Adapter` for FINETUNED.
"""

from __future__ import annotations

from .adapter import ADAPTER_CONFIG, Adapter
from .opening import Input, open_input

__all__ = ["Adapter", "ADAPTER_CONFIG", "Input", "open_input"]
