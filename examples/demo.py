"""A tour of the collectives; run it on several ranks:

    jax-mlxdist launch -n 2 examples/demo.py
"""

import jax
import jax.numpy as jnp

import jax_mlxdist as dist

group = dist.init()
rank, size = group.rank(), group.size()
print(f"rank {rank} of {size}")

x = jnp.arange(4.0) + rank
print("all_sum    ", dist.all_sum(x))
print("all_max    ", dist.all_max(x))
print("all_gather ", dist.all_gather(jnp.float32(rank)))
print("sum_scatter", dist.sum_scatter(jnp.ones(2 * size)))


@jax.jit
def step(w, data):
    """One data-parallel step: local gradient, summed over ranks, inside a single program."""
    grad = jax.grad(lambda w: jnp.mean((data @ w - 1.0) ** 2))(w)
    return w - 0.1 * dist.all_sum(grad) / size


w = jnp.zeros(3)
data = jax.random.normal(jax.random.key(rank), (8, 3))
for _ in range(20):
    w = step(w, data)
print("weights after 20 data-parallel steps (equal on every rank):", w)

if size > 1:
    # Point-to-point between any two ranks: a ring shift. Every rank sends first; a send
    # never waits for its recv.
    right, left = (rank + 1) % size, (rank - 1) % size
    dist.send(x, right)
    print(f"received from rank {left}:", dist.recv_like(x, left))
    print("sendrecv   ", dist.sendrecv(x, right, left))  # the same shift in one call
    # all_to_all: block i of axis 0 goes to rank i.
    print("all_to_all ", dist.all_to_all(jnp.arange(2.0 * size) + 100 * rank))
dist.barrier()
