#!/usr/bin/env python3
"""Real tiny transformers models, fine-tuned a few steps in full or with a PEFT LoRA adapter: test fixtures.

Nothing is downloaded: each model is built from a config (Llama, Qwen2, GPT-2), saved sharded in
bf16 as a base, and a LoRA adapter of the chosen variant is trained a few AdamW steps on random
tokens so that every B != 0, then saved with peft's own ``save_pretrained``.

    python tools/make_adapters.py OUT_DIR --arch llama --variant plain
    -> OUT_DIR/base (the model), OUT_DIR/adapter (the PEFT folder)
    python tools/make_adapters.py OUT_DIR --arch llama --variant full
    -> OUT_DIR/base, OUT_DIR/finetuned (every weight trained)

Variants: plain, rslora, patterns (rank_pattern/alpha_pattern), embedding (embedding LoRA, peft
then also stores the base embedding), modules_to_save, lora_bias, dora. GPT-2 (Conv1D) always
runs with fan_in_fan_out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

ARCHS = ("llama", "qwen2", "gpt2")
VARIANTS = ("plain", "rslora", "patterns", "embedding", "modules_to_save", "lora_bias", "dora")


def tiny_model(arch: str, seed: int = 0):
    """A real transformers model from a config: small, but with every module kind of its family."""
    import transformers as tf

    torch.manual_seed(seed)
    if arch == "llama":
        cfg = tf.LlamaConfig(
            vocab_size=96,
            hidden_size=48,
            intermediate_size=80,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        )
        return tf.LlamaForCausalLM(cfg)
    if arch == "qwen2":
        cfg = tf.Qwen2Config(
            vocab_size=96,
            hidden_size=48,
            intermediate_size=80,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        )
        return tf.Qwen2ForCausalLM(cfg)
    if arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=96, n_embd=48, n_layer=2, n_head=4, n_positions=64)
        return tf.GPT2LMHeadModel(cfg)
    raise ValueError(f"unknown arch {arch!r}")


def lora_config(arch: str, variant: str):
    from peft import LoraConfig

    targets = {
        "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "gpt2": ["c_attn", "c_proj", "c_fc"],
    }[arch]
    kw: dict = dict(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0, init_lora_weights=True)
    if arch == "gpt2":
        kw["fan_in_fan_out"] = True
    if variant == "rslora":
        kw["use_rslora"] = True
    elif variant == "patterns":
        kw["rank_pattern"] = {"q_proj": 4, r"layers\.1\.mlp\.down_proj": 2, "c_attn": 4}
        kw["alpha_pattern"] = {"v_proj": 3, "c_fc": 5}
    elif variant == "embedding":
        kw["target_modules"] = targets + (["wte"] if arch == "gpt2" else ["embed_tokens"])
    elif variant == "modules_to_save":
        kw["modules_to_save"] = ["lm_head"] if arch == "llama" else ["ln_f"] if arch == "gpt2" else ["norm"]
    elif variant == "lora_bias":
        kw["lora_bias"] = True
        if arch != "gpt2":
            kw["target_modules"] = ["q_proj", "k_proj", "v_proj"]  # the layers with a bias (Qwen2)
    elif variant == "dora":
        kw["use_dora"] = True
    elif variant != "plain":
        raise ValueError(f"unknown variant {variant!r}")
    return LoraConfig(**kw)


def make(out: Path, arch: str = "llama", variant: str = "plain", steps: int = 4, seed: int = 0) -> tuple[Path, Path]:
    """Save a bf16 sharded base and a trained adapter under `out`; returns (base, adapter)."""
    from peft import get_peft_model

    out = Path(out)
    base_dir, adapter_dir = out / "base", out / "adapter"
    model = tiny_model(arch, seed)
    model.to(torch.bfloat16).save_pretrained(base_dir, max_shard_size="40KB")
    model.to(torch.float32)
    peft_model = get_peft_model(model, lora_config(arch, variant))
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-2)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=g)
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    peft_model.peft_config["default"].base_model_name_or_path = str(base_dir)
    peft_model.save_pretrained(adapter_dir)
    return base_dir, adapter_dir


def make_finetune(
    out: Path, arch: str = "llama", steps: int = 4, seed: int = 0, added_tokens: int = 0
) -> tuple[Path, Path]:
    """A full fine-tune (every weight trained a few AdamW steps): bf16 sharded base and fine-tune under `out`;
    `added_tokens` grows the fine-tune's vocabulary first (embeddings and lm_head), as a chat template's do."""
    out = Path(out)
    base_dir, ft_dir = out / "base", out / "finetuned"
    model = tiny_model(arch, seed)
    model.to(torch.bfloat16).save_pretrained(base_dir, max_shard_size="40KB")
    model.to(torch.float32)
    if added_tokens:
        model.resize_token_embeddings(model.config.vocab_size + added_tokens, mean_resizing=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # a fine-tune-sized step: weights move by a few percent
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.to(torch.bfloat16).save_pretrained(ft_dir, max_shard_size="40KB")
    return base_dir, ft_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--arch", choices=ARCHS, default="llama")
    p.add_argument("--variant", choices=(*VARIANTS, "full"), default="plain")
    p.add_argument("--steps", type=int, default=4)
    a = p.parse_args()
    if a.variant == "full":
        base, ft = make_finetune(a.out, a.arch, a.steps)
        print(f"base {base}\nfinetuned {ft}")
        return
    base, adapter = make(a.out, a.arch, a.variant, a.steps)
    print(f"base {base}\nadapter {adapter}")


if __name__ == "__main__":
    main()
