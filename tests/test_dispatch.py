"""Order and values of collectives on every dispatch path, on real ranks.

Programs lower our effect's token inside themselves and take no runtime token (the fast
path); MLXDIST_RUNTIME_TOKENS=1 keeps JAX's. Each scenario runs three ways: under jax.jit,
under dist.jit, and eagerly (op by op), and checks the values on every rank. The scenarios
are the ones that break when the order is wrong: many independent same-shape collectives after
rank-dependent compute, loop and branch bodies, one jitted helper reused at top level, twice in
a program and inside scan (jit's trace cache hands the same jaxpr to both), results nobody
uses, executions dispatched back to back, two groups on two threads, checkpoint and grad.
"""

import pytest

HOWS = ["jit", "dist.jit", "eager"]


def scenarios(how, group, rank, size):
    import threading

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    import jax_mlxdist as dist

    n, r = size, rank
    nxt, prv = (r + 1) % n, (r - 1) % n
    wrap = {"jit": jax.jit, "dist.jit": dist.jit, "eager": lambda f, **_: f}[how]
    ranks = np.arange(n, dtype=np.float32)
    x = (jnp.arange(16384, dtype=jnp.float32) % 7)  # 64 KiB
    xn = np.asarray(x)
    big = jnp.ones((256, 256), jnp.float32)

    def delay(v, k):
        # Rank- and k-dependent work before an op, so that unordered ops would pair wrongly.
        if (k + r) % 3:
            return v
        return v + 0.0 * jnp.sum(jnp.tanh(big @ big))

    # 64 independent 64 KiB all_sums in one program.
    many = wrap(lambda v: [dist.all_sum(delay(v * (r + 1) + k, k)) for k in range(64)])
    for k, got in enumerate(many(x)):
        np.testing.assert_array_equal(np.asarray(got), xn * (ranks + 1).sum() + n * k,
                                      err_msg=f"{how}: independent all_sum {k}")

    # Loop and branch bodies: c -> all_sum(c + r) - sum(ranks) multiplies by n each step.
    s = float(ranks.sum())
    step = lambda c: dist.all_sum(c + r) - s  # noqa: E731
    loops = {
        "scan": lambda v: lax.scan(lambda c, _: (step(c), None), v, None, length=3)[0],
        "fori_loop": lambda v: lax.fori_loop(0, 3, lambda i, c: step(c), v),
        "while_loop": lambda v: lax.while_loop(lambda ic: ic[0] < 3,
                                               lambda ic: (ic[0] + 1, step(ic[1])), (0, v))[1],
    }
    for name, f in loops.items():
        np.testing.assert_array_equal(np.asarray(wrap(f)(x)), xn * n**3, err_msg=f"{how}: {name}")
    branch = wrap(lambda v: lax.cond(r % 2 == 0, lambda u: dist.all_sum(u * 2),
                                     lambda u: dist.all_sum(u * 3), v))
    np.testing.assert_array_equal(np.asarray(branch(x)),
                                  xn * sum(2 if q % 2 == 0 else 3 for q in range(n)),
                                  err_msg=f"{how}: cond")

    # One jitted helper: at top level first, then twice in a program, then inside scan.
    helper = jax.jit(lambda v: dist.all_gather(delay(v * (r + 1), 0)))
    gathered = lambda v: np.concatenate([np.asarray(v) * (q + 1) for q in range(n)])  # noqa: E731
    np.testing.assert_array_equal(np.asarray(helper(x)), gathered(x), err_msg=f"{how}: helper")
    a, b = wrap(lambda v: (helper(v), helper(v + 1)))(x)
    np.testing.assert_array_equal(np.asarray(a), gathered(x), err_msg=f"{how}: helper 1 of 2")
    np.testing.assert_array_equal(np.asarray(b), gathered(x + 1), err_msg=f"{how}: helper 2 of 2")
    _, ys = wrap(lambda v: lax.scan(lambda c, k: (c, helper(c + k)), v, jnp.arange(3.0)))(x)
    for k in range(3):
        np.testing.assert_array_equal(np.asarray(ys[k]), gathered(x + k),
                                      err_msg=f"{how}: helper in scan, step {k}")

    # Results nobody uses: a send and a barrier.
    def unused(v):
        dist.send(v * (r + 1), nxt)
        got = dist.recv_like(v, prv)
        dist.barrier()
        return got

    np.testing.assert_array_equal(np.asarray(wrap(unused)(x)), xn * (prv + 1),
                                  err_msg=f"{how}: unused send and barrier")

    # 40 executions dispatched back to back, donated, each checked afterwards.
    back = wrap(lambda v, k: dist.all_sum(delay(v * (r + 1), 1) + k), donate_argnums=0)
    outs = [back(x + 0, float(k)) for k in range(40)]
    for k, got in enumerate(jax.block_until_ready(outs)):
        np.testing.assert_array_equal(np.asarray(got), xn * (ranks + 1).sum() + n * k,
                                      err_msg=f"{how}: execution {k} of 40")

    # Two groups, each driven from its own thread at the same time.
    groups = [group.split(0), group.split(0)]
    results, errors = {}, []

    def drive(i):
        try:
            f = wrap(lambda v: dist.all_sum(v + i * 100 + r, group=groups[i]))
            results[i] = [np.asarray(f(x + t)) for t in range(20)]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=drive, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(2):
        for t, got in enumerate(results[i]):
            np.testing.assert_array_equal(got, n * (xn + t + i * 100) + s,
                                          err_msg=f"{how}: group {i} call {t}")
    for g in groups:
        g.close()

    # checkpoint, and grad through the wrapper.
    loss = lambda w: jnp.sum(jnp.sin(dist.all_sum(w * (r + 1))))  # noqa: E731
    w = jnp.linspace(0.0, 1.0, 8)
    got = wrap(jax.grad(jax.checkpoint(loss)))(w)
    want = np.cos(np.asarray(w) * (ranks + 1).sum()) * (r + 1)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, err_msg=f"{how}: checkpoint")
    got = wrap(jax.grad(lambda w: jnp.sum(dist.all_gather(w * (r + 1)) ** 2)))(w)
    np.testing.assert_allclose(np.asarray(got), 2 * np.asarray(w) * (r + 1) ** 2, rtol=1e-6,
                               err_msg=f"{how}: grad through all_gather")


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.ranks(2, 3, timeout=300)
def test_fast_dispatch(how, group, rank, size):
    import jax
    import jax.numpy as jnp

    import jax_mlxdist as dist
    from jax_mlxdist import _dispatch

    assert _dispatch.installed
    text = jax.jit(lambda v: dist.all_sum(v)).lower(jnp.ones(4)).as_text()
    assert "jax.token" not in text  # no runtime token argument or result
    assert "stablehlo.create_token" in text or "after_all" in text
    scenarios(how, group, rank, size)


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.ranks(2, timeout=300, env={"MLXDIST_RUNTIME_TOKENS": "1"})
def test_runtime_tokens(how, group, rank, size):
    import jax
    import jax.numpy as jnp

    import jax_mlxdist as dist
    from jax_mlxdist import _dispatch

    assert not _dispatch.installed
    assert "jax.token" in jax.jit(lambda v: dist.all_sum(v)).lower(jnp.ones(4)).as_text()
    scenarios(how, group, rank, size)


@pytest.mark.ranks(2, timeout=120)
def test_dist_jit_signature(group, rank, size):
    import jax.numpy as jnp
    import numpy as np

    import jax_mlxdist as dist

    @dist.jit(static_argnums=1, donate_argnums=0)
    def scaled(v, k):
        return dist.all_sum(v * k)

    np.testing.assert_array_equal(np.asarray(scaled(jnp.ones(3), 2)), np.full(3, 2.0 * size))

    @dist.jit
    def plain(v):
        return dist.all_max(v + rank)

    assert float(plain(jnp.zeros(()))) == size - 1
    assert "mlxdist_all_reduce" in plain.lower(jnp.zeros(())).as_text()  # jit's methods pass

    class Layer:
        scale = 3.0

        @dist.jit(static_argnums=0)
        def __call__(self, v):
            return dist.all_sum(v * self.scale)

    assert float(Layer()(jnp.ones(()))) == 3.0 * size


@pytest.mark.ranks(2, timeout=120)
def test_eager_barrier_waits_for_every_rank(group, rank, size, tmp_path):
    import os
    import time

    import jax_mlxdist as dist

    marker = os.path.join(str(tmp_path), "arrived")
    dist.barrier()
    if rank == 1:
        time.sleep(1.0)  # late, so a barrier that does not wait is caught
        open(marker, "w").close()
    dist.barrier()
    assert os.path.exists(marker)  # rank 0 left only after rank 1 had arrived
