"""Every collective on real subprocess ranks, against numpy."""

import numpy as np
import pytest

from jax_mlxdist.testing import run_ranks

DTYPES = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
          "float16", "bfloat16", "float32", "float64", "complex64"]
# 0-d, one element, a prime, and sizes that are not multiples of the chunk size: the last
# is above the small-message path, so it exercises the pipelined ring.
SIZES = [(), (1,), (7,), (3, 37), (100_003,)]


def np_dtype(name):
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def make_input(rank, shape, dtype, salt=0):
    """Deterministic per-rank data, small enough that sums stay exact in every integer type."""
    n = int(np.prod(shape, dtype=np.int64))
    rng = np.random.default_rng(1000 * rank + 17 * salt + n)
    dt = np_dtype(dtype)
    if dt == np.bool_:
        vals = rng.integers(0, 2, n).astype(bool)
    elif dt.kind in "iu":
        vals = rng.integers(0, 5, n).astype(dt)
    elif dt.kind == "c":
        vals = (rng.integers(-4, 5, n) + 1j * rng.integers(-4, 5, n)).astype(dt)
    else:
        vals = (rng.integers(-8, 9, n) / 4).astype(dt)  # exactly representable even in float16
    return vals.reshape(shape)


def reference(op, inputs):
    stack = np.stack([np.asarray(v) for v in inputs])
    dt = stack.dtype
    if op == "sum":
        if dt == np.bool_:
            return stack.any(0)
        halves = (np.dtype("float16"), np_dtype("bfloat16"))
        return (stack.astype(np.float32) if dt in halves else stack).sum(0).astype(dt)
    if dt == np.bool_:
        return stack.any(0) if op == "max" else stack.all(0)
    return stack.max(0) if op == "max" else stack.min(0)


def body_all_ops(dtypes, sizes):
    import jax.numpy as jnp
    import jax_mlxdist as dist
    g = dist.init()
    r, n = g.rank(), g.size()
    out = {}
    for dt in dtypes:
        for shape in sizes:
            x = jnp.asarray(make_input(r, shape, dt))
            out[dt, shape, "sum"] = dist.all_sum(x)
            if dt != "complex64":
                out[dt, shape, "max"] = dist.all_max(x)
                out[dt, shape, "min"] = dist.all_min(x)
            out[dt, shape, "gather"] = dist.all_gather(x)
            lead = (n * (shape[0] if shape else 1),) + tuple(shape[1:])
            out[dt, shape, "scatter"] = dist.sum_scatter(jnp.asarray(make_input(r, lead, dt, 1)))
    return out


def check_all_ops(results, dtypes, sizes):
    n = len(results)
    for dt in dtypes:
        for shape in sizes:
            inputs = [make_input(r, shape, dt) for r in range(n)]
            ops = ["sum", "gather", "scatter"] + ([] if dt == "complex64" else ["max", "min"])
            for op in ops:
                got = [np.asarray(res[dt, shape, op]) for res in results]
                for r in range(1, n):  # identical bits on every rank (except scatter's blocks)
                    if op != "scatter":
                        assert got[r].tobytes() == got[0].tobytes(), (dt, shape, op, r)
                if op == "gather":
                    want = np.concatenate([np.atleast_1d(v) for v in inputs])
                elif op == "scatter":
                    lead = (n * (shape[0] if shape else 1),) + tuple(shape[1:])
                    total = reference("sum", [make_input(r, lead, dt, 1) for r in range(n)])
                    want = None
                    for r in range(n):
                        block = np.split(total, n)[r]
                        assert got[r].shape == block.shape, (dt, shape, r)
                        np.testing.assert_allclose(got[r].astype(np.float64 if dt != "complex64" else np.complex128),
                                                   block.astype(np.float64 if dt != "complex64" else np.complex128),
                                                   rtol=1e-2 if dt in ("float16", "bfloat16") else 1e-6)
                    continue
                else:
                    want = reference(op, inputs)
                assert got[0].shape == want.shape and got[0].dtype == want.dtype, (dt, shape, op)
                if dt in ("float16", "bfloat16"):
                    np.testing.assert_allclose(got[0].astype(np.float32), want.astype(np.float32), rtol=1e-2)
                else:
                    np.testing.assert_array_equal(got[0], want, err_msg=f"{dt} {shape} {op}")


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_every_op_and_dtype(n):
    # 64-bit types need x64 mode in the ranks.
    results = run_ranks(body_all_ops, n, args=(DTYPES, SIZES), timeout=240,
                        env={"JAX_ENABLE_X64": "1"})
    check_all_ops(results, DTYPES, SIZES)


def body_huge():
    import jax.numpy as jnp
    import jax_mlxdist as dist
    r = dist.init().rank()
    x = jnp.full((17 * 2**20 + 3,), r + 1, jnp.float32)  # > 64 MiB
    y = dist.all_sum(x)
    return float(y.min()), float(y.max()), y.shape


def test_larger_than_64_mib():
    for lo, hi, shape in run_ranks(body_huge, 2, timeout=240):
        assert (lo, hi, shape) == (3.0, 3.0, (17 * 2**20 + 3,))


def body_control_flow():
    import jax
    import jax.numpy as jnp
    from jax import lax
    import jax_mlxdist as dist
    g = dist.init()
    r, n = g.rank(), g.size()

    @jax.jit
    def f(x):
        a = lax.cond(x[0] > 0, dist.all_sum, lambda v: dist.all_max(v) * 0, x)
        b, gathered = lax.scan(lambda c, _: (dist.all_sum(c) / n, dist.all_gather(c)), x, None, length=3)
        c = lax.fori_loop(0, 10, lambda i, v: dist.all_sum(v) / n, x)
        return a, b, gathered, c

    eager = dist.all_sum(jnp.arange(3.0) + r)
    return [eager] + list(f(jnp.arange(3.0) + r + 1))


@pytest.mark.parametrize("n", [2, 3])
def test_inside_jit_scan_cond_fori_loop(n):
    results = run_ranks(body_control_flow, n)
    base = np.arange(3.0)
    total = sum(base + r + 1 for r in range(n))
    for eager, a, b, gathered, c in results:
        np.testing.assert_allclose(eager, sum(base + r for r in range(n)))
        np.testing.assert_allclose(a, total)
        np.testing.assert_allclose(b, total / n)
        assert gathered.shape == (3, 3 * n)
        np.testing.assert_allclose(c, total / n)


def body_ordering_hazard():
    import jax
    import jax.numpy as jnp
    import jax_mlxdist as dist
    r = dist.init().rank()

    # Independent collectives of equal shape: XLA may run them in any order unless the
    # effect orders them; a wrong pairing gives wrong sums.
    @jax.jit
    def f(x):
        return [dist.all_sum(x * (i + 1)) for i in range(12)] + [dist.all_gather(x[:5] + i) for i in range(3)]

    outs = f(jnp.full((300_000,), r + 1.0, jnp.float32))
    outs2 = f(jnp.full((300_000,), r + 1.0, jnp.float32))  # a second, overlapping execution
    return [(float(o.min()), float(o.max())) for o in outs + outs2]


def test_many_independent_collectives_keep_program_order():
    n = 2
    total = sum(r + 1.0 for r in range(n))
    for res in run_ranks(body_ordering_hazard, n):
        sums = res[:12] + res[15:27]
        for i, (lo, hi) in enumerate(sums):
            assert lo == hi == total * (i % 12 + 1)
        gathers = res[12:15] + res[27:30]
        for i, (lo, hi) in enumerate(gathers):
            assert (lo, hi) == (1.0 + i % 3, 2.0 + i % 3)


def body_send_recv():
    import jax
    import jax.numpy as jnp
    import jax_mlxdist as dist
    g = dist.init()
    r, n = g.rank(), g.size()
    got = {}
    # Every ordered pair, neighbours or not, both eager and inside jit.
    for src in range(n):
        for dst in range(n):
            if src == dst:
                continue
            if r == src:
                dist.send(jnp.arange(4.0) + 10 * src + dst, dst)
            elif r == dst:
                got[src, "eager"] = dist.recv((4,), jnp.float32, src)
    step = jax.jit(lambda x: (dist.send(x, (r + 2) % n), dist.recv_like(x, (r - 2) % n))[1])
    got["jit"] = step(jnp.full((2, 3), r, jnp.int32))
    return got


def test_send_recv_between_any_ranks():
    n = 4
    results = run_ranks(body_send_recv, n)
    for dst, res in enumerate(results):
        for src in range(n):
            if src != dst:
                np.testing.assert_array_equal(res[src, "eager"], np.arange(4.0) + 10 * src + dst)
        np.testing.assert_array_equal(res["jit"], np.full((2, 3), (dst - 2) % n))


def body_split():
    import jax.numpy as jnp
    import jax_mlxdist as dist
    g = dist.init()
    r = g.rank()
    evens_odds = g.split(r % 2)
    reversed_ = g.split(0, key=100 - r)  # -1 would mean "keep rank order"
    out = {"sub": (evens_odds.rank(), evens_odds.size()), "rev": reversed_.rank()}
    # The two sub-groups run different collectives at the same time.
    if r % 2 == 0:
        out["res"] = dist.all_sum(jnp.full((200_000,), r, jnp.float32), group=evens_odds)[:2]
    else:
        out["res"] = dist.all_gather(jnp.float32(r), group=evens_odds)
    out["world"] = dist.all_sum(jnp.float32(1))
    out["rev_gather"] = dist.all_gather(jnp.int32(r), group=reversed_)
    return out


def test_split_subgroups_run_concurrently():
    n = 4
    results = run_ranks(body_split, n)
    for r, res in enumerate(results):
        assert res["sub"] == (r // 2, 2)
        assert res["rev"] == n - 1 - r
        if r % 2 == 0:
            np.testing.assert_array_equal(res["res"], [2.0, 2.0])
        else:
            np.testing.assert_array_equal(res["res"], [1.0, 3.0])
        assert res["world"] == n
        np.testing.assert_array_equal(res["rev_gather"], [3, 2, 1, 0])


def body_close_reinit():
    import jax.numpy as jnp
    import jax_mlxdist as dist
    g = dist.init()
    a = float(dist.all_sum(jnp.float32(g.rank())))
    g.close()
    closed = g.closed
    try:
        dist.all_sum(jnp.float32(1), group=g)
        err = None
    except dist.DistributedError as e:
        err = str(e)
    with dist.init() as g2:
        b = float(dist.all_sum(jnp.float32(10 * g2.rank())))
        same = g2 is g
    return a, closed, err, b, same


def test_close_then_init_again():
    for a, closed, err, b, same in run_ranks(body_close_reinit, 3):
        assert (a, closed, b, same) == (3.0, True, 30.0, False)
        assert "closed" in err


def body_barrier():
    import time
    import jax_mlxdist as dist
    g = dist.init()
    if g.rank() == 0:
        time.sleep(1.0)  # the slow rank under test: the others must wait for it
    t = time.monotonic()
    dist.barrier()
    return time.monotonic() - t


def test_barrier_waits_for_every_rank():
    waits = run_ranks(body_barrier, 3)
    assert all(w > 0.5 for w in waits[1:])
