"""Load a model saved by MLX (save_with_mlx.py), shard it over the ranks with our layers as
MLX shards it (each block's up projection all-to-sharded, its down projection sharded-to-all:
one all_sum per block), run it, and compare with MLX's single-process output.

    jax-mlxdist launch -n 2 examples/mlx_checkpoint/run_sharded.py --model DIR
"""

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.flax import load_file

import jax_mlxdist as dist
from jax_mlxdist import nn


def linear(weights: dict, name: str, quantization: dict | None) -> dict:
    """One linear layer's entries ({weight, bias[, scales, biases]}) as a dict for shard_linear,
    with the quantization format when the checkpoint has one."""
    layer = {k[len(name) + 1:]: v for k, v in weights.items() if k.startswith(name + ".")}
    return layer | (quantization or {}) if "scales" in layer else layer


def dense(layer: dict, x):
    """A replicated (unsharded) linear layer, plain or quantized."""
    w = layer["weight"]
    if "scales" in layer:
        w = nn.dequantize(w, layer["scales"], layer.get("biases"), layer["group_size"], layer["bits"],
                          layer["mode"], dtype=x.dtype)
    return x @ w.T.astype(x.dtype) + layer["bias"]


def rms_norm(x, weight, eps=1e-5):  # MLX's nn.RMSNorm: normalized in float32, rounded, scaled
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps)).astype(x.dtype) * weight


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=pathlib.Path, required=True)
    a = p.parse_args()

    group = dist.init()
    config = json.loads((a.model / "config.json").read_text())
    quant = config.get("quantization")
    weights = load_file(str(a.model / "model.safetensors"))
    blocks = [{"norm": weights[f"layers.{i}.norm.weight"],
               "up": nn.shard_linear(linear(weights, f"layers.{i}.up", quant), "all-to-sharded", group=group),
               "down": nn.shard_linear(linear(weights, f"layers.{i}.down", quant), "sharded-to-all", group=group)}
              for i in range(config["layers"])]
    head = linear(weights, "head", quant)

    @jax.jit
    def forward(blocks, x):
        for b in blocks:
            x = x + b["down"](jax.nn.gelu(b["up"](rms_norm(x, b["norm"])), approximate=False))
        return dense(head, x)

    ref = load_file(str(a.model / "reference.safetensors"))
    y = np.asarray(forward(blocks, ref["x"]), np.float32)
    want = np.asarray(ref["y"], np.float32)
    err = float(np.max(np.abs(y - want)) / np.max(np.abs(want)))
    # Half precision: rounding orders differ, and MLX's own half-precision quantized matmul is
    # up to ~4% (relative to the output's largest value) from the same product in float32.
    tol = 1e-4 if config["dtype"] == "float32" else 6e-2
    if group.rank() == 0:
        what = f"{quant['mode']} {quant['bits']}-bit" if quant else "unquantized"
        print(f"{config['layers']} blocks ({what}, {config['dtype']}) on {group.size()} ranks: "
              f"max |ours - MLX| / max |MLX| = {err:.2e} ({'match' if err <= tol else 'MISMATCH'}, "
              f"tolerance {tol:g})")
    if err > tol:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
