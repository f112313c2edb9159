"""Gradient helpers."""

from __future__ import annotations

from collections.abc import Callable

from jax_mlxdist import _primitives as P
from jax_mlxdist._group import Group, resolve
from jax_mlxdist._ops import _array


def sum_gradients(group: Group | None = None) -> Callable:
    """A function that is the identity forward and all_sums the cotangent backward (as MLX).

    Put it where a replicated input enters a sharded computation (the first layer of a
    tensor-parallel block): each rank's partial gradient of the input is then summed.
    """
    g = resolve(group, "sum_gradients")

    def f(x):
        x = _array(x, "sum_gradients")
        if g.size() == 1:
            return x
        return P.grad_sum_p.bind(x, group=g._handle, rank=g.rank(), size=g.size())

    return f
