"""Train an expert-parallel mixture-of-experts layer (one expert per rank), and check that its
loss curve matches the same layer trained in one process:

    jax-mlxdist launch -n 4 examples/moe.py [--steps 50]

Each rank routes its own tokens (top-1 gate, a fixed capacity per expert so shapes are
static), all_to_all carries every token to the rank holding its expert, the expert's MLP runs
there, and a second all_to_all brings the results home. Gradients flow back through both
exchanges (the reverse all_to_all), so each rank's expert learns from every rank's tokens.
"""

import argparse
import sys

import jax
import jax.numpy as jnp

import jax_mlxdist as dist
from jax_mlxdist import nn

D, HIDDEN, TOKENS, CAPACITY = 16, 32, 24, 12  # per rank: TOKENS tokens, CAPACITY per expert


def init(key, experts):
    kg, k1, k2 = jax.random.split(key, 3)
    return {"gate": jax.random.normal(kg, (D, experts)) * D ** -0.5,
            "w1": jax.random.normal(k1, (experts, D, HIDDEN)) * D ** -0.5,
            "w2": jax.random.normal(k2, (experts, HIDDEN, D)) * HIDDEN ** -0.5}


def batch(step, rank):
    k = jax.random.fold_in(jax.random.key(step), rank)
    x = jax.random.normal(k, (TOKENS, D))
    return x, jnp.roll(x, 1, axis=-1)  # target: a fixed permutation of the features


def route(gate, x, experts):
    """Top-1 expert per token, its gate weight, and its slot in that expert's buffer (tokens
    past the capacity are dropped: slot -1)."""
    probs = jax.nn.softmax(x @ gate, axis=-1)
    expert = jnp.argmax(probs, axis=-1)
    weight = jnp.take_along_axis(probs, expert[:, None], axis=-1)[:, 0]
    onehot = jax.nn.one_hot(expert, experts, dtype=jnp.int32)
    slot = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=-1)
    return expert, weight, jnp.where(slot < CAPACITY, slot, -1)


def dispatch(x, expert, slot, experts):
    """(experts * CAPACITY, D): block e holds the tokens for expert e, zero-padded."""
    buf = jnp.zeros((experts, CAPACITY, D), x.dtype)
    keep = slot >= 0
    buf = buf.at[jnp.where(keep, expert, experts), jnp.where(keep, slot, 0)].set(x, mode="drop")
    return buf.reshape(experts * CAPACITY, D)


def mlp(w1, w2, h):
    return jax.nn.gelu(h @ w1) @ w2


def combine(y, expert, weight, slot, experts):
    y = y.reshape(experts, CAPACITY, D)[expert, jnp.maximum(slot, 0)]
    return jnp.where((slot >= 0)[:, None], y * weight[:, None], 0.0)


def moe_sharded(params, x, rank, size):
    """This rank's tokens through the layer; params hold this rank's expert only."""
    expert, weight, slot = route(params["gate"], x, size)
    h = dist.all_to_all(dispatch(x, expert, slot, size))  # block p: rank p's tokens for us
    y = mlp(params["w1"][0], params["w2"][0], h)
    return combine(dist.all_to_all(y), expert, weight, slot, size)


def moe_single(params, xs, experts):
    """Every rank's tokens in one process (xs: one batch per rank), all experts here."""
    outs = []
    for x in xs:
        expert, weight, slot = route(params["gate"], x, experts)
        buf = dispatch(x, expert, slot, experts).reshape(experts, CAPACITY, D)
        y = jax.vmap(mlp)(params["w1"], params["w2"], buf).reshape(experts * CAPACITY, D)
        outs.append(combine(y, expert, weight, slot, experts))
    return outs


def train(loss, params, data, steps, lr=0.1):
    step = jax.jit(jax.value_and_grad(loss))
    curve = []
    for s in range(steps):
        value, grads = step(params, *data(s))
        params = jax.tree_util.tree_map(lambda w, g: w - lr * g, params, grads)
        curve.append(float(value))
    return curve


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    group = dist.init()
    rank, size = group.rank(), group.size()
    full = init(jax.random.key(0), size)
    mine = {"gate": full["gate"], "w1": full["w1"][rank:rank + 1], "w2": full["w2"][rank:rank + 1]}

    def sharded_loss(p, x, t):
        # The mean over every rank's tokens: the gate is replicated, so its gradient is summed.
        local = jnp.sum((moe_sharded(p, x, rank, size) - t) ** 2) / (TOKENS * size * D)
        return dist.all_sum(local, vjp="identity")

    # Each rank's gate gradient covers its own tokens; summing them gives the whole one.
    def loss_with_gate_sum(p, x, t):
        return sharded_loss({**p, "gate": nn.sum_gradients(group)(p["gate"])}, x, t)

    sharded = train(loss_with_gate_sum, mine, lambda s: batch(s, rank), args.steps)
    if rank != 0:
        return 0

    def single_loss(p, xs, ts):
        outs = moe_single(p, xs, size)
        return sum(jnp.sum((o - t) ** 2) for o, t in zip(outs, ts)) / (TOKENS * size * D)

    def all_batches(s):
        pairs = [batch(s, r) for r in range(size)]
        return [x for x, _ in pairs], [t for _, t in pairs]

    single = train(single_loss, full, all_batches, args.steps)
    gap = max(abs(a - b) / abs(b) for a, b in zip(sharded, single))
    print(f"{size} ranks, one expert each: loss {sharded[0]:.4f} -> {sharded[-1]:.4f} "
          f"over {args.steps} steps")
    print(f"single process: loss {single[0]:.4f} -> {single[-1]:.4f}")
    ok = gap < 1e-4
    print(f"largest relative gap between the loss curves: {gap:.1e} ({'match' if ok else 'MISMATCH'})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
