"""Tensor-parallel layers, FSDP and gradient helpers against the unsharded model (on ranks)."""

import numpy as np
import pytest

RTOL = 2e-5


def full_layer(key, out_dims, in_dims):
    import jax
    kw, kb = jax.random.split(jax.random.key(key))
    return {"weight": jax.random.normal(kw, (out_dims, in_dims)), "bias": jax.random.normal(kb, (out_dims,))}


def rows(a, rank, size, axis=0):
    return np.split(np.asarray(a), size, axis=axis)[rank]


@pytest.mark.ranks(2, 4)
def test_linear_layers_match_the_unsharded_model(group, rank, size):
    import jax
    import jax.numpy as jnp
    from jax_mlxdist import nn
    first, second = full_layer(0, 8 * size, 6), full_layer(1, 5, 8 * size)
    x = jax.random.normal(jax.random.key(2), (3, 6))

    def unsharded(p1, p2, x):
        return jnp.sum(jnp.tanh(jnp.tanh(x @ p1["weight"].T + p1["bias"]) @ p2["weight"].T + p2["bias"]) ** 2)

    a = nn.shard_linear(first, "all-to-sharded", group=group)
    b = nn.shard_linear(second, "sharded-to-all", group=group)
    assert isinstance(a, nn.AllToShardedLinear) and isinstance(b, nn.ShardedToAllLinear)
    sharded = lambda a, b, x: jnp.sum(jnp.tanh(b(jnp.tanh(a(x)))) ** 2)
    np.testing.assert_allclose(sharded(a, b, x), unsharded(first, second, x), rtol=RTOL)
    ga, gb, gx = jax.jit(jax.grad(sharded, argnums=(0, 1, 2)))(a, b, x)
    f1, f2, fx = jax.grad(unsharded, argnums=(0, 1, 2))(first, second, x)
    np.testing.assert_allclose(ga.weight, rows(f1["weight"], rank, size), rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(ga.bias, rows(f1["bias"], rank, size), rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(gb.weight, rows(f2["weight"], rank, size, axis=1), rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(gb.bias, f2["bias"], rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(gx, fx, rtol=RTOL, atol=1e-6)  # input gradient summed over ranks
    # Any object with .weight/.bias (an Equinox or Flax layer) works like the dict.
    from types import SimpleNamespace
    obj = nn.AllToShardedLinear.from_linear(SimpleNamespace(**first), group=group)
    np.testing.assert_array_equal(obj.weight, a.weight)
    # Functional forms give the same outputs.
    np.testing.assert_allclose(nn.all_to_sharded_linear(x, a.weight, a.bias), a(x), rtol=RTOL)


@pytest.mark.ranks(2)
def test_segments_split_fused_weights_per_segment(group, rank, size):
    import jax.numpy as jnp
    from jax_mlxdist import nn
    w = jnp.arange(12 * 3.0).reshape(12, 3)  # a fused QKV of 3 x 4 rows
    mine = nn.AllToShardedLinear.from_linear({"weight": w, "bias": jnp.arange(12.0)}, segments=3,
                                             group=group)
    q, k, v = np.split(np.asarray(w), 3)
    np.testing.assert_array_equal(mine.weight, np.concatenate([rows(p, rank, size) for p in (q, k, v)]))
    frac = nn.shard_inplace({"w": jnp.arange(8.0)}, lambda path, w: (0, [0.5]), group=group)
    np.testing.assert_array_equal(frac["w"], np.concatenate([rows(p, rank, size) for p in np.split(np.arange(8.0), 2)]))
    w2 = jnp.arange(12 * 4.0).reshape(12, 4)
    tree = nn.shard_inplace({"layer": {"weight": w2, "bias": jnp.arange(12.0)}}, "sharded-to-all", group=group)
    np.testing.assert_array_equal(tree["layer"]["weight"], rows(w2, rank, size, axis=1))
    np.testing.assert_array_equal(tree["layer"]["bias"], np.arange(12.0))  # the bias stays whole


@pytest.mark.ranks(2)
def test_bad_sizes_and_names_raise_mlx_messages(group, size):
    import jax
    import jax.numpy as jnp
    import jax_mlxdist as dist
    from jax_mlxdist import nn
    with pytest.raises(dist.DistributedError, match="Cannot shard the output of size 3 across 2 devices"):
        nn.AllToShardedLinear.create(jax.random.key(0), 4, 3, group=group)
    with pytest.raises(dist.DistributedError, match="The input of size 5 cannot be sharded across 2"):
        nn.ShardedToAllLinear.from_linear({"weight": jnp.ones((4, 5))}, group=group)
    with pytest.raises(dist.DistributedError, match="not supported"):
        nn.shard_linear({"weight": jnp.ones((4, 4))}, "rows", group=group)


@pytest.mark.ranks(2, 4)
def test_quantized_layers_match_the_dequantized_model(group, rank, size):
    for bits in (4, 8):
        for group_size in (32, 64, 128):
            check_quantized(group, rank, size, bits, group_size)


def check_quantized(group, rank, size, bits, group_size):
    import jax
    import jax.numpy as jnp
    from jax_mlxdist import nn
    in_dims = group_size * size
    first = full_layer(3, 4 * size, in_dims)
    second = full_layer(4, 6, 4 * size * 32)
    q1 = nn.quantized_linear(first["weight"], first["bias"], group_size=group_size, bits=bits)
    q2 = nn.quantized_linear(jnp.tile(second["weight"], (1, 1)), second["bias"], group_size=32, bits=bits)
    a = nn.shard_linear(q1, "all-to-sharded", group=group)
    b = nn.shard_linear(q2, "sharded-to-all", group=group)
    assert isinstance(a, nn.QuantizedAllToShardedLinear) and isinstance(b, nn.QuantizedShardedToAllLinear)
    w1 = nn.dequantize(q1["weight"], q1["scales"], q1["biases"], group_size, bits)
    w2 = nn.dequantize(q2["weight"], q2["scales"], q2["biases"], 32, bits)
    x = jax.random.normal(jax.random.key(5), (2, in_dims))
    h = jnp.repeat(x @ w1.T + q1["bias"], 32, axis=-1)  # widen to the second layer's inputs
    want = h @ w2.T + q2["bias"]
    mine_h = jnp.repeat(a(x), 32, axis=-1)
    np.testing.assert_allclose(b(mine_h), want, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(a(x), rows(x @ w1.T + q1["bias"], rank, size, axis=1), rtol=1e-5, atol=1e-4)


@pytest.mark.ranks(2, 4)
def test_average_gradients_is_the_mean(group, rank, size):
    for bucket in (0, 64, 32 * 1024**2):  # one all_sum per array, small buckets, one bucket
        check_average(group, rank, size, bucket)


def check_average(group, rank, size, bucket):
    import jax
    import jax.numpy as jnp
    from jax_mlxdist import nn

    def grads(r):
        return {"a": jnp.full((3, 5), r, jnp.float32), "b": [jnp.arange(7, dtype=jnp.float16) * r,
                jnp.full((2,), 10 * r, jnp.float32)], "c": jnp.float32(r)}

    got = nn.average_gradients(grads(rank), group=group, all_reduce_size=bucket)
    mean = float(np.mean(range(size)))
    want = jax.tree_util.tree_map(lambda one: one * mean, grads(1))
    for g_, w_ in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert g_.dtype == w_.dtype and g_.shape == w_.shape
        np.testing.assert_allclose(np.asarray(g_, np.float32), np.asarray(w_, np.float32), rtol=1e-3)


@pytest.mark.ranks(2, 4)
def test_fully_shard_trains_like_data_parallel(group, rank, size):
    import jax
    import jax.numpy as jnp
    import jax_mlxdist as dist
    from jax_mlxdist import nn
    params = {"w": jax.random.normal(jax.random.key(0), (4 * size, 3)), "b": jnp.zeros(3)}
    data = jax.random.normal(jax.random.fold_in(jax.random.key(1), rank), (5, 4 * size))

    def loss(p, x):
        return jnp.mean(jnp.tanh(x @ p["w"] + p["b"]) ** 2)

    sharded, unshard = nn.fully_shard(params, group=group)
    assert sharded["w"].shape == (4, 3) and sharded["b"].shape == (3,)
    dp = params
    fsdp_step = jax.jit(lambda s: jax.tree_util.tree_map(
        lambda w, g: w - 0.5 * g / size, s, jax.grad(lambda s: loss(unshard(s), data))(s)))
    dp_step = jax.jit(lambda p: jax.tree_util.tree_map(
        lambda w, g: w - 0.5 * g, p, nn.average_gradients(jax.grad(loss)(p, data), group=group)))
    for _ in range(5):
        sharded, dp = fsdp_step(sharded), dp_step(dp)
        np.testing.assert_allclose(dist.all_gather(sharded["w"], group=group), dp["w"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(sharded["b"], dp["b"], rtol=1e-5, atol=1e-6)


@pytest.mark.ranks(2)
def test_clip_grad_norm_sharded_uses_the_global_norm(group, rank, size):
    import jax.numpy as jnp
    from jax_mlxdist import nn
    grads = {"w": jnp.full((4,), 3.0 * (rank + 1))}
    total = np.sqrt(sum(4 * (3.0 * (r + 1)) ** 2 for r in range(size)))
    clipped, norm = nn.clip_grad_norm_sharded(grads, 1.0, group=group)
    np.testing.assert_allclose(norm, total, rtol=1e-5)
    np.testing.assert_allclose(clipped["w"], grads["w"] / total, rtol=1e-4)


@pytest.mark.parametrize("n", [2, 4])
def test_tensor_parallel_example_matches_single_process(n):
    import pathlib
    import subprocess
    import sys
    example = pathlib.Path(__file__).parent.parent / "examples" / "tensor_parallel.py"
    out = subprocess.run([sys.executable, "-P", "-m", "jax_mlxdist.launch", "-n", str(n), str(example),
                          "--steps", "30"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "(match)" in out.stdout
