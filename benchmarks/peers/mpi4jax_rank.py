"""Rank script for mpi4jax over Open MPI, started by mpirun (TCP or shared-memory BTL)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mpi4py import MPI  # noqa: E402
import mpi4jax  # noqa: E402

from common import Control, control_port, serve  # noqa: E402
from jax_cases import JaxImpl  # noqa: E402

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()


def _first(r):  # older mpi4jax returned (result, token)
    return r[0] if isinstance(r, tuple) else r


right, left = (rank + 1) % size, (rank - 1) % size
ops = {"all_sum": lambda x: _first(mpi4jax.allreduce(x, op=MPI.SUM, comm=comm)),
       "all_gather": lambda x: _first(mpi4jax.allgather(x, comm=comm)).reshape(-1),
       "all_to_all": lambda x: _first(mpi4jax.alltoall(x.reshape(size, -1), comm=comm)).reshape(-1),
       "sendrecv": lambda x: _first(mpi4jax.sendrecv(x, x, source=left, dest=right, comm=comm)),
       "broadcast": lambda x: _first(mpi4jax.bcast(x, 0, comm=comm)),
       # at root (nproc, n) flattened; elsewhere the input back
       "gather": lambda x: _first(mpi4jax.gather(x, 0, comm=comm)).reshape(-1)}
# mpi4jax has no reduce_scatter: sum_scatter is reported as unsupported.

ctl = Control(control_port(), rank, size)
ctl.hello()
serve(JaxImpl(rank, size, ops, barrier=comm.Barrier), ctl)
