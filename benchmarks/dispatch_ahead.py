"""How far dispatch runs ahead: 40 chained jitted steps (tanh, then a 4 MiB all_sum), time to
dispatch them against time until the last result is ready, with programs making their own
token (default) and with JAX's runtime token (MLXDIST_RUNTIME_TOKENS=1), in one run.

    python benchmarks/dispatch_ahead.py [-n 2] [--mib 4] [--steps 40]
"""

from __future__ import annotations

import argparse

from jax_mlxdist.testing import run_ranks


def body(count, steps, repeats=3):
    import time

    import jax
    import jax.numpy as jnp

    import jax_mlxdist as dist

    n = dist.init().size()
    step = jax.jit(lambda x: dist.all_sum(jnp.tanh(x)) / n, donate_argnums=0)
    x = step(jnp.ones(count, jnp.float32)).block_until_ready()
    out = []
    for _ in range(repeats):
        dist.barrier()
        t = time.perf_counter()
        for _ in range(steps):
            x = step(x)
        dispatched = time.perf_counter() - t
        x.block_until_ready()
        out.append((dispatched, time.perf_counter() - t))
    return min(out, key=lambda r: r[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", type=int, default=2)
    p.add_argument("--mib", type=float, default=4.0)
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args()
    count = int(args.mib * (1 << 20)) // 4
    print(f"| {args.steps} steps, {args.mib:g} MiB all_sum, n = {args.n} | dispatched after | "
          "ready after |\n| --- | --- | --- |")
    for label, env in (("own token", {}), ("runtime token", {"MLXDIST_RUNTIME_TOKENS": "1"})):
        ranks = run_ranks(body, args.n, args=(count, args.steps), env=env, timeout=600)
        d, r = max(x[0] for x in ranks), max(x[1] for x in ranks)
        print(f"| {label} | {d * 1e3:.1f} ms | {r * 1e3:.1f} ms |", flush=True)


if __name__ == "__main__":
    main()
