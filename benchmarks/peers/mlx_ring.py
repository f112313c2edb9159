"""Rank script for MLX's ring backend (mlx[cpu]), started with MLX_RANK + MLX_HOSTFILE.

single:  one op and one mx.eval per iteration.
batched: one mx.eval of a chained graph of K dependent all_sums; time / K.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from common import CHECK_CHAIN, Control, Unsupported, control_port, serve  # noqa: E402

group = mx.distributed.init(strict=True, backend="ring")
rank, size = group.rank(), group.size()
ctl = Control(control_port(), rank, size)
ctl.hello()

OPS = {"all_sum": mx.distributed.all_sum, "all_gather": mx.distributed.all_gather,
       "sum_scatter": mx.distributed.sum_scatter}


class Case:
    def __init__(self, op, count, mode):
        self.f, self.count, self.mode = OPS[op], count, mode

    def _chain(self, x, k):
        for _ in range(k):
            x = self.f(x)
        return x

    def run_check(self, x):
        y = self._chain(mx.array(x), CHECK_CHAIN) if self.mode == "batched" else self.f(mx.array(x))
        mx.eval(y)
        return np.array(y)

    def prepare(self, iters):
        self.x = mx.zeros((self.count,), dtype=mx.float32)
        mx.eval(self.x)
        self.run(2 if self.mode == "single" else iters)

    def run(self, iters):
        if self.mode == "batched":
            mx.eval(self._chain(self.x, iters))
            return
        for _ in range(iters):
            mx.eval(self.f(self.x))


class Impl:
    def __init__(self):
        self.rank, self.size = rank, size
        self._one = mx.zeros((1,), dtype=mx.float32)

    def barrier(self):
        mx.eval(mx.distributed.all_sum(self._one))

    def case(self, op, count, mode):
        if op not in OPS:
            raise Unsupported(f"MLX has no {op}")
        if mode == "batched" and op != "all_sum":
            raise Unsupported("batched form only for all_sum")
        return Case(op, count, mode)


serve(Impl(), ctl)
