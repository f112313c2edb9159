"""Fully sharded data parallel: parameters live sharded on axis 0; the loss sees them whole
(all_gather forward) and their gradient comes back as this rank's block of the sum over ranks
(sum_scatter backward)."""

from __future__ import annotations

import functools

import jax

from jax_mlxdist._group import Group, resolve
from jax_mlxdist._ops import all_gather, all_sum, sum_scatter
from jax_mlxdist.nn._gradients import sum_gradients


@functools.lru_cache(maxsize=None)
def _gather_fn(group: Group):
    @jax.custom_vjp
    def gather(x):
        return all_gather(x, group=group)

    gather.defvjp(lambda x: (all_gather(x, group=group), None),
                  lambda _, ct: (sum_scatter(ct, group=group),))
    return gather


def _shardable(x, n: int) -> bool:
    return hasattr(x, "shape") and x.ndim > 0 and x.shape[0] % n == 0


def fully_shard(params, group: Group | None = None):
    """(sharded params, unshard): each array whose axis 0 divides by the group size keeps this
    rank's block; the others stay replicated. Inside the loss call unshard(sharded) to get the
    whole parameters; grad w.r.t. the sharded params is then this rank's block of the sum of
    every rank's gradient (replicated leaves get the plain sum). Divide by size() to average."""
    g = resolve(group, "fully_shard")
    n, r = g.size(), g.rank()
    shardable = jax.tree_util.tree_map(lambda x: _shardable(x, n), params)
    sharded = jax.tree_util.tree_map(
        lambda x, s: x[r * (x.shape[0] // n):(r + 1) * (x.shape[0] // n)] if s else x, params, shardable)
    gather, replicated = _gather_fn(g), sum_gradients(g)

    def unshard(tree):
        return jax.tree_util.tree_map(lambda x, s: gather(x) if s else replicated(x), tree, shardable)

    return sharded, unshard
