"""Splitting weights into this rank's shard (MLX's segments semantics) and sharding pytrees."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jax_mlxdist._errors import DistributedError
from jax_mlxdist._group import Group, resolve

SHARDINGS = ("all-to-sharded", "sharded-to-all")


def split(weight, segments, axis: int) -> list:
    """Like jnp.split, but segments may also be fractions of the axis (e.g. [0.5, 0.75])."""
    if isinstance(segments, int) or all(isinstance(s, int) for s in segments):
        try:
            return jnp.split(weight, segments, axis=axis)
        except ValueError as e:
            raise DistributedError(f"cannot split an axis of size {weight.shape[axis]} into "
                                   f"{segments}: {e}") from None
    n = weight.shape[axis]
    return jnp.split(weight, [int(s * n) for s in segments], axis=axis)


def shard_array(weight, axis: int, segments, group: Group):
    """This rank's part of every segment along axis, concatenated: a fused QKV weight
    (segments=3) keeps one third of each of Q, K and V."""
    n, r = group.size(), group.rank()
    parts = []
    for part in split(weight, segments, axis):
        if part.shape[axis] % n:
            raise DistributedError(f"Cannot shard an axis of size {part.shape[axis]} across {n} "
                                   "devices.")
        parts.append(split(part, n, axis)[r])
    return jnp.concatenate(parts, axis=axis)


def _predicate(sharding: str, segments) -> Callable:
    if sharding not in SHARDINGS:
        raise DistributedError(f"Sharding type sharding={sharding!r} not supported, choose one "
                               "of 'all-to-sharded' or 'sharded-to-all'")
    if sharding == "all-to-sharded":  # outputs split: weight rows and the bias
        return lambda path, w: (-1, segments) if path.endswith("bias") else (max(w.ndim - 2, 0), segments)
    return lambda path, w: None if path.endswith("bias") else (-1, segments)  # inputs split


def _path(keys) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in keys)


def shard_inplace(params, sharding: str | Callable, *, segments=1, group: Group | None = None):
    """The parameter pytree with every array replaced by this rank's shard.

    sharding: "all-to-sharded", "sharded-to-all", or a function (path, weight) returning None
    (keep), an axis, or (axis, segments); path joins the keys with dots ("layers.0.weight").
    """
    g = resolve(group, "shard_inplace")
    rule = _predicate(sharding, segments) if isinstance(sharding, str) else sharding

    def shard_leaf(keys, w):
        if not hasattr(w, "shape"):
            return w
        spec = rule(_path(keys), w)
        if spec is None:
            return w
        axis, segs = (spec, 1) if isinstance(spec, int) else spec
        return shard_array(jnp.asarray(w), axis, segs, g)

    return jax.tree_util.tree_map_with_path(shard_leaf, params)


def shard_linear(module, sharding: str, *, segments=1, group: Group | None = None):
    """A sharded copy of a linear layer (plain or quantized) that communicates as it runs."""
    from jax_mlxdist.nn import _linear, _quantized
    _predicate(sharding, segments)
    quantized = _quantized.is_quantized(module)
    cls = {("all-to-sharded", False): _linear.AllToShardedLinear,
           ("sharded-to-all", False): _linear.ShardedToAllLinear,
           ("all-to-sharded", True): _quantized.QuantizedAllToShardedLinear,
           ("sharded-to-all", True): _quantized.QuantizedShardedToAllLinear}[sharding, quantized]
    make = cls.from_quantized_linear if quantized else cls.from_linear
    return make(module, segments=segments, group=group)
