"""Rank script for torch.distributed with the gloo backend (CPU tensors, in-place ops).

Rank 0 creates the TCPStore on port 0 (the OS picks a free port) and publishes the port through
the control channel; the other ranks connect to it.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from common import Control, Unsupported, control_port, serve  # noqa: E402

torch.set_num_threads(1)
rank, size = int(os.environ["BENCH_RANK"]), int(os.environ["BENCH_SIZE"])
ctl = Control(control_port(), rank, size)
store = None
if rank == 0:
    store = dist.TCPStore("127.0.0.1", 0, size, is_master=True, wait_for_workers=False)
published = ctl.hello(**({"port": store.port} if store else {}))
if store is None:
    store = dist.TCPStore("127.0.0.1", published["port"], size, is_master=False)
dist.init_process_group("gloo", store=store, rank=rank, world_size=size)


def _all_sum(x, out):
    dist.all_reduce(x)  # in place
    return x


def _unsupported(fn, *args):
    try:
        fn(*args)
    except (RuntimeError, NotImplementedError) as e:  # raised locally, before any traffic
        if "support" in str(e).lower():
            raise Unsupported(f"{fn.__name__}: {str(e).splitlines()[0]}") from e
        raise


def _all_gather(x, out):
    _unsupported(dist.all_gather_into_tensor, out, x)
    return out


def _sum_scatter(x, out):
    _unsupported(dist.reduce_scatter_tensor, out, x)
    return out


def _all_to_all(x, out):
    _unsupported(dist.all_to_all_single, out, x)
    return out


def _sendrecv(x, out):  # a ring pass, as torch's docs pair isend and irecv
    ops = [dist.P2POp(dist.isend, x, (rank + 1) % size), dist.P2POp(dist.irecv, out, (rank - 1) % size)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return out


def _broadcast(x, out):
    dist.broadcast(x, src=0)  # in place
    return x


def _gather(x, out):
    dist.gather(x, list(out.view(size, -1).unbind(0)) if rank == 0 else None, dst=0)
    return out if rank == 0 else x


OPS = {"all_sum": (_all_sum, lambda c: c), "all_gather": (_all_gather, lambda c: c * size),
       "sum_scatter": (_sum_scatter, lambda c: c // size), "all_to_all": (_all_to_all, lambda c: c),
       "sendrecv": (_sendrecv, lambda c: c), "broadcast": (_broadcast, lambda c: c),
       "gather": (_gather, lambda c: c * size)}


class Case:
    def __init__(self, op, count):
        self.f, nout = OPS[op]
        self.count, self.nout = count, nout(count)

    def run_check(self, x):
        return self.f(torch.from_numpy(x.copy()), torch.zeros(self.nout)).numpy()

    def prepare(self, iters):
        self.x, self.out = torch.zeros(self.count), torch.zeros(self.nout)
        self.run(2)

    def run(self, iters):
        for _ in range(iters):
            self.f(self.x, self.out)  # zeros stay zeros, so all_reduce in place is steady


class Impl:
    def __init__(self):
        self.rank, self.size = rank, size

    def barrier(self):
        dist.barrier()

    def case(self, op, count, mode):
        if mode == "batched":
            raise Unsupported("no batched form")
        return Case(op, count)


serve(Impl(), ctl)
dist.destroy_process_group()
