"""Loading a Llama checkpoint in mlx-lm's (and Hugging Face's) layout into model.py's params,
sharded over a group: config.json plus model*.safetensors, plain or quantized as MLX saves it
(config["quantization"] = {"group_size", "bits", "mode"}, per-layer overrides keyed by the
layer's path; a layer is quantized where the checkpoint has its .scales)."""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
from safetensors import safe_open

import jax_mlxdist as dist
from jax_mlxdist import nn

from model import Config, Replicated


class Checkpoint:
    """Tensors read one at a time from the safetensors files, so a rank holds only its shards
    and one whole tensor at a time."""

    def __init__(self, path: pathlib.Path):
        self.config = json.loads((path / "config.json").read_text())
        files = sorted(path.glob("model*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no model*.safetensors in {path}")
        # flax: numpy has no bfloat16, and JAX's CPU arrays convert to numpy without a copy.
        self.files = [safe_open(str(f), framework="flax") for f in files]
        self.where = {k: f for f in self.files for k in f.keys()}

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def __getitem__(self, name: str) -> np.ndarray:
        return np.asarray(self.where[name].get_tensor(name))

    def quantization(self, layer: str) -> tuple | None:
        """(group_size, bits, mode) of a layer, or None when it is not quantized."""
        if f"{layer}.scales" not in self:
            return None
        q = self.config.get("quantization") or self.config.get("quantization_config") or {}
        q = q.get(layer) if isinstance(q.get(layer), dict) else q
        return q.get("group_size", 64), q.get("bits", 4), q.get("mode", "affine")

    def linear(self, layer: str) -> dict:
        """A layer's arrays ({weight[, scales, biases][, bias]}) and format, as shard_linear takes them."""
        entries = {k: self[f"{layer}.{k}"] for k in ("weight", "scales", "biases", "bias") if f"{layer}.{k}" in self}
        fmt = self.quantization(layer)
        return entries | dict(zip(("group_size", "bits", "mode"), fmt)) if fmt else entries

    def replicated(self, layer: str) -> Replicated:
        d = self.linear(layer)
        return Replicated(d["weight"], d.get("scales"), d.get("biases"), d.get("group_size", 0), d.get("bits", 0),
                          d.get("mode", ""))


def sharded(ckpt: Checkpoint, layers: list[str], sharding: str, group) -> list:
    """The layers sharded over the group; layers of one format become one layer (their rows
    concatenated, each split over the ranks separately through shard_linear's segments), so a
    rank runs one matmul for its share of all of them."""
    if len({ckpt.quantization(name) for name in layers}) > 1:
        return [nn.shard_linear(ckpt.linear(name), sharding, group=group) for name in layers]
    parts = [ckpt.linear(name) for name in layers]
    fused = {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if isinstance(parts[0][k], np.ndarray)}
    fused |= {k: v for k, v in parts[0].items() if k not in fused}
    cuts = np.cumsum([p["weight"].shape[0] for p in parts])[:-1].tolist()
    return [nn.shard_linear(fused, sharding, segments=cuts or 1, group=group)]


def load(path, group=None) -> tuple[Config, dict]:
    """(config, params) with this rank's shards; every rank of the group calls it."""
    group = group or dist.init()
    ckpt = Checkpoint(pathlib.Path(path))
    c = Config.from_dict(ckpt.config, has_lm_head="lm_head.weight" in ckpt)
    n = group.size()
    if c.num_key_value_heads % n or c.num_attention_heads % n:
        raise ValueError(f"{n} ranks must divide the {c.num_key_value_heads} key/value heads and the "
                         f"{c.num_attention_heads} attention heads")
    layers = []
    for i in range(c.num_hidden_layers):
        pre = f"model.layers.{i}"
        attn, mlp = f"{pre}.self_attn", f"{pre}.mlp"
        layers.append({
            "attn_norm": ckpt[f"{pre}.input_layernorm.weight"],
            "qkv": sharded(ckpt, [f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"], "all-to-sharded", group),
            "o": nn.shard_linear(ckpt.linear(f"{attn}.o_proj"), "sharded-to-all", group=group),
            "mlp_norm": ckpt[f"{pre}.post_attention_layernorm.weight"],
            "gate_up": sharded(ckpt, [f"{mlp}.gate_proj", f"{mlp}.up_proj"], "all-to-sharded", group),
            "down": nn.shard_linear(ckpt.linear(f"{mlp}.down_proj"), "sharded-to-all", group=group),
        })
    params = {"embed": ckpt.replicated("model.embed_tokens"), "layers": layers,
              "norm": ckpt["model.norm.weight"],
              "head": None if c.tie_word_embeddings else ckpt.replicated("lm_head")}
    return c, jax.device_put(params)  # numpy leaves (norms, replicated tables) onto the device once
