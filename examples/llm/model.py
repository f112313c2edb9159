"""A Llama-architecture decoder in plain JAX, tensor-parallel with jax_mlxdist.nn as mlx-lm
shards Llama: each rank holds 1/n of the attention heads (query and key/value heads alike) and
of the MLP's hidden units. q/k/v and gate/up are all-to-sharded, o and down sharded-to-all, so a
layer costs two all_sums; embeddings, norms and the output head are replicated.

params (load.py builds them from a checkpoint):
    {"embed": Replicated, "layers": [{"attn_norm", "qkv": [layers], "o", "mlp_norm",
     "gate_up": [layers], "down"}], "norm", "head": Replicated, or None for tied embeddings}
"qkv" and "gate_up" are lists of sharded layers whose outputs are concatenated: one fused layer
when the checkpoint's q/k/v (gate/up) share a format, else one per projection.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jax_mlxdist import nn


@dataclasses.dataclass(frozen=True)
class Config:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_traditional: bool = False
    rope_scaling: tuple | None = None  # the config's dict as sorted items (hashable)
    head_dim: int = 0
    tie_word_embeddings: bool = True

    @classmethod
    def from_dict(cls, d: dict, *, has_lm_head: bool) -> "Config":
        scaling = d.get("rope_scaling")
        heads = d["num_attention_heads"]
        return cls(
            hidden_size=d["hidden_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=d.get("num_key_value_heads") or heads,
            intermediate_size=d["intermediate_size"], vocab_size=d["vocab_size"],
            rms_norm_eps=d.get("rms_norm_eps", 1e-5), rope_theta=d.get("rope_theta", 10000.0),
            rope_traditional=d.get("rope_traditional", False),
            rope_scaling=tuple(sorted(scaling.items())) if scaling else None,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            # mlx-lm and Hugging Face default this differently: the checkpoint decides.
            tie_word_embeddings=d.get("tie_word_embeddings", not has_lm_head))


def rope_frequencies(c: Config) -> jax.Array:
    """Angular frequency of each rotated pair (head_dim / 2), with mlx-lm's rope scalings
    "default", "linear" and "llama3"."""
    inv = c.rope_theta ** (-jnp.arange(0, c.head_dim, 2, dtype=jnp.float32) / c.head_dim)
    s = dict(c.rope_scaling or {})
    kind = s.get("type") or s.get("rope_type") or "default"
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / s["factor"]
    if kind == "llama3":  # long wavelengths slowed down by `factor`, a smooth ramp to the short ones
        factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
        old = s.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv
        ramp = (old / wavelen - low) / (high - low)
        scaled = jnp.where(wavelen > old / low, inv / factor, inv)
        between = (wavelen > old / high) & (wavelen < old / low)
        return jnp.where(between, inv * ((1 - ramp) / factor + ramp), scaled)
    raise NotImplementedError(f"rope_scaling of type {kind!r}")


def rope(x, positions, freqs, traditional: bool):
    """Rotary embedding of x (T, heads, head_dim) at positions (T,). mlx-lm's "traditional"
    rotates adjacent pairs (x0, x1), (x2, x3)...; otherwise the two halves are paired."""
    angle = positions.astype(jnp.float32)[:, None, None] * freqs
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    xf = x.astype(jnp.float32)
    if traditional:
        a, b = xf[..., 0::2], xf[..., 1::2]
        out = jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(x.shape)
    else:
        a, b = jnp.split(xf, 2, axis=-1)
        out = jnp.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)
    return out.astype(x.dtype)


def rms_norm(x, weight, eps):
    """As MLX's: normalized in float32, rounded to x's dtype, then scaled."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return y.astype(x.dtype) * weight


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Replicated:
    """An unsharded weight (out, in), plain or quantized in MLX's format (then weight is the
    packed uint32 and scales, biases are MLX's): the embedding table and the output head."""
    weight: jax.Array
    scales: jax.Array | None = None
    biases: jax.Array | None = None
    group_size: int = dataclasses.field(default=0, metadata=dict(static=True))
    bits: int = dataclasses.field(default=0, metadata=dict(static=True))
    mode: str = dataclasses.field(default="", metadata=dict(static=True))

    def rows(self, index, dtype):
        """weight[index] as floats; a quantized table dequantizes only those rows."""
        if self.scales is None:
            return self.weight[index].astype(dtype)
        biases = None if self.biases is None else self.biases[index]
        return nn.dequantize(self.weight[index], self.scales[index], biases, self.group_size, self.bits,
                             self.mode, dtype=dtype)

    def __call__(self, x):
        return x @ self.rows(slice(None), x.dtype).T


def init_cache(c: Config, params: dict, max_len: int):
    """Static-shape KV cache: per layer (k, v), each (this rank's kv heads, max_len, head_dim)."""
    ranks = params["layers"][0]["o"].group.size()
    shape = (c.num_key_value_heads // ranks, max_len, c.head_dim)
    dtype = params["norm"].dtype
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in params["layers"]]


def attention(c: Config, layer: dict, x, cache, pos, freqs):
    """x (T, hidden) at positions pos..pos+T-1; cache (k, v) of this rank's kv heads, updated."""
    t, hd = x.shape[0], c.head_dim
    k_cache, v_cache = cache
    kv = k_cache.shape[0]
    qkv = jnp.concatenate([proj(x) for proj in layer["qkv"]], axis=-1)  # this rank's heads
    heads = qkv.shape[-1] // hd - 2 * kv
    q, k, v = jnp.split(qkv.reshape(t, heads + 2 * kv, hd), [heads, heads + kv], axis=1)
    positions = pos + jnp.arange(t)
    q = rope(q, positions, freqs, c.rope_traditional)
    k = rope(k, positions, freqs, c.rope_traditional)
    k_cache = jax.lax.dynamic_update_slice(k_cache, k.transpose(1, 0, 2).astype(k_cache.dtype), (0, pos, 0))
    v_cache = jax.lax.dynamic_update_slice(v_cache, v.transpose(1, 0, 2).astype(v_cache.dtype), (0, pos, 0))
    # Grouped-query attention: heads // kv query heads share each kv head.
    q = q.reshape(t, kv, heads // kv, hd) * jnp.asarray(hd ** -0.5, q.dtype)
    scores = jnp.einsum("tgrd,gsd->grts", q, k_cache, preferred_element_type=jnp.float32)
    visible = jnp.arange(k_cache.shape[1])[None, :] <= positions[:, None]  # causal, and unwritten slots hidden
    p = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1).astype(v_cache.dtype)
    out = jnp.einsum("grts,gsd->tgrd", p, v_cache).reshape(t, heads * hd)
    return layer["o"](out), (k_cache, v_cache)


def mlp(layer: dict, x):
    gate, up = jnp.split(jnp.concatenate([proj(x) for proj in layer["gate_up"]], axis=-1), 2, axis=-1)
    return layer["down"](jax.nn.silu(gate) * up)


def forward(c: Config, params: dict, tokens, cache, pos):
    """Logits (T, vocab) of tokens (T,) at positions pos..pos+T-1, and the updated cache.
    Every rank returns the same logits (the all_sums give every rank the same bits)."""
    dtype = params["norm"].dtype
    freqs = rope_frequencies(c)
    x = params["embed"].rows(tokens, dtype)
    new_cache = []
    for layer, layer_cache in zip(params["layers"], cache):
        h, layer_cache = attention(c, layer, rms_norm(x, layer["attn_norm"], c.rms_norm_eps), layer_cache,
                                   pos, freqs)
        x = x + h
        x = x + mlp(layer, rms_norm(x, layer["mlp_norm"], c.rms_norm_eps))
        new_cache.append(layer_cache)
    x = rms_norm(x, params["norm"], c.rms_norm_eps)
    head = params["embed"] if params["head"] is None else params["head"]
    return head(x), new_cache
