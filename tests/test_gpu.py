"""Collectives on CUDA arrays (staged through pinned host memory) with real subprocess ranks.
Runs where JAX has a CUDA backend; the ranks may share one GPU."""

import importlib.util
import shutil

import numpy as np
import pytest

from jax_mlxdist.testing import run_ranks

HAVE_CUDA = shutil.which("nvidia-smi") is not None and any(
    importlib.util.find_spec(m) for m in ("jax_cuda13_plugin", "jax_cuda12_plugin", "jax_plugins"))
pytestmark = pytest.mark.skipif(not HAVE_CUDA, reason="needs an NVIDIA GPU and JAX with CUDA")
GPU_ENV = {"JAX_PLATFORMS": "cuda", "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
           "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.2", "NCCL_NVLS_ENABLE": "0"}


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
        return s, gathered, scattered, m

    s, gathered, scattered, m = step(x)
    assert s.devices().pop().platform == "gpu"
    nxt = dist.send(x * 2, (r + 1) % n) if r % 2 == 0 else None
    got = dist.recv_like(x, (r - 1) % n)
    if r % 2:
        dist.send(x * 2, (r + 1) % n)
    grad = jax.grad(lambda w: dist.all_sum(w * (r + 1), vjp="all_sum").sum())(jnp.ones(3))
    del nxt
    return [np.asarray(a) for a in (s, gathered, scattered, m.astype(jnp.float32), got, grad)]


@pytest.mark.parametrize("n", [2])
def test_ops_on_gpu_arrays(n):
    results = run_ranks(body_ops, n, env=GPU_ENV, timeout=300)
    base = np.arange(6, dtype=np.float32)
    for r, (s, gathered, scattered, m, got, grad) in enumerate(results):
        np.testing.assert_array_equal(s, sum(base + k for k in range(n)))
        np.testing.assert_array_equal(gathered, np.concatenate([base + k for k in range(n)]))
        np.testing.assert_array_equal(scattered, sum(base + k for k in range(n)))
        np.testing.assert_array_equal(m, base + n - 1)
        np.testing.assert_array_equal(got, (base + (r - 1) % n) * 2)
        np.testing.assert_array_equal(grad, np.full(3, (r + 1) * n))  # cotangents summed
