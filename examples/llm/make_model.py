"""Make a random-weight Llama model and save it as mlx-lm saves one: model.safetensors (with
mlx-lm's tensor names) and config.json. Nothing is downloaded.

    python examples/llm/make_model.py DIR [--hidden 768 --layers 12 --heads 12 --kv-heads 4
        --intermediate 2048 --vocab 32000] [--dtype float16] [--quantize affine --bits 4]

The defaults make 100M parameters; --hidden 2048 --layers 16 --heads 32 --kv-heads 8
--intermediate 8192 makes 1.0B (Llama 3.2 1B's shape with a 32000-token vocabulary).

Quantized models are quantized and saved by MLX itself (mx.quantize, mx.save_safetensors: the
layout nn.quantize and mlx-lm's convert give), every linear layer and the embedding table, and
config.json gets mlx-lm's "quantization" entry. Without MLX only plain models can be made
(numpy and safetensors).
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np


def random_weights(a, rng) -> dict[str, np.ndarray]:
    """Weights that keep activations near unit scale: linear layers N(0, 1/fan_in), embedding
    rows of unit norm (so the residual stream is the layers' output, not the input token, and
    the logits of the tied head spread by about 1)."""
    hd = a.head_dim or a.hidden // a.heads

    def linear(out_dims, in_dims):
        return rng.standard_normal((out_dims, in_dims), np.float32) * in_dims ** -0.5

    w = {"model.embed_tokens.weight": linear(a.vocab, a.hidden),
         "model.norm.weight": 1 + 0.1 * rng.standard_normal(a.hidden, np.float32)}
    for i in range(a.layers):
        p = f"model.layers.{i}"
        w |= {f"{p}.self_attn.q_proj.weight": linear(a.heads * hd, a.hidden),
              f"{p}.self_attn.k_proj.weight": linear(a.kv_heads * hd, a.hidden),
              f"{p}.self_attn.v_proj.weight": linear(a.kv_heads * hd, a.hidden),
              f"{p}.self_attn.o_proj.weight": linear(a.hidden, a.heads * hd),
              f"{p}.mlp.gate_proj.weight": linear(a.intermediate, a.hidden),
              f"{p}.mlp.up_proj.weight": linear(a.intermediate, a.hidden),
              f"{p}.mlp.down_proj.weight": linear(a.hidden, a.intermediate),
              f"{p}.input_layernorm.weight": 1 + 0.1 * rng.standard_normal(a.hidden, np.float32),
              f"{p}.post_attention_layernorm.weight": 1 + 0.1 * rng.standard_normal(a.hidden, np.float32)}
    if not a.tie:
        w["lm_head.weight"] = linear(a.vocab, a.hidden)
    return w


def config(a) -> dict:
    c = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": a.hidden,
         "num_hidden_layers": a.layers, "num_attention_heads": a.heads, "num_key_value_heads": a.kv_heads,
         "intermediate_size": a.intermediate, "vocab_size": a.vocab, "rms_norm_eps": 1e-5,
         "rope_theta": a.rope_theta, "rope_traditional": a.rope_traditional, "tie_word_embeddings": a.tie,
         "torch_dtype": a.dtype, "max_position_embeddings": 4096}
    if a.head_dim:
        c["head_dim"] = a.head_dim
    if a.rope_scaling:
        c["rope_scaling"] = json.loads(a.rope_scaling)
    return c


def save_with_mlx(a, weights, cfg) -> None:
    import mlx.core as mx
    dtype = getattr(mx, a.dtype)
    out = {}
    for name, w in weights.items():
        w = mx.array(w).astype(dtype)
        layer = name.removesuffix(".weight")
        # mlx-lm quantizes every layer with a to_quantized (linear layers, the embedding) whose
        # rows hold whole groups; norms stay as they are.
        if a.quantize and w.ndim == 2 and w.shape[-1] % a.group_size == 0:
            packed = mx.quantize(w, group_size=a.group_size, bits=a.bits, mode=a.quantize)
            out |= dict(zip((f"{layer}.weight", f"{layer}.scales", f"{layer}.biases"), packed))
        else:
            out[name] = w
    if a.quantize:
        cfg["quantization"] = {"group_size": a.group_size, "bits": a.bits, "mode": a.quantize}
        cfg["quantization_config"] = cfg["quantization"]
    mx.save_safetensors(str(a.dir / "model.safetensors"), out, metadata={"format": "mlx"})


def save_with_numpy(a, weights) -> None:
    from ml_dtypes import bfloat16
    from safetensors.numpy import save_file
    dtype = {"float32": np.float32, "float16": np.float16, "bfloat16": bfloat16}[a.dtype]
    save_file({k: v.astype(dtype) for k, v in weights.items()}, str(a.dir / "model.safetensors"),
              metadata={"format": "mlx"})


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", type=pathlib.Path)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=0, help="default hidden / heads")
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--tie", action=argparse.BooleanOptionalAction, default=True,
                   help="tied embeddings (default) or a separate lm_head")
    p.add_argument("--rope-theta", type=float, default=10000.0)
    p.add_argument("--rope-traditional", action="store_true")
    p.add_argument("--rope-scaling", default=None, help='JSON, e.g. \'{"rope_type": "llama3", "factor": 8}\'')
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--quantize", default=None, choices=["affine", "mxfp4", "mxfp8", "nvfp4"],
                   help="quantize with MLX in this mode (default: not quantized)")
    p.add_argument("--bits", type=int, default=None)
    p.add_argument("--group-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    defaults = {"affine": (64, 4), "mxfp4": (32, 4), "mxfp8": (32, 8), "nvfp4": (16, 4)}
    if a.quantize:
        a.group_size = a.group_size or defaults[a.quantize][0]
        a.bits = a.bits or defaults[a.quantize][1]
    try:
        import mlx.core  # noqa: F401
        have_mlx = True
    except ImportError:
        have_mlx = False
    if a.quantize and not have_mlx:
        raise SystemExit("quantized models are made by MLX: pip install 'mlx[cpu]' (or mlx on macOS)")
    weights = random_weights(a, np.random.default_rng(a.seed))
    cfg = config(a)
    a.dir.mkdir(parents=True, exist_ok=True)
    if have_mlx:
        save_with_mlx(a, weights, cfg)
    else:
        save_with_numpy(a, weights)
    (a.dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    params = sum(w.size for w in weights.values())
    what = f"{a.quantize} {a.bits}-bit" if a.quantize else a.dtype
    print(f"saved {a.dir}: {params / 1e6:.1f}M parameters, {what}, "
          f"{(a.dir / 'model.safetensors').stat().st_size / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
