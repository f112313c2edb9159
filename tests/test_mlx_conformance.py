"""MLX's distributed test suite as a conformance suite, on 3 and 8 real subprocess ranks.

Ported from MLX's python/tests: mlx_distributed_tests.py (the cases every backend runs),
ring_test_distributed.py, mpi_test_distributed.py and nccl_test_distributed.py. Each test below
names the MLX case it ports. Inputs, expected values, tolerances and dtypes are MLX's: random
inputs are uniform(0, 1) * 10 cast to the dtype, drawn with numpy from a fixed seed (MLX's exact
random numbers cannot be reproduced); tolerances are the backend classes' (atol 1e-6, rtol 1e-4;
the NCCL class 1e-4, 1e-4) and mx.allclose's defaults (rtol 1e-5, atol 1e-8) where MLX uses them.
Expected sums are computed exactly (float64) where MLX sums in the dtype.

MLX's CI runs these cases on 8 ranks; here they run on 8 and on 3 (MLXDIST_TEST_RANKS replaces
the counts). Sizes that MLX ties to 8 ranks scale with the rank count n so that they divide:
shard_linear's 1024 features are 128 * n, its 128-feature Sequential and the convolutions' 128
channels are 16 * n, sum_scatter's first dimensions 8, 64, 1024 are n, 8 * n, 128 * n (MLX's
values at n = 8). Splits by rank % 2 and rank // 2 give groups of 2 and 1 on 3 ranks; the
expected sizes, ranks and sums follow from the membership (MLX's values at n = 8). MLX's
test_send_recv of the MPI class pairs ranks 2k and 2k + 1; an odd rank out has no partner and
sits that case out.

One launch of ranks per (backend, rank count) runs every case (rank-side functions `case_*`)
and hands each case's results to the parent, where the test functions assert; a case that
raises on a rank fails its own test with that rank's traceback. MLX evaluates a case's calls
lazily, as graphs; here the dtype loops of the collective cases run one jitted program per
dtype (every shape and op of that dtype), the layers' forward and backward passes are jitted,
and the groups, mixed, pairs, vjp and average_gradients cases call the ops eagerly.

No counterpart here:
- ring_test_distributed.py test_groups' `world.split(...)` raising RuntimeError: MLX's ring
  cannot split groups; every backend here can, so the ring runs MPI's and NCCL's test_groups
  (the split sizes and ranks) instead.
- mlx_distributed_tests.py test_jaccl_all_gather_factory_validation: MLX's init takes an
  `all_gather_factory` (a user-supplied side channel for JACCL's address exchange) and validates
  it. dist.init has no such argument: JACCL here meets at MLX_JACCL_COORDINATOR (or through
  the ring's hostfile) and exchanges its addresses over its own TCP control ring, so there is
  no user-supplied side channel to validate.
- test_shard_linear's guard `if not mx.cuda.is_available()` around the quantized layers:
  MLX's QuantizedMatmul lacks CUDA; the quantized layers here dequantize in JAX and run on
  every platform, so those checks always run.
"""

import os

import numpy as np
import pytest

from jax_mlxdist.testing import RanksFailed, run_ranks

# Once per backend given to --backend (conftest.py).
pytestmark = pytest.mark.usefixtures("on_backend")

# MLX's dtypes and tolerances (rtol; 0 means exact).
ALL_REDUCE_DTYPES = [("int8", 0), ("uint8", 0), ("int32", 0), ("uint32", 0), ("float32", 1e-6),
                     ("float16", 5e-3), ("bfloat16", 1e-1)]
EXTRA_DTYPES = [("int16", 0), ("uint16", 0), ("complex64", 1e-6)]
FLOAT_DTYPES = [("float32", 1e-6), ("float16", 5e-3), ("bfloat16", 1e-1)]
SIZES = [(7,), (10,), (1024,), (1024, 1024)]
GATHER_DTYPES = ["int8", "uint8", "int32", "uint32", "float32", "float16", "bfloat16"]
GATHER_EXTRA_DTYPES = ["int16", "uint16", "complex64"]
GATHER_SPLIT_DTYPES = ["float32", "float16", "bfloat16"]
SEND_RECV_DTYPES = ["int8", "uint8", "int16", "uint16", "int32", "uint32", "float32", "float16",
                    "bfloat16", "complex64"]
SEED = 0xF0F0F0F0  # MLX's mx.random.seed for the nn cases: the same weights on every rank
ALLCLOSE = {"rtol": 1e-5, "atol": 1e-8}  # mx.allclose's defaults

ENV = {"MLXDIST_TIMEOUT": "60"}  # a stalled rank fails within a minute (the default is 300 s)
LAUNCH_TIMEOUT = 600


def _rank_counts():
    override = os.environ.get("MLXDIST_TEST_RANKS", "").replace(",", " ").split()
    return tuple(int(c) for c in override) if override else (3, 8)


def _tolerances(backend):
    """(atol, rtol) of MLX's test class for this backend."""
    return (1e-4, 1e-4) if backend == "nccl" else (1e-6, 1e-4)


# ---------------------------------------------------------------------------------------------
# Rank side: helpers and one function per case (run in order by _suite on every rank).


def _np_dtype(name):
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def _wide(a):
    """An exact widening for comparisons: complex128 or float64."""
    a = np.asarray(a)
    return a.astype(np.complex128 if a.dtype.kind == "c" else np.float64)


def _put(a):
    import jax
    return jax.device_put(np.ascontiguousarray(a))  # no program compiled per shape


def _max_error(y, z, rtol):
    """MLX's check: max |y - z| (divided by |z| when rtol > 0)."""
    err = np.abs(_wide(y) - _wide(z))
    if rtol > 0:
        err = err / np.abs(_wide(z))
    return float(err.max())


def _uniform10(cache, shape, seed=0):
    """uniform(shape) * 10 in float32 (MLX's inputs before the cast), drawn once per shape."""
    if (shape, seed) not in cache:
        cache[shape, seed] = np.random.default_rng(seed).random(shape, dtype=np.float32) * 10
    return cache[shape, seed]


def _reduce_checks(group, dtypes, sizes, cache):
    """MLX's all_reduce body on one group: x = uniform((size,) + shape) * 10 cast to the dtype,
    the same on every rank; each rank reduces its row. Each dtype's calls (every shape, sum,
    max and min) run in one jitted program. Returns {(dtype, shape): (sum error, max equal,
    min equal)}."""
    import jax

    import jax_mlxdist as dist
    k, r = group.size(), group.rank()
    reduce_all = jax.jit(lambda xs: [(dist.all_sum(x, group=group), dist.all_max(x, group=group),
                                      dist.all_min(x, group=group)) for x in xs])
    us = [_uniform10(cache, (k, *sh)) for sh in sizes]
    out = {}
    for name, rtol in dtypes:
        dt = _np_dtype(name)
        exact = np.int64 if np.issubdtype(dt, np.integer) else None
        got = reduce_all([_put(u[r].astype(dt)) for u in us])
        for sh, u, (y_sum, y_max, y_min) in zip(sizes, us, got):
            # The sum of the cast rows, exactly; the cast is monotone, so max and min commute with it.
            z = sum((u[i].astype(dt).astype(exact) if exact else _wide(u[i].astype(dt)))
                    for i in range(k))
            y = np.asarray(y_sum).astype(exact) if exact else y_sum
            out[name, sh] = (_max_error(y, z, rtol),
                             np.array_equal(np.asarray(y_max), u.max(0).astype(dt)),
                             np.array_equal(np.asarray(y_min), u.min(0).astype(dt)))
    return out


def _gather_checks(group, dtypes):
    """MLX's all_gather body: ones((2, 2, 4)) of each dtype gathered (one jitted program);
    returns {dtype: (shape, all ones)}."""
    import jax
    import jax.numpy as jnp

    import jax_mlxdist as dist
    gathered = jax.jit(lambda xs: [dist.all_gather(x, group=group) for x in xs])(
        [jnp.ones((2, 2, 4), dtype=_np_dtype(name)) for name in dtypes])
    return {name: (tuple(y.shape), bool((np.asarray(y) == 1).all()))
            for name, y in zip(dtypes, gathered)}


def case_groups(world):
    import jax_mlxdist as dist
    r = world.rank()
    world2 = dist.init()
    by_parity = world.split(r % 2)
    by_pair = world.split(r // 2)
    return {"rank": r, "size": world.size(), "rank2": world2.rank(), "size2": world2.size(),
            "parity_size": by_parity.size(), "parity_rank": by_parity.rank(),
            "pair_size": by_pair.size(),
            # who is in each sub-group, in sub-group rank order
            "parity_members": np.asarray(dist.all_gather(np.int32(r), group=by_parity)),
            "pair_members": np.asarray(dist.all_gather(np.int32(r), group=by_pair))}


def case_all_reduce(world):
    return _reduce_checks(world, ALL_REDUCE_DTYPES, SIZES, {})


def case_all_reduce_extra(world):
    cache = {}
    sub = world.split(world.rank() % 2)
    return {"world": _reduce_checks(world, EXTRA_DTYPES, SIZES, cache),
            "split": _reduce_checks(sub, EXTRA_DTYPES, SIZES, cache)}


def case_all_reduce_split(world):
    return _reduce_checks(world.split(world.rank() % 2), FLOAT_DTYPES, SIZES, {})


def case_all_gather(world):
    return _gather_checks(world, GATHER_DTYPES)


def case_all_gather_extra(world):
    sub = world.split(world.rank() % 2)
    return {"world": _gather_checks(world, GATHER_EXTRA_DTYPES),
            "split": _gather_checks(sub, GATHER_EXTRA_DTYPES), "split_size": sub.size()}


def case_all_gather_split(world):
    sub = world.split(world.rank() % 2)
    return {"gathered": _gather_checks(sub, GATHER_SPLIT_DTYPES), "split_size": sub.size()}


def case_mixed(world):
    import jax.numpy as jnp

    import jax_mlxdist as dist
    r = world.rank()
    sub_1 = world.split(r // 2)  # pairs 2k, 2k + 1
    sub_2 = world.split(r % 2)   # one member of each pair
    x = jnp.ones((1, 8)) * r
    y = dist.all_sum(x, group=sub_1)
    return dist.all_gather(y, group=sub_2)


def case_send_recv_ring(world):
    import jax

    import jax_mlxdist as dist
    n, r = world.size(), world.rank()
    right, left = (r + 1) % n, (r + n - 1) % n

    @jax.jit
    def ring_pass(xs):  # every shape of one dtype in one program
        out = []
        for x in xs:
            if r % 2 == 0:
                y = dist.send(x, right)
                z = dist.recv_like(y, left)
            else:
                z = dist.recv_like(x, left)
                y = dist.send(x, right)
            out.append((y, z))
        return out

    out, cache = {}, {}
    us = [_uniform10(cache, (n, *sh)) for sh in SIZES]
    for name in SEND_RECV_DTYPES:
        dt = _np_dtype(name)
        got = ring_pass([_put(u[r].astype(dt)) for u in us])
        for sh, u, (y, z) in zip(SIZES, us, got):
            out[name, sh] = (np.array_equal(np.asarray(y), u[r].astype(dt)),
                             np.array_equal(np.asarray(z), u[left].astype(dt)))
    return out


def case_send_recv_pairs(world):
    import jax
    import jax.numpy as jnp

    import jax_mlxdist as dist
    pairs = world.split(world.rank() // 2)
    if pairs.size() == 1:
        return None  # the odd rank out has no partner
    neighbor = (pairs.rank() + 1) % 2
    send = pairs.rank() == 0
    x = jnp.ones(10)
    for _ in range(10):
        if send:
            dist.send(2 * x, neighbor, group=pairs)
        else:
            x = dist.recv_like(x, neighbor, group=pairs)
        send = not send
    after_ten = np.asarray(x)

    # A receive (or send) and an unrelated computation in one program.
    def step(x):
        y = jnp.ones((5, 5)) + jnp.float32(2.0)
        if send:
            return y, dist.send(2 * x, neighbor, group=pairs)
        return y, dist.recv_like(x, neighbor, group=pairs)

    y, x = jax.jit(step)(x)
    return {"pair_rank": pairs.rank(), "after_ten": after_ten, "y": y, "x": x}


def case_all_gather_vjp(world):
    import jax
    import jax.numpy as jnp

    import jax_mlxdist as dist
    return float(jax.grad(lambda x: dist.all_gather(x)[0])(jnp.float32(1.0)))


def case_sum_scatter(world):
    import jax

    import jax_mlxdist as dist
    n, r = world.size(), world.rank()
    sizes = [(n,), (8 * n,), (128 * n,), (128 * n, 1024)]  # MLX's 8, 64, 1024 at n = 8
    both = jax.jit(lambda xs: [(dist.sum_scatter(x), dist.all_sum(x)) for x in xs])
    out, cache = {}, {}
    for name, rtol in FLOAT_DTYPES:
        # each rank its own values (MLX: key = rank)
        got = both([_put(_uniform10(cache, sh, seed=r).astype(_np_dtype(name))) for sh in sizes])
        for sh, (y, z) in zip(sizes, got):
            chunk = sh[0] // n
            out[name, sh] = (tuple(y.shape), _max_error(y, np.asarray(z)[r * chunk:(r + 1) * chunk], rtol))
    return out


def case_donation(world):
    """Peak memory of compiled programs (XLA's buffer assignment), MLX's peak memory counterpart."""
    import jax
    import jax.numpy as jnp

    import jax_mlxdist as dist
    x = _put(np.random.default_rng(world.rank()).standard_normal(1024, dtype=np.float32))
    scale = jnp.float32(2.0)

    def peak(fn, **jit_kwargs):
        compiled = jax.jit(fn, **jit_kwargs).lower(x).compile()
        stats = compiled.memory_analysis()
        value = getattr(stats, "peak_memory_in_bytes", None)
        if value is None:
            value = (stats.argument_size_in_bytes + stats.output_size_in_bytes
                     + stats.temp_size_in_bytes - stats.alias_size_in_bytes)
        compiled(x).block_until_ready()  # and it runs
        return int(value)

    return {"all_sum_only": peak(lambda v: dist.all_sum(v)),
            "all_sum_with_binary": peak(lambda v: dist.all_sum(v) * scale),
            "donated": peak(lambda v: dist.all_sum(v), donate_argnums=0),
            "nbytes": x.nbytes}


def _collective_ops(fn, *args):
    import jax
    text = str(jax.make_jaxpr(fn)(*args))
    return text.count("mlxdist_all_reduce[") + text.count("mlxdist_all_reduce_many[")


def case_average_gradients(world):
    import jax.numpy as jnp

    from jax_mlxdist import nn
    grads = [jnp.ones(10) for _ in range(10)]
    out = {}
    for label, kwargs in (("default", {}), ("200 bytes", {"all_reduce_size": 4 * 50}),
                          ("0", {"all_reduce_size": 0})):
        new = nn.average_gradients(grads, **kwargs)
        out[label] = {"len": len(new), "all_ones": all(bool((g == 1).all()) for g in new),
                      "ops": _collective_ops(lambda g, kw=kwargs: nn.average_gradients(g, **kw), grads)}
    return out


def case_clip_grad_norm_sharded(world):
    import jax
    import jax.numpy as jnp

    from jax_mlxdist import nn
    value = 3.0
    grads = {"a": jnp.ones((4, 3)) * value, "b": jnp.ones((5,)) * value}
    out = {}
    for max_norm in (1e9, 1.0):
        clip = jax.jit(lambda g, m=max_norm: nn.clip_grad_norm_sharded(g, max_norm=m, group=world))
        out[max_norm] = clip(grads)
    return out


def _linear_init(rng, in_dims, out_dims):
    """MLX's nn.Linear initialisation: weight and bias uniform(-1/sqrt(in), 1/sqrt(in))."""
    s = 1.0 / np.sqrt(in_dims)
    return {"weight": rng.uniform(-s, s, (out_dims, in_dims)).astype(np.float32),
            "bias": rng.uniform(-s, s, (out_dims,)).astype(np.float32)}


def _shard_linear_setup(world):
    n, r = world.size(), world.rank()
    dims = 128 * n  # MLX's 1024 at n = 8
    rng = np.random.default_rng(SEED)
    x = rng.standard_normal((4, dims), dtype=np.float32)
    lin = _linear_init(rng, dims, dims)
    part = slice(r * dims // n, (r + 1) * dims // n)
    return _put(x), lin, part


def case_shard_linear(world):
    import jax

    from jax_mlxdist import nn
    x, lin, part = _shard_linear_setup(world)
    slin1 = nn.shard_linear(lin, "all-to-sharded")
    slin2 = nn.shard_linear(lin, "sharded-to-all")
    y, y1, y2 = jax.jit(lambda x, lin, slin1, slin2: (
        x @ lin["weight"].T + lin["bias"], slin1(x), slin2(x[:, part])))(x, lin, slin1, slin2)
    return {"y": y, "y1": y1, "y2": y2}


def _quantized_outputs(world, q):
    """The quantized layer on one process (a group of one) and its two shards on the world."""
    import jax

    from jax_mlxdist import nn
    x, _, part = _shard_linear_setup(world)
    alone = world.split(world.rank())  # size 1: shard_linear keeps the whole layer
    qlin = nn.shard_linear(q, "all-to-sharded", group=alone)
    slin1 = nn.shard_linear(q, "all-to-sharded")
    slin2 = nn.shard_linear(q, "sharded-to-all")
    y, y1, y2 = jax.jit(lambda x, qlin, slin1, slin2: (qlin(x), slin1(x), slin2(x[:, part])))(
        x, qlin, slin1, slin2)
    return {"y": y, "y1": y1, "y2": y2, "layers": (slin1, slin2)}


def case_shard_linear_quantized(world):
    from jax_mlxdist import nn
    _, lin, _ = _shard_linear_setup(world)
    q = nn.quantized_linear(lin["weight"], lin["bias"])  # MLX's to_quantized(): 4-bit affine, groups of 64
    out = _quantized_outputs(world, q)
    del out["layers"]
    return out


def case_shard_linear_mxfp8(world):
    from jax_mlxdist import nn
    _, lin, _ = _shard_linear_setup(world)
    q = nn.quantized_linear(lin["weight"], lin["bias"], group_size=32, bits=8, mode="mxfp8")
    out = _quantized_outputs(world, q)
    slin1, slin2 = out.pop("layers")
    out.update(mode=q["mode"], modes=(slin1.mode, slin2.mode),
               biases=(slin1.biases is None, slin2.biases is None))
    return out


def _sequential(layers, x):
    for layer in layers:
        x = layer(x) if callable(layer) else x @ layer["weight"].T + layer["bias"]
    return x


def case_shard_linear_grads(world):
    import jax
    import jax.numpy as jnp

    from jax_mlxdist import nn
    n = world.size()
    dims = 16 * n  # MLX's 128 at n = 8
    rng = np.random.default_rng(SEED + 1)
    mod = [_linear_init(rng, dims, dims) for _ in range(4)]
    smod = [nn.shard_linear(layer, kind) for layer, kind in
            zip(mod, ["all-to-sharded", "sharded-to-all"] * 2)]
    x = _put(rng.standard_normal((4, dims), dtype=np.float32))
    y = _put(rng.standard_normal((4, dims), dtype=np.float32))

    def dummy_loss(model, x, y):
        return jnp.sum(_sequential(model, x) * y)

    l1, g1 = jax.jit(jax.value_and_grad(dummy_loss))(mod, x, y)
    l2, g2 = jax.jit(jax.value_and_grad(dummy_loss))(smod, x, y)
    return {"l1": l1, "l2": l2, "g1": g1, "g2": [{"weight": g.weight, "bias": g.bias} for g in g2]}


def _conv(params, x, aggregate):
    """MLX's Conv2d (weight (out, kh, kw, in), NHWC input, no padding), then all_sum if asked."""
    import jax

    import jax_mlxdist as dist
    y = jax.lax.conv_general_dilated(x, params["weight"], (1, 1), "VALID",
                                     dimension_numbers=("NHWC", "OHWI", "NHWC"))
    y = y + params["bias"]
    return dist.all_sum(y) if aggregate else y


def case_shard_predicate(world):
    import jax

    from jax_mlxdist import nn
    n = world.size()
    channels = 16 * n  # MLX's 128 at n = 8
    rng = np.random.default_rng(SEED)

    def conv_init(cin, cout, k=3):  # MLX's Conv2d: uniform(+-1/sqrt(cin * k * k)), zero bias
        s = 1.0 / np.sqrt(cin * k * k)
        return {"conv": {"weight": rng.uniform(-s, s, (cout, k, k, cin)).astype(np.float32),
                         "bias": np.zeros((cout,), np.float32)}}

    params = {"layers": [conv_init(3, channels), conv_init(channels, channels),
                         conv_init(channels, channels), conv_init(channels, 3)]}

    def sharding(path, weight):
        parts = path.split(".")
        if int(parts[1]) % 2 == 0:
            return 0
        return -1 if parts[-1] != "bias" else None

    sparams = nn.shard_inplace(params, sharding)
    x = _put(rng.standard_normal((4, 16, 16, 3), dtype=np.float32))

    def model(p, x, aggregate):
        for i, layer in enumerate(p["layers"]):
            x = _conv(layer["conv"], x, aggregate and i % 2 == 1)
        return x

    y1 = jax.jit(lambda p, x: model(p, x, False))(params, x)
    y2 = jax.jit(lambda p, x: model(p, x, True))(sparams, x)
    return {"y1": y1, "y2": y2,
            "shapes": [tuple(layer["conv"]["weight"].shape) for layer in sparams["layers"]]}


def _mlp(params, x):
    import jax
    h = jax.nn.relu(x @ params["l1"]["weight"].T + params["l1"]["bias"])
    return h @ params["l2"]["weight"].T + params["l2"]["bias"]


def case_fully_shard_grads(world):
    import jax
    import jax.numpy as jnp

    import jax_mlxdist as dist
    from jax_mlxdist import nn
    n, r = world.size(), world.rank()
    dims = 8 * n

    def loss_fn(model, x, y):
        logits = model(x).astype(jnp.float32)
        return jnp.mean((logits - y) ** 2)

    out = {}
    for name in ("float32", "bfloat16"):
        dtype = jnp.dtype(_np_dtype(name))
        wrng = np.random.default_rng(SEED)  # the same parameters everywhere
        params = {"l1": _linear_init(wrng, dims, dims), "l2": _linear_init(wrng, dims, dims)}
        drng = np.random.default_rng(r)  # each rank its own data
        x = _put(drng.standard_normal((4, dims), dtype=np.float32).astype(dtype))
        y = _put(drng.standard_normal((4, dims), dtype=np.float32))

        # Data-parallel reference: replicated parameters in dtype, gradients averaged.
        cast = jax.tree_util.tree_map(lambda p, d=dtype: _put(p).astype(d), params)
        model = jax.tree_util.Partial(_mlp, cast)

        @jax.jit
        def data_parallel(model, x, y):
            loss, grads = jax.value_and_grad(loss_fn)(model, x, y)
            return dist.all_sum(loss, group=world) / n, nn.average_gradients(grads, group=world)

        @jax.jit
        def fully_sharded(model, x, y):
            loss, grads = jax.value_and_grad(loss_fn)(model, x, y)
            return dist.all_sum(loss, group=world) / n, grads

        loss, grads = data_parallel(model, x, y)
        sharded = nn.fully_shard(jax.tree_util.Partial(_mlp, jax.tree_util.tree_map(_put, params)),
                                 compute_dtype=dtype)
        loss_sharded, grads_sharded = fully_sharded(sharded, x, y)
        ref = [(jax.tree_util.keystr(path), np.asarray(g, np.float32))
               for path, g in jax.tree_util.tree_leaves_with_path(grads)]
        mine = [np.asarray(g, np.float32) for g in jax.tree_util.tree_leaves(grads_sharded)]
        out[name] = {"loss": float(loss), "loss_sharded": float(loss_sharded), "ref": ref, "mine": mine}
    return out


CASES = {name[len("case_"):]: fn for name, fn in globals().items() if name.startswith("case_")}


def _suite(names):
    """Every case in order on this rank; each case's result or its exception text."""
    import traceback

    import jax_mlxdist as dist
    world = dist.init()
    out = {}
    for name in names:
        try:
            out[name] = ("ok", CASES[name](world))
        except Exception as e:  # noqa: BLE001 - reported by the case's own test
            out[name] = ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
    return out


# ---------------------------------------------------------------------------------------------
# Parent side: one launch per (backend, rank count), shared by the tests below.

_launches: dict = {}


@pytest.fixture(params=_rank_counts(), ids=lambda n: f"{n}ranks")
def nranks(request):
    return request.param


@pytest.fixture
def case(on_backend, nranks):
    """case(name) -> that case's result on each rank, in rank order."""
    key = (on_backend, nranks)
    if key not in _launches:
        try:
            _launches[key] = run_ranks(_suite, nranks, args=(list(CASES),), env=ENV,
                                       timeout=LAUNCH_TIMEOUT)
        except RanksFailed as e:
            _launches[key] = e

    def get(name):
        got = _launches[key]
        if isinstance(got, RanksFailed):
            pytest.fail(f"the ranks of the {on_backend} launch on {nranks} ranks failed:\n{got}")
        per_rank = []
        for r, res in enumerate(got):
            status, value = res[name]
            if status == "error":
                pytest.fail(f"rank {r} of {nranks} ({on_backend}): case {name} raised {value}")
            per_rank.append(value)
        return per_rank
    return get


def _check_reductions(results, dtypes, what):
    bad = [(what, name, sh, res) for name, rtol in dtypes for sh in SIZES
           for res in [results[name, sh]] if not (res[0] <= rtol and res[1] and res[2])]
    assert not bad, f"(group, dtype, shape, (sum error, max equal, min equal)) off: {bad}"


def _parity_size(r, n):
    return len(range(r % 2, n, 2))


def _pair_size(r, n):
    return min(2, n - 2 * (r // 2))


def test_groups(case, nranks):
    """MPI's and NCCL's test_groups (and the ring's, whose split raises in MLX): init() twice
    gives the same group; split(rank % 2) and split(rank // 2) give MLX's sizes and ranks."""
    for r, res in enumerate(case("groups")):
        assert (res["rank"], res["size"]) == (r, nranks)
        assert (res["rank2"], res["size2"]) == (r, nranks)
        assert res["parity_size"] == _parity_size(r, nranks)  # 4 on 8 ranks
        assert res["parity_rank"] == r // 2
        assert res["pair_size"] == _pair_size(r, nranks)  # 2 on 8 ranks
        assert list(res["parity_members"]) == list(range(r % 2, nranks, 2))
        assert list(res["pair_members"]) == list(range(r - r % 2, r - r % 2 + res["pair_size"]))


def test_all_reduce(case):
    """mlx_distributed_tests.py test_all_reduce: all_sum/all_max/all_min, 7 dtypes x 4 shapes."""
    for r, res in enumerate(case("all_reduce")):
        _check_reductions(res, ALL_REDUCE_DTYPES, f"world, rank {r}")


def test_all_reduce_extra(case):
    """ring's and MPI's test_all_reduce_extra: int16, uint16, complex64 on the world (ring, MPI)
    and on split(rank % 2) (MPI)."""
    for r, res in enumerate(case("all_reduce_extra")):
        _check_reductions(res["world"], EXTRA_DTYPES, f"world, rank {r}")
        _check_reductions(res["split"], EXTRA_DTYPES, f"split, rank {r}")


def test_all_reduce_split(case):
    """NCCL's test_all_reduce_split: float32, float16, bfloat16 on split(rank % 2)."""
    for r, res in enumerate(case("all_reduce_split")):
        _check_reductions(res, FLOAT_DTYPES, f"split, rank {r}")


def test_all_gather(case, nranks):
    """mlx_distributed_tests.py test_all_gather: ones((2, 2, 4)) of 7 dtypes."""
    for r, res in enumerate(case("all_gather")):
        for name in GATHER_DTYPES:
            assert res[name] == ((nranks * 2, 2, 4), True), (r, name)


def test_all_gather_extra(case, nranks):
    """ring's and MPI's test_all_gather_extra: int16, uint16, complex64 on the world and (MPI)
    on split(rank % 2)."""
    for r, res in enumerate(case("all_gather_extra")):
        assert res["split_size"] == _parity_size(r, nranks)
        for name in GATHER_EXTRA_DTYPES:
            assert res["world"][name] == ((nranks * 2, 2, 4), True), (r, name)
            assert res["split"][name] == ((res["split_size"] * 2, 2, 4), True), (r, name)


def test_all_gather_split(case, nranks):
    """NCCL's test_all_gather_split: float32, float16, bfloat16 on split(rank % 2)."""
    for r, res in enumerate(case("all_gather_split")):
        assert res["split_size"] == _parity_size(r, nranks)
        for name in GATHER_SPLIT_DTYPES:
            assert res["gathered"][name] == ((res["split_size"] * 2, 2, 4), True), (r, name)


def test_mixed(case, nranks):
    """MPI's test_mixed: all_sum over pairs (split(rank // 2)), then all_gather over
    split(rank % 2). On 8 ranks: the pair sums 1, 5, 9, 13 on every rank."""
    pair_sums = [sum(range(2 * k, min(2 * k + 2, nranks))) for k in range((nranks + 1) // 2)]
    for r, z in enumerate(case("mixed")):
        want = np.array([[s] for k, s in enumerate(pair_sums) if 2 * k + r % 2 < nranks], np.float32)
        assert z.shape == (len(want), 8), (r, z.shape)
        np.testing.assert_array_equal(z, np.broadcast_to(want, z.shape), err_msg=f"rank {r}")


def test_send_recv(case):
    """ring's test_send_recv: a ring pass (even ranks send first, odd ranks receive first) of
    10 dtypes x 4 shapes; the send returns its input, the receive the left neighbour's row."""
    for r, res in enumerate(case("send_recv_ring")):
        bad = [(name, sh, res[name, sh]) for name in SEND_RECV_DTYPES for sh in SIZES
               if res[name, sh] != (True, True)]
        assert not bad, f"rank {r}: (dtype, shape, (sent ok, received ok)) off: {bad}"


def test_send_recv_pairs(case, nranks):
    """MPI's test_send_recv: pairs (split(rank // 2)) pass 2 * x back and forth ten times
    (1024 on the pair's rank 0, 512 on its rank 1), then a receive and an unrelated
    computation in one program."""
    results = case("send_recv_pairs")
    for r, res in enumerate(results):
        if _pair_size(r, nranks) == 1:
            assert res is None
            continue
        assert res["pair_rank"] == r % 2
        np.testing.assert_array_equal(res["after_ten"], np.full(10, 1024.0 if r % 2 == 0 else 512.0))
        np.testing.assert_array_equal(res["y"], np.full((5, 5), 3.0))
        np.testing.assert_array_equal(res["x"], np.full(10, 2048.0))  # sent, and received


def test_all_gather_vjp(case):
    """ring's test_all_gather_vjp: d all_gather(x)[0] / dx is 1 on rank 0, 0 elsewhere."""
    for r, grad in enumerate(case("all_gather_vjp")):
        assert grad == (1.0 if r == 0 else 0.0), (r, grad)


def test_sum_scatter(case, nranks):
    """NCCL's test_sum_scatter: float32, float16, bfloat16; each rank's block against all_sum."""
    for r, res in enumerate(case("sum_scatter")):
        for name, rtol in FLOAT_DTYPES:
            for sh in [(nranks,), (8 * nranks,), (128 * nranks,), (128 * nranks, 1024)]:
                shape, err = res[name, sh]
                assert shape == (sh[0] // nranks, *sh[1:]), (r, name, sh, shape)
                assert err <= rtol, (r, name, sh, err)


def test_donation(case):
    """mlx_distributed_tests.py test_donation: an all_sum followed by a binary op peaks at the
    memory of the all_sum alone (the op writes into the all_sum's buffer). Here: the peak
    memory XLA assigns to the compiled programs; and a donated input is reduced in place."""
    for r, res in enumerate(case("donation")):
        assert res["all_sum_with_binary"] == res["all_sum_only"], (r, res)
        assert res["donated"] == res["nbytes"], (r, res)  # the input's buffer is the output's


def test_average_gradients(case):
    """mlx_distributed_tests.py test_average_gradients: ten ones(10) average to ones, in one
    all_sum (default bucket) or one per array (all_reduce_size=0). The all_sums are counted in
    the program (MLX counts the calls of a patched all_sum)."""
    for r, res in enumerate(case("average_gradients")):
        for label in ("default", "200 bytes", "0"):
            assert res[label]["len"] == 10 and res[label]["all_ones"], (r, label, res[label])
        assert res["default"]["ops"] == 1, (r, res)
        assert res["0"]["ops"] == 10, (r, res)


def test_average_gradients_bucket_size(case):
    """mlx_distributed_tests.py test_average_gradients, all_reduce_size=4 * 50: ten arrays of
    40 bytes in buckets of 200 bytes take 2 all_sums."""
    for r, res in enumerate(case("average_gradients")):
        assert res["200 bytes"]["ops"] == 2, (r, res["200 bytes"])


def test_clip_grad_norm_sharded(case, nranks, on_backend):
    """mlx_distributed_tests.py test_clip_grad_norm_sharded: the global norm of {a: 3 * ones((4,
    3)), b: 3 * ones(5)} on every rank; unchanged under max_norm=1e9, scaled under 1.0."""
    atol, rtol = _tolerances(on_backend)
    grads = {"a": np.ones((4, 3)) * 3.0, "b": np.ones((5,)) * 3.0}
    expected_norm = np.sqrt(nranks * (4 * 3 + 5)) * 3.0
    for r, res in enumerate(case("clip_grad_norm_sharded")):
        clipped, norm = res[1e9]
        np.testing.assert_allclose(norm, expected_norm, atol=atol, rtol=rtol)
        for k, g in grads.items():
            np.testing.assert_allclose(clipped[k], g, atol=atol, rtol=rtol, err_msg=k)
        clipped, _ = res[1.0]
        scale = 1.0 / (expected_norm + 1e-6)
        for k, g in grads.items():
            np.testing.assert_allclose(clipped[k], g * scale, atol=atol, rtol=rtol, err_msg=k)


def _part(r, n, dims):
    return slice(r * dims // n, (r + 1) * dims // n)


def test_shard_linear(case, nranks, on_backend):
    """mlx_distributed_tests.py test_shard_linear, the plain layers: all-to-sharded gives this
    rank's columns of the output, sharded-to-all the whole output from this rank's inputs."""
    atol, rtol = _tolerances(on_backend)
    for r, res in enumerate(case("shard_linear")):
        part = _part(r, nranks, res["y"].shape[1])
        np.testing.assert_allclose(res["y2"], res["y"], atol=atol, rtol=rtol)
        np.testing.assert_allclose(res["y1"], res["y"][:, part], atol=atol, rtol=rtol)


def test_shard_linear_quantized(case, nranks, on_backend):
    """mlx_distributed_tests.py test_shard_linear, quantized (to_quantized(): 4-bit affine,
    groups of 64): the shards against the quantized layer on one process."""
    atol, rtol = _tolerances(on_backend)
    for r, res in enumerate(case("shard_linear_quantized")):
        part = _part(r, nranks, res["y"].shape[1])
        np.testing.assert_allclose(res["y2"], res["y"], atol=atol, rtol=rtol)
        np.testing.assert_allclose(res["y1"], res["y"][:, part], **ALLCLOSE)


def test_shard_linear_mxfp8(case, nranks, on_backend):
    """mlx_distributed_tests.py test_shard_linear, mxfp8 (groups of 32, 8 bits): the mode
    reaches both shards, which have no biases, and they match the layer on one process."""
    atol, rtol = _tolerances(on_backend)
    for r, res in enumerate(case("shard_linear_mxfp8")):
        assert res["mode"] == "mxfp8"
        assert res["modes"] == ("mxfp8", "mxfp8")
        assert res["biases"] == (True, True)  # None on both
        part = _part(r, nranks, res["y"].shape[1])
        np.testing.assert_allclose(res["y2"], res["y"], atol=atol, rtol=rtol)
        np.testing.assert_allclose(res["y1"], res["y"][:, part], **ALLCLOSE)


def test_shard_linear_grads(case, nranks, on_backend):
    """mlx_distributed_tests.py test_shard_linear, the backward pass: four linear layers
    sharded all-to-sharded, sharded-to-all, all-to-sharded, sharded-to-all; loss
    sum(model(x) * y) and every parameter's gradient against the unsharded model's."""
    atol, rtol = _tolerances(on_backend)
    tight = {"atol": 1e-6, "rtol": 1e-4}
    for r, res in enumerate(case("shard_linear_grads")):
        g1, g2 = res["g1"], res["g2"]
        part = _part(r, nranks, g1[0]["weight"].shape[0])
        np.testing.assert_allclose(res["l2"], res["l1"], **ALLCLOSE)
        np.testing.assert_allclose(g2[0]["weight"], g1[0]["weight"][part], **tight)
        np.testing.assert_allclose(g2[2]["weight"], g1[2]["weight"][part], **tight)
        np.testing.assert_allclose(g2[1]["weight"], g1[1]["weight"][:, part], **tight)
        np.testing.assert_allclose(g2[3]["weight"], g1[3]["weight"][:, part], **tight)
        np.testing.assert_allclose(g2[0]["bias"], g1[0]["bias"][part], **tight)
        np.testing.assert_allclose(g2[2]["bias"], g1[2]["bias"][part], **tight)
        np.testing.assert_allclose(g2[1]["bias"], g1[1]["bias"], atol=atol, rtol=rtol)
        np.testing.assert_allclose(g2[3]["bias"], g1[3]["bias"], atol=atol, rtol=rtol)


def test_shard_predicate(case, nranks):
    """mlx_distributed_tests.py test_shard_predicate: four 3x3 convolutions (NHWC); shard_inplace
    with a predicate splits the even layers' outputs (weight and bias on axis 0) and the odd
    layers' inputs (weight on axis -1, bias whole), whose outputs are all_summed."""
    channels = 16 * nranks
    for r, res in enumerate(case("shard_predicate")):
        c = channels // nranks
        assert res["shapes"] == [(c, 3, 3, 3), (channels, 3, 3, c), (c, 3, 3, channels), (3, 3, 3, c)]
        np.testing.assert_allclose(res["y2"], res["y1"], atol=1e-6, rtol=1e-4, err_msg=f"rank {r}")


def test_fully_shard_grads(case, nranks):
    """NCCL's test_fully_shard_grads: an MLP under fully_shard(compute_dtype=...) against
    data-parallel training (average_gradients) in float32 and bfloat16: the same mean loss,
    and each rank's gradient block equals the block of the averaged gradient."""
    tolerances = {"float32": (1e-6, 1e-6), "bfloat16": (1e-3, 1e-3)}
    for r, res in enumerate(case("fully_shard_grads")):
        for name, (atol, rtol) in tolerances.items():
            got = res[name]
            np.testing.assert_allclose(got["loss_sharded"], got["loss"], atol=1e-4, rtol=1e-4)
            assert len(got["mine"]) == len(got["ref"]) == 4
            for (path, ref), mine in zip(got["ref"], got["mine"]):
                np.testing.assert_allclose(mine, ref[_part(r, nranks, ref.shape[0])], atol=atol,
                                           rtol=rtol, err_msg=f"rank {r}, {name}, {path}")
