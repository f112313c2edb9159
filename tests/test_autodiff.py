"""Gradients of collectives against explicitly written global objectives.

Each pattern defines per-rank parameters and a global objective of all of them. The ranks
compute gradients with jax.grad through the collectives (eagerly, under jit, and through
jax.checkpoint) and central finite differences of the global objective in float64, and check
them against the same objective computed locally, with no communication, as reference. The
bodies run on the ranks through the pytest plugin (@pytest.mark.ranks).
"""

import numpy as np
import pytest

# Once per backend given to --backend (conftest.py).
pytestmark = pytest.mark.usefixtures("on_backend")


X64 = {"JAX_ENABLE_X64": "1"}
K = 3  # parameters per rank


def params(rank, salt=0):
    return np.random.default_rng(100 * rank + salt).normal(size=K)


def coeffs(n, salt=0):
    """Constants every rank knows (same on all ranks)."""
    return np.random.default_rng(999 + salt).normal(size=n * K)


def local_losses(jnp, dist, n, r):
    """The per-rank programs under test: name -> (fn of this rank's params, kind).

    kind "replicated": every rank computes the same loss, the objective is that loss.
    kind "sum": each rank computes its own loss, the objective is their sum.
    """
    c = jnp.asarray(coeffs(n))
    nxt, prv = (r + 1) % n, (r - 1) % n

    def ring_pass(w):
        dist.send(w, nxt)
        return dist.recv_like(w, prv)

    def ring2(w):  # two hops, like ring attention's rotating blocks
        y1 = ring_pass(w)
        y2 = ring_pass(y1 * 2.0)
        return dist.all_sum(jnp.sum(jnp.sin(w * y1) + y2 * (r + 1)))

    return {
        "all_sum": (lambda w: jnp.sum(jnp.sin(dist.all_sum(w * c[r * K:(r + 1) * K])) ** 2), "replicated"),
        "all_sum_exact": (lambda w: jnp.sum(jnp.cos(dist.all_sum(w, vjp="all_sum")) * c[r * K:(r + 1) * K]), "sum"),
        "all_gather": (lambda w: jnp.sum(jnp.tanh(dist.all_gather(w)) * c), "replicated"),
        "sum_scatter": (lambda w: jnp.sum(dist.sum_scatter(jnp.concatenate([w * (q + 1 + r) for q in range(n)])) ** 3), "sum"),
        "all_max": (lambda w: jnp.sum(dist.all_max(jnp.round(w)) * 0 + dist.all_max(w) * c[:K]), "replicated"),
        "all_min": (lambda w: jnp.sum(dist.all_min(w) ** 2), "replicated"),
        "ring": (ring2, "replicated"),
    }


def global_objectives(jnp, n):
    """The same objectives as functions of all ranks' parameters W (n, K), no communication."""
    c = jnp.asarray(coeffs(n))

    def first_extreme(W, pick):  # value at the lowest rank holding the extreme
        idx = pick(W, axis=0)
        return jnp.take_along_axis(W, idx[None, :], axis=0)[0]

    def ring2(W):
        y1 = jnp.roll(W, 1, axis=0)
        y2 = jnp.roll(y1 * 2.0, 1, axis=0)
        return sum(jnp.sum(jnp.sin(W[r] * y1[r]) + y2[r] * (r + 1)) for r in range(n))

    return {
        "all_sum": lambda W: jnp.sum(jnp.sin(jnp.sum(W * c.reshape(n, K), 0)) ** 2),
        "all_sum_exact": lambda W: sum(jnp.sum(jnp.cos(jnp.sum(W, 0)) * c[r * K:(r + 1) * K]) for r in range(n)),
        "all_gather": lambda W: jnp.sum(jnp.tanh(W.reshape(-1)) * c),
        "sum_scatter": lambda W: sum(
            jnp.sum(sum(W[q] * (r + 1 + q) for q in range(n)) ** 3) for r in range(n)),
        "all_max": lambda W: jnp.sum(first_extreme(W, jnp.argmax) * c[:K]),
        "all_min": lambda W: jnp.sum(first_extreme(W, jnp.argmin) ** 2),
        "ring": ring2,
    }


def tie_params(rank):
    w = params(rank)
    w[0] = 0.5  # element 0 ties on every rank: the lowest rank owns it
    return w


def body_gradients(eps):
    import jax
    import jax.numpy as jnp
    import jax_mlxdist as dist
    g = dist.init()
    r, n = g.rank(), g.size()
    out = {}
    for name, (loss, kind) in local_losses(jnp, dist, n, r).items():
        w = jnp.asarray(tie_params(r) if name in ("all_max", "all_min") else params(r))
        out[name, "grad"] = jax.grad(loss)(w)
        out[name, "jit"] = jax.jit(jax.grad(loss))(w)
        out[name, "remat"] = jax.grad(jax.checkpoint(loss))(w)

        def objective(w):
            value = loss(w)
            return value if kind == "replicated" else dist.all_sum(value)

        objective = jax.jit(objective)
        fd = np.zeros(K)
        for q in range(n):  # every rank walks the same perturbations of the global parameters
            for i in range(K):
                e = jnp.zeros(K).at[i].set(eps if q == r else 0.0)
                diff = (objective(w + e) - objective(w - e)) / (2 * eps)
                if q == r:
                    fd[i] = diff
        out[name, "fd"] = fd
    return out


@pytest.mark.ranks(2, 3, 4, env=X64, timeout=300)
def test_gradients_match_global_objective(rank, size):
    import jax
    import jax.numpy as jnp
    n, eps = size, 1e-6
    res = body_gradients(eps)
    for name, objective in global_objectives(jnp, n).items():
        W = np.stack([tie_params(r) if name in ("all_max", "all_min") else params(r) for r in range(n)])
        reference = np.asarray(jax.grad(objective)(jnp.asarray(W)))
        for r in (rank,):
            for how in ("grad", "jit", "remat"):
                np.testing.assert_allclose(res[name, how], reference[r], rtol=1e-9, atol=1e-12,
                                           err_msg=f"{name} {how} rank {r}")
            smooth = slice(1, K) if name in ("all_max", "all_min") else slice(0, K)  # no FD at ties
            np.testing.assert_allclose(res[name, "fd"][smooth], reference[r][smooth], rtol=1e-5,
                                       atol=1e-6, err_msg=f"{name} finite differences rank {r}")
    # The tie goes to rank 0 alone.
    assert (res["all_min", "grad"][0] != 0) == (rank == 0)


def body_parallel_patterns():
    import jax
    import jax.numpy as jnp
    from jax import lax
    import jax_mlxdist as dist
    from jax_mlxdist.nn import sum_gradients
    g = dist.init()
    r, n = g.rank(), g.size()
    rng = np.random.default_rng(7)
    W1, W2, x = rng.normal(size=(2 * n, 3)), rng.normal(size=(3, 2 * n)), rng.normal(size=3)
    data = rng.normal(size=(4 * n, 3))

    # Tensor parallel (Megatron MLP): W1 split by rows, W2 by columns, x replicated.
    def tp_loss(x, w1, w2):
        h = jnp.tanh(w1 @ sum_gradients()(x))
        return jnp.sum(dist.all_sum(w2 @ h) ** 2)

    tp = jax.jit(jax.grad(tp_loss, argnums=(0, 1, 2)))(
        jnp.asarray(x), jnp.asarray(W1[2 * r:2 * r + 2]), jnp.asarray(W2[:, 2 * r:2 * r + 2]))

    # Data parallel: replicated weights, a shard of the batch, gradients averaged; trained
    # inside lax.scan with the gradient in the body.
    def local_loss(w, batch):
        return jnp.mean((batch @ w - 1.0) ** 2)

    def sgd(w, _):
        grad = jax.grad(local_loss)(w, jnp.asarray(data[4 * r:4 * r + 4]))
        return w - 0.1 * dist.all_sum(grad) / n, None

    w_final, _ = jax.jit(lambda w: lax.scan(sgd, w, None, length=5))(jnp.zeros(3))
    return tp, w_final


@pytest.mark.ranks(2, env=X64)
def test_tensor_and_data_parallel_match_single_process(rank, size):
    import jax
    import jax.numpy as jnp
    n = size
    results = {rank: body_parallel_patterns()}
    rng = np.random.default_rng(7)
    W1, W2, x = rng.normal(size=(2 * n, 3)), rng.normal(size=(3, 2 * n)), rng.normal(size=3)
    data = rng.normal(size=(4 * n, 3))
    gx, gw1, gw2 = jax.grad(lambda x, w1, w2: jnp.sum((w2 @ jnp.tanh(w1 @ x)) ** 2), argnums=(0, 1, 2))(x, W1, W2)
    w = jnp.zeros(3)
    for _ in range(5):
        w = w - 0.1 * jax.grad(lambda w: jnp.mean((data @ w - 1.0) ** 2))(w)
    for r, ((tx, tw1, tw2), w_final) in results.items():
        np.testing.assert_allclose(tx, gx, rtol=1e-9)
        np.testing.assert_allclose(tw1, gw1[2 * r:2 * r + 2], rtol=1e-9)
        np.testing.assert_allclose(tw2, gw2[:, 2 * r:2 * r + 2], rtol=1e-9)
        np.testing.assert_allclose(w_final, w, rtol=1e-9)


def body_jvp_and_transpose():
    import jax
    import jax.numpy as jnp
    import jax_mlxdist as dist
    g = dist.init()
    r, n = g.rank(), g.size()
    x = jnp.arange(2.0 * n) + r
    t = jnp.ones(2 * n) * (r + 1)
    return {
        "jvp_sum": jax.jvp(dist.all_sum, (x,), (t,)),
        "jvp_gather": jax.jvp(dist.all_gather, (x,), (t,)),
        "jvp_scatter": jax.jvp(dist.sum_scatter, (x,), (t,)),
        "jvp_max": jax.jvp(dist.all_max, (x,), (t,)),
        "transpose_scatter": jax.linear_transpose(dist.sum_scatter, x)(jnp.ones(2) * (r + 1))[0],
        "transpose_gather": jax.linear_transpose(dist.all_gather, x)(jnp.arange(2.0 * n * n))[0],
    }


@pytest.mark.ranks(3)
def test_jvp_and_linear_transpose(rank, size):
    n = size
    res = {rank: body_jvp_and_transpose()}
    ts = sum(np.ones(2 * n) * (r + 1) for r in range(n))
    for r, out in res.items():
        np.testing.assert_allclose(out["jvp_sum"][1], ts)
        np.testing.assert_allclose(out["jvp_gather"][1], np.concatenate([np.ones(2 * n) * (q + 1) for q in range(n)]))
        np.testing.assert_allclose(out["jvp_scatter"][1], ts[2 * r:2 * r + 2])
        np.testing.assert_allclose(out["jvp_max"][1], np.ones(2 * n) * n)  # rank n-1 holds every max
        np.testing.assert_allclose(out["transpose_scatter"], np.concatenate([np.ones(2) * (q + 1) for q in range(n)]))
        np.testing.assert_allclose(out["transpose_gather"], np.arange(2.0 * n * n)[2 * n * r:2 * n * (r + 1)])


def body_vmap():
    import jax
    import jax.numpy as jnp
    import jax_mlxdist as dist
    g = dist.init()
    r, n = g.rank(), g.size()
    X = jnp.arange(2 * n * 3 * 4, dtype=jnp.float32).reshape(2 * n, 3, 4) + 100 * r
    out = {}
    for name, op in (("sum", dist.all_sum), ("max", dist.all_max), ("gather", dist.all_gather),
                     ("scatter", dist.sum_scatter)):
        for axis in (0, 1, -1):
            if name == "scatter" and X.shape[0 if axis != 0 else 1] % n:
                continue
            batched = jax.vmap(op, in_axes=axis, out_axes=0)(X)
            looped = jnp.stack([op(jnp.take(X, i, axis=axis)) for i in range(X.shape[axis])])
            out[name, axis] = (batched, looped)
    scalars = jnp.arange(5.0) + r
    out["gather", "scalars"] = (jax.vmap(dist.all_gather)(scalars),
                                jnp.stack([dist.all_gather(s) for s in scalars]))
    nxt, prv = (r + 1) % n, (r - 1) % n
    ring = jax.vmap(lambda v: (dist.send(v, nxt), dist.recv_like(v, prv))[1], in_axes=1, out_axes=1)
    out["ring", 1] = (ring(X), jnp.stack([X[..., i] - 100 * r + 100 * prv for i in range(4)], axis=-1))
    return out


@pytest.mark.ranks(2)
def test_vmap_equals_loop():
    for res in (body_vmap(),):
        assert ("gather", 1) in res and ("scatter", -1) in res
        for key, (batched, looped) in res.items():
            np.testing.assert_array_equal(batched, looped, err_msg=str(key))


def body_custom_vjp():
    import jax
    import jax.numpy as jnp
    import jax_mlxdist as dist

    @jax.custom_vjp
    def scaled_sum(x):
        return dist.all_sum(x)

    def fwd(x):
        return dist.all_sum(x), None

    def bwd(_, ct):
        return (dist.all_sum(ct) * 0.5,)

    scaled_sum.defvjp(fwd, bwd)
    r = dist.init().rank()
    return jax.jit(jax.grad(lambda x: jnp.sum(scaled_sum(x) * (r + 1))))(jnp.ones(2))


@pytest.mark.ranks(2)
def test_collectives_inside_custom_vjp(size):
    for g in (body_custom_vjp(),):
        total = sum(r + 1 for r in range(size))  # (1 + 2) * 0.5 on 2 ranks
        np.testing.assert_allclose(g, [total * 0.5] * 2)
