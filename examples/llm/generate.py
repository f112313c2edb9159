"""Greedy generation with a Llama model sharded over the ranks (tensor parallel, as mlx-lm):

    python examples/llm/make_model.py /tmp/llama                  # a random 100M model
    jax-mlxdist launch -n 4 examples/llm/generate.py --model /tmp/llama --prompt-tokens 1 2 3 --max-tokens 32
    jax-mlxdist launch -n 2 examples/llm/generate.py --model DIR --prompt "Hello"   # DIR/tokenizer.json

The prompt runs as one jitted step (prefill), then one jitted step per token, with a
static-shape KV cache donated and updated in place. Each step returns only the next token
(the argmax), which feeds the next step while the host reads the previous one. Rank 0 prints
the tokens and the prefill and decode speeds; --json prints them as one JSON line.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import sys
import time

import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax_mlxdist as dist  # noqa: E402
from load import load  # noqa: E402
from model import Config, forward, init_cache  # noqa: E402


def make_step(c: Config):
    """One jitted step: tokens (T,) at positions pos.. -> (greedy next token, cache). The cache
    is donated, so its update happens in place."""
    def step(params, cache, tokens, pos):
        logits, cache = forward(c, params, tokens, cache, pos)
        return jnp.argmax(logits[-1]).astype(jnp.int32), cache
    return dist.jit(step, donate_argnums=(1,))


@functools.cache
def _step_for(c: Config):
    return make_step(c)


def generate(c: Config, params, prompt: list[int], max_tokens: int, eos: int | None = None,
             cache_len: int | None = None):
    """(tokens, prefill seconds, decode seconds): greedy decoding of max_tokens tokens (fewer at
    eos). Prefill ends when the first new token is known; decode covers the rest. The cache
    holds cache_len positions (default: the prompt and max_tokens); its shape is part of the
    compiled steps."""
    step = _step_for(c)
    cache = init_cache(c, params, cache_len or len(prompt) + max_tokens)
    start = time.perf_counter()
    token, cache = step(params, cache, jnp.asarray(prompt, jnp.int32), 0)
    out = [int(token)]
    prefilled = time.perf_counter()
    pos, ahead = len(prompt), []
    while len(out) < max_tokens and out[-1] != eos:
        # Keep one step dispatched ahead of the token read back, so the host never leaves the
        # ranks idle (past eos that one step is thrown away).
        while len(out) + len(ahead) < max_tokens and len(ahead) < 2:
            token, cache = step(params, cache, token.reshape(1), pos)
            ahead.append(token)
            pos += 1
        out.append(int(ahead.pop(0)))
    return out, prefilled - start, time.perf_counter() - prefilled


def logits_of(c: Config, params, tokens: list[int], steps: int):
    """Logits of a prefill of tokens and of `steps` greedy decode steps after it, (len + steps,
    vocab) as float32: what tests compare across rank counts."""
    f = dist.jit(lambda p, cache, t, pos: forward(c, p, t, cache, pos))
    cache = init_cache(c, params, len(tokens) + steps)
    logits, cache = f(params, cache, jnp.asarray(tokens, jnp.int32), 0)
    rows = [logits]
    for i in range(steps):
        nxt = jnp.argmax(rows[-1][-1]).astype(jnp.int32).reshape(1)
        logits, cache = f(params, cache, nxt, len(tokens) + i)
        rows.append(logits)
    return jnp.concatenate(rows).astype(jnp.float32)


def tokenizer_for(model: pathlib.Path):
    path = model / "tokenizer.json"
    if not path.exists():
        return None
    from tokenizers import Tokenizer  # pip install tokenizers
    return Tokenizer.from_file(str(path))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=pathlib.Path, required=True)
    p.add_argument("--prompt-tokens", type=int, nargs="+", help="token ids")
    p.add_argument("--prompt", help="text (needs the model's tokenizer.json and `tokenizers`)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (compilation)")
    p.add_argument("--json", action="store_true", help="one JSON line of results on rank 0")
    a = p.parse_args()

    group = dist.init()
    c, params = load(a.model, group)
    tok = tokenizer_for(a.model)
    if a.prompt is not None:
        if tok is None:
            p.error(f"--prompt needs {a.model / 'tokenizer.json'}; give --prompt-tokens instead")
        prompt = tok.encode(a.prompt).ids
    elif a.prompt_tokens:
        prompt = a.prompt_tokens
    else:
        p.error("give --prompt-tokens (or --prompt with a tokenizer.json)")
    eos = json.loads((a.model / "config.json").read_text()).get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    for _ in range(a.warmup):  # compiles the prefill and decode steps for this cache length
        generate(c, params, prompt, min(a.max_tokens, 3), None, cache_len=len(prompt) + a.max_tokens)
    tokens, prefill_s, decode_s = generate(c, params, prompt, a.max_tokens, eos)
    if group.rank() != 0:
        return
    result = {"ranks": group.size(), "prompt_tokens": len(prompt), "generated": len(tokens),
              "prefill_tps": len(prompt) / prefill_s,
              "decode_tps": (len(tokens) - 1) / decode_s if len(tokens) > 1 else float("nan"),
              "tokens": tokens}
    if a.json:
        print(json.dumps(result), flush=True)
        return
    print(f"tokens: {' '.join(map(str, tokens))}")
    if tok is not None:
        print(f"text: {tok.decode(tokens)!r}")
    print(f"{group.size()} ranks: prefill {len(prompt)} tokens at {result['prefill_tps']:.1f} tokens/s, "
          f"decode {len(tokens)} tokens at {result['decode_tps']:.1f} tokens/s", flush=True)


if __name__ == "__main__":
    main()
