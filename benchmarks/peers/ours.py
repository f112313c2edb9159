"""Rank script for jax_mlxdist: the ring backend, started by `python -m jax_mlxdist.launch -n N`,
or the MPI backend (BENCH_BACKEND=mpi), started by mpirun."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax_mlxdist as dist  # noqa: E402

from common import Control, control_port, serve  # noqa: E402
from jax_cases import JaxImpl  # noqa: E402

group = dist.init(strict=True, backend=os.environ.get("BENCH_BACKEND", "any"))
ctl = Control(control_port(), group.rank(), group.size())
ctl.hello()
right, left = (group.rank() + 1) % group.size(), (group.rank() - 1) % group.size()
ops = {"all_sum": dist.all_sum, "all_gather": dist.all_gather, "sum_scatter": dist.sum_scatter}
if hasattr(dist, "all_to_all"):  # builds before these ops ran as "ours-before"
    ops.update(all_to_all=dist.all_to_all, sendrecv=lambda x: dist.sendrecv(x, right, left))
if hasattr(dist, "broadcast"):
    ops.update(broadcast=lambda x: dist.broadcast(x, 0), gather=lambda x: dist.gather(x, 0))
serve(JaxImpl(group.rank(), group.size(), ops,
              barrier=dist.barrier,
              # BENCH_DISPATCH=eager: each op called eagerly; else one dist.jit program per op
              jit=None if os.environ.get("BENCH_DISPATCH") == "eager"
              else getattr(dist, "jit", jax.jit)),  # jax.jit for versions without dist.jit
      ctl)
group.close()
