"""MLX's quantization formats in JAX, bit for bit: quantize, dequantize and their checks.

affine: groups of 32, 64 or 128 along the last axis, w ~ scales * q + biases, q of 1, 2, 3, 4, 5,
6 or 8 bits packed into uint32 words as one little-endian bit stream (value i in bits
[i * bits, (i + 1) * bits) of its row); scales and biases in w's dtype.
mxfp4 / mxfp8: groups of 32, E2M1 / E4M3 values, one E8M0 scale (a power of two, uint8) each.
nvfp4: groups of 16, E2M1 values, one E4M3 scale (uint8) each, optionally over a global scale.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax_mlxdist._errors import DistributedTypeError, DistributedValueError

# mode: (default group size, default bits); the fp modes allow only these.
MODES = {"affine": (64, 4), "mxfp4": (32, 4), "mxfp8": (32, 8), "nvfp4": (16, 4)}
AFFINE_BITS = (1, 2, 3, 4, 5, 6, 8)
AFFINE_GROUP_SIZES = (32, 64, 128)
E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
_FP_MAX = {4: 6.0, 8: 448.0}


def _shape(shape) -> str:
    """A shape as MLX writes it: (8,96)."""
    return "(" + ",".join(str(d) for d in shape) + ")"


def params(op: str, mode: str, group_size: int | None, bits: int | None) -> tuple[int, int]:
    """(group_size, bits) for a mode, defaults filled in, checked as MLX checks them."""
    if mode not in MODES:
        raise DistributedValueError(f"[{op}] Invalid quantization mode '{mode}'.")
    gs_default, bits_default = MODES[mode]
    gs = gs_default if group_size is None else int(group_size)
    b = bits_default if bits is None else int(bits)
    if mode == "affine":
        if gs not in AFFINE_GROUP_SIZES:
            raise DistributedValueError(
                f"[{op}] The requested group size {gs} is not supported. The supported group "
                "sizes are 32, 64, and 128.")
        if b not in AFFINE_BITS:
            raise DistributedValueError(
                f"[{op}] The requested number of bits {b} is not supported. The supported bits "
                "are 1, 2, 3, 4, 5, 6 and 8.")
    else:
        if gs != gs_default:
            raise DistributedValueError(
                f"[{op}] {mode} quantization requires group size {gs_default} but got {gs}.")
        if b != bits_default:
            raise DistributedValueError(
                f"[{op}] {mode} quantization requires bits to be {bits_default} but got {b}.")
    return gs, b


def _check_global_scale(op: str, mode: str, global_scale) -> None:
    if global_scale is not None and mode != "nvfp4":
        raise DistributedValueError(f"[{op}] Global scale is only supported for 'nvfp4' quantization mode.")


def quantize(w, group_size: int | None = None, bits: int | None = None, mode: str = "affine", *,
             global_scale=None):
    """MLX's mx.quantize: (w_q, scales, biases) for "affine", (w_q, scales) for the fp modes."""
    gs, b = params("quantize", mode, group_size, bits)
    w = jnp.asarray(w)
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise DistributedValueError(
            f"[quantize] Only real floating types can be quantized but w has type {w.dtype}.")
    if w.ndim < 2:
        raise DistributedValueError(
            "[quantize] The matrix to be quantized must have at least 2 dimension but it has "
            f"only {w.ndim}.")
    if w.shape[-1] % gs:
        raise DistributedValueError(
            "[quantize] The last dimension of the matrix needs to be divisible by the "
            f"quantization group size {gs}. However the provided matrix has shape {_shape(w.shape)}")
    _check_global_scale("quantize", mode, global_scale)
    if mode == "affine":
        return _affine_quantize(w, gs, b)
    gscale = None if global_scale is None else jnp.asarray(global_scale, jnp.float32)
    return _fp_quantize(w, gscale, gs, b)


def dequantize(w, scales, biases=None, group_size: int | None = None, bits: int | None = None,
               mode: str = "affine", *, global_scale=None, dtype=None):
    """MLX's mx.dequantize: the float weight of a quantized one (affine: in scales' dtype;
    fp modes: bfloat16 unless dtype says otherwise)."""
    gs, b = params("dequantize", mode, group_size, bits)
    w, scales = jnp.asarray(w), jnp.asarray(scales)
    check_packed("dequantize", mode, w, scales, biases, gs, b)
    _check_global_scale("dequantize", mode, global_scale)
    if mode == "affine":
        out = _affine_dequantize(w, scales, jnp.asarray(biases), gs, b)
        return out if dtype is None else out.astype(dtype)
    out_dtype = jnp.dtype(jnp.bfloat16 if dtype is None else dtype)
    gscale = None if global_scale is None else jnp.asarray(global_scale, jnp.float32)
    return _fp_dequantize(w, scales, gscale, gs, b, out_dtype)


def check_packed(op: str, mode: str, w, scales, biases, gs: int, bits: int) -> None:
    """MLX's checks of a packed weight against its scales (and biases), with its messages."""
    if mode != "affine" and scales.dtype != jnp.uint8:
        raise DistributedValueError(f"[{op}] Scale type must be uint8 but received type {scales.dtype}.")
    if mode == "affine" and biases is None:
        raise DistributedValueError(f"[{op}] Biases must be provided for affine quantization.")
    if mode != "affine" and biases is not None:
        raise DistributedValueError(f"[{op}] Biases must be null for quantization mode '{mode}'.")
    if w.dtype != jnp.uint32:
        raise DistributedValueError(f"[{op}] The matrix should be given as a uint32")
    if w.ndim < 2:
        raise DistributedValueError(
            f"[{op}] The matrix to be dequantized must have at least 2 dimension but it has only "
            f"{w.ndim}.")
    what = "scales and biases" if mode == "affine" else "scales"
    shapes = [scales.shape] + ([jnp.shape(biases)] if mode == "affine" else [])
    if any(s[:-1] != w.shape[:-1] for s in shapes):
        raise DistributedValueError(f"[{op}] Shape of {what} does not match the matrix")
    if w.shape[-1] * 32 // bits != scales.shape[-1] * gs or (mode == "affine" and shapes[1] != scales.shape):
        raise DistributedValueError(
            f"[{op}] Shape of {what} does not match the matrix given the quantization "
            f"parameters. Provided matrix of shape {_shape(w.shape)} and {what.replace(' and ', '/')} "
            f"of shape {_shape(scales.shape)}"
            + (f" with group_size={gs} and bits={bits}." if mode == "affine" else "."))


def check_weight_type(op: str, w) -> None:
    if not hasattr(w, "dtype") or w.dtype != jnp.uint32:
        raise DistributedTypeError(f"[{op}] The quantized weight must be a uint32 array, got "
                                   f"{getattr(w, 'dtype', type(w).__name__)}")


def _divisor(value, shape):
    """A divisor of the given shape that XLA cannot rewrite: it turns x / broadcast(y) into
    x * broadcast(1 / y), one rounding off MLX's division (which moves exact ties)."""
    return jax.lax.optimization_barrier(jnp.broadcast_to(value, shape))


# ---- affine ------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=(1, 2))  # one compiled program, not dozens of eager ops
def _affine_quantize(w, gs: int, bits: int):
    n_bins = float(2**bits - 1)
    groups = w.reshape(*w.shape[:-1], w.shape[-1] // gs, gs)
    hi = groups.max(-1).astype(jnp.float32)
    lo = groups.min(-1).astype(jnp.float32)
    if bits == 1:  # the group's two ends
        scale, bias = jnp.maximum(hi - lo, 1e-7), lo
    else:  # the edge of larger magnitude is exact; so is 0 when it is in range
        lo_edge = jnp.abs(lo) > jnp.abs(hi)
        scale = jnp.maximum((hi - lo) / _divisor(jnp.float32(n_bins), hi.shape), 1e-7)
        scale = jnp.where(lo_edge, scale, -scale)
        edge = jnp.where(lo_edge, lo, hi)
        q0 = jnp.round(edge / scale)
        scale = jnp.where(q0 != 0, edge / q0, scale)
        bias = jnp.where(q0 != 0, edge, 0.0)
    q = jnp.round((groups.astype(jnp.float32) - bias[..., None]) / _divisor(scale[..., None], groups.shape))
    q = jnp.clip(q, 0, n_bins).astype(jnp.uint32).reshape(w.shape)
    return _pack(q, bits), scale.astype(w.dtype), bias.astype(w.dtype)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _affine_dequantize(w, scales, biases, gs: int, bits: int):
    q = _unpack(w, bits).astype(scales.dtype)
    q = q.reshape(*scales.shape, gs)
    return (q * scales[..., None] + biases[..., None]).reshape(*w.shape[:-1], -1)


def _pack(q, bits: int):
    """uint32 values < 2**bits (..., n) -> uint32 words (..., n * bits // 32), a bit stream."""
    lead, n = q.shape[:-1], q.shape[-1]
    if 32 % bits == 0:  # whole values per word
        per_word = 32 // bits
        shifts = jnp.arange(per_word, dtype=jnp.uint32) * bits
        return jnp.sum(q.reshape(*lead, n // per_word, per_word) << shifts, axis=-1, dtype=jnp.uint32)
    bit = (q[..., None] >> jnp.arange(bits, dtype=jnp.uint32)) & 1
    bit = bit.reshape(*lead, n * bits // 32, 32).astype(jnp.uint32)
    return jnp.sum(bit << jnp.arange(32, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)


def _unpack(w, bits: int):
    """The inverse of _pack: (..., words) -> (..., words * 32 // bits) uint32 values."""
    lead, words = w.shape[:-1], w.shape[-1]
    mask = jnp.uint32(2**bits - 1)
    if 32 % bits == 0:
        shifts = jnp.arange(32 // bits, dtype=jnp.uint32) * bits
        return ((w[..., None] >> shifts) & mask).reshape(*lead, -1)
    # `bits` words hold 32 values; value j starts at bit j * bits and may spill into the next word.
    start = np.arange(32) * bits
    word, shift = start // 32, start % 32
    spills = shift + bits > 32
    period = w.reshape(*lead, words // bits, bits)
    low = jnp.take(period, jnp.asarray(word), axis=-1) >> jnp.asarray(shift, jnp.uint32)
    nxt = jnp.take(period, jnp.asarray(np.minimum(word + 1, bits - 1)), axis=-1)
    high = jnp.where(jnp.asarray(spills), nxt << jnp.asarray(np.where(spills, 32 - shift, 0), jnp.uint32), 0)
    return ((low | high) & mask).reshape(*lead, -1)


# ---- fp modes ----------------------------------------------------------------------------------

def _to_e4m3(x):
    """Float -> E4M3 bits (uint8): round to nearest even, saturating at +-448 (MLX's rule)."""
    x = jnp.clip(x.astype(jnp.float32), -448.0, 448.0)
    return jax.lax.bitcast_convert_type(x.astype(jnp.float8_e4m3fn), jnp.uint8)


def _from_e4m3(b, dtype):
    return jax.lax.bitcast_convert_type(b, jnp.float8_e4m3fn).astype(dtype)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _fp_quantize(w, global_scale, gs: int, bits: int):
    """MLX's CPU reference, step by step in w's dtype (its roundings included)."""
    dt = w.dtype
    groups = w.reshape(-1, gs)
    scales = jnp.max(jnp.abs(groups), -1, keepdims=True)
    scales = scales / _divisor(jnp.asarray(_FP_MAX[bits], dt), scales.shape)
    if gs == 16:  # nvfp4: E4M3 scales, relative to the global scale when one is given
        encode = jnp.float32(1.0) if global_scale is None else jnp.float32(448.0 * 6.0) / _divisor(global_scale, jnp.shape(global_scale))
        scales = _to_e4m3(scales * encode)
        wq = (groups / _divisor(_from_e4m3(scales, dt), groups.shape)) * encode
    else:  # E8M0: the power of two at or above the scale, stored as exponent + 127
        mant, exp = jnp.frexp(scales.astype(jnp.float32))
        exp = jnp.where(mant == 0.5, exp - 1, exp)
        wq = groups / jnp.ldexp(jnp.ones((), dt), exp)
        scales = (exp + 127).astype(jnp.uint8)
    if bits == 4:
        lut = jnp.asarray(E2M1, dt)
        q = jnp.argmin(jnp.abs(wq[..., None] - lut), axis=-1).astype(jnp.uint32)
        packed = _pack(q, 4)
    else:
        packed = jax.lax.bitcast_convert_type(_to_e4m3(wq).reshape(-1, gs // 4, 4), jnp.uint32)
    return packed.reshape(*w.shape[:-1], -1), scales.reshape(*w.shape[:-1], -1)


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _fp_dequantize(w, scales, global_scale, gs: int, bits: int, dtype):
    if bits == 4:
        values = jnp.asarray(E2M1, dtype)[_unpack(w, 4)]
    else:
        values = _from_e4m3(jax.lax.bitcast_convert_type(w, jnp.uint8).reshape(*w.shape[:-1], -1), dtype)
    values = values.reshape(*scales.shape, gs)
    if gs == 16:
        scale = _from_e4m3(scales, dtype)
        if global_scale is not None:
            scale = scale * (global_scale / _divisor(jnp.float32(448.0 * 6.0), jnp.shape(global_scale))).astype(dtype)
    else:
        scale = jnp.power(jnp.asarray(2.0, dtype), scales.astype(dtype) - jnp.asarray(127, dtype))
    return (values * scale[..., None]).reshape(*w.shape[:-1], -1)
