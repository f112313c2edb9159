"""Our quantization and quantized layers against MLX's own (mlx[cpu], in the test extra) for the
same inputs: every mode, width and group size, bit for bit where MLX's CPU arithmetic allows,
and MLX-quantized weights sharded over real ranks against MLX's single-process layer."""

import ml_dtypes
import numpy as np
import pytest

mx = pytest.importorskip("mlx.core", reason="needs MLX (pip install 'mlx[cpu]', in the test extra on Linux)")
mlx_nn = pytest.importorskip("mlx.nn", reason="needs MLX's nn")

import jax.numpy as jnp  # noqa: E402

from jax_mlxdist import nn  # noqa: E402
from jax_mlxdist.testing import run_ranks  # noqa: E402

AFFINE = [("affine", gs, bits) for bits in (1, 2, 3, 4, 5, 6, 8) for gs in (32, 64, 128)]
FP = [("mxfp4", 32, 4), ("mxfp8", 32, 8), ("nvfp4", 16, 4)]
DTYPES = ("float32", "float16", "bfloat16")


def to_numpy(a):
    """An MLX array as numpy (bfloat16 through ml_dtypes)."""
    if a.dtype == mx.bfloat16:
        return np.array(a.astype(mx.float32)).astype(ml_dtypes.bfloat16)
    return np.array(a)


def weights(seed, shape, dtype):
    """Normal weights at three magnitudes per row, some groups constant or zero (ties, edges)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32) * rng.choice([1e-2, 1.0, 30.0], (shape[0], 1))
    w[0, :128], w[1, :128] = 0.0, 5.0
    return w.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)


def same_bits(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8))


def within_one_rounding(a, b, scales, biases, gs, bits):
    """|a - b| within one rounding (of a's dtype) of the terms scale * q and bias."""
    eps = float(ml_dtypes.finfo(a.dtype).eps)
    terms = np.abs(np.asarray(scales, np.float64)) * (2**bits - 1) + np.abs(np.asarray(biases, np.float64))
    bound = eps * np.repeat(terms, gs, axis=-1)
    return bool(np.all(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)) <= bound))


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_is_mlx_bit_for_bit(dtype):
    w = weights(0, (96, 384), dtype)
    mw = mx.array(w.astype(np.float32)).astype(getattr(mx, dtype))
    for mode, gs, bits in AFFINE + FP:
        theirs = [to_numpy(a) for a in mx.quantize(mw, gs, bits, mode=mode)]
        ours = [np.asarray(a) for a in nn.quantize(jnp.asarray(w), gs, bits, mode)]
        assert len(ours) == len(theirs) == (3 if mode == "affine" else 2)
        for part, a, b in zip(("weight", "scales", "biases"), ours, theirs):
            assert same_bits(a, b), (dtype, mode, gs, bits, part, int(np.sum(a != b)))


def test_nvfp4_with_a_global_scale_is_mlx_bit_for_bit():
    w = weights(1, (32, 256), "float32")
    g = np.float32(np.abs(w).max())
    theirs = mx.quantize(mx.array(w), mode="nvfp4", global_scale=mx.array(g))
    ours = nn.quantize(jnp.asarray(w), mode="nvfp4", global_scale=g)
    for a, b in zip(ours, theirs):
        assert same_bits(np.asarray(a), to_numpy(b))
    back = mx.dequantize(*theirs, mode="nvfp4", global_scale=mx.array(g), dtype=mx.float32)
    mine = nn.dequantize(*(to_numpy(a) for a in theirs), mode="nvfp4", global_scale=g, dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(mine), to_numpy(back))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_of_mlx_weights(dtype):
    """MLX's packed weights read back as MLX reads them: the fp modes exactly, affine within one
    rounding of the result dtype (XLA fuses the multiply-add that MLX rounds twice)."""
    mw = mx.array(weights(2, (64, 384), dtype).astype(np.float32)).astype(getattr(mx, dtype))
    for mode, gs, bits in AFFINE + FP:
        packed = mx.quantize(mw, gs, bits, mode=mode)
        theirs = to_numpy(mx.dequantize(*packed, group_size=gs, bits=bits, mode=mode))
        ours = np.asarray(nn.dequantize(*(to_numpy(a) for a in packed), group_size=gs, bits=bits, mode=mode))
        assert ours.dtype == theirs.dtype, (mode, ours.dtype, theirs.dtype)
        if mode == "affine":
            assert within_one_rounding(ours, theirs, *(to_numpy(a) for a in packed[1:]), gs, bits), \
                (dtype, mode, gs, bits, float(np.max(np.abs(ours.astype(np.float64) - theirs))))
        else:
            assert same_bits(ours, theirs), (dtype, mode)


def test_argument_errors_match_mlx():
    """The same bad call raises ValueError in both, with MLX's message."""
    w = np.ones((8, 128), np.float32)
    wq, s, b = (to_numpy(a) for a in mx.quantize(mx.array(w)))
    fq, fs = (to_numpy(a) for a in mx.quantize(mx.array(w), mode="mxfp4"))
    calls = [
        ("quantize", (w, 64, 7), {}),
        ("quantize", (w, 16, 4), {}),
        ("quantize", (w,), {"mode": "int4"}),
        ("quantize", (w, 64), {"mode": "mxfp4"}),
        ("quantize", (w,), {"bits": 8, "mode": "nvfp4"}),
        ("quantize", (np.ones((8, 64), np.int32),), {}),
        ("quantize", (np.ones((64,), np.float32),), {}),
        ("quantize", (np.ones((8, 96), np.float32),), {}),
        ("dequantize", (wq, s[:, :1], b[:, :1]), {}),
        ("dequantize", (wq, s, b, 64, 8), {}),
        ("dequantize", (wq.astype(np.int32), s, b), {}),
        ("dequantize", (wq, s, None), {}),
        ("dequantize", (wq, s, b), {"mode": "mxfp4"}),
        ("dequantize", (fq, fs, fs), {"mode": "mxfp4"}),
        ("dequantize", (fq, fs[:, :2]), {"mode": "mxfp4"}),
        ("dequantize", (fq[0], fs[0]), {"mode": "mxfp4"}),
        ("quantize", (w,), {"global_scale": np.float32(1.0)}),
    ]
    for name, args, kwargs in calls:
        with pytest.raises(ValueError) as theirs:
            getattr(mx, name)(*(mx.array(a) if isinstance(a, np.ndarray) else a for a in args),
                              **{k: mx.array(v) if isinstance(v, np.floating) else v for k, v in kwargs.items()})
        with pytest.raises(ValueError) as ours:
            getattr(nn, name)(*args, **kwargs)
        assert isinstance(ours.value, nn_error()), (name, args, kwargs)
        assert " ".join(str(ours.value).split()) == " ".join(str(theirs.value).split()), (name, kwargs)


def nn_error():
    import jax_mlxdist as dist
    return dist.DistributedError


def mlx_layers(dtype):
    """MLX QuantizedLinear layers of every mode and width from one Linear, as numpy dicts, with
    MLX's outputs for one input."""
    mx.random.seed(7)
    lin = mlx_nn.Linear(384, 192, bias=True)
    lin.update({k: v.astype(getattr(mx, dtype)) for k, v in lin.parameters().items()})
    x = (mx.random.normal((4, 384)) * 0.5).astype(getattr(mx, dtype))
    layers = []
    for mode, gs, bits in [c for c in AFFINE if c[1] == 64] + [("affine", 32, 3), ("affine", 128, 5)] + FP:
        q = lin.to_quantized(group_size=gs, bits=bits, mode=mode)
        params = {k: to_numpy(v) for k, v in q.parameters().items()}
        params.update(group_size=q.group_size, bits=q.bits, mode=q.mode)
        layers.append((params, to_numpy(q(x))))
    return to_numpy(x), layers


def body_mlx_layers_sharded(x, layers):
    import jax
    import jax_mlxdist as dist
    from jax_mlxdist import nn
    g = dist.init()
    r, n = g.rank(), g.size()
    out = []
    for params, _ in layers:
        a = nn.shard_linear(params, "all-to-sharded", group=g)
        b = nn.shard_linear(params | {"bias": None}, "sharded-to-all", group=g)
        cols = x.shape[-1] // n
        call = jax.jit(lambda layer, v: layer(v))
        ya = call(a, jax.numpy.asarray(x))
        yb = call(b, jax.numpy.asarray(x[:, r * cols:(r + 1) * cols])) + params["bias"]
        out.append((np.asarray(ya), np.asarray(yb), a.mode, a.biases is None))
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mlx_quantized_layers_sharded_over_ranks_give_mlx_outputs(dtype):
    """MLX's QuantizedLinear weights (every affine width, the fp modes), sharded both ways over 3
    real ranks, against MLX's single-process layer on the same input."""
    n = 3
    x, layers = mlx_layers(dtype)
    tol = dict(rtol=2e-4, atol=2e-4) if dtype == "float32" else dict(rtol=2e-2, atol=6e-2)
    results = run_ranks(body_mlx_layers_sharded, n, args=(x, layers), timeout=300)
    for r, out in enumerate(results):
        for (params, want), (ya, yb, mode, no_biases) in zip(layers, out):
            what = (r, params["mode"], params["bits"], params["group_size"])
            assert mode == params["mode"] and no_biases == (mode != "affine"), what
            rows = want.shape[-1] // n
            np.testing.assert_allclose(np.asarray(ya, np.float32), np.asarray(want[:, r * rows:(r + 1) * rows], np.float32),
                                       err_msg=str(what), **tol)
            np.testing.assert_allclose(np.asarray(yb, np.float32), np.asarray(want, np.float32), err_msg=str(what), **tol)


@pytest.mark.parametrize("n, flags", [
    (2, ()),
    (3, ("--mode", "affine", "--bits", "3", "--group-size", "32")),
    (2, ("--mode", "nvfp4")),
    (2, ("--dtype", "bfloat16", "--mode", "affine", "--bits", "4")),
])
def test_example_runs_an_mlx_checkpoint_sharded(tmp_path, n, flags):
    """examples/mlx_checkpoint: a model saved by MLX, sharded over real ranks, matches MLX's output
    (the script exits non-zero beyond its tolerance)."""
    import pathlib
    import subprocess
    import sys

    from jax_mlxdist.testing import launch
    here = pathlib.Path(__file__).parent.parent / "examples" / "mlx_checkpoint"
    dims = ["--dims", "192", "--hidden", "384"] if n == 3 else []
    saved = subprocess.run([sys.executable, str(here / "save_with_mlx.py"), str(tmp_path), *dims, *flags],
                           capture_output=True, text=True, timeout=300)
    assert saved.returncode == 0, saved.stdout + saved.stderr
    out = launch(here / "run_sharded.py", n, "--model", str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"on {n} ranks" in out.stdout and "(match," in out.stdout, out.stdout
