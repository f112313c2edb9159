"""Build a small model in MLX, quantize it (optionally) and save it as MLX saves models:
weights in model.safetensors, the shape and quantization in config.json (mlx-lm's keys), plus
MLX's own output for one input in reference.safetensors. Needs MLX (pip install "mlx[cpu]").

    python examples/mlx_checkpoint/save_with_mlx.py DIR [--bits 4 --group-size 64 --mode affine]
"""

import argparse
import json
import pathlib

import mlx.core as mx
import mlx.nn as nn


class Block(nn.Module):
    """A pre-norm residual MLP block, the shape of a transformer's feed-forward half."""

    def __init__(self, dims: int, hidden: int):
        super().__init__()
        self.norm = nn.RMSNorm(dims)
        self.up = nn.Linear(dims, hidden)
        self.down = nn.Linear(hidden, dims)

    def __call__(self, x):
        return x + self.down(nn.gelu(self.up(self.norm(x))))


class Model(nn.Module):
    def __init__(self, dims: int, hidden: int, layers: int, out: int):
        super().__init__()
        self.layers = [Block(dims, hidden) for _ in range(layers)]
        self.head = nn.Linear(dims, out)

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", type=pathlib.Path)
    p.add_argument("--dims", type=int, default=256)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--out", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--mode", default=None, help="quantize: affine, mxfp4, mxfp8 or nvfp4 (default: not quantized)")
    p.add_argument("--bits", type=int, default=None)
    p.add_argument("--group-size", type=int, default=None)
    a = p.parse_args()

    mx.random.seed(0)
    model = Model(a.dims, a.hidden, a.layers, a.out)
    model.set_dtype(getattr(mx, a.dtype))
    config = {"dims": a.dims, "hidden": a.hidden, "layers": a.layers, "out": a.out, "dtype": a.dtype}
    if a.mode:
        nn.quantize(model, group_size=a.group_size, bits=a.bits, mode=a.mode)
        q = model.layers[0].up
        config["quantization"] = {"group_size": q.group_size, "bits": q.bits, "mode": q.mode}
    a.dir.mkdir(parents=True, exist_ok=True)
    model.save_weights(str(a.dir / "model.safetensors"))
    (a.dir / "config.json").write_text(json.dumps(config, indent=2))
    x = mx.random.normal((4, a.dims)).astype(getattr(mx, a.dtype))
    mx.save_safetensors(str(a.dir / "reference.safetensors"), {"x": x, "y": model(x)})
    print(f"saved {a.dir}: {json.dumps(config)}")


if __name__ == "__main__":
    main()
