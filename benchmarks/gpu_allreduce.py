"""all_sum on GPU arrays, one process per GPU: our NCCL backend, our ring backend staged through
pinned host memory, and JAX's own shard_map(psum) on the same GPUs (one process, all of them),
side by side.

    python benchmarks/gpu_allreduce.py -n 2                       # 4 B .. 1 GiB
    python benchmarks/gpu_allreduce.py -n 2 --sizes 4 1M 256M --impls nccl jax --ops 10

Per size: chained jitted calls, each running --ops all-reduces in a row (1: one op per call, so
JAX's per-call dispatch counts; 10: the steady state inside a compiled step); median of batches,
slowest rank; time per all-reduce and bus bandwidth 2(n-1)/n x bytes / time. NVLink multicast
stays off (NCCL_NVLS_ENABLE=0).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

from jax_mlxdist.testing import run_ranks

SIZES = ["4", "64K", "1M", "16M", "256M", "1G"]
ENV = {"JAX_PLATFORMS": "cuda", "XLA_PYTHON_CLIENT_PREALLOCATE": "false", "NCCL_NVLS_ENABLE": "0"}


def parse_size(s: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * units[s[-1]] if s[-1] in units else int(s)


def iterations(nbytes: int) -> int:
    return max(3, min(200, (4 << 30) // max(nbytes, 1) // 16))


def repeated(op, ops):
    """One jitted call running op ops times in a row (x -> op(x) / n keeps values bounded)."""
    import jax
    return jax.jit(lambda x: jax.lax.fori_loop(0, ops, lambda _, y: op(y), x), donate_argnums=0)


def time_fn(step, x, nbytes, barrier, ops, batches=5):
    import time
    x = step(x).block_until_ready()
    times = []
    for _ in range(batches):
        barrier()
        t = time.perf_counter()
        for _ in range(iterations(nbytes)):
            x = step(x)
        x.block_until_ready()
        times.append((time.perf_counter() - t) / iterations(nbytes) / ops)
    return statistics.median(times)


def ours(backend, sizes, ops):
    import jax.numpy as jnp
    import jax_mlxdist as dist
    g = dist.init(strict=True, backend=backend)
    assert g.backend == backend
    step = repeated(lambda x: dist.all_sum(x) * (1.0 / g.size()), ops)
    out = {}
    for nbytes in sizes:
        x = jnp.ones((max(1, nbytes // 4),), jnp.float32)
        out[nbytes] = time_fn(step, x, nbytes, dist.barrier, ops)
        assert float(step(jnp.ones(4, jnp.float32))[0]) == 1.0
    out["dispatch"] = dispatch_ahead(step, jnp.ones(1 << 20, jnp.float32), dist.barrier)
    return out


def dispatch_ahead(step, x, barrier, calls=40):
    """(seconds to dispatch `calls` chained calls, seconds until the last result is ready):
    dispatch returning long before the results means Python runs ahead of the device."""
    import time
    x = step(x).block_until_ready()
    barrier()
    t = time.perf_counter()
    for _ in range(calls):
        x = step(x)
    dispatched = time.perf_counter() - t
    x.block_until_ready()
    return dispatched, time.perf_counter() - t


JAX_PSUM = """
import json, sys, statistics, time
import jax, jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
sys.path.insert(0, {here!r})
from gpu_allreduce import repeated, time_fn
n, sizes, ops = {n}, {sizes}, {ops}
mesh = Mesh(jax.devices()[:n], ("x",))
shard = getattr(jax, "shard_map", None) or __import__("jax.experimental.shard_map", fromlist=["shard_map"]).shard_map
psum = shard(lambda x: jax.lax.psum(x, "x") * (1.0 / n), mesh=mesh, in_specs=P("x"), out_specs=P("x"))
f = repeated(psum, ops)
out = {{}}
for nbytes in sizes:
    x = jax.device_put(jnp.ones((n * max(1, nbytes // 4),), jnp.float32), NamedSharding(mesh, P("x")))
    out[nbytes] = time_fn(f, x, nbytes, lambda: None, ops)
print(json.dumps(out))
"""


def jax_psum(n, sizes, ops):
    here = os.path.dirname(os.path.abspath(__file__))
    code = JAX_PSUM.format(here=here, n=n, sizes=sizes, ops=ops)
    done = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True,
                          env={**os.environ, **ENV}, check=True)
    import json
    return {int(k): v for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", type=int, default=2)
    p.add_argument("--sizes", nargs="+", default=SIZES)
    p.add_argument("--impls", nargs="+", default=["nccl", "ring", "jax"],
                   choices=["nccl", "ring", "jax"])
    p.add_argument("--ops", type=int, nargs="+", default=[1, 10],
                   help="all-reduces per jitted call (one table each)")
    args = p.parse_args()
    sizes = [parse_size(s) for s in args.sizes]
    labels = {"nccl": "ours, nccl", "ring": "ours, ring (staged)", "jax": "JAX shard_map(psum)"}
    for ops in args.ops:
        results = {}
        for impl in args.impls:
            if impl == "jax":
                results[impl] = jax_psum(args.n, sizes, ops)
                continue
            per_rank = run_ranks(ours, args.n, args=(impl, sizes, ops), env=ENV, timeout=1800,
                                 backend=impl)
            results[impl] = {s: max(r[s] for r in per_rank) for s in sizes}
            d, ready = max(r["dispatch"] for r in per_rank)
            print(f"{labels[impl]}: 40 chained 4 MiB calls ({ops} all_sum each) dispatched in "
                  f"{d * 1e3:.2f} ms, results ready after {ready * 1e3:.2f} ms", flush=True)
        ratios = [i for i in ("nccl", "ring") if i in results] if "jax" in results else []
        print(f"\nall_sum on {args.n} GPUs, {ops} per jitted call: time per all_sum / bus GB/s "
              "(slowest rank, median)")
        print("| size | " + " | ".join(labels[i] for i in args.impls) + " | " +
              "".join(f"{i} / JAX (time) | " for i in ratios))
        print("| --- " * (len(args.impls) + len(ratios) + 1) + "|")
        for s in sizes:
            cells = []
            for i in args.impls:
                t = results[i][s]
                cells.append(f"{t * 1e6:.0f} us / {2 * (args.n - 1) / args.n * s / t / 1e9:.2f}")
            cells += [f"{results[i][s] / results['jax'][s]:.2f}" for i in ratios]
            print(f"| {args.sizes[sizes.index(s)]} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
