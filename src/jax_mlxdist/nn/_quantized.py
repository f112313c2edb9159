"""dist.Group-wise affine quantization (4 or 8 bits; groups of 32, 64 or 128 along the input) and
the quantized tensor-parallel layers. Packed as MLX does: 32 // bits values per uint32."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

import jax_mlxdist as dist
from jax_mlxdist.nn._linear import all_to_sharded_linear, sharded_to_all_linear
from jax_mlxdist.nn._sharding import group_for, shard_array

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)


def _check(group_size: int, bits: int, in_dims: int) -> None:
    if bits not in BITS or group_size not in GROUP_SIZES:
        raise dist.DistributedError(f"quantize: bits must be one of {BITS} and group_size one of "
                               f"{GROUP_SIZES}, got bits={bits}, group_size={group_size}")
    if in_dims % group_size:
        raise dist.DistributedError(f"quantize: the input size {in_dims} is not a multiple of the "
                               f"group size {group_size}")


def quantize(w, group_size: int = 64, bits: int = 4):
    """(packed uint32 weight, scales, biases) with w ~ scales * q + biases per group."""
    if jnp.ndim(w) != 2:
        raise dist.DistributedError(f"quantize: expected a weight of shape (out, in), got {jnp.shape(w)}")
    _check(group_size, bits, jnp.shape(w)[1])
    return _quantize(w, group_size, bits)


@functools.partial(jax.jit, static_argnums=(1, 2))  # one compiled program, not dozens of eager ops
def _quantize(w, group_size: int, bits: int):
    w = w.astype(jnp.float32)
    out_dims, in_dims = w.shape
    groups = w.reshape(out_dims, in_dims // group_size, group_size)
    lo, hi = groups.min(-1), groups.max(-1)
    levels = 2**bits - 1
    scales = jnp.where(hi > lo, (hi - lo) / levels, 1.0)
    q = jnp.clip(jnp.round((groups - lo[..., None]) / scales[..., None]), 0, levels).astype(jnp.uint32)
    per_word = 32 // bits
    q = q.reshape(out_dims, in_dims // per_word, per_word)
    shifts = jnp.arange(per_word, dtype=jnp.uint32) * bits
    packed = jnp.sum(q << shifts, axis=-1, dtype=jnp.uint32)
    return packed, scales, lo


@functools.partial(jax.jit, static_argnums=(3, 4))
def dequantize(packed, scales, biases, group_size: int = 64, bits: int = 4):
    """The float32 weight (out, in) of a quantized one."""
    per_word = 32 // bits
    shifts = jnp.arange(per_word, dtype=jnp.uint32) * bits
    q = (packed[..., None] >> shifts) & jnp.uint32(2**bits - 1)
    out_dims = packed.shape[0]
    q = q.reshape(out_dims, -1, group_size).astype(jnp.float32)
    return (q * scales[..., None] + biases[..., None]).reshape(out_dims, -1)


def _check_input(in_dims: int, group_size: int, n: int) -> None:
    if in_dims % n:
        raise dist.DistributedError(f"The input of size {in_dims} cannot be sharded across {n} devices.")
    if (in_dims // n) % group_size:  # a rank's columns must hold whole quantization groups
        raise dist.DistributedError(f"The input of size {in_dims} cannot be sharded across {n} devices "
                               f"in whole quantization groups of {group_size}.")


def _random(key, shape, input_dims, bias_dims, bias, group_size, bits):
    """A random quantized weight of this rank's shape and a zero bias (as MLX's constructors)."""
    s = input_dims ** -0.5
    w = jax.random.uniform(key, shape, minval=-s, maxval=s)
    return (*quantize(w, group_size, bits), jnp.zeros((bias_dims,)) if bias else None, group_size, bits)


def is_quantized(module) -> bool:
    return (isinstance(module, dict) and "scales" in module) or hasattr(module, "scales")


def _fields(q):
    get = (lambda k, d=None: q.get(k, d)) if isinstance(q, dict) else (lambda k, d=None: getattr(q, k, d))
    return (jnp.asarray(get("weight")), jnp.asarray(get("scales")), jnp.asarray(get("biases")),
            None if get("bias") is None else jnp.asarray(get("bias")),
            int(get("group_size", 64)), int(get("bits", 4)))


def quantized_linear(weight, bias=None, *, group_size: int = 64, bits: int = 4) -> dict:
    """A quantized linear layer as a dict, from a float weight (out, in)."""
    packed, scales, biases = quantize(weight, group_size, bits)
    return {"weight": packed, "scales": scales, "biases": biases, "bias": bias,
            "group_size": group_size, "bits": bits}


@dataclasses.dataclass
class _Quantized:
    """A quantized weight (packed, scales, biases), an optional float bias, and the group.

    Dequantized on the fly (w = scales * q + biases per group) and multiplied in x's dtype.
    Like MLX's quantized layers they are meant to stay frozen: the packed weight is uint32, so
    differentiate with respect to the input or to other parameters (close over the layer, or
    jax.grad(..., allow_int=True))."""
    weight: jax.Array
    scales: jax.Array
    biases: jax.Array
    bias: jax.Array | None
    group_size: int = dataclasses.field(metadata=dict(static=True))
    bits: int = dataclasses.field(metadata=dict(static=True))
    group: dist.Group = dataclasses.field(metadata=dict(static=True))

    def dense_weight(self, dtype):
        return dequantize(self.weight, self.scales, self.biases, self.group_size, self.bits).astype(dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QuantizedAllToShardedLinear(_Quantized):
    """AllToShardedLinear with a quantized weight (this rank's output rows)."""

    @classmethod
    def create(cls, key, input_dims: int, output_dims: int, bias: bool = True, group_size: int = 64,
               bits: int = 4, group: dist.Group | None = None) -> "QuantizedAllToShardedLinear":
        g = group_for(group, "QuantizedAllToShardedLinear")
        n = g.size()
        if output_dims % n:
            raise dist.DistributedError(f"Cannot shard the output of size {output_dims} across {n} devices.")
        return cls(*_random(key, (output_dims // n, input_dims), input_dims, output_dims // n, bias,
                            group_size, bits), g)

    @classmethod
    def from_quantized_linear(cls, q, *, segments=1, group: dist.Group | None = None):
        g = group_for(group, "QuantizedAllToShardedLinear.from_quantized_linear")
        w, s, b, bias, gs, bits = _fields(q)
        if w.shape[0] % g.size():
            raise dist.DistributedError(f"Cannot shard the output of size {w.shape[0]} across {g.size()} devices.")
        rows = lambda a: shard_array(a, 0, segments, g)
        return cls(rows(w), rows(s), rows(b), None if bias is None else shard_array(bias, -1, segments, g),
                   gs, bits, g)

    def __call__(self, x):
        return all_to_sharded_linear(x, self.dense_weight(x.dtype), self.bias, group=self.group)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QuantizedShardedToAllLinear(_Quantized):
    """ShardedToAllLinear with a quantized weight (this rank's input columns)."""

    @classmethod
    def create(cls, key, input_dims: int, output_dims: int, bias: bool = True, group_size: int = 64,
               bits: int = 4, group: dist.Group | None = None) -> "QuantizedShardedToAllLinear":
        g = group_for(group, "QuantizedShardedToAllLinear")
        _check_input(input_dims, group_size, g.size())
        return cls(*_random(key, (output_dims, input_dims // g.size()), input_dims, output_dims, bias,
                            group_size, bits), g)

    @classmethod
    def from_quantized_linear(cls, q, *, segments=1, group: dist.Group | None = None):
        g = group_for(group, "QuantizedShardedToAllLinear.from_quantized_linear")
        w, s, b, bias, gs, bits = _fields(q)
        _check_input(s.shape[-1] * gs, gs, g.size())
        cols = lambda a: shard_array(a, -1, segments, g)  # packed words and groups split alike
        return cls(cols(w), cols(s), cols(b), bias, gs, bits, g)

    def __call__(self, x):
        return sharded_to_all_linear(x, self.dense_weight(x.dtype), self.bias, group=self.group)
