"""Latency and bus bandwidth of all_sum and all_gather on the ring backend, jitted steady state.

    python benchmarks/allreduce.py            # n = 2 and 4, 4 B .. 64 MiB
    python benchmarks/allreduce.py -n 2 --sizes 4 65536

Per size: one jitted call per iteration, iterations chained through their results, median of
several batches, slowest rank. Bus bandwidth: all_sum 2(n-1)/n x bytes / time, all_gather
(n-1)/n x output bytes / time. The last line times 1,000 dependent 4-byte all_sums inside one
jitted fori_loop (dispatch paid once).
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
    out = {}
    for op_name in ("all_sum", "all_gather"):
        op = getattr(dist, op_name)
        # all_gather's output is n times larger: feed back one block to keep shapes fixed.
        step = jax.jit(lambda x: op(x) if op_name == "all_sum" else op(x)[: x.shape[0]])
        for nbytes in sizes:
            x = jnp.zeros((max(1, nbytes // 4),), jnp.float32)
            x = step(x).block_until_ready()  # compile and warm up
            iters, times = _iterations(nbytes), []
            for _ in range(batches):
                dist.barrier()
                t = time.perf_counter()
                for _ in range(iters):
                    x = step(x)
                x.block_until_ready()
                times.append((time.perf_counter() - t) / iters)
            out[op_name, nbytes] = statistics.median(times)
    loop = jax.jit(lambda x: lax.fori_loop(0, 1000, lambda i, c: dist.all_sum(c), x))
    x = loop(jnp.zeros((1,), jnp.float32)).block_until_ready()
    times = []
    for _ in range(batches):
        dist.barrier()
        t = time.perf_counter()
        loop(x).block_until_ready()
        times.append((time.perf_counter() - t) / 1000)
    out["loop"] = statistics.median(times)
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
            print(f"| size | all_sum time | all_sum bus GB/s | all_gather time | all_gather bus GB/s |")
            print("| --- | --- | --- | --- | --- |")
            for b in args.sizes:
                b = max(4, b // 4 * 4)
                ts, tg = worst["all_sum", b], worst["all_gather", b]
                bus_s = 2 * (n - 1) / n * b / ts / 1e9
                bus_g = (n - 1) / n * (n * b) / tg / 1e9
                print(f"| {_fmt_size(b)} | {_fmt_time(ts)} | {bus_s:.3f} | {_fmt_time(tg)} | {bus_g:.3f} |")
            print(f"4 B all_sum inside one jitted fori_loop of 1,000: {_fmt_time(worst['loop'])} per op")


if __name__ == "__main__":
    main()
