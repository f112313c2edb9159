"""jax_mlxdist: MLX's distributed collectives as JAX primitives, over our own C++ backends."""

import jax  # noqa: F401  (before our extension: some environments crash in ml_dtypes otherwise)

try:
    from jax_mlxdist import _C  # noqa: F401
except ImportError as e:  # a source checkout shadowing the installed package
    raise ImportError(
        "jax_mlxdist's compiled extension is missing here: this looks like a source checkout "
        "that shadows the installed package. Run from outside the checkout, or run tests with "
        "`pytest` rather than `python -m pytest` (which puts the current directory first on "
        "sys.path), or install in place with `pip install -e .`.") from e

from jax_mlxdist._dispatch import jit
from jax_mlxdist._errors import DistributedError, is_distributed_error
from jax_mlxdist._group import Group, init, is_available
from jax_mlxdist._ops import (
    all_gather,
    all_max,
    all_min,
    all_prod,
    all_sum,
    barrier,
    recv,
    recv_like,
    send,
    sum_scatter,
)

__all__ = [
    "DistributedError", "Group", "all_gather", "all_max", "all_min", "all_prod", "all_sum",
    "barrier", "init", "is_available", "is_distributed_error", "jit", "recv", "recv_like", "send",
    "sum_scatter",
]
__version__ = "0.1.0"

# Autodiff and vmap rules register themselves on the primitives.
from jax_mlxdist import _autodiff, _batching  # noqa: E402,F401
