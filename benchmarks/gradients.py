"""Data-parallel gradient averaging of a 10 M-parameter MLP (8 leaves, 40 MiB of float32):
nn.average_gradients (one pytree all_sum) against one all_sum per leaf, in one jitted step
each, on n ranks of this machine:

    python benchmarks/gradients.py [-n 2 4 8] [--steps 20]

Prints the median step time of each (the slower rank's) and their ratio.
"""

from __future__ import annotations

import argparse
import statistics

from jax_mlxdist.testing import run_ranks

WIDTHS = [1024, 2048, 2048, 1536, 1024]  # 4 layers: 8 leaves, about 10 M parameters


def body(steps: int) -> dict:
    import time

    import jax
    import jax.numpy as jnp

    import jax_mlxdist as dist
    from jax_mlxdist import nn
    g = dist.init()
    n = g.size()
    grads = {f"layer{i}": {"w": jnp.ones((a, b), jnp.float32) * g.rank(),
                           "b": jnp.ones((b,), jnp.float32)}
             for i, (a, b) in enumerate(zip(WIDTHS, WIDTHS[1:]))}
    variants = {
        "pytree": jax.jit(lambda t: nn.average_gradients(t, group=g)),
        "per leaf": jax.jit(lambda t: jax.tree_util.tree_map(
            lambda x: dist.all_sum(x, group=g) / n, t)),
    }
    times = {}
    for name, f in variants.items():
        jax.block_until_ready(f(grads))  # compile, warm up
        dist.barrier()
        samples = []
        for _ in range(steps):
            t = time.perf_counter()
            jax.block_until_ready(f(grads))
            samples.append(time.perf_counter() - t)
        times[name] = statistics.median(samples)
    params = sum(x.size for x in jax.tree_util.tree_leaves(grads))
    return {"times": times, "params": params}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("-n", type=int, nargs="+", default=[2])
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    print("| n | pytree all_sum (average_gradients) | one all_sum per leaf | ratio |")
    print("| --- | --- | --- | --- |")
    for n in args.n:
        results = run_ranks(body, n, args=(args.steps,), timeout=600)
        slow = {k: max(r["times"][k] for r in results) for k in results[0]["times"]}
        print(f"| {n} | {slow['pytree'] * 1e3:.2f} ms | {slow['per leaf'] * 1e3:.2f} ms | "
              f"{slow['pytree'] / slow['per leaf']:.2f} |", flush=True)
    print(f"\n{results[0]['params'] / 1e6:.1f} M parameters, float32, 8 leaves.")


if __name__ == "__main__":
    main()
