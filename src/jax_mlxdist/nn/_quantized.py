"""The quantized tensor-parallel layers, in every MLX quantization mode (formats in _quantize).

A quantized linear layer is a dict (or an object with the same attributes, MLX's
QuantizedLinear among them): weight (packed uint32), scales, biases (affine only), bias,
group_size, bits, mode."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

import jax_mlxdist as dist
from jax_mlxdist._errors import DistributedValueError
from jax_mlxdist.nn._linear import all_to_sharded_linear, sharded_to_all_linear
from jax_mlxdist.nn._quantize import check_packed, check_weight_type, dequantize, params, quantize
from jax_mlxdist.nn._sharding import check_input, check_output, group_for, shard_array


def quantized_linear(weight, bias=None, *, group_size: int | None = None, bits: int | None = None,
                     mode: str = "affine") -> dict:
    """A quantized linear layer as a dict, from a float weight (out, in) (MLX's
    QuantizedLinear.from_linear)."""
    gs, b = params("quantize", mode, group_size, bits)
    packed = quantize(weight, gs, b, mode)
    return {"weight": packed[0], "scales": packed[1], "biases": packed[2] if mode == "affine" else None,
            "bias": bias, "group_size": gs, "bits": b, "mode": mode}


def is_quantized(module) -> bool:
    return (isinstance(module, dict) and "scales" in module) or hasattr(module, "scales")


def _fields(q, op: str):
    """(weight, scales, biases, bias, group_size, bits, mode) of a quantized layer, checked."""
    get = (lambda k, d=None: q.get(k, d)) if isinstance(q, dict) else (lambda k, d=None: getattr(q, k, d))
    mode = get("mode", "affine")
    gs, bits = params(op, mode, get("group_size"), get("bits"))
    weight = get("weight")
    check_weight_type(op, weight)
    w, s = jnp.asarray(weight), jnp.asarray(get("scales"))
    biases = None if get("biases") is None else jnp.asarray(get("biases"))
    check_packed(op, mode, w, s, biases, gs, bits)
    bias = None if get("bias") is None else jnp.asarray(get("bias"))
    return w, s, biases, bias, gs, bits, mode


def _random(key, shape, input_dims, bias_dims, bias, group_size, bits, mode):
    """A random quantized weight of this rank's shape and a zero bias (as MLX's constructors)."""
    gs, b = params("quantize", mode, group_size, bits)
    s = input_dims ** -0.5
    packed = quantize(jax.random.uniform(key, shape, minval=-s, maxval=s), gs, b, mode)
    return (packed[0], packed[1], packed[2] if mode == "affine" else None,
            jnp.zeros((bias_dims,)) if bias else None, gs, b, mode)


def _check_input(op: str, in_dims: int, group_size: int, n: int, segments=1) -> None:
    """A rank's columns (of every segment) must hold whole quantization groups."""
    check_input(op, in_dims, n)
    parts = segments if isinstance(segments, int) else len(segments) + 1
    if (in_dims // n) % group_size or (isinstance(segments, int) and (in_dims // (n * parts)) % group_size):
        raise DistributedValueError(f"{op}: The input of size {in_dims} cannot be sharded across {n} "
                                    f"devices in whole quantization groups of {group_size}.")


@dataclasses.dataclass
class _Quantized:
    """A quantized weight (packed, scales, biases or None), an optional float bias, the format
    and the group.

    Dequantized on the fly and multiplied in x's dtype. Like MLX's quantized layers they are
    meant to stay frozen: the packed weight is uint32, so differentiate with respect to the input
    or to other parameters (close over the layer, or jax.grad(..., allow_int=True))."""
    weight: jax.Array
    scales: jax.Array
    biases: jax.Array | None
    bias: jax.Array | None
    group_size: int = dataclasses.field(metadata=dict(static=True))
    bits: int = dataclasses.field(metadata=dict(static=True))
    mode: str = dataclasses.field(metadata=dict(static=True))
    group: dist.Group = dataclasses.field(metadata=dict(static=True))

    def dense_weight(self, dtype):
        return dequantize(self.weight, self.scales, self.biases, self.group_size, self.bits,
                          self.mode, dtype=dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QuantizedAllToShardedLinear(_Quantized):
    """AllToShardedLinear with a quantized weight (this rank's output rows)."""

    @classmethod
    def create(cls, key, input_dims: int, output_dims: int, bias: bool = True,
               group_size: int | None = None, bits: int | None = None, mode: str = "affine",
               group: dist.Group | None = None) -> "QuantizedAllToShardedLinear":
        g = group_for(group, "QuantizedAllToShardedLinear")
        n = g.size()
        check_output("QuantizedAllToShardedLinear", output_dims, n)
        return cls(*_random(key, (output_dims // n, input_dims), input_dims, output_dims // n, bias,
                            group_size, bits, mode), g)

    @classmethod
    def from_quantized_linear(cls, q, *, segments=1, group: dist.Group | None = None):
        g = group_for(group, "QuantizedAllToShardedLinear.from_quantized_linear")
        w, s, b, bias, gs, bits, mode = _fields(q, "QuantizedAllToShardedLinear.from_quantized_linear")
        check_output("QuantizedAllToShardedLinear.from_quantized_linear", w.shape[0], g.size())
        rows = lambda a: None if a is None else shard_array(a, 0, segments, g)
        return cls(rows(w), rows(s), rows(b), None if bias is None else shard_array(bias, -1, segments, g),
                   gs, bits, mode, g)

    def __call__(self, x):
        return all_to_sharded_linear(x, self.dense_weight(x.dtype), self.bias, group=self.group)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QuantizedShardedToAllLinear(_Quantized):
    """ShardedToAllLinear with a quantized weight (this rank's input columns)."""

    @classmethod
    def create(cls, key, input_dims: int, output_dims: int, bias: bool = True,
               group_size: int | None = None, bits: int | None = None, mode: str = "affine",
               group: dist.Group | None = None) -> "QuantizedShardedToAllLinear":
        g = group_for(group, "QuantizedShardedToAllLinear")
        gs, _ = params("quantize", mode, group_size, bits)
        _check_input("QuantizedShardedToAllLinear", input_dims, gs, g.size())
        return cls(*_random(key, (output_dims, input_dims // g.size()), input_dims, output_dims, bias,
                            group_size, bits, mode), g)

    @classmethod
    def from_quantized_linear(cls, q, *, segments=1, group: dist.Group | None = None):
        g = group_for(group, "QuantizedShardedToAllLinear.from_quantized_linear")
        w, s, b, bias, gs, bits, mode = _fields(q, "QuantizedShardedToAllLinear.from_quantized_linear")
        _check_input("QuantizedShardedToAllLinear.from_quantized_linear", s.shape[-1] * gs, gs, g.size(),
                     segments)
        cols = lambda a: None if a is None else shard_array(a, -1, segments, g)  # words and groups alike
        return cls(cols(w), cols(s), cols(b), bias, gs, bits, mode, g)

    def __call__(self, x):
        return sharded_to_all_linear(x, self.dense_weight(x.dtype), self.bias, group=self.group)
