"""Soak: random collectives (ops, sizes, dtypes, sub-groups) on 4 ranks, checked against numpy.

Every rank draws the same sequence from one seed and builds every rank's input itself, so it
checks its own result exactly (inputs are small integers: every order of summation gives the
same bits). SOAK_OPS per run (default 2,000; MLXDIST_SOAK_OPS=100000 for the full soak): a
random sequence of half that many, run twice; RSS must stay flat over the repeat.
"""

import os

from jax_mlxdist.testing import run_ranks

SOAK_OPS = int(os.environ.get("MLXDIST_SOAK_OPS", "2000"))


def body_soak(n_ops, seed):
    import os
    import numpy as np
    import jax
    import jax.numpy as jnp
    import jax_mlxdist as dist
    jax.config.update("jax_enable_x64", True)  # float64/int64 stay 64-bit

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    world = dist.init()
    me = world.rank()
    # Sub-groups: members of each, in group-rank order, and this rank's instance.
    groups = {"world": (list(range(4)), world),
              "pairs": ([r for r in range(4) if r % 2 == me % 2], world.split(me % 2)),
              "halves": ([r for r in range(4) if r // 2 == me // 2][::-1],
                         world.split(me // 2, key=3 - me))}
    dtypes = ["float32", "float64", "int32", "int64", "uint8", "bool", "float16", "bfloat16",
              "complex64", "int16"]
    sizes = [0, 1, 5, 1000, 20_000, 100_000]
    ops = ["sum", "max", "min", "prod", "gather", "scatter", "sendrecv", "barrier"]
    half = n_ops // 2
    marks = {}
    for step in range(2 * half):
        if step % half == 0:  # the second half repeats the first: its programs are compiled
            rng = np.random.default_rng(seed)
            marks["early" if step == 0 else "repeat"] = rss()
        op = ops[rng.integers(len(ops))]
        gname = list(groups)[rng.integers(len(groups))]
        members, g = groups[gname]
        n = len(members)
        dt = dtypes[rng.integers(len(dtypes))]
        size = sizes[rng.integers(len(sizes))]
        if op == "scatter":
            size = size // n * n
        if op == "prod":
            size = min(size, 1000)
        lo, hi = (1, 3) if op == "prod" else (-8, 9)
        if dt in ("uint8", "bool"):
            lo = max(lo, 0)
        data = rng.integers(lo, hi, size=(4, size))  # every rank's input, drawn on every rank
        npdt = jnp.dtype(dt)
        x_all = [data[members[i]].astype(npdt) for i in range(n)]
        mine = x_all[g.rank()]
        what = f"step {step}: {op} {dt}[{size}] on {gname}"
        if op in ("max", "min") and dt == "complex64":
            op = "sum"
        if op in ("sum", "max", "min", "prod"):
            fn = {"sum": dist.all_sum, "max": dist.all_max, "min": dist.all_min,
                  "prod": dist.all_prod}[op]
            got = np.asarray(fn(jnp.asarray(mine), group=g))
            wide = np.stack([a.astype(np.complex128 if dt == "complex64" else np.float64)
                             for a in x_all])
            if dt == "bool":
                want = wide.any(0) if op in ("sum", "max") else wide.all(0)
            else:
                want = {"sum": wide.sum(0), "max": wide.max(0), "min": wide.min(0),
                        "prod": wide.prod(0)}[op]
            want = want.astype(npdt)
        elif op == "gather":
            got = np.asarray(dist.all_gather(jnp.asarray(mine), group=g))
            want = np.concatenate(x_all)
        elif op == "scatter":
            if dt == "bool":
                continue
            got = np.asarray(dist.sum_scatter(jnp.asarray(mine), group=g))
            total = np.stack([a.astype(np.complex128 if dt == "complex64" else np.float64)
                              for a in x_all]).sum(0).astype(npdt)
            k = size // n
            want = total[g.rank() * k:(g.rank() + 1) * k]
        elif op == "sendrecv":
            # A random perfect matching; the lower rank of a pair sends first (no deadlock).
            perm = rng.permutation(n)
            pairs = {int(perm[i]): int(perm[i ^ 1]) for i in range(n - n % 2)}
            peer = pairs.get(g.rank())
            if peer is None:
                continue
            if g.rank() < peer:
                dist.send(jnp.asarray(mine), peer, group=g)
                got = np.asarray(dist.recv_like(jnp.asarray(mine), peer, group=g))
            else:
                got = np.asarray(dist.recv_like(jnp.asarray(mine), peer, group=g))
                dist.send(jnp.asarray(mine), peer, group=g)
            want = x_all[peer]
        else:
            dist.barrier(group=g)
            continue
        assert got.dtype == want.dtype and got.shape == want.shape, (what, got.shape, want.shape)
        assert got.tobytes() == want.tobytes(), what
    marks["late"] = rss()
    return marks


def test_soak_mixed_collectives_on_4_ranks():
    results = run_ranks(body_soak, 4, args=(SOAK_OPS, 1234), timeout=120 + SOAK_OPS * 0.2)
    for marks in results:
        # The first half compiles a program per new (op, shape, dtype, group); repeating it
        # runs the same collectives again and must not grow memory.
        assert marks["late"] - marks["repeat"] < 24 << 20, marks
