"""Train a Megatron-style transformer block sharded over the ranks, and check that its loss
curve matches the same block trained in one process:

    jax-mlxdist launch -n 2 examples/tensor_parallel.py [--steps 300]

Attention heads are split over the ranks (fused QKV projection: AllToShardedLinear with
segments=3; output projection: ShardedToAllLinear), and so are the MLP's hidden units.
"""

import argparse
import sys

import jax
import jax.numpy as jnp

import jax_mlxdist as dist
from jax_mlxdist import nn

D, HEADS, HIDDEN, T = 32, 4, 128, 16
DH = D // HEADS


def init(key):
    """The unsharded block, layers as {"weight": (out, in), "bias": (out,)}."""
    def linear(k, out_dims, in_dims):
        kw, kb = jax.random.split(k)
        s = in_dims ** -0.5
        return {"weight": jax.random.uniform(kw, (out_dims, in_dims), minval=-s, maxval=s),
                "bias": jax.random.uniform(kb, (out_dims,), minval=-s, maxval=s)}
    ks = jax.random.split(key, 4)
    return {"qkv": linear(ks[0], 3 * D, D), "out": linear(ks[1], D, D),
            "up": linear(ks[2], HIDDEN, D), "down": linear(ks[3], D, HIDDEN)}


def dense(layer):
    return lambda x: x @ layer["weight"].T + layer["bias"]


def shard(params, group):
    return {"qkv": nn.shard_linear(params["qkv"], "all-to-sharded", segments=3, group=group),
            "out": nn.shard_linear(params["out"], "sharded-to-all", group=group),
            "up": nn.shard_linear(params["up"], "all-to-sharded", group=group),
            "down": nn.shard_linear(params["down"], "sharded-to-all", group=group)}


def block(layers, x):
    """layers: callables; with sharded layers each rank computes its own heads and units."""
    q, k, v = jnp.split(layers["qkv"](x), 3, axis=-1)
    heads = lambda a: a.reshape(T, -1, DH).transpose(1, 0, 2)
    att = jax.nn.softmax(heads(q) @ heads(k).transpose(0, 2, 1) / DH ** 0.5, axis=-1)
    y = x + layers["out"]((att @ heads(v)).transpose(1, 0, 2).reshape(T, -1))
    return y + layers["down"](jax.nn.gelu(layers["up"](y)))


def batch(step):
    kx, kt = jax.random.split(jax.random.fold_in(jax.random.key(7), step))
    return jax.random.normal(kx, (T, D)), jax.random.normal(kt, (T, D))


def train(params, as_layers, steps, lr=0.05):
    loss = lambda p, x, t: jnp.mean((block(as_layers(p), x) - t) ** 2)
    step = jax.jit(jax.value_and_grad(loss))
    curve = []
    for s in range(steps):
        value, grads = step(params, *batch(s))
        params = jax.tree_util.tree_map(lambda w, g: w - lr * g, params, grads)
        curve.append(float(value))
    return curve


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    group = dist.init()
    params = init(jax.random.key(0))
    sharded = train(shard(params, group), lambda layers: layers, args.steps)
    if group.rank() != 0:
        return 0
    single = train(params, lambda p: {k: dense(v) for k, v in p.items()}, args.steps)
    gap = max(abs(a - b) / abs(b) for a, b in zip(sharded, single))
    print(f"{group.size()} ranks: loss {sharded[0]:.4f} -> {sharded[-1]:.4f} over {args.steps} steps")
    print(f"single process: loss {single[0]:.4f} -> {single[-1]:.4f}")
    ok = gap < 1e-4
    print(f"largest relative gap between the loss curves: {gap:.1e} ({'match' if ok else 'MISMATCH'})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
