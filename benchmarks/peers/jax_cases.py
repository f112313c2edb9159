"""Jitted steady-state cases for the JAX-based implementations (ours, JAX gloo, mpi4jax).

single:  one jitted call per iteration. step(x, y) -> (x, op(x)), both arguments donated, so
         every call depends on the previous call's result (calls cannot overlap) and x comes
         back aliased, without a copy. The timing input is zeros.
batched: one jitted fori_loop of K dependent all_sums (dispatch paid once); time / K.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from common import CHECK_CHAIN, Unsupported


def out_count(op: str, count: int, size: int) -> int:
    return {"all_sum": count, "all_gather": count * size, "sum_scatter": count // size,
            "all_to_all": count, "sendrecv": count, "broadcast": count, "gather": count * size}[op]


class JaxImpl:
    """ops: op name -> function of this rank's block (inside `wrap`).

    wrap(f, in_kinds, out_kinds) turns a per-rank function into what is jitted (identity for the
    one-process-per-rank libraries, shard_map for JAX's own collectives); kinds are "s" for a
    per-rank block. put(np) / get(array) move this rank's block in and out. jit compiles the
    single-call step (None: the op is called eagerly)."""

    def __init__(self, rank, size, ops, barrier, put=jnp.asarray, get=np.asarray,
                 wrap=lambda f, i, o: f, jit=jax.jit):
        self.rank, self.size, self.jit = rank, size, jit
        self.ops, self.barrier, self.put, self.get, self.wrap = ops, barrier, put, get, wrap
        self._steps, self._loops = {}, {}

    def step(self, op):
        if op not in self._steps:
            f = self.ops[op]

            def step(x, y):
                x, y = lax.optimization_barrier((x, y))
                return x, f(x)

            if self.jit is None:  # eager: the op alone, called on x
                self._steps[op] = lambda x, y: (x, f(x))
            else:
                self._steps[op] = self.jit(self.wrap(step, "ss", "ss"), donate_argnums=(0, 1))
        return self._steps[op]

    def loop(self, k):
        if k not in self._loops:
            f = self.ops["all_sum"]
            self._loops[k] = jax.jit(self.wrap(
                lambda x: lax.fori_loop(0, k, lambda i, c: f(c), x), "s", "s"))
        return self._loops[k]

    def case(self, op, count, mode):
        if op not in self.ops:
            raise Unsupported(f"no {op}")
        if mode == "batched":
            if op != "all_sum":
                raise Unsupported("batched form only for all_sum")
            return _Batched(self, count)
        return _Single(self, op, count)


class _Single:
    def __init__(self, impl, op, count):
        self.impl, self.count = impl, count
        self.nout = out_count(op, count, impl.size)
        self.fn = impl.step(op)

    def run_check(self, x):
        _, y = self.fn(self.impl.put(x), self.impl.put(np.zeros(self.nout, np.float32)))
        return self.impl.get(y)

    def prepare(self, iters):
        self.x = self.impl.put(np.zeros(self.count, np.float32))
        self.y = self.impl.put(np.zeros(self.nout, np.float32))
        self.run(2)

    def run(self, iters):
        x, y = self.x, self.y
        for _ in range(iters):
            x, y = self.fn(x, y)
        y.block_until_ready()
        self.x, self.y = x, y


class _Batched:
    def __init__(self, impl, count):
        self.impl, self.count = impl, count

    def run_check(self, x):
        return self.impl.get(self.impl.loop(CHECK_CHAIN)(self.impl.put(x)))

    def prepare(self, iters):
        self.x = self.impl.put(np.zeros(self.count, np.float32))
        self.run(iters)

    def run(self, iters):
        self.impl.loop(iters)(self.x).block_until_ready()
