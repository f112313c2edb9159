"""Gradient helpers."""

from __future__ import annotations

import jax
import jax.numpy as jnp

import jax_mlxdist as dist
from jax_mlxdist.nn._sharding import group_for


def average_gradients(grads, group: dist.Group | None = None, all_reduce_size: int = 32 * 1024**2,
                      communication_type=None):
    """The mean of every rank's gradients (as MLX). all_reduce_size is MLX's bucket size:
    consecutive arrays (in pytree order) fill a bucket until it holds at least that many bytes,
    and each bucket is one pytree all_sum (its small arrays of each dtype packed in one op, its
    large ones one op each, reduced where they lie: no concatenation or slicing in the
    program); 0 or less makes one all_sum per array. communication_type casts the arrays for
    the wire (e.g. jnp.bfloat16 to halve the bytes) and back."""
    g = group_for(group, "average_gradients")
    n = g.size()
    if n == 1:
        return grads
    leaves, treedef = jax.tree_util.tree_flatten(grads)
    # Gradients of integer inputs (allow_int=True) are float0: no data, nothing to average.
    moving = [i for i, leaf in enumerate(leaves)
              if (getattr(leaf, "dtype", None) or jnp.asarray(leaf).dtype) != jax.dtypes.float0]
    wire = [jnp.asarray(leaves[i]) for i in moving]
    if communication_type is not None:
        wire = [w.astype(communication_type) for w in wire]
    if all_reduce_size <= 0:
        summed = [dist.all_sum(w, group=g) for w in wire]
    else:
        summed = [s for bucket in _buckets(wire, all_reduce_size) for s in dist.all_sum(bucket, group=g)]
    out = list(leaves)
    for i, s in zip(moving, summed):
        out[i] = (s.astype(jnp.asarray(leaves[i]).dtype) / n).astype(jnp.asarray(leaves[i]).dtype)
    return jax.tree_util.tree_unflatten(treedef, out)


def _buckets(arrays, size: int):
    """Consecutive arrays grouped until a group holds at least size bytes (MLX's grouping)."""
    out, current, held = [], [], 0
    for a in arrays:
        current.append(a)
        held += a.size * a.dtype.itemsize
        if held >= size:
            out.append(current)
            current, held = [], 0
    return out + [current] if current else out


def clip_grad_norm_sharded(grads, max_norm: float, group: dist.Group | None = None):
    """Clips gradients that are split over the ranks (each rank holds different parameters, as
    with tensor-parallel or fully sharded layers) by their global norm. Returns (clipped, norm)."""
    if max_norm <= 0:
        raise dist.DistributedValueError(f"clip_grad_norm_sharded: max_norm must be positive, got {max_norm}")
    g = group_for(group, "clip_grad_norm_sharded")
    local = sum(jnp.sum(jnp.square(jnp.asarray(x, jnp.float32))) for x in jax.tree_util.tree_leaves(grads))
    norm = jnp.sqrt(dist.all_sum(jnp.asarray(local, jnp.float32), group=g))
    scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    return jax.tree_util.tree_map(lambda x: (x * scale).astype(jnp.asarray(x).dtype), grads), norm
