"""Converting a linear layer (plain or quantized) into its sharded counterpart."""

from __future__ import annotations

import jax_mlxdist as dist
from jax_mlxdist.nn import _linear, _quantized
from jax_mlxdist.nn._sharding import _predicate


def shard_linear(module, sharding: str, *, segments=1, group: dist.Group | None = None):
    """A sharded copy of a linear layer (plain or quantized) that communicates as it runs."""
    _predicate(sharding, segments, "shard_linear")
    quantized = _quantized.is_quantized(module)
    cls = {("all-to-sharded", False): _linear.AllToShardedLinear,
           ("sharded-to-all", False): _linear.ShardedToAllLinear,
           ("all-to-sharded", True): _quantized.QuantizedAllToShardedLinear,
           ("sharded-to-all", True): _quantized.QuantizedShardedToAllLinear}[sharding, quantized]
    make = cls.from_quantized_linear if quantized else cls.from_linear
    return make(module, segments=segments, group=group)
