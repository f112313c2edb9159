"""JVP and transpose rules (README, "Autodiff semantics").

The collectives are linear; their tangents go through the same collective and their
transposes are the table's rules. Symbolic-zero cotangents are instantiated wherever the rule
communicates, so every rank takes part even where its cotangent happens to be zero.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.interpreters import ad

from jax_mlxdist import _primitives as P

SUM, MAX, MIN = P.REDUCE["sum"], P.REDUCE["max"], P.REDUCE["min"]


def _dense(t, aval=None):
    """A concrete cotangent/tangent: symbolic zeros become arrays of zeros."""
    return ad.instantiate_zeros(t)


def _all_reduce_jvp(primals, tangents, **params):
    (x,), (dx,) = primals, tangents
    y = P.all_reduce_p.bind(x, **params)
    reduce = params["reduce"]
    if reduce == SUM:
        return y, P.all_reduce_p.bind(_dense(dx), **params)
    if reduce in (MAX, MIN):
        # The gradient goes to one rank per element: the lowest rank holding the extreme.
        rank, size = params["rank"], params["size"]
        holder = jnp.where(x == y, jnp.int32(rank), jnp.int32(size))
        owner = P.all_reduce_p.bind(holder, **{**params, "reduce": MIN}) == rank
        own = jnp.where(owner, _dense(dx), jnp.zeros_like(y))
        return y, P.all_reduce_p.bind(own, **{**params, "reduce": SUM, "vjp": "identity"})
    raise NotImplementedError("all_prod is not differentiable")


def _all_reduce_transpose(ct, x, **params):
    assert params["reduce"] == SUM, "only sums are linear"
    if params["vjp"] == "identity":  # the output is one replicated value
        return [ct]
    return [P.all_reduce_p.bind(_dense(ct), **params)]  # exact: sum of per-rank cotangents


def _all_gather_transpose(ct, x, *, rank, **params):
    if type(ct) is ad.Zero:
        return [ad.Zero(x.aval)]
    if x.aval.ndim == 0:
        return [ct[rank]]
    m = x.aval.shape[0]
    return [lax.slice_in_dim(ct, rank * m, (rank + 1) * m, axis=0)]


def _sum_scatter_transpose(ct, x, **params):
    return [P.all_gather_p.bind(_dense(ct), **params)]


def _send_transpose(ct, x, *, group, dst, tag):
    # send returns x and hands x to dst: x's cotangent is its own plus the one dst sends back.
    ct = _dense(ct)
    return [ct + P.recv_p.bind(ct, group=group, src=dst, tag=tag)]


def _recv_transpose(ct, template, *, group, src, tag):
    P.send_p.bind(_dense(ct), group=group, dst=src, tag=tag)  # kept alive by the ordered effect
    return [ad.Zero(template.aval) if ad.is_undefined_primal(template) else None]


def _same_on_tangent(prim):
    """JVP of a linear op: the op itself on the (instantiated) tangent. Point-to-point tangents
    carry a higher tag, so a tangent can never be taken for a value by a recv."""
    def jvp(primals, tangents, **params):
        tangent_params = {**params, "tag": params["tag"] + 1} if "tag" in params else params
        return prim.bind(*primals, **params), prim.bind(*map(_dense, tangents), **tangent_params)
    return jvp


def _grad_sum_transpose(ct, x, *, group, rank, size):
    return [P.all_reduce_p.bind(_dense(ct), group=group, reduce=SUM, vjp="identity",
                                rank=rank, size=size)]


ad.primitive_jvps[P.all_reduce_p] = _all_reduce_jvp
ad.primitive_transposes[P.all_reduce_p] = _all_reduce_transpose
for _prim, _transpose in ((P.all_gather_p, _all_gather_transpose),
                          (P.sum_scatter_p, _sum_scatter_transpose),
                          (P.send_p, _send_transpose),
                          (P.recv_p, _recv_transpose),
                          (P.grad_sum_p, _grad_sum_transpose)):
    ad.primitive_jvps[_prim] = _same_on_tangent(_prim)
    ad.primitive_transposes[_prim] = _transpose
