"""jax_mlxdist: MLX's distributed collectives as JAX primitives, over our own C++ backends."""

import jax  # noqa: F401  (before our extension: some environments crash in ml_dtypes otherwise)

try:
    from jax_mlxdist import _C  # noqa: F401
except ImportError as e:  # the sources on sys.path (PYTHONPATH=src, say) rather than a build
    raise ImportError(
        "jax_mlxdist's compiled extension is missing: this copy of the package was not built. "
        "Install it (`pip install .`, or `pip install -e .` to work on it) and import the "
        "installed package.") from e

from jax_mlxdist._dispatch import jit
from jax_mlxdist._errors import (
    DistributedError,
    DistributedTypeError,
    DistributedValueError,
    is_distributed_error,
)
from jax_mlxdist._group import Group, init, is_available
from jax_mlxdist._observe import dump_flight_recorder
from jax_mlxdist._objects import all_gather_object, broadcast_object, recv_object, send_object
from jax_mlxdist._ops import (
    all_gather,
    all_max,
    all_mean,
    all_min,
    all_prod,
    all_reduce,
    all_sum,
    all_to_all,
    barrier,
    broadcast,
    gather,
    recv,
    recv_like,
    reduce,
    scatter,
    send,
    sendrecv,
    sum_scatter,
)

__all__ = [
    "DistributedError", "DistributedTypeError", "DistributedValueError", "Group", "all_gather", "all_gather_object", "all_max", "all_mean", "all_min",
    "all_prod", "all_reduce", "all_sum", "all_to_all", "barrier", "broadcast", "broadcast_object", "dump_flight_recorder", "gather", "init",
    "is_available", "is_distributed_error", "jit", "recv", "recv_like", "recv_object", "reduce",
    "scatter", "send", "send_object", "sendrecv", "sum_scatter",
]
__version__ = "0.1.0"
