"""Splitting weights into this rank's shard (MLX's segments semantics) and sharding pytrees."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import jax_mlxdist as dist

SHARDINGS = ("all-to-sharded", "sharded-to-all")


def group_for(group, op: str):
    """The group an nn helper runs on: group=None means the world group, as for the ops."""
    if group is None:
        return dist.init()
    if not isinstance(group, dist.Group):
        raise dist.DistributedTypeError(f"{op}: group must be a jax_mlxdist Group, got {type(group).__name__}")
    return group


def check_output(op: str, size: int, n: int) -> None:
    """An all-to-sharded layer's outputs split evenly over n ranks (MLX's message, op first)."""
    if size % n:
        raise dist.DistributedValueError(f"{op}: Cannot shard the output of size {size} across {n} devices.")


def check_input(op: str, size: int, n: int) -> None:
    """A sharded-to-all layer's inputs split evenly over n ranks (MLX's message, op first)."""
    if size % n:
        raise dist.DistributedValueError(f"{op}: The input of size {size} cannot be sharded across {n} devices.")


def _bounds(n: int, segments, axis_name: str) -> list[tuple[int, int]]:
    """(start, stop) of each segment of an axis of size n; segments as in jnp.split, or
    fractions of the axis (e.g. [0.5, 0.75])."""
    if isinstance(segments, int):
        if segments <= 0 or n % segments:
            raise dist.DistributedValueError(f"cannot split {axis_name} of size {n} into {segments} equal segments")
        cuts = [n // segments * i for i in range(1, segments)]
    else:
        cuts = [s if isinstance(s, int) else int(s * n) for s in segments]
        if any(not 0 <= c <= n for c in cuts) or cuts != sorted(cuts):
            raise dist.DistributedValueError(f"cannot split {axis_name} of size {n} at {list(segments)}")
    edges = [0, *cuts, n]
    return list(zip(edges[:-1], edges[1:]))


def shard_array(weight, axis: int, segments, group: dist.Group):
    """This rank's part of every segment along axis, concatenated: a fused QKV weight
    (segments=3) keeps one third of each of Q, K and V."""
    n, r = group.size(), group.rank()
    pieces = []
    for start, stop in _bounds(weight.shape[axis], segments, "an axis"):
        if (stop - start) % n:
            raise dist.DistributedValueError(f"Cannot shard an axis of size {stop - start} across {n} devices.")
        block = (stop - start) // n
        pieces.append((start + r * block, start + (r + 1) * block))
    if isinstance(weight, jax.core.Tracer):  # inside a trace: jnp ops
        return jnp.concatenate([jax.lax.slice_in_dim(weight, a, b, axis=axis) for a, b in pieces], axis=axis)
    # Concrete arrays are cut on the host and put back with device_put: no program compiled per
    # weight shape at set-up time (jnp ops, and even jnp.asarray of a numpy array, compile one).
    idx = np.concatenate([np.arange(a, b) for a, b in pieces])
    return jax.device_put(np.take(np.asarray(weight), idx, axis=axis))


def _predicate(sharding: str, segments, op: str) -> Callable:
    if sharding not in SHARDINGS:
        raise dist.DistributedValueError(f"{op}: Sharding type sharding={sharding!r} not supported, "
                                         "choose one of 'all-to-sharded' or 'sharded-to-all'")
    if sharding == "all-to-sharded":  # outputs split: weight rows and the bias
        return lambda path, w: (-1, segments) if path.endswith("bias") else (max(w.ndim - 2, 0), segments)
    return lambda path, w: None if path.endswith("bias") else (-1, segments)  # inputs split


def _path(keys) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in keys)


def shard_inplace(params, sharding: str | Callable, *, segments=1, group: dist.Group | None = None):
    """The parameter pytree with every array replaced by this rank's shard.

    sharding: "all-to-sharded", "sharded-to-all", or a function (path, weight) returning None
    (keep), an axis, or (axis, segments); path joins the keys with dots ("layers.0.weight").
    """
    g = group_for(group, "shard_inplace")
    if not isinstance(sharding, str) and not callable(sharding):
        raise dist.DistributedTypeError("shard_inplace: sharding must be 'all-to-sharded', "
                                        f"'sharded-to-all' or a function, got {sharding!r}")
    rule = _predicate(sharding, segments, "shard_inplace") if isinstance(sharding, str) else sharding

    def shard_leaf(keys, w):
        if not hasattr(w, "shape"):
            return w
        spec = rule(_path(keys), w)
        if spec is None:
            return w
        axis, segs = (spec, 1) if isinstance(spec, int) else spec
        return shard_array(jnp.asarray(w), axis, segs, g)

    return jax.tree_util.tree_map_with_path(shard_leaf, params)
