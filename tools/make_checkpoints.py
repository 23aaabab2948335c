#!/usr/bin/env python3
"""Generate a (base, fine-tune) pair of safetensors checkpoints shaped like real LLMs (streamsoup/synthetic.py).

Llama/Qwen-style names and shapes (GQA k/v, untied lm_head, optional q/k/v biases),
bf16, several shards with an index json, config.json, tokenizer and generation
config. Each fine-tune matrix is ``W0 + decaying low-rank update + dense noise``,
the shape of real fine-tuning updates. Tensors are generated row block by row
block and written in place, so a multi-GB pair never sits in memory.

``--awkward`` adds what real pairs throw at a merger: a conv kernel, an untouched
(frozen) matrix, a resized vocabulary, tensors only in one checkpoint, int and
1-D tensors, fp16/fp32/fp64 and base/fine-tune dtype mismatches, a 1e-9 relative
update, and a base sharded differently and without an index.

    python tools/make_checkpoints.py OUT_DIR --preset small [--awkward]
    -> OUT_DIR/base, OUT_DIR/finetuned
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from streamsoup.synthetic import (  # noqa: E402, F401  (names the tests and benchmarks use)
    HF_SHARD_SIZE,
    PRESETS,
    ModelShape,
    Writer,
    llama_tensors,
    make_pair,
)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="folder to create base/ and finetuned/ in")
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--layers", type=int, help="override the preset's number of layers (scales the size)")
    p.add_argument("--awkward", action="store_true", help="add conv, frozen, resized, extra, mixed-dtype tensors")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", type=int, help="fine-tune shard size in bytes (default: a third of the model)")
    p.add_argument("--base-shard-size", type=int, help="base shard size in bytes (default: as the fine-tune's)")
    p.add_argument(
        "--sparse",
        action="store_true",
        help="real headers, data left as holes: full-size shapes "
        "(llama3-70b, qwen2-72b) in no disk space, for `streamsoup plan` and budget tests",
    )
    args = p.parse_args(argv)
    if args.sparse and not args.shard_size:
        args.shard_size = args.base_shard_size = HF_SHARD_SIZE
    shape = PRESETS[args.preset]
    if args.layers:
        shape = replace(shape, layers=args.layers)
    base, ft = make_pair(
        args.out,
        shape,
        awkward=args.awkward,
        seed=args.seed,
        base_shard_size=args.base_shard_size,
        ft_shard_size=args.shard_size,
        sparse=args.sparse,
    )
    size = sum(f.stat().st_size for f in ft.glob("*.safetensors"))
    kind = " apparent size, sparse" if args.sparse else ""
    print(f"wrote {base} and {ft} ({size / 2**20:.1f} MiB per checkpoint{kind})")


if __name__ == "__main__":
    main()
