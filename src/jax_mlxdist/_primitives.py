"""One JAX primitive per collective, with all its rules side by side: abstract eval, the ordered
effect and the FFI lowering, then JVP, transpose and batching (README, "Autodiff semantics").

Every collective carries one *ordered* effect whose token is threaded through its custom call.
XLA then runs a program's collectives one after another in program order, JAX serialises
executions that contain them, and none is dead-code eliminated. Matching messages by tag would
not be enough: two instances of one call site carry the same tag and could pair up wrongly.
"""

from __future__ import annotations

import functools

import numpy as np
import jax
import jax.numpy as jnp
from jax import lax
from jax.interpreters import ad, batching, mlir
from jax.extend.core import Primitive
from jax._src import dispatch, effects

from jax_mlxdist import _C, _config, _dispatch

# --- compat shim: jax 0.10.x and 0.11.x -------------------------------------------------------
try:  # jax >= 0.11 exports the token aval here
    from jax.ffi import abstract_token
except ImportError:  # jax 0.10: the public alias is deprecated; JAX compares by identity
    from jax._src.core import abstract_token

ShapedArray = jax.core.ShapedArray

# Reduction codes shared with csrc/core/dtype.h (ReduceOp).
REDUCE = {"sum": 0, "max": 1, "min": 2, "prod": 3, "and": 4, "or": 5, "xor": 6}
SUM, MAX, MIN = REDUCE["sum"], REDUCE["max"], REDUCE["min"]


def reduce_name(code: int) -> str:
    return next(k for k, v in REDUCE.items() if v == code)


class CollectiveEffect(effects.Effect):
    """Orders collectives within and across executions (see module docstring)."""

    def __repr__(self):
        return "MlxdistCollective"


effect = CollectiveEffect()
for _kind in (effects.lowerable_effects, effects.ordered_effects,
              effects.control_flow_allowed_effects, effects.custom_derivatives_allowed_effects,
              effects.remat_allowed_effects,
              # keeps a send whose result is unused when checkpoint re-traces its backward pass
              effects.partial_eval_kept_effects):
    _kind.add_type(CollectiveEffect)

# Programs take no runtime token for this effect (see _dispatch.py); MLXDIST_RUNTIME_TOKENS=1
# keeps JAX's own handling.
if not _config.runtime_tokens():
    _dispatch.install(effect)

for _name, _capsule in _C.ffi_targets("cpu").items():
    jax.ffi.register_ffi_target(_name, _capsule, platform="cpu")
# Arrays on CUDA GPUs: the same ops, staged through pinned host memory. JAX keeps these until
# a CUDA backend starts, so CPU-only installs are unaffected.
for _name, _capsule in _C.ffi_targets("cuda").items():
    jax.ffi.register_ffi_target(_name, _capsule, platform="CUDA")


def _lowering(target: str, attrs, *, operands: bool = True, **lowering_args):
    """An FFI lowering that threads the effect's token through the call.

    attrs: the params passed to C++ (ints, or tuples of ints); operands: how many of the array
    operands the call takes (True: all, False: none); the rest are templates that only give
    their shape to JAX (recv's, sendrecv's).
    """
    def attr(v):
        return np.asarray(v, np.int64) if isinstance(v, tuple) else np.int64(v)

    def rule(ctx, *args, **params):
        k = len(args) if operands is True else int(operands)
        avals_in, args = ctx.avals_in[:k], args[:k]
        token = ctx.tokens_in.get(effect)
        ctx_tok = ctx.replace(avals_in=(*avals_in, abstract_token),
                              avals_out=(*ctx.avals_out, abstract_token))
        extra = dict(lowering_args)
        if extra.pop("alias_all", False):  # one result per operand, written over it
            extra["operand_output_aliases"] = {i: i for i in range(k)}
        lower = jax.ffi.ffi_lowering(target, has_side_effect=True, **extra)
        results = list(lower(ctx_tok, *args, token,
                             **{k: attr(params[k]) for k in attrs}))
        ctx.set_tokens_out(mlir.TokenSet({effect: results.pop()}))
        return results

    return rule


def _primitive(name: str, abstract_eval, attrs, *, multiple_results=False,
               **lowering_args) -> Primitive:
    """A collective: effectful, lowered to the FFI target of the same name."""
    p = Primitive(name)
    p.multiple_results = multiple_results
    p.def_impl(functools.partial(dispatch.apply_primitive, p))
    p.def_effectful_abstract_eval(lambda *a, **kw: (abstract_eval(*a, **kw), {effect}))
    for platform in ("cpu", "cuda"):
        mlir.register_lowering(p, _lowering(name, attrs, **lowering_args), platform=platform)
    return p


def _rules(p: Primitive, *, jvp, transpose, batch) -> None:
    ad.primitive_jvps[p] = jvp
    ad.primitive_transposes[p] = transpose
    batching.primitive_batchers[p] = batch


# --- shared rules ------------------------------------------------------------------------------

def _dense(t):
    """A concrete cotangent/tangent: symbolic zeros become arrays of zeros. Wherever a rule
    communicates, every rank must take part even where its cotangent happens to be zero."""
    return ad.instantiate_zeros(t)


def _linear_jvp(prim):
    """JVP of a linear op: the op itself on the (instantiated) tangent. Point-to-point tangents
    carry a higher tag, so a tangent can never be taken for a value by a recv."""
    def jvp(primals, tangents, **params):
        tangent_params = {**params, "tag": params["tag"] + 1} if "tag" in params else params
        return prim.bind(*primals, **params), prim.bind(*map(_dense, tangents), **tangent_params)
    return jvp


def _elementwise_batch(prim):
    """vmap of an op that treats every element alike: the batch axis may sit anywhere."""
    def rule(args, dims, **params):
        return prim.bind(*args, **params), dims[0]
    return rule


def _axis0_batch(prim):
    """vmap of an op on axis 0 (all_gather, sum_scatter): a batch axis in front moves behind it."""
    def rule(args, dims, **params):
        (x,), (d,) = args, dims
        if x.ndim == 1:  # unbatched scalars: gather them as a (1, batch) block
            x, d = x[None, :], 1
        elif d == 0:
            x, d = jnp.moveaxis(x, 0, 1), 1
        return prim.bind(x, **params), d
    return rule


def _same(x, **_):
    return ShapedArray(x.shape, x.dtype, weak_type=x.weak_type)


# Params shared by the collectives: group (C++ handle), rank and size (static, for the shape
# and autodiff rules); reduce and vjp for all-reduce; dst/src and tag (0 for values, k for
# k-th order tangents) for point-to-point.

# --- all_reduce: all_sum, all_max, all_min, all_prod ------------------------------------------
# It writes its result over its input: no extra buffer when the input is donated.
all_reduce_p = _primitive("mlxdist_all_reduce", _same, ("group", "reduce"),
                          operand_output_aliases={0: 0})


def _all_reduce_jvp(primals, tangents, **params):
    (x,), (dx,) = primals, tangents
    y = all_reduce_p.bind(x, **params)
    reduce = params["reduce"]
    if reduce == SUM:
        return y, all_reduce_p.bind(_dense(dx), **params)
    if reduce in (MAX, MIN):
        # The gradient goes to one rank per element: the lowest rank holding the extreme.
        rank, size = params["rank"], params["size"]
        holder = jnp.where(x == y, jnp.int32(rank), jnp.int32(size))
        owner = all_reduce_p.bind(holder, **{**params, "reduce": MIN}) == rank
        own = jnp.where(owner, _dense(dx), jnp.zeros_like(y))
        return y, all_reduce_p.bind(own, **{**params, "reduce": SUM, "vjp": "identity"})
    raise NotImplementedError(f"all_reduce with op={reduce_name(reduce)!r} is not differentiable")


def _all_reduce_transpose(ct, x, **params):
    assert params["reduce"] == SUM, "only sums are linear"
    if params["vjp"] == "identity":  # the output is one replicated value
        return [ct]
    return [all_reduce_p.bind(_dense(ct), **params)]  # exact: sum of per-rank cotangents


_rules(all_reduce_p, jvp=_all_reduce_jvp, transpose=_all_reduce_transpose,
       batch=_elementwise_batch(all_reduce_p))


# --- all_reduce_many: a pytree's leaves of one dtype in one op ----------------------------------
def _many_same(*xs, **_):
    return [_same(x) for x in xs]


all_reduce_many_p = _primitive("mlxdist_all_reduce_many", _many_same, ("group", "reduce"),
                               multiple_results=True, alias_all=True)


def _all_reduce_many_jvp(primals, tangents, **params):
    assert params["reduce"] == SUM, "_ops packs sums only"
    return (all_reduce_many_p.bind(*primals, **params),
            all_reduce_many_p.bind(*map(_dense, tangents), **params))


def _all_reduce_many_transpose(cts, *xs, **params):
    if params["vjp"] == "identity":  # each output is one replicated value
        return list(cts)
    return all_reduce_many_p.bind(*map(_dense, cts), **params)


def _all_reduce_many_batch(args, dims, **params):
    return all_reduce_many_p.bind(*args, **params), list(dims)


_rules(all_reduce_many_p, jvp=_all_reduce_many_jvp, transpose=_all_reduce_many_transpose,
       batch=_all_reduce_many_batch)


# --- all_gather ---------------------------------------------------------------------------------
def _gathered(x, *, size, **_):
    shape = (size,) if x.ndim == 0 else (size * x.shape[0], *x.shape[1:])
    return ShapedArray(shape, x.dtype, weak_type=x.weak_type)


all_gather_p = _primitive("mlxdist_all_gather", _gathered, ("group",))


def _all_gather_transpose(ct, x, *, rank, **params):
    if type(ct) is ad.Zero:
        return [ad.Zero(x.aval)]
    if x.aval.ndim == 0:
        return [ct[rank]]
    m = x.aval.shape[0]
    return [lax.slice_in_dim(ct, rank * m, (rank + 1) * m, axis=0)]


_rules(all_gather_p, jvp=_linear_jvp(all_gather_p), transpose=_all_gather_transpose,
       batch=_axis0_batch(all_gather_p))


# --- sum_scatter --------------------------------------------------------------------------------
def _scattered(x, *, size, **_):
    return ShapedArray((x.shape[0] // size, *x.shape[1:]), x.dtype, weak_type=x.weak_type)


sum_scatter_p = _primitive("mlxdist_sum_scatter", _scattered, ("group",))


def _sum_scatter_transpose(ct, x, **params):
    return [all_gather_p.bind(_dense(ct), **params)]


_rules(sum_scatter_p, jvp=_linear_jvp(sum_scatter_p), transpose=_sum_scatter_transpose,
       batch=_axis0_batch(sum_scatter_p))


# --- send and recv ------------------------------------------------------------------------------
send_p = _primitive("mlxdist_send", _same, ("group", "dst", "tag"), operand_output_aliases={0: 0})
# recv's operand is a template (shape and dtype) so that vmap and autodiff can reach it.
recv_p = _primitive("mlxdist_recv", _same, ("group", "src", "tag"), operands=False)


def _send_transpose(ct, x, *, group, dst, tag):
    # send returns x and hands x to dst: x's cotangent is its own plus the one dst sends back.
    ct = _dense(ct)
    return [ct + recv_p.bind(ct, group=group, src=dst, tag=tag)]


def _recv_transpose(ct, template, *, group, src, tag):
    send_p.bind(_dense(ct), group=group, dst=src, tag=tag)  # kept alive by the ordered effect
    return [ad.Zero(template.aval) if ad.is_undefined_primal(template) else None]


_rules(send_p, jvp=_linear_jvp(send_p), transpose=_send_transpose,
       batch=_elementwise_batch(send_p))
_rules(recv_p, jvp=_linear_jvp(recv_p), transpose=_recv_transpose,
       batch=_elementwise_batch(recv_p))


# --- sendrecv: x to dst, and from src an array like the template --------------------------------
def _like_template(x, template, **_):
    return ShapedArray(template.shape, template.dtype, weak_type=template.weak_type)


sendrecv_p = _primitive("mlxdist_sendrecv", _like_template, ("group", "dst", "src", "tag"),
                        operands=1)


def _sendrecv_transpose(ct, x, template, *, group, dst, src, tag):
    # What came from src goes back to it; what went to dst comes back as x's cotangent.
    like = jnp.zeros(x.aval.shape, x.aval.dtype) if ad.is_undefined_primal(x) else x
    back = sendrecv_p.bind(_dense(ct), like, group=group, dst=src, src=dst, tag=tag)
    return [back if ad.is_undefined_primal(x) else None,
            ad.Zero(template.aval) if ad.is_undefined_primal(template) else None]


def _sendrecv_batch(args, dims, **params):
    # Both in front: every rank vmaps alike, so what arrives is batched as what leaves.
    x, template = args
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    x, template = (jnp.broadcast_to(a, (size, *a.shape)) if d is None
                   else jnp.moveaxis(a, d, 0) for a, d in zip(args, dims))
    return sendrecv_p.bind(x, template, **params), 0


_rules(sendrecv_p, jvp=_linear_jvp(sendrecv_p), transpose=_sendrecv_transpose,
       batch=_sendrecv_batch)


# --- all_to_all: axis-0 blocks to every rank, theirs back in rank order -------------------------
def _exchanged(x, *, recv_sizes, **_):  # sizes count rows of axis 0
    return ShapedArray((sum(recv_sizes), *x.shape[1:]), x.dtype, weak_type=x.weak_type)


all_to_all_p = _primitive("mlxdist_all_to_all", _exchanged, ("group", "send_sizes", "recv_sizes"))


def _all_to_all_transpose(ct, x, *, send_sizes, recv_sizes, **params):
    return [all_to_all_p.bind(_dense(ct), send_sizes=recv_sizes, recv_sizes=send_sizes, **params)]


_rules(all_to_all_p, jvp=_linear_jvp(all_to_all_p), transpose=_all_to_all_transpose,
       batch=_axis0_batch(all_to_all_p))


# --- rooted: broadcast, reduce, gather, scatter (params root, rank, size; reduce for reduce) -----
# Outside the root, reduce and gather return their input (as mpi4jax); scatter's input there is
# one block's shape, its contents unused.
def _zeros_unless_root(v, rank, root):
    return v if rank == root else jnp.zeros(v.shape, v.dtype)


# Written over its input where XLA can (root's stays as it is; the others receive into it).
broadcast_p = _primitive("mlxdist_broadcast", _same, ("group", "root"), operand_output_aliases={0: 0})
reduce_p = _primitive("mlxdist_reduce", _same, ("group", "root", "reduce"))


def _gathered_at_root(x, *, root, rank, size, **_):
    if rank != root:
        return _same(x)
    return ShapedArray((size * x.shape[0], *x.shape[1:]), x.dtype, weak_type=x.weak_type)


def _scattered_from_root(x, *, root, rank, size, **_):
    if rank != root:
        return _same(x)
    return ShapedArray((x.shape[0] // size, *x.shape[1:]), x.dtype, weak_type=x.weak_type)


gather_p = _primitive("mlxdist_gather", _gathered_at_root, ("group", "root"))
scatter_p = _primitive("mlxdist_scatter", _scattered_from_root, ("group", "root"))


def _broadcast_transpose(ct, x, *, rank, root, **params):
    # Every rank's output is root's x: its cotangent is the sum of all of them, at root.
    total = reduce_p.bind(_dense(ct), reduce=SUM, rank=rank, root=root, **params)
    return [_zeros_unless_root(total, rank, root)]


def _reduce_transpose(ct, x, *, rank, root, reduce, **params):
    assert reduce == SUM, "only sums are linear"
    # Root's cotangent reaches every input; elsewhere the output is also the input itself.
    ct = _dense(ct)
    back = broadcast_p.bind(ct, rank=rank, root=root, **params)
    return [back if rank == root else back + ct]


def _gather_transpose(ct, x, *, rank, root, **params):
    ct = _dense(ct)
    back = scatter_p.bind(ct, rank=rank, root=root, **params)  # block r of root's cotangent
    return [back if rank == root else back + ct]


def _scatter_transpose(ct, x, *, rank, root, **params):
    ct = _dense(ct)
    back = gather_p.bind(ct, rank=rank, root=root, **params)
    return [_zeros_unless_root(back, rank, root)]  # elsewhere the input is only a shape


def _reduce_jvp(primals, tangents, **params):
    if params["reduce"] != SUM:
        raise NotImplementedError("reduce is differentiable for op='sum' only")
    return _linear_jvp(reduce_p)(primals, tangents, **params)


_rules(broadcast_p, jvp=_linear_jvp(broadcast_p), transpose=_broadcast_transpose,
       batch=_elementwise_batch(broadcast_p))
_rules(reduce_p, jvp=_reduce_jvp, transpose=_reduce_transpose,
       batch=_elementwise_batch(reduce_p))
_rules(gather_p, jvp=_linear_jvp(gather_p), transpose=_gather_transpose,
       batch=_axis0_batch(gather_p))
_rules(scatter_p, jvp=_linear_jvp(scatter_p), transpose=_scatter_transpose,
       batch=_axis0_batch(scatter_p))


# --- barrier: no operands, nothing to differentiate or batch ------------------------------------
barrier_p = _primitive("mlxdist_barrier", lambda **_: [], ("group",), multiple_results=True)


# --- grad_sum: identity forward, all_sum of the cotangent backward (nn.sum_gradients) -----------
# Pure: no effect, no communication until it is transposed.
grad_sum_p = Primitive("mlxdist_grad_sum")
grad_sum_p.def_impl(lambda x, **_: x)
grad_sum_p.def_abstract_eval(_same)
mlir.register_lowering(grad_sum_p, lambda ctx, x, **_: [x])


def _grad_sum_transpose(ct, x, *, group, rank, size):
    return [all_reduce_p.bind(_dense(ct), group=group, reduce=SUM, vjp="identity",
                              rank=rank, size=size)]


_rules(grad_sum_p, jvp=_linear_jvp(grad_sum_p), transpose=_grad_sum_transpose,
       batch=_elementwise_batch(grad_sum_p))
