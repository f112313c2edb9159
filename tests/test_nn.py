"""jax_mlxdist.nn on real ranks: every sharded layer, gradient helper and FSDP step is compared
with the unsharded model computed locally on each rank. Each test runs many checks in one rank
body to keep the start-up cost of ranks low."""

import numpy as np
import pytest

RTOL, ATOL = 2e-5, 1e-5  # float32; values and gradients are O(1)


def normal(seed, *shape, dtype=np.float32):
    # numpy + device_put, not jax.random or jnp.asarray: those compile a program per new shape
    # on every rank, which dominated these tests' time.
    import jax
    return jax.device_put(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32).astype(dtype))


def full_layer(seed, out_dims, in_dims):
    return {"weight": normal(seed, out_dims, in_dims), "bias": normal(seed + 100, out_dims)}


def block(a, rank, size, axis=0):
    return np.split(np.asarray(a), size, axis=axis)[rank]


def count(fn, *args, prim):
    import jax
    return str(jax.make_jaxpr(fn)(*args)).count(prim)


@pytest.mark.ranks(2, 4)
def test_layers_match_the_unsharded_model(group, rank, size):
    import jax
    import jax.numpy as jnp
    import jax_mlxdist as dist
    from jax_mlxdist import nn

    # AllToSharded then ShardedToAll (an MLP): outputs, parameter and input gradients.
    first, second = full_layer(0, 8 * size, 6), full_layer(1, 5, 8 * size)
    x = normal(2, 3, 6)

    def unsharded(p1, p2, x):
        return jnp.sum(jnp.tanh(jnp.tanh(x @ p1["weight"].T + p1["bias"]) @ p2["weight"].T + p2["bias"]) ** 2)

    a = nn.shard_linear(first, "all-to-sharded", group=group)
    b = nn.shard_linear(second, "sharded-to-all", group=group)
    assert type(a) is nn.AllToShardedLinear and type(b) is nn.ShardedToAllLinear
    assert a.weight.shape == (8, 6) and a.bias.shape == (8,) and b.weight.shape == (5, 8)
    sharded = lambda a, b, x: jnp.sum(jnp.tanh(b(jnp.tanh(a(x)))) ** 2)
    value, (ga, gb, gx) = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 2)))(a, b, x)
    want, (f1, f2, fx) = jax.jit(jax.value_and_grad(unsharded, argnums=(0, 1, 2)))(first, second, x)
    np.testing.assert_allclose(value, want, rtol=RTOL)
    np.testing.assert_allclose(ga.weight, block(f1["weight"], rank, size), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(ga.bias, block(f1["bias"], rank, size), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(gb.weight, block(f2["weight"], rank, size, axis=1), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(gb.bias, f2["bias"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(gx, fx, rtol=RTOL, atol=ATOL)  # the input's gradient, summed over ranks
    # Functional forms, objects with .weight/.bias (Equinox, Flax), create().
    from types import SimpleNamespace
    np.testing.assert_array_equal(nn.AllToShardedLinear.from_linear(SimpleNamespace(**first), group=group).weight,
                                  a.weight)
    h, y = jax.jit(lambda x: (nn.all_to_sharded_linear(x, a.weight, a.bias, group=group),
                              nn.sharded_to_all_linear(a(x), b.weight, None, group=group)))(x)
    full_h = np.asarray(x) @ np.asarray(first["weight"]).T + np.asarray(first["bias"])
    np.testing.assert_allclose(h, block(full_h, rank, size, axis=1), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(y, full_h @ np.asarray(second["weight"]).T, rtol=RTOL, atol=ATOL)
    c = nn.ShardedToAllLinear.create(jax.random.key(3), 4 * size, 3, bias=False, group=group)
    assert c.weight.shape == (3, 4) and c.bias is None

    # Segments: a fused QKV keeps this rank's rows of each of Q, K and V; fractions; shard_inplace.
    w = jnp.arange(12 * size * 3.0).reshape(12 * size, 3)
    qkv = nn.AllToShardedLinear.from_linear({"weight": w, "bias": w[:, 0]}, segments=3, group=group)
    want = np.concatenate([block(p, rank, size) for p in np.split(np.asarray(w), 3)])
    np.testing.assert_array_equal(qkv.weight, want)
    np.testing.assert_array_equal(qkv.bias, want[:, 0])
    uneven = nn.shard_inplace({"w": jnp.arange(8.0 * size)}, lambda path, w: (0, [0.25]), group=group)
    parts = np.split(np.arange(8.0 * size), [2 * size])
    np.testing.assert_array_equal(uneven["w"], np.concatenate([block(p, rank, size) for p in parts]))
    tree = {"layer": {"weight": w.T, "bias": jnp.arange(3.0)}}
    s2a = nn.shard_inplace(tree, "sharded-to-all", group=group)
    np.testing.assert_array_equal(s2a["layer"]["weight"], block(w.T, rank, size, axis=1))
    np.testing.assert_array_equal(s2a["layer"]["bias"], np.arange(3.0))  # the bias stays whole
    a2s = nn.shard_inplace({"l": first}, "all-to-sharded", group=group)
    np.testing.assert_array_equal(a2s["l"]["bias"], a.bias)

    # MLX's messages for sizes that do not divide and unknown shardings.
    with pytest.raises(dist.DistributedError, match=f"Cannot shard the output of size 3 across {size} devices"):
        nn.AllToShardedLinear.create(jax.random.key(0), 4, 3, group=group)
    with pytest.raises(dist.DistributedError, match=f"The input of size 5 cannot be sharded across {size} devices"):
        nn.ShardedToAllLinear.from_linear({"weight": jnp.ones((4, 5))}, group=group)
    with pytest.raises(dist.DistributedError, match="Sharding type sharding='rows' not supported"):
        nn.shard_linear({"weight": jnp.ones((4, 4))}, "rows", group=group)
    with pytest.raises(dist.DistributedError, match="Cannot shard an axis of size 3"):
        nn.AllToShardedLinear.from_linear({"weight": jnp.ones((3 * size * 3, 2))}, segments=[3], group=group)
    with pytest.raises(dist.DistributedError, match="in whole quantization groups of 64"):
        nn.QuantizedShardedToAllLinear.create(jax.random.key(0), 64, 4, group=group)
    # The group still works after argument errors.
    assert float(dist.all_sum(1.0, group=group)) == size

    # Quantized layers against the dequantized model: every bits/group_size on 2 ranks, two
    # of them on 4 (each pair costs compilations on every rank).
    # Every affine width (group sizes in turn) and the three fp modes on 2 ranks; on 4, a few.
    affine = [("affine", b, (32, 64, 128)[i % 3]) for i, b in enumerate((1, 2, 3, 4, 5, 6, 8))]
    fp = [("mxfp4", 4, 32), ("mxfp8", 8, 32), ("nvfp4", 4, 16)]
    combos = affine + fp if size == 2 else [("affine", 3, 32), ("affine", 4, 128), ("nvfp4", 4, 16)]
    for mode, bits, group_size in combos:
        check_quantized(group, rank, size, mode, bits, group_size)


def check_quantized(group, rank, size, mode, bits, group_size):
    import jax
    import jax.numpy as jnp
    from jax_mlxdist import nn
    in_dims, hidden = group_size * size * 2, group_size * size
    first, second = full_layer(3, hidden, in_dims), full_layer(4, 6, hidden)
    q1 = nn.quantized_linear(first["weight"], first["bias"], group_size=group_size, bits=bits, mode=mode)
    q2 = nn.quantized_linear(second["weight"], second["bias"], group_size=group_size, bits=bits, mode=mode)
    assert q1["weight"].dtype == jnp.uint32 and q1["weight"].shape == (hidden, in_dims * bits // 32)
    assert (q1["biases"] is None) == (mode != "affine") and q1["mode"] == mode
    w1 = nn.dequantize(q1["weight"], q1["scales"], q1["biases"], group_size, bits, mode, dtype=jnp.float32)
    w2 = nn.dequantize(q2["weight"], q2["scales"], q2["biases"], group_size, bits, mode, dtype=jnp.float32)
    err = np.abs(np.asarray(w1) - np.asarray(first["weight"]))
    if mode == "affine":  # every weight on the nearest point of its group's grid
        rep = lambda a: np.repeat(np.asarray(a, np.float32), group_size, axis=1)[..., None]
        grid = rep(q1["biases"]) + rep(q1["scales"]) * np.arange(2**bits)
        nearest = np.min(np.abs(grid - np.asarray(first["weight"])[..., None]), axis=-1)
        assert np.all(err <= nearest + 1e-5), (mode, bits, group_size)
    else:  # a float format: within its relative precision of the group's largest weight
        top = np.repeat(np.abs(np.asarray(first["weight"])).reshape(hidden, -1, group_size).max(-1),
                        group_size, axis=1)
        assert np.all(err <= top * (0.25 if bits == 4 else 0.07)), (mode, np.max(err / top))
    a = nn.shard_linear(q1, "all-to-sharded", group=group)
    b = nn.shard_linear(q2, "sharded-to-all", group=group)
    assert type(a) is nn.QuantizedAllToShardedLinear and type(b) is nn.QuantizedShardedToAllLinear
    assert a.mode == b.mode == mode and (a.biases is None) == (mode != "affine")
    x = normal(5, 2, in_dims)
    ref = lambda x: jnp.sum(jnp.tanh(jnp.tanh(x @ w1.T + q1["bias"]) @ w2.T + q2["bias"]) ** 2)
    mine = lambda x: jnp.sum(jnp.tanh(b(jnp.tanh(a(x)))) ** 2)
    (value, gx), h = jax.jit(lambda x: (jax.value_and_grad(mine)(x), a(x)))(x)
    (want, want_gx), want_h = jax.jit(lambda x: (jax.value_and_grad(ref)(x), x @ w1.T + q1["bias"]))(x)
    np.testing.assert_allclose(h, block(want_h, rank, size, axis=1), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(value, want, rtol=1e-5)
    np.testing.assert_allclose(gx, want_gx, rtol=1e-4, atol=1e-4)


@pytest.mark.ranks(2, 4)
def test_average_gradients_and_clipping(group, rank, size):
    import jax
    import jax.numpy as jnp
    from jax_mlxdist import nn

    def grads(r):  # mixed dtypes and shapes, a scalar, nested containers
        return {"a": jnp.full((3, 5), r, jnp.float32) + jnp.arange(5.0), "c": jnp.float32(r),
                "b": [jnp.arange(7, dtype=jnp.float16) * r, jnp.full((2,), 10 * r, jnp.float32)],
                "d": jnp.arange(4, dtype=jnp.bfloat16) - r}

    mean = jax.tree_util.tree_map(lambda *gs: np.mean([np.asarray(g, np.float32) for g in gs], axis=0),
                                  *[grads(r) for r in range(size)])
    # Bucket size -> ops: 0 is one all_sum per array; a positive size fills buckets in leaf
    # order (a, b[0], b[1], c, d) until they hold that many bytes, each one pytree all_sum with
    # one op per dtype: 64 bytes gives [a, b[0]] (float32, float16) and [b[1], c, d] (float32,
    # bfloat16); 32 MiB one bucket (three dtypes). No concatenation or slicing in the program.
    for bucket, prim, calls in ((0, "mlxdist_all_reduce[", 5), (64, "mlxdist_all_reduce_many[", 4),
                                (32 * 1024**2, "mlxdist_all_reduce_many[", 3)):
        got = jax.jit(lambda g: nn.average_gradients(g, group=group, all_reduce_size=bucket))(grads(rank))
        fn = lambda g: nn.average_gradients(g, group=group, all_reduce_size=bucket)  # noqa: E731
        assert count(fn, grads(rank), prim=prim) == calls
        assert count(fn, grads(rank), prim="concatenate") == count(fn, grads(rank), prim="slice") == 0
        for g_, w_, mine in zip(*map(jax.tree_util.tree_leaves, (got, mean, grads(rank)))):
            assert g_.dtype == mine.dtype and g_.shape == mine.shape
            np.testing.assert_allclose(np.asarray(g_, np.float32), w_, rtol=1e-2 if g_.dtype != jnp.float32 else 1e-6)
    # Eager, and with bfloat16 on the wire.
    got = nn.average_gradients(grads(rank), group=group, communication_type=jnp.bfloat16)
    assert got["a"].dtype == jnp.float32
    np.testing.assert_allclose(got["a"], mean["a"], rtol=1e-2)

    # Clipping by the global norm of gradients split over the ranks.
    g = {"w": jnp.full((4,), 3.0 * (rank + 1)), "v": jnp.ones((2, 2)) * rank}
    total = np.sqrt(sum(4 * (3.0 * (r + 1)) ** 2 + 4 * r**2 for r in range(size)))
    clipped, norm = jax.jit(lambda g: nn.clip_grad_norm_sharded(g, 1.0, group=group))(g)
    np.testing.assert_allclose(norm, total, rtol=1e-6)
    np.testing.assert_allclose(clipped["w"], g["w"] / (total + 1e-6), rtol=1e-5)
    kept, _ = nn.clip_grad_norm_sharded(g, 2 * total, group=group)  # under the limit: unchanged
    np.testing.assert_allclose(kept["v"], g["v"], rtol=1e-6)


@pytest.mark.ranks(2, 4)
def test_fully_shard_trains_like_data_parallel(group, rank, size):
    import jax
    import jax.numpy as jnp
    import jax_mlxdist as dist
    from jax_mlxdist import nn

    model = {"w": normal(0, 4 * size, 3), "b": jax.device_put(np.zeros(2 * size, np.float32)),
             "emb": normal(1, size, 3, dtype=jnp.bfloat16), "steps": jnp.int32(7)}
    x = normal(10 + rank, 5, 4 * size)  # each rank its own data

    def loss(p, x):
        h = jnp.tanh(x @ p["w"] + p["b"][:3]) * jnp.sum(p["emb"].astype(jnp.float32), 0)
        return jnp.mean(h ** 2) + jnp.sum(p["b"] ** 2)

    fsdp = nn.fully_shard(model, group=group)
    assert isinstance(fsdp, nn.FullyShardedModule) and nn.fully_shard(fsdp) is fsdp
    mine = fsdp.gather()
    assert mine["w"].shape == (4 * size, 3)  # gather() is the whole model ...
    leaves = dict(zip(["b", "emb", "steps", "w"], jax.tree_util.tree_leaves(fsdp)))
    assert leaves["w"].shape == (4, 3) and leaves["b"].shape == (2,) and leaves["emb"].shape == (1, 3)
    np.testing.assert_array_equal(leaves["w"], block(model["w"], rank, size))  # ... each rank keeps a block
    assert int(leaves["steps"]) == 7  # integer leaves are kept whole
    # One all_gather per dtype forward, one sum_scatter per dtype backward.
    grad_fn = jax.grad(lambda m: loss(m.gather(), x), allow_int=True)
    assert count(grad_fn, fsdp, prim="mlxdist_all_gather") == 2
    assert count(grad_fn, fsdp, prim="mlxdist_sum_scatter") == 2

    def update(p, g):
        return p - 0.5 * g.astype(p.dtype) if jnp.issubdtype(p.dtype, jnp.inexact) else p

    fsdp_step = jax.jit(lambda m: jax.tree_util.tree_map(update, m, grad_fn(m)))
    dp_step = jax.jit(lambda p: jax.tree_util.tree_map(update, p, nn.average_gradients(
        jax.grad(loss, allow_int=True)(p, x), group=group)))
    dp = model
    for _ in range(4):
        fsdp, dp = fsdp_step(fsdp), dp_step(dp)
        whole = jax.jit(lambda m: m.gather())(fsdp)
        np.testing.assert_allclose(whole["w"], dp["w"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(whole["b"], dp["b"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(whole["emb"], np.float32), np.asarray(dp["emb"], np.float32),
                                   rtol=2e-2, atol=1e-2)
    assert float(jnp.abs(whole["w"] - model["w"]).max()) > 1e-3  # it did train

    # A callable pytree (here a Partial; an Equinox module alike): calling the sharded module
    # calls the gathered one; compute_dtype sets the dtype it computes in.
    p = full_layer(2, 2 * size, 3)
    layer = jax.tree_util.Partial(lambda w, b, x: x @ w.T + b, p["weight"], p["bias"])
    sharded = nn.fully_shard(layer, group=group, compute_dtype=jnp.bfloat16)
    xs = jnp.ones((2, 3), jnp.bfloat16)
    assert sharded(xs).dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(sharded(xs), np.float32), np.asarray(layer(xs), np.float32),
                               rtol=2e-2, atol=5e-2)
    g = jax.grad(lambda m: jnp.sum(m(xs).astype(jnp.float32)))(sharded)
    assert jax.tree_util.tree_leaves(g)[0].dtype == jnp.float32  # gradients in the parameters' dtype

    # MLX's messages for what cannot be sharded.
    with pytest.raises(dist.DistributedError, match="Cannot shard parameter 'w' with shape"):
        nn.fully_shard({"w": jnp.ones((2 * size + 1, 2))}, group=group)
    with pytest.raises(dist.DistributedError, match="Cannot shard parameter 'layers.0.s' because it is a scalar"):
        nn.fully_shard({"layers": [{"s": jnp.float32(1)}]}, group=group)


def test_tensor_parallel_example_matches_single_process():
    import pathlib

    from jax_mlxdist.testing import launch
    out = launch(pathlib.Path(__file__).parent.parent / "examples" / "tensor_parallel.py", 2,
                 "--steps", "20")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "(match)" in out.stdout and "over 20 steps" in out.stdout, out.stdout
