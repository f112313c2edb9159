"""vmap rules. The batch axis may sit anywhere; all_gather and sum_scatter work on the
unbatched axis 0, so a batch axis in front is moved behind it first."""

from __future__ import annotations

import jax.numpy as jnp
from jax.interpreters import batching

from jax_mlxdist import _primitives as P


def _elementwise(prim):
    def rule(args, dims, **params):
        return prim.bind(*args, **params), dims[0]
    return rule


def _along_axis0(prim):
    def rule(args, dims, **params):
        (x,), (d,) = args, dims
        if x.ndim == 1:  # unbatched scalars: gather them as a (1, batch) block
            x, d = x[None, :], 1
        elif d == 0:
            x, d = jnp.moveaxis(x, 0, 1), 1
        return prim.bind(x, **params), d
    return rule


for _prim in (P.all_reduce_p, P.send_p, P.recv_p, P.grad_sum_p):
    batching.primitive_batchers[_prim] = _elementwise(_prim)
for _prim in (P.all_gather_p, P.sum_scatter_p):
    batching.primitive_batchers[_prim] = _along_axis0(_prim)
