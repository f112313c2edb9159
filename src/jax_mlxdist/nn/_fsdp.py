"""Fully sharded data parallel (MLX's fully_shard): every floating-point parameter lives
sharded on axis 0; the forward pass all_gathers them and the backward pass sum_scatters their
gradient and divides by the group size, so each rank holds and updates only its block of the
averaged gradient. Training then equals data-parallel training with average_gradients.

The primitive-level all_gather transposes to "this rank's block of the cotangent" (right for a
replicated use of a gathered value); FSDP gathers to use the whole parameter on each rank's own
data, so the gradient must be reduced over ranks: hence its own custom_vjp below.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

import jax_mlxdist as dist
from jax_mlxdist.nn._sharding import group_for, shard_array


@functools.lru_cache(maxsize=None)
def _gather_fn(group: dist.Group, shard_shapes: tuple, dtype):
    """Gathers a list of shards of one dtype with a single all_gather (concatenated flat)."""
    n = group.size()
    sizes = [math.prod(s) for s in shard_shapes]
    cuts = list(np.cumsum(sizes)[:-1])
    full_shapes = [(s[0] * n, *s[1:]) for s in shard_shapes]

    @jax.custom_vjp
    def gather(shards):
        flat = jnp.concatenate([jnp.ravel(s).astype(dtype) for s in shards])
        table = dist.all_gather(flat, group=group).reshape(n, -1)  # row r: rank r's shards
        # Rank r's block of a parameter is rows r*s0/n..(r+1)*s0/n, so stacking the blocks
        # rank-major and merging the first two axes gives the whole parameter.
        return [part.reshape(full) for part, full in
                zip(jnp.split(table, cuts, axis=1), full_shapes)]

    def fwd(shards):
        return gather(shards), [jnp.zeros((), s.dtype) for s in shards]

    def bwd(like, cts):
        table = jnp.concatenate([jnp.reshape(c, (n, -1)).astype(dtype) for c in cts], axis=1)
        mine = dist.sum_scatter(table, group=group)[0] / n
        return ([part.reshape(shape).astype(z.dtype) for part, shape, z in
                 zip(jnp.split(mine, cuts), shard_shapes, like)],)

    gather.defvjp(fwd, bwd)
    return gather


def _sharded(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)


@jax.tree_util.register_pytree_node_class
class FullyShardedModule:
    """A module (any pytree: a dict of parameters, one of our layers, an Equinox module) whose
    floating-point arrays are this rank's blocks along axis 0. Other leaves are kept whole.

    gather() returns the whole module (differentiable: its gradient flows back to the shards
    averaged over ranks); calling it calls the gathered module. Pass it to jax.grad/jit as is.
    """

    def __init__(self, leaves, treedef, group: dist.Group, compute_dtype=None):
        self.leaves, self.treedef, self.group, self.compute_dtype = list(leaves), treedef, group, compute_dtype

    def tree_flatten(self):
        return self.leaves, (self.treedef, self.group, self.compute_dtype)

    @classmethod
    def tree_unflatten(cls, aux, leaves):
        return cls(leaves, *aux)

    def gather(self):
        """The whole module, on every rank."""
        leaves = list(self.leaves)
        if self.group.size() > 1:
            by_dtype: dict = {}
            for i, x in enumerate(leaves):
                if _sharded(x):
                    dt = jnp.dtype(self.compute_dtype or x.dtype)
                    by_dtype.setdefault(dt, []).append(i)
            for dt, idx in by_dtype.items():  # one all_gather per dtype
                fn = _gather_fn(self.group, tuple(tuple(leaves[i].shape) for i in idx), dt)
                for i, full in zip(idx, fn([leaves[i] for i in idx])):
                    leaves[i] = full
        elif self.compute_dtype is not None:
            leaves = [x.astype(self.compute_dtype) if _sharded(x) else x for x in leaves]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    def __call__(self, *args, **kwargs):
        return self.gather()(*args, **kwargs)

    def __repr__(self):
        n = sum(_sharded(x) for x in self.leaves)
        return f"FullyShardedModule(num_sharded_params={n}, group={self.group!r})"


def _path(keys) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in keys)


def fully_shard(module, *, group: dist.Group | None = None, compute_dtype=None) -> FullyShardedModule:
    """Wraps module (a pytree) in a FullyShardedModule holding this rank's block, along axis 0,
    of every floating-point array (each axis 0 must divide by the group size, as MLX).
    compute_dtype: the dtype the gathered parameters are cast to for the forward pass (and the
    dtype they travel in); gradients come back in the parameters' own dtype."""
    if isinstance(module, FullyShardedModule):
        return module
    g = group_for(group, "fully_shard")
    n = g.size()
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(module)
    leaves = []
    for keys, x in with_paths:
        if _sharded(x):
            if x.ndim == 0:
                raise dist.DistributedValueError(f"fully_shard: Cannot shard parameter '{_path(keys)}' because it is a scalar.")
            if x.shape[0] % n:
                raise dist.DistributedValueError(
                    f"fully_shard: Cannot shard parameter '{_path(keys)}' with shape {tuple(x.shape)} "
                    f"across {n} devices: axis 0 must be divisible by {n}.")
            x = shard_array(x, 0, 1, g)
        leaves.append(x)
    return FullyShardedModule(leaves, treedef, g, compute_dtype)
