"""Size-1 behaviour and configuration errors, in this process."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_mlxdist as dist
from jax_mlxdist import _group


@pytest.fixture(autouse=True)
def fresh_world(monkeypatch):
    for var in ("MLX_RANK", "MLX_HOSTFILE", "MLXDIST_LISTEN_FDS", "MLXDIST_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    yield
    if _group._world is not None:
        _group._world.close()


def test_init_without_configuration_is_size_one():
    g = dist.init()
    assert (g.rank(), g.size()) == (0, 1)
    assert dist.init() is g
    x = jnp.arange(6.0).reshape(2, 3)
    for op in (dist.all_sum, dist.all_max, dist.all_min, dist.sum_scatter, dist.all_gather):
        np.testing.assert_array_equal(op(x), x)
    assert dist.all_gather(jnp.float32(3)).shape == (1,)
    dist.barrier()
    with pytest.raises(dist.DistributedError, match="size 1"):
        dist.send(x, 0)
    with pytest.raises(dist.DistributedError, match="size 1"):
        dist.recv((2,), jnp.float32, 0)
    assert jax.jit(lambda v: dist.all_sum(v) * 2)(x).shape == (2, 3)
    assert g.split(3).size() == 1


def test_strict_init_without_configuration_raises():
    with pytest.raises(dist.DistributedError, match="MLX_HOSTFILE"):
        dist.init(strict=True)


def test_availability_and_unknown_backend():
    assert dist.is_available() and dist.is_available("ring") and dist.is_available("jaccl")
    assert dist.is_available("nope") is False  # as MLX: an unknown backend is not available
    if jax.default_backend() == "cpu":  # NCCL moves CUDA arrays only
        assert not dist.is_available("nccl")
    with pytest.raises(dist.DistributedError, match="unknown backend"):
        dist.init(backend="tcp")


@pytest.mark.parametrize("content, match", [
    ("not json", "cannot read"),
    (json.dumps(["127.0.0.1:1"]), "JSON list"),
    (json.dumps([["127.0.0.1:1"], ["127.0.0.1:2", "127.0.0.1:3"]]), "same number"),
])
def test_bad_hostfile(tmp_path, monkeypatch, content, match):
    path = tmp_path / "hosts.json"
    path.write_text(content)
    monkeypatch.setenv("MLX_HOSTFILE", str(path))
    monkeypatch.setenv("MLX_RANK", "0")
    with pytest.raises(dist.DistributedError, match=match):
        dist.init()


def test_rank_outside_hostfile(tmp_path, monkeypatch):
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps([["127.0.0.1:1"], ["127.0.0.1:2"]]))
    monkeypatch.setenv("MLX_HOSTFILE", str(path))
    monkeypatch.setenv("MLX_RANK", "2")
    with pytest.raises(dist.DistributedError, match="MLX_RANK=2"):
        dist.init()


def test_closed_group_rejects_ops():
    g = dist.init()
    g.close()
    with pytest.raises(dist.DistributedError, match="closed"):
        dist.all_sum(jnp.ones(2), group=g)


def test_unsupported_dtype():
    with pytest.raises(dist.DistributedError, match="not supported"):
        dist.recv((2,), "datetime64[s]", 1)


def test_cxx_group_of_one_returns_its_input():
    """Python skips groups of one, but C++ can hold one (split makes them): every op must give
    the input back, not read past it."""
    import jax.numpy as jnp
    from jax_mlxdist import _C
    from jax_mlxdist import _primitives as P
    h = _C.connect("ring", 0, [["127.0.0.1:1"]], [], _C.Settings())  # a ring of one never connects
    try:
        for x in (jnp.arange(6.0) - 2, jnp.ones(100_000)):
            for op in P.REDUCE.values():
                y = P.all_reduce_p.bind(x, group=h, reduce=op, vjp="identity", rank=0, size=1)
                np.testing.assert_array_equal(y, x)
            np.testing.assert_array_equal(P.sum_scatter_p.bind(x, group=h, rank=0, size=1), x)
            np.testing.assert_array_equal(P.all_gather_p.bind(x, group=h, rank=0, size=1), x)
    finally:
        _C.close_group(h)
