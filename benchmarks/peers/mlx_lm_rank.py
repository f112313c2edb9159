"""Rank script for mlx-lm's own tensor-parallel generation on MLX's ring backend (the mlx-lm
venv), started with MLX_RANK + MLX_HOSTFILE (one process without them).

The model is loaded and sharded as mlx-lm's sharded_load does it (load_model lazily, then
model.shard(group): mlx.nn's shard_linear on q/k/v/gate/up and o/down), then greedy tokens
come from mlx-lm's generate_step. Prefill ends when the first token is known, as in
examples/llm/generate.py. Rank 0 prints one JSON line.

    python mlx_lm_rank.py --model DIR --prompt-tokens 1 2 3 --max-tokens 64
"""

import argparse
import json
import pathlib
import time

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.utils import load_model


def run(model, prompt, max_tokens):
    start = time.perf_counter()
    out, prefilled = [], None
    for token, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens):
        out.append(int(token))
        if prefilled is None:
            prefilled = time.perf_counter()
    return out, prefilled - start, time.perf_counter() - prefilled


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", type=pathlib.Path, required=True)
    p.add_argument("--prompt-tokens", type=int, nargs="+", required=True)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--warmup", type=int, default=1)
    a = p.parse_args()

    group = mx.distributed.init(backend="ring")
    model, _ = load_model(a.model, lazy=True)
    if group.size() > 1:
        model.shard(group)
    mx.eval(model.parameters())
    mx.eval(mx.distributed.all_sum(mx.array(1.0), stream=mx.cpu))  # every rank loaded
    for _ in range(a.warmup):
        run(model, a.prompt_tokens, 3)
    tokens, prefill_s, decode_s = run(model, a.prompt_tokens, a.max_tokens)
    if group.rank() == 0:
        print(json.dumps({"ranks": group.size(), "prompt_tokens": len(a.prompt_tokens), "generated": len(tokens),
                          "prefill_tps": len(a.prompt_tokens) / prefill_s,
                          "decode_tps": (len(tokens) - 1) / decode_s, "tokens": tokens}), flush=True)


if __name__ == "__main__":
    main()
