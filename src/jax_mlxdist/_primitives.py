"""One JAX primitive per collective: abstract eval, the ordered effect, and the FFI lowering.

Every collective carries one *ordered* effect whose token is threaded through its custom call.
XLA then runs a program's collectives one after another in program order, JAX serialises
executions that contain them, and none is dead-code eliminated. Matching messages by tag would
not be enough: two instances of one call site carry the same tag and could pair up wrongly.
"""

from __future__ import annotations

import functools

import numpy as np
import jax
from jax.interpreters import mlir
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
REDUCE = {"sum": 0, "max": 1, "min": 2, "prod": 3}


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

    attrs: the params passed to C++; operands=False leaves the array operands out of the call
    (recv's template only gives its shape to JAX).
    """

    def rule(ctx, *args, **params):
        avals_in = ctx.avals_in if operands else ()
        args = args if operands else ()
        token = ctx.tokens_in.get(effect)
        ctx_tok = ctx.replace(avals_in=(*avals_in, abstract_token),
                              avals_out=(*ctx.avals_out, abstract_token))
        lower = jax.ffi.ffi_lowering(target, has_side_effect=True, **lowering_args)
        results = list(lower(ctx_tok, *args, token,
                             **{k: np.int64(params[k]) for k in attrs}))
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


def _same(x, **_):
    return ShapedArray(x.shape, x.dtype, weak_type=x.weak_type)


def _gathered(x, *, size, **_):
    shape = (size,) if x.ndim == 0 else (size * x.shape[0], *x.shape[1:])
    return ShapedArray(shape, x.dtype, weak_type=x.weak_type)


def _scattered(x, *, size, **_):
    return ShapedArray((x.shape[0] // size, *x.shape[1:]), x.dtype, weak_type=x.weak_type)


# Params shared by the collectives: group (C++ handle), rank and size (static, for the shape
# and autodiff rules); reduce and vjp for all-reduce; dst/src and tag (0 for values, k for
# k-th order tangents) for point-to-point.
# all_reduce writes its result over its input: no extra buffer when the input is donated.
all_reduce_p = _primitive("mlxdist_all_reduce", _same, ("group", "reduce"),
                          operand_output_aliases={0: 0})
all_gather_p = _primitive("mlxdist_all_gather", _gathered, ("group",))
sum_scatter_p = _primitive("mlxdist_sum_scatter", _scattered, ("group",))
send_p = _primitive("mlxdist_send", _same, ("group", "dst", "tag"), operand_output_aliases={0: 0})
# recv's operand is a template (shape and dtype) so that vmap and autodiff can reach it.
recv_p = _primitive("mlxdist_recv", _same, ("group", "src", "tag"), operands=False)
barrier_p = _primitive("mlxdist_barrier", lambda **_: [], ("group",), multiple_results=True)

# Identity forward, all_sum of the cotangent backward (nn.sum_gradients). Pure: no effect.
grad_sum_p = Primitive("mlxdist_grad_sum")
grad_sum_p.def_impl(lambda x, **_: x)
grad_sum_p.def_abstract_eval(_same)
mlir.register_lowering(grad_sum_p, lambda ctx, x, **_: [x])
