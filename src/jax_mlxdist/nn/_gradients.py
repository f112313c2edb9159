"""Gradient helpers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jax_mlxdist as dist
from jax_mlxdist.nn._sharding import group_for


def average_gradients(grads, group: dist.Group | None = None, all_reduce_size: int = 32 * 1024**2,
                      communication_type=None):
    """The mean of every rank's gradients (as MLX). Small arrays are concatenated into buckets of
    up to all_reduce_size bytes per dtype, so a model's gradients take few all_sums; 0 or less
    means one all_sum per array. communication_type casts the buckets for the wire (e.g.
    jnp.bfloat16 to halve the bytes) and back."""
    g = group_for(group, "average_gradients")
    n = g.size()
    if n == 1:
        return grads
    leaves, treedef = jax.tree_util.tree_flatten(grads)
    out = list(leaves)
    buckets: dict = {}
    for i, leaf in enumerate(leaves):
        dtype = getattr(leaf, "dtype", None) or jnp.asarray(leaf).dtype
        if dtype == jax.dtypes.float0:  # gradients of integer inputs (allow_int=True): no data
            continue
        buckets.setdefault(jnp.dtype(dtype), []).append(i)

    def reduce(indices):
        flat = jnp.concatenate([jnp.ravel(jnp.asarray(leaves[i])) for i in indices])
        wire = flat.astype(communication_type) if communication_type is not None else flat
        total = dist.all_sum(wire, group=g).astype(flat.dtype) / n
        offsets = np.cumsum([0] + [int(np.prod(jnp.shape(leaves[i]))) for i in indices])
        for j, i in enumerate(indices):
            out[i] = total[offsets[j]:offsets[j + 1]].reshape(jnp.shape(leaves[i]))

    for dtype, indices in buckets.items():
        if all_reduce_size <= 0:
            for i in indices:
                reduce([i])
            continue
        bucket, size = [], 0
        for i in indices:
            nbytes = int(np.prod(jnp.shape(leaves[i]))) * jnp.dtype(dtype).itemsize
            if bucket and size + nbytes > all_reduce_size:
                reduce(bucket)
                bucket, size = [], 0
            bucket.append(i)
            size += nbytes
        if bucket:
            reduce(bucket)
    return jax.tree_util.tree_unflatten(treedef, out)


def clip_grad_norm_sharded(grads, max_norm: float, group: dist.Group | None = None):
    """Clips gradients that are split over the ranks (each rank holds different parameters, as
    with tensor-parallel or fully sharded layers) by their global norm. Returns (clipped, norm)."""
    if max_norm <= 0:
        raise dist.DistributedError(f"clip_grad_norm_sharded: max_norm must be positive, got {max_norm}")
    g = group_for(group, "clip_grad_norm_sharded")
    local = sum(jnp.sum(jnp.square(jnp.asarray(x, jnp.float32))) for x in jax.tree_util.tree_leaves(grads))
    norm = jnp.sqrt(dist.all_sum(jnp.asarray(local, jnp.float32), group=g))
    scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    return jax.tree_util.tree_map(lambda x: (x * scale).astype(jnp.asarray(x).dtype), grads), norm
