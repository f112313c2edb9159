"""broadcast, reduce, gather and scatter on real subprocess ranks, against numpy: every dtype,
every root, eager and jitted, with gradients and vmap (bodies run on the ranks)."""

import cloudpickle
import numpy as np
import pytest

import test_collectives
from jax_mlxdist.testing import run_ranks
from test_collectives import DTYPES, X64, assert_close, make_input, np_dtype, reference

cloudpickle.register_pickle_by_value(test_collectives)  # the bodies use its inputs

pytestmark = pytest.mark.usefixtures("on_backend")
N = 3


def body_rooted(dtypes):
    import jax
    import jax.numpy as jnp
    import jax_mlxdist as dist
    g = dist.init()
    r, n = g.rank(), g.size()
    out = {}
    for name in dtypes:
        dt = jnp.bfloat16 if name == "bfloat16" else name
        x = jnp.asarray(make_input(r, (n * 2, 3), name), dt)
        for root in range(n):
            jit = root == 1  # eager for the other roots
            call = (lambda f: jax.jit(f)) if jit else (lambda f: f)
            out[name, root, "broadcast"] = np.asarray(call(lambda v: dist.broadcast(v, root))(x))
            out[name, root, "gather"] = np.asarray(call(lambda v: dist.gather(v, root))(x))
            block = x if r == root else x[:2]  # elsewhere only a block's shape
            out[name, root, "scatter"] = np.asarray(call(lambda v: dist.scatter(v, root))(block))
            ops = ("sum",) if name == "complex64" else ("sum", "max", "min")
            for op in ops:
                out[name, root, "reduce", op] = np.asarray(
                    call(lambda v: dist.reduce(v, root, op))(x))
    return out


def test_rooted_collectives_every_dtype_and_root():
    results = run_ranks(body_rooted, N, args=(DTYPES,), env=X64, timeout=600)
    for r, out in enumerate(results):
        for name in DTYPES:
            xs = [make_input(p, (N * 2, 3), name).astype(np_dtype(name)) for p in range(N)]
            for root in range(N):
                what = (r, name, root)
                assert_close(out[name, root, "broadcast"], xs[root], what + ("broadcast",))
                want = np.concatenate(xs) if r == root else xs[r]
                assert_close(out[name, root, "gather"], want, what + ("gather",))
                assert_close(out[name, root, "scatter"], xs[root][2 * r:2 * r + 2], what + ("scatter",))
                for op in ("sum",) if name == "complex64" else ("sum", "max", "min"):
                    want = reference(op, xs) if r == root else xs[r]
                    assert_close(out[name, root, "reduce", op], want, what + ("reduce", op))


def body_rules():
    import jax
    import jax.numpy as jnp
    import jax_mlxdist as dist
    g = dist.init()
    r, n = g.rank(), g.size()
    root = 1
    x = jnp.arange(n * 4, dtype=jnp.float32).reshape(n * 2, 2) + 10 * r
    w = jnp.arange(n * 4, dtype=jnp.float32).reshape(n * 2, 2) * (r + 1)
    out = {}
    out["bcast grad"] = np.asarray(jax.grad(lambda v: jnp.sum(dist.broadcast(v, root) * w))(x))
    out["reduce grad"] = np.asarray(jax.jit(jax.grad(
        lambda v: jnp.sum(dist.reduce(v, root) * w)))(x))
    wg = jnp.ones((n * n * 2, 2)) * jnp.arange(n * n * 2)[:, None] if r == root else w
    out["gather grad"] = np.asarray(jax.grad(lambda v: jnp.sum(dist.gather(v, root) * wg))(x))
    block = x if r == root else x[:2]
    out["scatter grad"] = np.asarray(jax.grad(
        lambda v: jnp.sum(dist.scatter(v, root) * w[:2]))(block))
    _, out["bcast jvp"] = jax.jvp(lambda v: dist.broadcast(v, root), (x,), (w,))
    xb = jnp.stack([x, x + 100], axis=1)  # batch on axis 1
    out["bcast vmap"] = np.asarray(jax.vmap(lambda v: dist.broadcast(v, root), 1, 1)(xb))
    out["gather vmap"] = np.asarray(jax.vmap(lambda v: dist.gather(v, root), 1, 1)(xb))
    out["x"], out["w"] = np.asarray(x), np.asarray(w)
    return out


def test_rooted_gradients_jvp_and_vmap():
    results = run_ranks(body_rules, N, timeout=300)
    root = 1
    ws = [res["w"] for res in results]
    xs = [res["x"] for res in results]
    for r, out in enumerate(results):
        # broadcast: every rank's output is root's x, so root's gradient is the sum of the w's.
        want = sum(ws) if r == root else np.zeros_like(xs[r])
        np.testing.assert_array_equal(out["bcast grad"], want)
        # reduce: root's sum has every x in it; elsewhere the output is also x itself.
        want = ws[root] if r == root else ws[root] + ws[r]
        np.testing.assert_array_equal(out["reduce grad"], want)
        wg = np.ones((N * N * 2, 2)) * np.arange(N * N * 2)[:, None]
        want = wg[r * 6:(r + 1) * 6] if r == root else wg[r * 6:(r + 1) * 6] + ws[r]
        np.testing.assert_array_equal(out["gather grad"], want)
        want = np.concatenate([w[:2] for w in ws]) if r == root else np.zeros((2, 2))
        np.testing.assert_array_equal(out["scatter grad"], want)
        np.testing.assert_array_equal(np.asarray(out["bcast jvp"]), ws[root])
        np.testing.assert_array_equal(out["bcast vmap"], np.stack([xs[root], xs[root] + 100], 1))
        gathered = np.concatenate(xs) if r == root else xs[r]
        np.testing.assert_array_equal(out["gather vmap"], np.stack([gathered, gathered + 100], 1))


def body_mismatched_roots():
    import jax.numpy as jnp
    import jax_mlxdist as dist
    from jax_mlxdist.testing import attempt
    g = dist.init()
    err, _ = attempt(lambda: dist.broadcast(jnp.ones(4), root=g.rank()))  # each its own root
    if err is None:
        err, _ = attempt(dist.barrier)
    return err


def test_mismatched_roots_raise_on_every_rank_naming_both_calls():
    for rank, err in enumerate(run_ranks(body_mismatched_roots, 2, env={"MLXDIST_TIMEOUT": "20"},
                                         timeout=120)):
        assert err is not None and "root 0" in err and "root 1" in err, (rank, err)
