"""The ring algorithms in one process: n ranks as threads over in-memory pipes
(csrc/transport/memory.h, through _C._ring_in_memory), against numpy. Small chunks and pipes
make every message cross many frames and wait on back-pressure; no process is started."""

import itertools

import ml_dtypes
import numpy as np
import pytest

from jax_mlxdist import _C

DTYPES = {"float32": 11, "int32": 3, "float16": 9, "bfloat16": 10}  # csrc/core/dtype.h codes
REDUCE = {"sum": 0, "max": 1, "min": 2, "prod": 3}


def np_dtype(name):
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def inputs(n, count, dtype, seed=0):
    rng = np.random.default_rng(seed)
    dt = np_dtype(dtype)
    if dt.kind == "i":
        return [rng.integers(-3, 4, count).astype(dt) for _ in range(n)]
    return [rng.integers(-8, 9, count).astype(np.float32).astype(dt) / 4 for _ in range(n)]


def run(op, xs, dtype, reduce="sum", **kw):
    out = _C._ring_in_memory(op, [x.tobytes() for x in xs], DTYPES[dtype], REDUCE[reduce], **kw)
    return [np.frombuffer(o, np_dtype(dtype)) for o in out]


SHAPES = dict(chunk_bytes=64, pipe_bytes=96)  # frames of 64 bytes, pipes that hold one and a half


@pytest.mark.parametrize("n, count, dtype, reduce", [
    (n, count, dtype, reduce)
    for n, count in itertools.product((2, 3, 5), (1, 7, 1000))
    for dtype, reduce in (("float32", "sum"), ("int32", "max"), ("int32", "min"),
                          ("float16", "sum"), ("bfloat16", "sum"), ("int32", "prod"))])
@pytest.mark.parametrize("small_bytes", [0, 1 << 20])  # the two-pass ring, the gather path
def test_all_reduce(n, count, dtype, reduce, small_bytes):
    xs = inputs(n, count, dtype)
    want = {"sum": np.sum, "max": np.max, "min": np.min, "prod": np.prod}[reduce](
        np.stack([x.astype(np.float64) for x in xs]), axis=0)
    outs = run("all_reduce", xs, dtype, reduce, small_bytes=small_bytes, **SHAPES)
    for out in outs:
        np.testing.assert_array_equal(out.astype(np.float64), want.astype(np_dtype(dtype)).astype(np.float64))
        assert out.tobytes() == outs[0].tobytes()  # the same bits on every rank


@pytest.mark.parametrize("n, count", list(itertools.product((2, 3, 5), (1, 7, 1000))))
def test_all_gather(n, count):
    xs = inputs(n, count, "float32")
    for out in run("all_gather", xs, "float32", **SHAPES):
        np.testing.assert_array_equal(out, np.concatenate(xs))


@pytest.mark.parametrize("n, count, dtype", list(itertools.product((2, 3, 5), (1, 7, 300),
                                                              ("float32", "bfloat16"))))
def test_reduce_scatter(n, count, dtype):
    xs = inputs(n, n * count, dtype)
    total = np.sum(np.stack([x.astype(np.float64) for x in xs]), axis=0).astype(np_dtype(dtype))
    for r, out in enumerate(run("reduce_scatter", xs, dtype, **SHAPES)):
        np.testing.assert_array_equal(out, total[r * count:(r + 1) * count])


@pytest.mark.parametrize("n", [2, 3, 5])
def test_ring_pass(n):
    xs = inputs(n, 2000, "float32")  # 8000 bytes through 256-byte pipes: sends outlive their op
    for r, out in enumerate(run("ring_pass", xs, "float32", chunk_bytes=64, pipe_bytes=256)):
        np.testing.assert_array_equal(out, xs[(r - 1) % n])


@pytest.mark.parametrize("n", [2, 3, 5])
def test_sendrecv(n):
    xs = inputs(n, 2000, "float32")
    for r, out in enumerate(run("sendrecv", xs, "float32", chunk_bytes=64, pipe_bytes=256)):
        np.testing.assert_array_equal(out, xs[(r - 1) % n])


@pytest.mark.parametrize("n, rows", [(2, 1), (3, 7), (5, 100)])
def test_all_to_all(n, rows):
    xs = inputs(n, n * rows, "int32")
    for r, out in enumerate(run("all_to_all", xs, "int32", chunk_bytes=64, pipe_bytes=96)):
        np.testing.assert_array_equal(out, np.concatenate([x[r * rows:(r + 1) * rows] for x in xs]))


def test_mismatched_sizes_name_both_calls():
    xs = [np.ones(4, np.float32), np.ones(5, np.float32)]
    with pytest.raises(_C.DistError, match="16 bytes.*20 bytes|20 bytes.*16 bytes"):
        _C._ring_in_memory("all_gather", [x.tobytes() for x in xs], DTYPES["float32"])
