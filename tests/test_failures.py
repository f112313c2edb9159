"""Mismatches and lost peers raise DistributedError on every rank, quickly, never hang."""

import pytest

from jax_mlxdist.testing import run_ranks

TIMEOUT = 5.0  # MLXDIST_TIMEOUT for these ranks


@pytest.fixture(params=["tcp", "shm", "jaccl"])
def env(request):
    """Each failure is checked on every data path: the ring over sockets and over shared memory
    on one host, and JACCL (over shared memory here)."""
    if request.param == "jaccl":
        return {"MLXDIST_TIMEOUT": str(TIMEOUT), "MLXDIST_BACKEND": "jaccl"}
    return {"MLXDIST_TIMEOUT": str(TIMEOUT), "MLXDIST_TRANSPORT": request.param}


def _attempt(fn):
    """Runs fn; returns (error text or None, seconds taken).

    Eager ops raise DistributedError; a jitted program raises JAX's runtime error carrying it.
    """
    import time
    import jax
    import jax_mlxdist as dist
    t = time.monotonic()
    try:
        fn()
        return None, time.monotonic() - t
    except jax.errors.JaxRuntimeError as e:
        assert dist.is_distributed_error(e), e
        return str(e), time.monotonic() - t


def body_shape_mismatch():
    import jax.numpy as jnp
    import jax_mlxdist as dist
    r = dist.init().rank()
    first = _attempt(lambda: dist.all_sum(jnp.ones(10 + (r == 1))))
    after = _attempt(lambda: dist.all_sum(jnp.ones(3)))  # the group stays failed, no wrong data
    return first, after


@pytest.mark.parametrize("n", [2, 3])
def test_mismatched_shapes_raise_on_all_ranks(n, env):
    results = run_ranks(body_shape_mismatch, n, env=env)
    for r, ((err, took), (err2, _)) in enumerate(results):
        assert err is not None and "all_sum" in err, (r, err)
        assert took < TIMEOUT, (r, took)  # detected, not timed out
        assert err2 is not None and "earlier error" in err2
    # The ranks next to the odd one name both calls.
    assert any("mismatch" in err and "40 bytes" in err and "44 bytes" in err
               for (err, _), _ in results)


def body_order_mismatch():
    import jax
    import jax.numpy as jnp
    import jax_mlxdist as dist
    r = dist.init().rank()

    @jax.jit
    def f(x):
        if r == 0:
            return dist.all_gather(dist.all_sum(x))
        return dist.all_sum(dist.all_gather(x))[:4]

    return _attempt(lambda: f(jnp.ones(4)).block_until_ready())


def test_mismatched_order_raises_on_all_ranks(env):
    results = run_ranks(body_order_mismatch, 2, env=env)
    for r, (err, took) in enumerate(results):
        assert err is not None and "mismatch" in err, (r, err)
        assert "all_sum" in err and "all_gather" in err
        assert took < TIMEOUT


def body_killed_mid_collective():
    import os
    import jax.numpy as jnp
    import jax_mlxdist as dist
    g = dist.init()
    dist.barrier()
    if g.rank() == 1:
        # Dies with the collective in flight on the others.
        os.kill(os.getpid(), 9)
    return _attempt(lambda: dist.all_sum(jnp.ones(4_000_000)))


def test_killed_rank_makes_others_raise(env):
    from jax_mlxdist.testing import RanksFailed
    with pytest.raises(RanksFailed) as info:
        run_ranks(body_killed_mid_collective, 3, env=env)
    report = info.value
    assert "rank 1" in str(report)
    for r in (0, 2):
        err, took = report.results[r]
        assert err is not None and "rank 1" in err, (r, err)
        assert took < TIMEOUT + 2


def body_stalled_peer():
    import time
    import jax.numpy as jnp
    import jax_mlxdist as dist
    g = dist.init()
    if g.rank() == 1:
        time.sleep(TIMEOUT + 2)  # a stalled peer (the subject of the test), alive but silent
        return None
    return _attempt(lambda: dist.all_sum(jnp.ones(8)))


def test_stalled_peer_times_out_with_its_name(env):
    results = run_ranks(body_stalled_peer, 2, env=env, timeout=60)
    err, took = results[0]
    assert err is not None and "timed out" in err and "rank 1" in err
    assert TIMEOUT - 0.5 < took < TIMEOUT + 3


def body_bad_arguments():
    import jax.numpy as jnp
    import jax_mlxdist as dist
    g = dist.init()
    errors = [
        _attempt(lambda: dist.send(jnp.ones(2), g.size())),
        _attempt(lambda: dist.send(jnp.ones(2), g.rank())),
        _attempt(lambda: dist.recv((2,), jnp.float32, -1)),
        _attempt(lambda: dist.sum_scatter(jnp.ones(g.size() + 1))),
        _attempt(lambda: dist.all_max(jnp.ones(2, jnp.complex64))),
        _attempt(lambda: dist.all_sum("text")),
    ]
    ok = float(dist.all_sum(jnp.float32(1)))  # bad calls never reach the wire
    return errors, ok


def test_bad_arguments_raise_before_communicating():
    for errors, ok in run_ranks(body_bad_arguments, 2):
        assert ok == 2.0
        for err, _ in errors:
            assert err is not None
