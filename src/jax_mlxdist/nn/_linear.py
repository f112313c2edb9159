"""Tensor-parallel linear layers (weights (out, in), as MLX) and their functional forms.

AllToShardedLinear: replicated input, this rank's slice of the outputs. Its input passes
through sum_gradients, so the input's gradient is summed over ranks.
ShardedToAllLinear: this rank's slice of the inputs, replicated output (all_sum of the
partial products; the bias is added once, after the sum).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

import jax_mlxdist as dist
from jax_mlxdist._ops import sum_gradients
from jax_mlxdist.nn._sharding import check_input, check_output, group_for, shard_array


def all_to_sharded_linear(x, weight, bias=None, *, group: dist.Group | None = None):
    """x (..., in) replicated; weight (out/N, in): this rank's outputs."""
    y = sum_gradients(group)(x) @ weight.T
    return y if bias is None else y + bias


def sharded_to_all_linear(x, weight, bias=None, *, group: dist.Group | None = None):
    """x (..., in/N) this rank's inputs; weight (out, in/N): the full output on every rank."""
    y = dist.all_sum(x @ weight.T, group=group)
    return y if bias is None else y + bias


def _params_of(linear):
    """(weight, bias) of a dict {"weight", "bias"} or an object with .weight/.bias (Equinox, Flax)."""
    get = (lambda k: linear.get(k)) if isinstance(linear, dict) else (lambda k: getattr(linear, k, None))
    weight = get("weight")
    if weight is None:
        raise dist.DistributedTypeError("from_linear: expected a dict or layer with a 'weight' of shape (out, in)")
    return jnp.asarray(weight), None if get("bias") is None else jnp.asarray(get("bias"))


def _uniform(key, shape, fan_in):
    scale = math.sqrt(1.0 / fan_in)
    return jax.random.uniform(key, shape, minval=-scale, maxval=scale)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class AllToShardedLinear:
    weight: jax.Array
    bias: jax.Array | None
    group: dist.Group = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def create(cls, key, input_dims: int, output_dims: int, bias: bool = True,
               group: dist.Group | None = None) -> "AllToShardedLinear":
        g = group_for(group, "AllToShardedLinear")
        n = g.size()
        check_output("AllToShardedLinear", output_dims, n)
        kw, kb = jax.random.split(key)
        return cls(_uniform(kw, (output_dims // n, input_dims), input_dims),
                   _uniform(kb, (output_dims // n,), input_dims) if bias else None, g)

    @classmethod
    def from_linear(cls, linear, *, segments=1, group: dist.Group | None = None) -> "AllToShardedLinear":
        g = group_for(group, "AllToShardedLinear.from_linear")
        w, b = _params_of(linear)
        check_output("AllToShardedLinear.from_linear", w.shape[0], g.size())
        return cls(shard_array(w, 0, segments, g), None if b is None else shard_array(b, -1, segments, g), g)

    def __call__(self, x):
        return all_to_sharded_linear(x, self.weight, self.bias, group=self.group)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ShardedToAllLinear:
    weight: jax.Array
    bias: jax.Array | None
    group: dist.Group = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def create(cls, key, input_dims: int, output_dims: int, bias: bool = True,
               group: dist.Group | None = None) -> "ShardedToAllLinear":
        g = group_for(group, "ShardedToAllLinear")
        n = g.size()
        check_input("ShardedToAllLinear", input_dims, n)
        kw, kb = jax.random.split(key)
        return cls(_uniform(kw, (output_dims, input_dims // n), input_dims),
                   _uniform(kb, (output_dims,), input_dims) if bias else None, g)

    @classmethod
    def from_linear(cls, linear, *, segments=1, group: dist.Group | None = None) -> "ShardedToAllLinear":
        g = group_for(group, "ShardedToAllLinear.from_linear")
        w, b = _params_of(linear)
        check_input("ShardedToAllLinear.from_linear", w.shape[-1], g.size())
        return cls(shard_array(w, -1, segments, g), b, g)

    def __call__(self, x):
        return sharded_to_all_linear(x, self.weight, self.bias, group=self.group)
