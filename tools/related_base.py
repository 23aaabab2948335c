#!/usr/bin/env python3
"""How far real fine-tunes move their weights, against an unrelated BASE of the same shapes.

    python tools/related_base.py DIR

Builds a tiny Llama from a transformers config, fine-tunes it with AdamW on random token
sequences (a few learning rates and step counts, short fine-tunes and a continued-pre-training
style run), and prints the median relative update ||W1-W0||/||W0|| that streamsoup's preflight
computes from sampled spans (planning/preflight.py `sampled_rel_update`), next to two unrelated
bases: another seed of the same architecture, and a Qwen2 of identical sizes. The threshold
UNRELATED_REL_UPDATE is chosen from these numbers (docs/guarantees.md).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
import transformers

from streamsoup.io.checkpoint import Checkpoint
from streamsoup.planning.preflight import sampled_rel_update

SIZES = dict(
    vocab_size=512,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=False,
)


def model(kind: str, seed: int):
    torch.manual_seed(seed)
    if kind == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SIZES))
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**SIZES))


def fine_tune(net, lr: float, steps: int, seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    net.train()
    for _ in range(steps):
        ids = torch.randint(0, SIZES["vocab_size"], (8, 32), generator=g)
        loss = net(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return net


def median_update(base: Path, ft: Path) -> float:
    b, f = Checkpoint.from_path(base), Checkpoint.from_path(ft)
    rels = [sampled_rel_update(b[n], f[n]) for n in f if n in b and len(f[n].shape) == 2]
    return statistics.median(r for r in rels if r is not None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path)
    args = parser.parse_args()
    base = args.dir / "base"
    model("llama", 0).to(torch.bfloat16).save_pretrained(base)
    rows = []
    for lr, steps in ((1e-5, 300), (1e-4, 300), (1e-3, 300), (3e-4, 1000)):
        out = args.dir / f"ft-{lr:g}-{steps}"
        fine_tune(model("llama", 0), lr, steps).to(torch.bfloat16).save_pretrained(out)
        rows.append((f"AdamW fine-tune, lr {lr:g}, {steps} steps", median_update(base, out)))
    others = (("another seed, same architecture", "llama", 1), ("a Qwen2 of identical sizes", "qwen2", 0))
    for name, kind, seed in others:
        out = args.dir / f"other-{kind}-{seed}"
        model(kind, seed).to(torch.bfloat16).save_pretrained(out)
        rows.append((f"unrelated: {name}", median_update(out, args.dir / "ft-0.0001-300")))
    print("| BASE and FINETUNED | median sampled ||W1-W0|| / ||W0|| |")
    print("|---|---|")
    for name, rel in rows:
        print(f"| {name} | {rel:.3f} |")


if __name__ == "__main__":
    main()
