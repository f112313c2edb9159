"""Every collective on real subprocess ranks, against numpy (bodies run on the ranks)."""

import numpy as np
import pytest

# Once per backend given to --backend (conftest.py).
pytestmark = pytest.mark.usefixtures("on_backend")

DTYPES = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
          "float16", "bfloat16", "float32", "float64", "complex64", "complex128"]
HALVES = ("float16", "bfloat16")
# 0-d, one element, a prime, and sizes that are not multiples of the chunk size: the last
# is above the small-message path, so it exercises the pipelined ring.
SIZES = [(), (1,), (7,), (3, 37), (100_003,)]
X64 = {"JAX_ENABLE_X64": "1"}  # 64-bit types need x64 mode in the ranks


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
        return (stack.astype(np.float32) if dt.name in HALVES else stack).sum(0).astype(dt)
    if dt == np.bool_:
        return stack.any(0) if op == "max" else stack.all(0)
    return stack.max(0) if op == "max" else stack.min(0)


def assert_close(got, want, what):
    got = np.asarray(got)
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, got.dtype)
    if want.dtype.name in HALVES:
        np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=1e-2,
                                   err_msg=str(what))
    else:
        np.testing.assert_array_equal(got, want, err_msg=str(what))


def assert_same_bits_everywhere(dist, group, value, what):
    import jax.numpy as jnp
    raw = np.frombuffer(np.ascontiguousarray(np.asarray(value)).tobytes(), np.uint8)
    everyone = np.asarray(dist.all_gather(jnp.asarray(raw)[None], group=group))
    assert (everyone == everyone[0]).all(), f"{what}: ranks disagree"


@pytest.mark.ranks(1, 2, 3, 4, env=X64, timeout=240)
def test_every_op_and_dtype(group, rank, size):
    import jax.numpy as jnp
    import jax_mlxdist as dist
    for dt in DTYPES:
        for shape in SIZES:
            inputs = [make_input(r, shape, dt) for r in range(size)]
            x = jnp.asarray(inputs[rank])
            # Complex max/min: ordered by real, then imaginary part (MLX's order, numpy's too).
            ops = {"sum": dist.all_sum, "max": dist.all_max, "min": dist.all_min}
            for op, fn in ops.items():
                got = fn(x, group=group)
                assert_close(got, reference(op, inputs), (dt, shape, op))
                assert_same_bits_everywhere(dist, group, got, (dt, shape, op))
            assert_close(dist.all_gather(x, group=group),
                         np.concatenate([np.atleast_1d(v) for v in inputs]), (dt, shape, "gather"))
            lead = (size * (shape[0] if shape else 1),) + tuple(shape[1:])
            total = reference("sum", [make_input(r, lead, dt, 1) for r in range(size)])
            got = dist.sum_scatter(jnp.asarray(make_input(rank, lead, dt, 1)), group=group)
            assert_close(got, np.split(total, size)[rank], (dt, shape, "scatter"))


@pytest.mark.ranks(3, env={**X64, "MLXDIST_TRANSPORT": "tcp"}, timeout=240)
def test_every_op_and_dtype_over_tcp(group, rank, size):
    """The same checks with the data on sockets (ranks on one host default to shared memory)."""
    test_every_op_and_dtype(group, rank, size)


@pytest.mark.ranks(2, timeout=240)
def test_larger_than_64_mib(rank, size):
    import jax.numpy as jnp
    import jax_mlxdist as dist
    x = jnp.full((17 * 2**20 + 3,), rank + 1, jnp.float32)  # > 64 MiB
    y = dist.all_sum(x)
    assert y.shape == x.shape and float(y.min()) == float(y.max()) == size * (size + 1) / 2


@pytest.mark.ranks(2, env={"MLXDIST_TRANSPORT": "tcp"}, timeout=240)
def test_larger_than_64_mib_over_tcp(rank, size):
    test_larger_than_64_mib(rank, size)


@pytest.mark.ranks(2, 3)
def test_inside_jit_scan_cond_fori_loop(rank, size):
    import jax
    import jax.numpy as jnp
    from jax import lax
    import jax_mlxdist as dist

    @jax.jit
    def f(x):
        a = lax.cond(x[0] > 0, dist.all_sum, lambda v: dist.all_max(v) * 0, x)
        b, gathered = lax.scan(lambda c, _: (dist.all_sum(c) / size, dist.all_gather(c)), x, None, length=3)
        c = lax.fori_loop(0, 10, lambda i, v: dist.all_sum(v) / size, x)
        return a, b, gathered, c

    base = np.arange(3.0)
    np.testing.assert_allclose(dist.all_sum(jnp.arange(3.0) + rank), sum(base + r for r in range(size)))
    a, b, gathered, c = f(jnp.arange(3.0) + rank + 1)
    total = sum(base + r + 1 for r in range(size))
    np.testing.assert_allclose(a, total)
    np.testing.assert_allclose(b, total / size)
    assert gathered.shape == (3, 3 * size)
    np.testing.assert_allclose(c, total / size)


@pytest.mark.ranks(2)
def test_many_independent_collectives_keep_program_order(rank, size):
    import jax
    import jax.numpy as jnp
    import jax_mlxdist as dist

    # Independent collectives of equal shape: XLA may run them in any order unless the
    # effect orders them; a wrong pairing gives wrong sums.
    @jax.jit
    def f(x):
        return ([dist.all_sum(x * (i + 1)) for i in range(12)]
                + [dist.all_gather(x[:5] + i) for i in range(3)])

    total = sum(r + 1.0 for r in range(size))
    x = jnp.full((300_000,), rank + 1.0, jnp.float32)
    first, second = f(x), f(x)  # two executions that may overlap
    for outs in (first, second):
        for i, o in enumerate(outs[:12]):
            assert float(o.min()) == float(o.max()) == total * (i + 1)
        for i, o in enumerate(outs[12:]):
            np.testing.assert_array_equal(o, np.repeat([r + 1.0 + i for r in range(size)], 5))


@pytest.mark.ranks(4)
def test_send_recv_between_any_ranks(rank, size):
    import jax
    import jax.numpy as jnp
    import jax_mlxdist as dist
    for src in range(size):  # every ordered pair, neighbours or not
        for dst in range(size):
            if src != dst and rank == src:
                dist.send(jnp.arange(4.0) + 10 * src + dst, dst)
            elif src != dst and rank == dst:
                np.testing.assert_array_equal(dist.recv((4,), jnp.float32, src),
                                              np.arange(4.0) + 10 * src + dst)
    step = jax.jit(lambda x: (dist.send(x, (rank + 2) % size), dist.recv_like(x, (rank - 2) % size))[1])
    np.testing.assert_array_equal(step(jnp.full((2, 3), rank, jnp.int32)), np.full((2, 3), (rank - 2) % size))


@pytest.mark.ranks(4)
def test_split_subgroups_run_concurrently(group, rank, size):
    import jax.numpy as jnp
    import jax_mlxdist as dist
    evens_odds = group.split(rank % 2)
    reversed_ = group.split(0, key=100 - rank)  # -1 would mean "keep rank order"
    same_parity = list(range(rank % 2, size, 2))
    assert (evens_odds.rank(), evens_odds.size()) == (rank // 2, len(same_parity))
    assert reversed_.rank() == size - 1 - rank
    # The two sub-groups run different collectives at the same time.
    if rank % 2 == 0:
        got = dist.all_sum(jnp.full((200_000,), rank, jnp.float32), group=evens_odds)
        np.testing.assert_array_equal(got[:2], [sum(same_parity)] * 2)
    else:
        np.testing.assert_array_equal(dist.all_gather(jnp.float32(rank), group=evens_odds), same_parity)
    assert float(dist.all_sum(jnp.float32(1))) == size
    np.testing.assert_array_equal(dist.all_gather(jnp.int32(rank), group=reversed_),
                                  list(range(size - 1, -1, -1)))


@pytest.mark.ranks(3)
def test_close_then_init_again(group, rank, size):
    import jax.numpy as jnp
    import jax_mlxdist as dist
    assert float(dist.all_sum(jnp.float32(rank))) == sum(range(size))
    group.close()
    assert group.closed
    with pytest.raises(dist.DistributedError, match="closed"):
        dist.all_sum(jnp.float32(1), group=group)
    with dist.init() as again:
        assert again is not group
        assert float(dist.all_sum(jnp.float32(10 * again.rank()))) == 10 * sum(range(size))


@pytest.mark.ranks(3)
def test_barrier_waits_for_every_rank(rank):
    import time
    import jax_mlxdist as dist
    if rank == 0:
        time.sleep(1.0)  # the slow rank under test: the others must wait for it
    t = time.monotonic()
    dist.barrier()
    waited = time.monotonic() - t
    assert rank == 0 or waited > 0.5


@pytest.mark.ranks(3, env=X64)
def test_bitwise_reductions_and_mean(rank, size):
    import jax
    import jax.numpy as jnp
    import jax_mlxdist as dist
    fold = {"and": np.bitwise_and, "or": np.bitwise_or, "xor": np.bitwise_xor}
    for dt in ("bool", "int8", "int32", "uint16", "int64", "uint64"):
        xs = [(make_input(p, (7,), dt) * (1 if dt == "bool" else 37)).astype(dt)
              for p in range(size)]
        for op, f in fold.items():
            want = f.reduce(np.stack(xs), axis=0)
            assert_close(dist.all_reduce(jnp.asarray(xs[rank]), op), want, (dt, op))
            got = jax.jit(lambda v: dist.all_reduce(v, op))(jnp.asarray(xs[rank]))
            assert_close(got, want, (dt, op, "jit"))
    np.testing.assert_allclose(dist.all_mean(jnp.arange(4.0) * (rank + 1)),
                               np.arange(4.0) * (size + 1) / 2)
    np.testing.assert_array_equal(dist.all_reduce(jnp.arange(3) + rank, "sum"),
                                  np.arange(3) * size + size * (size - 1) // 2)


@pytest.mark.ranks(3)
def test_pytrees(rank, size):
    """Every collective takes a pytree and gives the same structure back; all_sum's small leaves
    of one dtype travel in one op, packed; large ones one op each, in place."""
    import jax
    import jax.numpy as jnp
    import jax_mlxdist as dist

    def tree(r):
        return {"w": jnp.full((3, 4), r, jnp.float32), "b": [jnp.arange(5, dtype=jnp.int32) * r,
                                                             jnp.full((2,), r, jnp.float16)],
                "big": jnp.arange(1 << 19, dtype=jnp.float32) + r, "none": None}

    everyone = [tree(r) for r in range(size)]
    total = jax.tree_util.tree_map(lambda *v: np.sum(np.stack(v), axis=0), *everyone)
    for got in (dist.all_sum(tree(rank)), jax.jit(dist.all_sum)(tree(rank))):
        assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(total)
        for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(total)):
            np.testing.assert_allclose(np.asarray(g, np.float32), w.astype(np.float32))
    program = str(jax.make_jaxpr(dist.all_sum)(tree(rank)))
    assert program.count("mlxdist_all_reduce_many[") == 3  # float32, int32, float16
    assert program.count("mlxdist_all_reduce[") == 1  # "big": 2 MiB
    maxed = dist.all_max(tree(rank))
    np.testing.assert_array_equal(maxed["b"][0], np.arange(5) * (size - 1))
    # The rest go leaf by leaf.
    gathered = dist.all_gather({"a": jnp.float32(rank), "b": (jnp.ones(2) * rank,)})
    np.testing.assert_array_equal(gathered["a"], np.arange(size))
    np.testing.assert_array_equal(gathered["b"][0], np.repeat(np.arange(size), 2))
    bcast = dist.broadcast({"seed": jnp.int32(rank + 7), "w": jnp.ones(3) * rank}, root=2)
    assert int(bcast["seed"]) == 9 and np.all(np.asarray(bcast["w"]) == 2)
    right, left = (rank + 1) % size, (rank - 1) % size
    dist.send({"x": jnp.ones(2) * rank, "y": jnp.int32(rank)}, right)
    got = dist.recv_like({"x": jnp.zeros(2), "y": jnp.int32(0)}, left)
    assert int(got["y"]) == left and np.all(np.asarray(got["x"]) == left)
    # Gradients through a pytree all_sum, both rules; vmap.
    w = {"a": jnp.ones(3) * (rank + 1), "b": jnp.arange(2.0)}
    loss = lambda t, vjp: jnp.sum(dist.all_sum(t, vjp=vjp)["a"] * w["a"]) + jnp.sum(  # noqa: E731
        dist.all_sum(t, vjp=vjp)["b"])
    g_id = jax.grad(loss)({"a": jnp.ones(3), "b": jnp.ones(2)}, "identity")
    np.testing.assert_array_equal(g_id["a"], np.ones(3) * (rank + 1))
    g_sum = jax.jit(jax.grad(loss), static_argnums=1)({"a": jnp.ones(3), "b": jnp.ones(2)}, "all_sum")
    np.testing.assert_array_equal(g_sum["a"], np.ones(3) * size * (size + 1) / 2)
    np.testing.assert_array_equal(g_sum["b"], np.ones(2) * size)
    batched = jax.vmap(dist.all_sum)({"a": jnp.ones((4, 3)) * rank, "b": jnp.ones((4,))})
    np.testing.assert_array_equal(batched["a"], np.ones((4, 3)) * size * (size - 1) / 2)
    np.testing.assert_array_equal(dist.all_mean({"m": jnp.ones(2) * rank})["m"], np.ones(2))
