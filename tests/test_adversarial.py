"""An adversary's run against README's failure promises, on every data path (the ring over
sockets and over shared memory, JACCL over shared memory): ranks killed at random points,
stopped and resumed within the timeout, every pair of different calls, extreme inputs, a
descriptor limit of 64, and sums that are bitwise identical on every rank.
MLXDIST_STRESS=1 runs more of each (and 2.1 GiB per rank)."""

import os

import numpy as np
import pytest

from jax_mlxdist.testing import RanksFailed, attempt, data_path_env, run_ranks

TIMEOUT = 3.0
MARGIN = 3.0  # what a surviving rank may take beyond the timeout (slow CI machines)
STRESS = os.environ.get("MLXDIST_STRESS") == "1"


@pytest.fixture(params=["tcp", "shm", "jaccl"])
def env(request):
    return data_path_env(request.param, TIMEOUT)


def body_killed_at(step):
    import os
    import signal
    import jax.numpy as jnp
    import jax_mlxdist as dist
    g = dist.init()
    r, n = g.rank(), g.size()
    ops = [lambda x: dist.all_sum(x), lambda x: dist.all_gather(x)[r::n],
           lambda x: dist.sum_scatter(jnp.tile(x, n)), lambda x: dist.all_max(x)]
    done = []
    for i in range(12):
        if r == 1 and i == step:
            os.kill(os.getpid(), signal.SIGKILL)
        x = jnp.full(1000 * (1 + i % 3), float(r + i))
        err, took = attempt(lambda: done.append(float(ops[i % 4](x).block_until_ready()[0])))
        if err is not None:
            return done, err, took
    return done, None, 0.0


def test_rank_killed_at_random_points(env):
    rng = np.random.default_rng(7)
    for step in rng.choice(12, 20 if STRESS else 2, replace=STRESS):
        with pytest.raises(RanksFailed) as info:
            run_ranks(body_killed_at, 3, args=(int(step),), env=env, timeout=90)
        assert "rank 1 exited with code -9" in str(info.value)
        for r in (0, 2):
            done, err, took = info.value.results[r]
            # Every call before the death returned the right value; the next one raised.
            want = [3.0 * i + 3 if i % 4 in (0, 2) else (i + 2.0 if i % 4 == 3 else float(i))
                    for i in range(len(done))]
            assert len(done) == step, (step, r, done)
            assert done == want, (step, r, done)
            assert err is not None and "rank 1" in err, (step, r, err)
            assert took < TIMEOUT + MARGIN, (step, r, took)


def body_stopped_within_timeout():
    import os
    import signal
    import threading
    import jax.numpy as jnp
    import jax_mlxdist as dist
    g = dist.init()
    pids = dist.all_gather(jnp.int32(os.getpid())).tolist()
    if g.rank() == 1:
        os.kill(os.getpid(), signal.SIGSTOP)  # rank 0 resumes it well within the timeout
    else:
        threading.Timer(TIMEOUT / 3, os.kill, (pids[1], signal.SIGCONT)).start()
    return [float(dist.all_sum(jnp.float32(k + g.rank()))) for k in range(3)]


def test_rank_stopped_within_the_timeout_just_delays(env):
    assert run_ranks(body_stopped_within_timeout, 2, env=env, timeout=90) == [[1.0, 3.0, 5.0]] * 2


CALLS = {
    "all_sum": lambda dist, g, jnp: dist.all_sum(jnp.ones(4), group=g),
    "all_max": lambda dist, g, jnp: dist.all_max(jnp.ones(4), group=g),
    "all_sum_f16": lambda dist, g, jnp: dist.all_sum(jnp.ones(4, jnp.float16), group=g),
    "all_sum_5": lambda dist, g, jnp: dist.all_sum(jnp.ones(5), group=g),
    "all_gather": lambda dist, g, jnp: dist.all_gather(jnp.ones(4), group=g),
    "sum_scatter": lambda dist, g, jnp: dist.sum_scatter(jnp.ones(4), group=g),
    "barrier": lambda dist, g, jnp: dist.barrier(group=g),
    "split": lambda dist, g, jnp: g.split(0),
}


def body_every_pair():
    import jax
    import jax.numpy as jnp
    import jax_mlxdist as dist
    g = dist.init()
    out = {}
    for a in CALLS:
        for b in CALLS:
            if a == b:
                continue
            sub = g.split(0)  # a fresh group per pair: a mismatch leaves its group failed
            call = CALLS[a if g.rank() == 0 else b]
            out[a, b] = attempt(lambda: jax.block_until_ready(call(dist, sub, jnp)))
            try:
                sub.close()
            except dist.DistributedError:  # close reports the failure again: known already
                pass
    return out


def test_every_pair_of_different_calls_raises_on_both_ranks(env):
    results = run_ranks(body_every_pair, 2, env={**env, "MLXDIST_TIMEOUT": "60"}, timeout=300)
    for (a, b), (err, took) in results[0].items():
        for r, (err, took) in enumerate((results[0][a, b], results[1][a, b])):
            assert err is not None and "mismatch" in err, (a, b, r, err)
            assert took < 10, (a, b, r, took)  # the header check, not the timeout


def body_extremes():
    import jax.numpy as jnp
    import numpy as np
    import jax_mlxdist as dist
    g = dist.init()
    r = g.rank()
    rng = np.random.default_rng(r)
    noise = rng.standard_normal(100_003).astype(np.float32) * 10.0 ** rng.integers(-6, 6, 100_003)
    special = np.array([np.inf, -np.inf, np.nan, 0.0, -0.0, 3.0][r::1][:4], np.float32)
    big = np.full(5, np.iinfo(np.int32).max - r, np.int32)
    strided = jnp.arange(40.0).reshape(8, 5)[::2, 1::2] + r  # a view XLA lays out anew
    return {
        "noise": np.asarray(dist.all_sum(jnp.asarray(noise))).tobytes(),
        "special_sum": np.asarray(dist.all_sum(jnp.asarray(special))),
        "special_max": np.asarray(dist.all_max(jnp.asarray(special))),
        "overflow": np.asarray(dist.all_sum(jnp.asarray(big))),
        "empty": np.asarray(dist.all_sum(jnp.zeros((0, 3)))).shape,
        "empty_gather": np.asarray(dist.all_gather(jnp.zeros((0, 3)))).shape,
        "strided": np.asarray(dist.all_gather(strided)),
    }


def test_extreme_inputs_and_identical_bits(env):
    n = 3
    results = run_ranks(body_extremes, n, env=env, timeout=120)
    specials = [np.array([np.inf, -np.inf, np.nan, 0.0, -0.0, 3.0][r:][:4], np.float32)
                for r in range(n)]
    for out in results:
        assert out["noise"] == results[0]["noise"]  # the same bits on every rank
        np.testing.assert_array_equal(out["special_sum"], np.sum(specials, axis=0))
        np.testing.assert_array_equal(out["special_max"], np.max(specials, axis=0))
        big = sum(np.full(5, np.iinfo(np.int32).max - r, np.int64) for r in range(n))
        np.testing.assert_array_equal(out["overflow"], big.astype(np.int32))  # wraps as numpy
        assert out["empty"] == (0, 3) and out["empty_gather"] == (0, 3)
        base = np.arange(40.0).reshape(8, 5)[::2, 1::2]
        np.testing.assert_array_equal(out["strided"], np.concatenate([base + r for r in range(n)]))


def body_few_descriptors():
    import resource
    import jax.numpy as jnp
    import jax_mlxdist as dist
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    g = dist.init()
    sub = g.split(g.rank() % 2)
    return float(dist.all_sum(jnp.float32(1))), float(dist.all_sum(jnp.float32(1), group=sub))


def test_descriptor_limit_of_64(env):
    assert run_ranks(body_few_descriptors, 3, env=env, timeout=120) == [(3.0, 2.0), (3.0, 1.0),
                                                                         (3.0, 2.0)]


def body_many_ranks():
    import jax.numpy as jnp
    import numpy as np
    import jax_mlxdist as dist
    g = dist.init()
    x = np.random.default_rng(g.rank()).standard_normal(4099).astype(np.float32)
    return np.asarray(dist.all_sum(jnp.asarray(x))).tobytes(), float(dist.all_sum(jnp.float32(1)))


def test_sixteen_ranks_on_few_cores(env):
    results = run_ranks(body_many_ranks, 16, env={**env, "MLXDIST_TIMEOUT": "120"}, timeout=600)
    assert all(out == (results[0][0], 16.0) for out in results)


def body_huge():
    import jax.numpy as jnp
    import jax_mlxdist as dist
    g = dist.init()
    x = jnp.full((2_200_000_000 // 4,), 1.0 + g.rank(), jnp.float32)  # 2.2 GB per rank
    y = dist.all_sum(x)
    return float(y[0]), float(y[-1]), y.shape[0]


@pytest.mark.skipif(not STRESS, reason="2.2 GB per rank: MLXDIST_STRESS=1 runs it")
def test_more_than_two_gib_per_rank(env):
    for out in run_ranks(body_huge, 2, env={**env, "MLXDIST_TIMEOUT": "300"}, timeout=900):
        assert out == (3.0, 3.0, 550_000_000)
