"""Rank script for JAX's own CPU collectives: jax.distributed (gloo) + shard_map psum.

Rank 0 reserves the coordinator's port (port 0, SO_REUSEPORT, not listening; see
common.reserve_port) and publishes it through the control channel; the coordination service's
gRPC server binds the same port with SO_REUSEPORT, then the reservation is closed.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from common import Control, control_port, reserve_port, serve  # noqa: E402
from jax_cases import JaxImpl  # noqa: E402

rank, size = int(os.environ["BENCH_RANK"]), int(os.environ["BENCH_SIZE"])
ctl = Control(control_port(), rank, size)
reservation = reserve_port() if rank == 0 else None
published = ctl.hello(**({"port": reservation.getsockname()[1]} if reservation else {}))
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{published['port']}",
                           num_processes=size, process_id=rank)
if reservation:
    reservation.close()
assert jax.process_count() == size and len(jax.devices()) == size

mesh = jax.make_mesh((size,), ("i",), axis_types=(jax.sharding.AxisType.Auto,))
sharded = NamedSharding(mesh, P("i"))


def wrap(f, in_kinds, out_kinds):
    # check_vma=False: a fori_loop carry of psum results keeps one type (as check_rep=False did).
    return jax.shard_map(f, mesh=mesh, in_specs=tuple(P("i") for _ in in_kinds),
                         out_specs=tuple(P("i") for _ in out_kinds) if len(out_kinds) > 1 else P("i"),
                         check_vma=False)


def put(local):
    return jax.make_array_from_process_local_data(sharded, np.ascontiguousarray(local))


def get(arr):
    return np.asarray(arr.addressable_shards[0].data)


ops = {"all_sum": lambda x: lax.psum(x, "i"),
       "all_gather": lambda x: lax.all_gather(x, "i", tiled=True),
       "sum_scatter": lambda x: lax.psum_scatter(x, "i", scatter_dimension=0, tiled=True),
       "all_to_all": lambda x: lax.all_to_all(x, "i", 0, 0, tiled=True),
       "sendrecv": lambda x: lax.ppermute(x, "i", [(i, (i + 1) % size) for i in range(size)]),
       # JAX has no rooted collectives: its multihost_utils broadcast is a psum of root's values.
       "broadcast": lambda x: lax.psum(jnp.where(lax.axis_index("i") == 0, x, jnp.zeros_like(x)), "i")}
_tiny = jax.jit(wrap(ops["all_sum"], "s", "s"))
_one = put(np.zeros(1, np.float32))


def barrier():
    _tiny(_one).block_until_ready()


serve(JaxImpl(rank, size, ops, barrier, put=put, get=get, wrap=wrap), ctl)
jax.distributed.shutdown()
