"""The JACCL backend's own cases with real subprocess ranks: every op on 2-8 ranks over shared
memory (ranks on one host), both variants, its failure modes, and the ibverbs transport's
"no device" path. The core and autodiff suites run on it with --backend jaccl."""

import os

import numpy as np
import pytest

from jax_mlxdist import _C
from jax_mlxdist.testing import RanksFailed, run_ranks


def body_every_op(sizes):
    import jax
    import jax.numpy as jnp
    import jax_mlxdist as dist
    g = dist.init()
    assert g.backend == "jaccl" and dist.is_available("jaccl")
    r, n = g.rank(), g.size()
    out = {}
    for count in sizes:
        x = jnp.arange(count, dtype=jnp.float32) + r
        out["sum", count] = np.asarray(jax.jit(dist.all_sum)(x))
        out["max", count] = np.asarray(dist.all_max(x))
        out["half", count] = np.asarray(dist.all_sum(x.astype(jnp.bfloat16)).astype(jnp.float32))
        out["gather", count] = np.asarray(dist.all_gather(x))
        out["scatter", count] = np.asarray(dist.sum_scatter(jnp.tile(x, n)))
    nxt = dist.send(jnp.full(5, float(r)), (r + 1) % n)
    out["ring"] = np.asarray(dist.recv_like(nxt, (r - 1) % n))
    sub = g.split(r % 2, key=-r)
    out["sub"] = (sub.rank(), sub.size(), float(dist.all_sum(jnp.float32(r), group=sub)))
    dist.barrier()
    return out


@pytest.mark.parametrize("n, variant", [(2, "mesh"), (4, "mesh"), (8, "mesh"), (2, "ring"),
                                        (3, "ring")])
def test_every_op_on_n_ranks(n, variant):
    sizes = [1, 1000, 300_001]  # below and above the one-round threshold; uneven blocks
    env = {"MLX_JACCL_RING": "1"} if variant == "ring" else {}
    results = run_ranks(body_every_op, n, args=(sizes,), backend="jaccl", timeout=600, env=env)
    for r, out in enumerate(results):
        for count in sizes:
            base = np.arange(count, dtype=np.float32)
            total = sum(base + k for k in range(n))
            np.testing.assert_array_equal(out["sum", count], total)
            np.testing.assert_array_equal(out["max", count], base + n - 1)
            np.testing.assert_allclose(out["half", count], total, rtol=1e-2)
            np.testing.assert_array_equal(out["gather", count],
                                          np.concatenate([base + k for k in range(n)]))
            np.testing.assert_array_equal(out["scatter", count], total)
            # the same bits on every rank
            np.testing.assert_array_equal(out["sum", count], results[0]["sum", count])
            np.testing.assert_array_equal(out["half", count], results[0]["half", count])
        np.testing.assert_array_equal(out["ring"], np.full(5, float((r - 1) % n)))
        members = [k for k in range(n) if k % 2 == r % 2]
        assert out["sub"] == (sorted(members, reverse=True).index(r), len(members),
                              float(sum(members)))


def body_mlx_variables(tmp):
    """MLX's own JACCL variables: rank 0 hosts the meeting; the devices file names the mesh."""
    import json
    import jax.numpy as jnp
    import jax_mlxdist as dist
    with open(os.environ.pop("MLX_HOSTFILE")) as f:
        rank0 = json.load(f)[0][0]  # rank 0 inherited a socket listening here
    n = 3
    path = os.path.join(tmp, "devices.json")
    with open(path + f".{os.environ['MLX_RANK']}", "w") as f:
        json.dump([[None if i == j else f"rdma_en{i + j}" for j in range(n)] for i in range(n)], f)
    os.environ.update(MLX_IBV_DEVICES=path + f".{os.environ['MLX_RANK']}",
                      MLX_JACCL_COORDINATOR=rank0)
    g = dist.init(strict=True, backend="jaccl")
    return g.backend, g.size(), float(dist.all_sum(jnp.float32(g.rank() + 1)))


def test_mlx_jaccl_variables(tmp_path):
    results = run_ranks(body_mlx_variables, 3, args=(str(tmp_path),), backend="ring", timeout=120)
    assert results == [("jaccl", 3, 6.0)] * 3


def body_mismatch():
    import jax.numpy as jnp
    import jax_mlxdist as dist
    g = dist.init()
    dist.all_sum(jnp.ones(100_000 + g.rank()))


def failure_on_both_ranks(body, **kwargs) -> str:
    """The report of a 2-rank JACCL run in which every rank raised DistributedError."""
    with pytest.raises(RanksFailed) as info:
        run_ranks(body, 2, backend="jaccl", **kwargs)
    msg = str(info.value)
    for r in range(2):
        assert f"rank {r} raised DistributedError" in msg
    return msg


def test_mismatched_shapes_raise_on_every_rank():
    msg = failure_on_both_ranks(body_mismatch, timeout=120)
    assert "all_sum(float32, 400000 bytes" in msg and "all_sum(float32, 400004 bytes" in msg


def body_split_against_all_sum():
    import jax.numpy as jnp
    import jax_mlxdist as dist
    g = dist.init()
    if g.rank() == 0:
        g.split(0)
    else:
        dist.all_sum(jnp.ones(4))


def test_split_against_another_op_names_both_calls():
    # Caught by the header check, not the timeout (set far beyond the test's own limit).
    msg = failure_on_both_ranks(body_split_against_all_sum, timeout=90,
                                env={"MLXDIST_TIMEOUT": "600"})
    assert "collective mismatch" in msg and "split(" in msg and "all_sum(" in msg, msg


def body_dead_peer():
    import jax.numpy as jnp
    import jax_mlxdist as dist
    g = dist.init()
    if g.rank() == 1:
        os._exit(3)  # dies without a word
    dist.all_sum(jnp.ones(1000))


def test_dead_peer_is_named():
    with pytest.raises(RanksFailed) as info:
        run_ranks(body_dead_peer, 2, backend="jaccl", timeout=120,
                  env={"MLXDIST_TIMEOUT": "60"})
    msg = str(info.value)
    assert "rank 0 raised DistributedError" in msg and "rank 1" in msg and "closed" in msg


def body_ibverbs_without_device():
    import jax_mlxdist as dist
    try:
        dist.init(strict=True, backend="jaccl")
    except dist.DistributedError as e:
        return str(e)
    return "no error"


def test_ibverbs_without_a_device_is_a_clear_error():
    ok, why = _C.ibverbs_available("libibverbs-that-is-not-there.so")
    assert not ok and "libibverbs-that-is-not-there.so" in why
    ok, why = _C.ibverbs_available("")
    if ok:
        pytest.skip(f"this machine has RDMA devices ({why}); the no-device path needs none")
    errors = run_ranks(body_ibverbs_without_device, 2, backend="jaccl", timeout=120,
                       env={"MLXDIST_JACCL_TRANSPORT": "ibverbs"})
    for e in errors:
        assert e != "no error" and ("RDMA device" in e or "libibverbs" in e), e
