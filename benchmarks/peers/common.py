"""The rank side shared by every implementation: the control channel, inputs, checks, timing.

Each peer's rank script (ours.py, mlx_ring.py, torch_gloo.py, jax_gloo.py, mpi4jax_rank.py)
runs in that peer's own venv, so this module needs nothing but the standard library and numpy.

A rank connects to the orchestrator (compare.py) on 127.0.0.1:<port>, says hello, and then
serves one JSON command per line: {"cmd": "measure", "op", "count", "mode", "iters",
"batches"} or {"cmd": "quit"}. Between commands a rank blocks in recv on that socket, so the
implementations that are not being measured use no CPU.

An implementation provides `barrier()` and `case(op, count, mode)`, which returns an object
with `run_check(x)` (one op, or for mode "batched" a chain of CHECK_CHAIN dependent ops, on
this rank's input; returns this rank's result as numpy), `prepare(iters)` (timing buffers,
compilation, warm-up) and `run(iters)` (iters dependent ops: single calls in a loop, or one batched program; returns
once the last result is ready). It raises Unsupported for what the peer does not have.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import time
import traceback

import numpy as np

CHECK_CHAIN = 3  # dependent all_sums in the batched correctness check


class Unsupported(Exception):
    """The peer has no such operation or mode."""


def rank_input(rank: int, count: int) -> np.ndarray:
    """Rank r's check input: small integers (exact in float32 sums), different per rank."""
    return ((rank + 1) + (np.arange(count) % 5)).astype(np.float32)


def expected(op: str, mode: str, rank: int, size: int, count: int) -> np.ndarray:
    inputs = [rank_input(r, count) for r in range(size)]
    total = np.sum(inputs, axis=0, dtype=np.float64).astype(np.float32)
    if op == "all_sum":
        if mode == "batched":
            return (total * float(size) ** (CHECK_CHAIN - 1)).astype(np.float32)
        return total
    if op == "all_gather":
        return np.concatenate(inputs)
    if op == "sum_scatter":
        block = count // size
        return total[rank * block:(rank + 1) * block]
    if op == "all_to_all":  # block `rank` of every rank's input, in rank order
        block = count // size
        return np.concatenate([x[rank * block:(rank + 1) * block] for x in inputs])
    if op == "sendrecv":  # a ring pass: the previous rank's input
        return inputs[(rank - 1) % size]
    if op == "broadcast":  # root 0's input
        return inputs[0]
    if op == "gather":  # at root 0 every input in rank order; elsewhere the rank's own
        return np.concatenate(inputs) if rank == 0 else inputs[rank]
    raise ValueError(op)


def reserve_port() -> socket.socket:
    """A socket bound to a free port with SO_REUSEPORT and not listening.

    While it is held no other user's socket can take the port, but a program of ours that binds
    the same port with SO_REUSEPORT (gRPC does by default, MLX's ring does) can, and since the
    reservation never listens, every connection goes to that program. Close it once the program
    has bound."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", 0))
    return s


class Control:
    def __init__(self, port: int, rank: int, size: int):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.file = self.sock.makefile("rwb")
        self.rank, self.size = rank, size

    def send(self, obj) -> None:
        self.file.write((json.dumps(obj) + "\n").encode())
        self.file.flush()

    def recv(self):
        line = self.file.readline()
        if not line:
            raise SystemExit("control channel closed")
        return json.loads(line)

    def hello(self, **extra) -> dict:
        """Says hello and returns what rank 0 published in its hello (ports, say)."""
        self.send({"hello": self.rank, "size": self.size, "pid": os.getpid(), **extra})
        return self.recv()


def control_port() -> int:
    for i, a in enumerate(sys.argv):
        if a == "--control":
            return int(sys.argv[i + 1])
    raise SystemExit("usage: <rank script> --control PORT")


def measure(impl, cmd: dict) -> dict:
    try:
        return _measure(impl, cmd)
    except Unsupported as e:
        return {"unsupported": str(e)}


def _measure(impl, cmd: dict) -> dict:
    op, count, mode = cmd["op"], cmd["count"], cmd["mode"]
    case = impl.case(op, count, mode)
    errors = []

    def check(when: str) -> None:
        got = np.asarray(case.run_check(rank_input(impl.rank, count))).reshape(-1)
        want = expected(op, mode, impl.rank, impl.size, count)
        if got.shape != want.shape:
            errors.append(f"{when}: shape {got.shape}, expected {want.shape}")
        elif not np.array_equal(got, want):
            bad = int(np.argmax(got != want))
            errors.append(f"{when}: element {bad} is {got[bad]}, expected {want[bad]} "
                          f"({int(np.sum(got != want))} of {want.size} differ)")

    try:
        check("before timing")
    except Exception as e:  # e.g. MLX: "[ring] sum_scatter not supported." (on every rank)
        if "not supported" in str(e).lower():
            raise Unsupported(str(e).splitlines()[0]) from e
        raise
    case.prepare(cmd["iters"])
    times = []
    for _ in range(cmd["batches"]):
        impl.barrier()
        t = time.perf_counter()
        case.run(cmd["iters"])
        times.append((time.perf_counter() - t) / cmd["iters"])
    check("after timing")
    del case
    return {"median": statistics.median(times), "min": min(times), "max": max(times),
            "errors": errors}


def serve(impl, ctl: Control) -> None:
    """Answers the orchestrator's commands until it says quit."""
    ctl.send({"ready": impl.rank})
    while True:
        cmd = ctl.recv()
        if cmd["cmd"] == "quit":
            ctl.send({"bye": impl.rank})
            return
        try:
            reply = measure(impl, cmd)
        except Exception as e:  # report, keep serving: the orchestrator decides what to do
            reply = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        ctl.send(reply)
