"""Tensor-parallel layers, fully sharded data parallel and gradient helpers (MLX's toolbox),
in plain JAX on top of the collectives. Modules are pytree dataclasses: pass them to jax.grad
and jax.jit directly."""

from jax_mlxdist.nn._fsdp import FullyShardedModule, fully_shard
from jax_mlxdist._ops import sum_gradients  # binds its primitive where every other op is bound
from jax_mlxdist.nn._gradients import average_gradients, clip_grad_norm_sharded
from jax_mlxdist.nn._linear import (
    AllToShardedLinear,
    ShardedToAllLinear,
    all_to_sharded_linear,
    sharded_to_all_linear,
)
from jax_mlxdist.nn._quantize import dequantize, quantize
from jax_mlxdist.nn._quantized import QuantizedAllToShardedLinear, QuantizedShardedToAllLinear, quantized_linear
from jax_mlxdist.nn._shard_linear import shard_linear
from jax_mlxdist.nn._sharding import shard_inplace

__all__ = [
    "AllToShardedLinear", "FullyShardedModule", "QuantizedAllToShardedLinear", "QuantizedShardedToAllLinear",
    "ShardedToAllLinear", "all_to_sharded_linear", "average_gradients", "clip_grad_norm_sharded",
    "dequantize", "fully_shard", "quantize", "quantized_linear", "shard_inplace", "shard_linear",
    "sharded_to_all_linear", "sum_gradients",
]
