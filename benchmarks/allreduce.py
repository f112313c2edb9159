"""Latency and bus bandwidth of all_sum and all_gather on the ring backend, jitted steady state.

    python benchmarks/allreduce.py            # n = 2 and 4, 4 B .. 64 MiB
    python benchmarks/allreduce.py -n 2 --sizes 4 65536

Per size: one jitted call per iteration, median of several batches, slowest rank. all_sum runs
in place (input donated, iterations chained through their results, as in a training loop) and
into a fresh output; all_gather into a fresh output, beside XLA alone writing an output of the
same size (a jitted concatenate): on CPU, large fresh outputs cost as much as the data movement
itself. Bus bandwidth: all_sum 2(n-1)/n x bytes / time, all_gather (n-1)/n x output bytes / time.
The last line times 1,000 dependent 4-byte all_sums inside one jitted fori_loop (dispatch paid
once).
"""

from __future__ import annotations

import argparse
import statistics

from jax_mlxdist.testing import run_ranks

DEFAULT_SIZES = [4, 1024, 64 << 10, 1 << 20, 16 << 20, 64 << 20]


def _iterations(nbytes: int) -> int:
    return max(3, min(200, (256 << 20) // max(nbytes, 1) // 8))


def measure(sizes: list[int], batches: int) -> dict:
    import time
    import jax
    import jax.numpy as jnp
    from jax import lax
    import jax_mlxdist as dist

    g = dist.init()

    def timed(step, x, iters, chain):
        for _ in range(2):  # compile and warm up
            y = step(x).block_until_ready()
            x = y if chain else x
        times = []
        for _ in range(batches):
            dist.barrier()
            t = time.perf_counter()
            y = x
            for _ in range(iters):
                y = step(y if chain else x)
            y.block_until_ready()
            times.append((time.perf_counter() - t) / iters)
            if chain:
                x = y
        return statistics.median(times)

    steps = {
        "all_sum": (jax.jit(dist.all_sum, donate_argnums=0), True),
        "all_sum fresh": (jax.jit(dist.all_sum), False),
        "all_gather": (jax.jit(dist.all_gather), False),
        "xla concatenate": (jax.jit(lambda x: jnp.concatenate([x] * g.size())), False),
    }
    out = {}
    for nbytes in sizes:
        for name, (step, chain) in steps.items():
            x = jnp.zeros((max(1, nbytes // 4),), jnp.float32)
            out[name, nbytes] = timed(step, x, _iterations(nbytes), chain)
    loop = jax.jit(lambda x: lax.fori_loop(0, 1000, lambda i, c: dist.all_sum(c), x))
    out["loop"] = timed(loop, jnp.zeros((1,), jnp.float32), 1, False) / 1000
    return out


def _fmt_size(b: int) -> str:
    for unit, k in (("MiB", 20), ("KiB", 10)):
        if b >= 1 << k:
            return f"{b >> k} {unit}"
    return f"{b} B"


def _fmt_time(s: float) -> str:
    return f"{s * 1e6:.0f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", type=int, nargs="+", default=[2, 4], help="rank counts")
    p.add_argument("--sizes", type=int, nargs="+", default=DEFAULT_SIZES, help="bytes per rank")
    p.add_argument("--batches", type=int, default=5)
    p.add_argument("--transport", nargs="+", default=["tcp", "shm"], choices=["tcp", "shm"],
                   help="data paths to measure (MLXDIST_TRANSPORT)")
    args = p.parse_args()
    for n in args.n:
        for transport in args.transport:
            per_rank = run_ranks(measure, n, args=(args.sizes, args.batches), timeout=1800,
                                 env={"MLXDIST_TRANSPORT": transport})
            worst = {k: max(r[k] for r in per_rank) for k in per_rank[0]}
            print(f"\nring backend over {transport}, n = {n} (slowest rank, median of {args.batches} batches)")
            print("| size | all_sum in place | all_sum, fresh output | all_gather | "
                  "XLA alone writing all_gather's output |")
            print("| --- | --- | --- | --- | --- |")
            for b in args.sizes:
                row = [_fmt_size(b)]
                for name in ("all_sum", "all_sum fresh", "all_gather", "xla concatenate"):
                    t = worst[name, b]
                    moved = 2 * (n - 1) / n * b if name.startswith("all_sum") else (n - 1) * b
                    rate = f" ({moved / t / 1e9:.2f} GB/s)" if b >= 64 << 10 else ""
                    row.append(_fmt_time(t) + rate)
                print("| " + " | ".join(row) + " |")
            print(f"4 B all_sum inside one jitted fori_loop of 1,000: {_fmt_time(worst['loop'])} per op")


if __name__ == "__main__":
    main()
