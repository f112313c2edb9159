"""Collectives on CUDA arrays with real subprocess ranks: the ring backend staged through pinned
host memory (its ranks may share a GPU) and NCCL (one GPU per rank). The last tests check the
NCCL backend's errors, on any machine."""

import importlib.util
import shutil

import numpy as np
import pytest

from jax_mlxdist.launch.local import gpu_count
from jax_mlxdist.testing import RanksFailed, run_ranks

HAVE_CUDA = shutil.which("nvidia-smi") is not None and any(
    importlib.util.find_spec(m) for m in ("jax_cuda13_plugin", "jax_cuda12_plugin", "jax_plugins"))
GPUS = gpu_count() if HAVE_CUDA else 0
needs_gpu = pytest.mark.skipif(not HAVE_CUDA, reason="needs an NVIDIA GPU and JAX with CUDA")
needs_two_gpus = pytest.mark.skipif(
    GPUS < 2, reason=f"NCCL needs a GPU per rank: 2 ranks, {GPUS} GPU(s) here")
GPU_ENV = {"JAX_PLATFORMS": "cuda", "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
           "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.2", "NCCL_NVLS_ENABLE": "0"}
BACKENDS = [pytest.param("ring", marks=needs_gpu), pytest.param("nccl", marks=needs_two_gpus)]


def body_ops():
    import jax
    import jax.numpy as jnp
    import jax_mlxdist as dist
    g = dist.init()
    r, n = g.rank(), g.size()
    x = jnp.arange(6, dtype=jnp.float32) + r
    assert x.devices().pop().platform == "gpu"

    @jax.jit
    def step(x):
        s = dist.all_sum(x)
        gathered = dist.all_gather(x)
        scattered = dist.sum_scatter(jnp.tile(x, n))
        m = dist.all_max(x.astype(jnp.bfloat16))
        lo = dist.all_min(x.astype(jnp.int16))             # NCCL lacks int16: staged
        p = dist.all_prod(x.astype(jnp.int32) + 1)
        c = dist.all_sum(x.astype(jnp.complex64) * (1 + 1j))  # float32 pairs on NCCL
        any_ = dist.all_max(x > 4.5)                         # bool: OR
        nan = dist.all_min(x.at[0].set(jnp.nan) if r == 0 else x)  # NaN wins, as on the CPU
        return s, gathered, scattered, m, lo, p, c, any_, nan

    out = step(x)
    assert out[0].devices().pop().platform == "gpu"
    big = dist.all_sum(jnp.full((3 << 20) + 5, r + 1.0))    # above one 4 MiB staging chunk
    rows = (1 << 20) + 3                                    # a chunk and a bit, per rank
    big_gather = dist.all_gather(jnp.full((rows, 2), float(r))).reshape(n, rows, 2)
    ramp = jnp.arange(n * rows, dtype=jnp.float32) % 1000
    big_scatter = dist.sum_scatter(ramp + r)
    nxt = dist.send(x * 2, (r + 1) % n) if r % 2 == 0 else None
    got = dist.recv_like(x, (r - 1) % n)
    if r % 2:
        dist.send(x * 2, (r + 1) % n)
    grad = jax.grad(lambda w: dist.all_sum(w * (r + 1), vjp="all_sum").sum())(jnp.ones(3))
    sub = g.split(r % 2)                                    # each rank alone when n == 2
    alone = dist.all_sum(x, group=sub)
    dist.barrier()
    del nxt
    big_ok = (bool((big == n * (n + 1) / 2).all()),
              bool((big_gather == jnp.arange(n, dtype=jnp.float32)[:, None, None]).all()),
              bool((big_scatter == n * ramp[r * rows:(r + 1) * rows] + n * (n - 1) / 2).all()))
    return [np.asarray(a) for a in (*out, got, grad, alone)] + [big_ok, g.backend]


@pytest.mark.parametrize("backend", BACKENDS)
def test_ops_on_gpu_arrays(backend):
    n = 2
    results = run_ranks(body_ops, n, env=GPU_ENV, timeout=300, backend=backend)
    base = np.arange(6, dtype=np.float32)
    every = [base + k for k in range(n)]
    for r, (s, gathered, scattered, m, lo, p, c, any_, nan, got, grad, alone, big_ok, used) in \
            enumerate(results):
        assert used == backend
        np.testing.assert_array_equal(s, sum(every))
        np.testing.assert_array_equal(gathered, np.concatenate(every))
        np.testing.assert_array_equal(scattered, sum(every))
        np.testing.assert_array_equal(m, base + n - 1)
        np.testing.assert_array_equal(lo, base.astype(np.int16))
        np.testing.assert_array_equal(p, np.prod([e.astype(np.int32) + 1 for e in every], axis=0))
        np.testing.assert_array_equal(c, sum(every) * (1 + 1j))
        np.testing.assert_array_equal(any_, np.any([e > 4.5 for e in every], axis=0))
        np.testing.assert_array_equal(nan, np.concatenate([[np.nan], base[1:]]))
        np.testing.assert_array_equal(got, (base + (r - 1) % n) * 2)
        np.testing.assert_array_equal(grad, np.full(3, (r + 1) * n))  # cotangents summed
        np.testing.assert_array_equal(alone, base + r)
        assert all(big_ok), big_ok  # all_sum, all_gather, sum_scatter in chunks


def body_mismatch():
    import jax.numpy as jnp
    import jax_mlxdist as dist
    g = dist.init()
    dist.all_sum(jnp.ones(4 + g.rank())).block_until_ready()


@needs_two_gpus
def test_nccl_mismatched_shapes_name_both_calls():
    with pytest.raises(RanksFailed) as e:
        run_ranks(body_mismatch, 2, env=GPU_ENV, timeout=120, backend="nccl")
    text = str(e.value)
    assert "DistributedError" in text and "16 bytes" in text and "20 bytes" in text


def body_dead_peer():
    import os
    import jax.numpy as jnp
    import jax_mlxdist as dist
    g = dist.init()
    x = jnp.ones(1024)
    dist.all_sum(x).block_until_ready()
    if g.rank() == 1:
        os._exit(3)
    try:
        dist.all_sum(x).block_until_ready()
    except dist.DistributedError as e:
        return str(e)
    return "no error"


@needs_two_gpus
def test_nccl_dead_peer_is_an_error_not_a_hang():
    with pytest.raises(RanksFailed) as e:
        run_ranks(body_dead_peer, 2, env={**GPU_ENV, "MLXDIST_TIMEOUT": "20"}, timeout=120,
                  backend="nccl")
    message = e.value.results[0]
    assert message is not None and "all_sum" in message and "rank 1" in message


def body_stalled():
    import os
    import jax.numpy as jnp
    import jax_mlxdist as dist
    g = dist.init()
    dist.barrier()
    if g.rank() == 1:
        os._exit(3)  # never joins the next op; with the check off, only the watchdog sees it
    dist.all_sum(jnp.ones(1 << 20)).block_until_ready()  # returns once the watchdog aborts
    try:
        g.close()
    except dist.DistributedError as e:
        return str(e)
    return "no error"


@needs_two_gpus
def test_nccl_stalled_op_is_aborted_and_raised_at_close():
    env = {**GPU_ENV, "MLXDIST_TIMEOUT": "10", "MLXDIST_NCCL_CHECK": "0"}
    with pytest.raises(RanksFailed) as e:
        run_ranks(body_stalled, 2, env=env, timeout=120, backend="nccl")
    message = e.value.results[0]
    assert message is not None and message.startswith("close: "), message
    # The watchdog's timeout, or NCCL noticing the dead peer first: either names what failed.
    assert ("all_sum" in message and "no progress" in message) or "NCCL failed" in message


def body_init_nccl():
    import jax_mlxdist as dist
    dist.init(backend="nccl")


@needs_gpu
def test_nccl_two_ranks_on_one_gpu_say_so():
    env = {**GPU_ENV, "CUDA_VISIBLE_DEVICES": "0"}
    with pytest.raises(RanksFailed) as e:
        run_ranks(body_init_nccl, 2, env=env, timeout=120, backend="nccl")
    assert "ranks 0 and 1 both use the GPU" in str(e.value)
    assert "NCCL needs a GPU per rank" in str(e.value)


def test_nccl_without_a_gpu_is_a_clear_error():
    with pytest.raises(RanksFailed) as e:
        run_ranks(body_init_nccl, 2, env={"JAX_PLATFORMS": "cpu"}, timeout=120, backend="nccl")
    assert "backend 'nccl' needs arrays on a CUDA GPU" in str(e.value)


def one_rank_ops(backend):
    """Every op through the C++ group of one rank (Python's ops skip groups of one, so bind the
    primitives): the NCCL path can run on a machine with a single GPU."""
    import jax.numpy as jnp
    from jax_mlxdist import _C, _group
    from jax_mlxdist import _primitives as P
    book = [["127.0.0.1:1"]]  # a ring of one never connects
    if backend == "nccl":
        import dataclasses
        from jax_mlxdist import _config
        base = _config.settings("nccl")
        lib, device = _group._nccl_setup(base.nccl_lib)
        settings = dataclasses.replace(base, nccl_lib=lib, nccl_device=device)
        h = _C.connect("nccl", 0, book, [], settings.for_cxx())
    else:
        h = _C.connect("ring", 0, book, [], _C.Settings())
    x = jnp.arange(6, dtype=jnp.float32) - 2
    out = []
    for dtype in (jnp.float32, jnp.bfloat16, jnp.int16, jnp.int32, jnp.complex64, jnp.bool_):
        for op in ("sum", "max", "min", "prod"):
            if dtype == jnp.complex64 and op in ("max", "min"):
                continue
            y = P.all_reduce_p.bind(x.astype(dtype), group=h, reduce=P.REDUCE[op],
                                    vjp="identity", rank=0, size=1)
            out.append(bool((y == x.astype(dtype)).all()))
    big = jnp.arange(5 << 20, dtype=jnp.float32)
    out.append(bool((P.all_reduce_p.bind(big, group=h, reduce=0, vjp="identity", rank=0,
                                         size=1) == big).all()))
    out.append(bool((P.all_gather_p.bind(x, group=h, rank=0, size=1) == x).all()))
    out.append(bool((P.sum_scatter_p.bind(x, group=h, rank=0, size=1) == x).all()))
    P.barrier_p.bind(group=h)
    child = _C.split(h, 5, 0)
    out.append(bool((P.all_reduce_p.bind(x, group=child, reduce=0, vjp="identity", rank=0,
                                         size=1) == x).all()))
    _C.close_group(child)
    _C.close_group(h)
    return out


@pytest.mark.parametrize("backend", [pytest.param("ring", marks=needs_gpu),
                                     pytest.param("nccl", marks=needs_gpu)])
def test_group_of_one_on_gpu(backend):
    [checks] = run_ranks(one_rank_ops, 1, args=(backend,), env=GPU_ENV, timeout=120)
    assert all(checks), checks
