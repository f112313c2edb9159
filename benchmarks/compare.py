"""Side-by-side benchmark: jax_mlxdist's collectives against the CPU peers, in one run.

    python benchmarks/compare.py --setup                    # once: .bench-venvs/<peer>
    python benchmarks/compare.py                            # n = 2, 4 B .. 64 MiB
    python benchmarks/compare.py -n 2 4 --sizes 4 64K 1M --plot out.png --json out.json

Implementations (--impls): ours (jax_mlxdist ring, this interpreter, one dist.jit program per
call), ours-eager (the same op called eagerly: no jit), ours-norecorder and
ours-eager-norecorder (the same with MLXDIST_FLIGHT_RECORDER=0: what the recorder costs), ours-tokens (dist.jit, but with
MLXDIST_RUNTIME_TOKENS=1: JAX's runtime token per call, as before the fast dispatch), ours-jaccl (our JACCL
backend; over shared memory here, the ranks sharing the host), ours-jaccl-ring (its ring
variant, MLX_JACCL_RING=1), ours-mpi-tcp and
ours-mpi-shm (jax_mlxdist's MPI backend over the same Open MPI as mpi4jax), mlx (MLX ring 0.32.4,
MLX_RANK + MLX_HOSTFILE, our own small launcher), torch (torch 2.13.0 gloo), jax (JAX 0.10.2's
own CPU collectives: jax.distributed + shard_map, gloo), mpi4jax-tcp and mpi4jax-shm (mpi4jax
0.9.1.post2 over Open MPI, TCP BTL or shared-memory BTL, started by mpirun), ours-mpich and
mpi4jax-mpich (both over the MPICH from PyPI in the mpi4jax-mpich venv, started by its mpirun). Every peer runs in
its own venv made by --setup.

Method. For each n, every implementation's ranks are started once and stay up; each rank
blocks on a control socket between measurements (no CPU used while another implementation is
measured). Then, for each pass (two by default), op, size and mode, the implementations are
measured one after the other (A B A B: alternated per size, same order each pass). Each
measurement first checks one call on rank-dependent data against the exact expected result
(again after timing), then times `batches` batches of `iters` dependent ops after a barrier;
a rank's time is the median of its batches, and the table shows the slower rank's.

Modes: single, one op per iteration (jitted steady state for the JAX-based ones: one jitted call
per op, chained through its result); batched (all_sum at the smallest size): MLX one eval of a
chained graph of K all_sums, JAX / mpi4jax / ours one jitted fori_loop of K all_sums; time / K.

Sizes are per-rank input bytes (all_gather outputs n times that; sum_scatter's input is rounded
up to a multiple of 4n bytes, as is all_to_all's). sendrecv: every rank sends its input to the
next rank and receives the previous rank's (a ring pass). Bus bandwidth: all_sum 2(n-1)/n x
bytes / time, all_gather (n-1)/n x output bytes / time, sum_scatter and all_to_all (n-1)/n x
input bytes / time, sendrecv bytes / time. broadcast and gather use root 0 (gather's
result is checked at the root; elsewhere each rank's own input); their bus bandwidth is
bytes / time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PEERS = os.path.join(HERE, "peers")
ROOT = os.path.dirname(HERE)
sys.path.insert(0, PEERS)

from common import reserve_port  # noqa: E402
from setup import setup, venv_python  # noqa: E402

OPS = ["all_sum", "all_gather", "sum_scatter", "all_to_all", "sendrecv", "broadcast", "gather"]
START_TIMEOUT = 240.0

MPI_TCP = ["--mca", "pml", "ob1", "--mca", "btl", "tcp,self", "--mca", "btl_tcp_if_include", "lo"]
MPI_SHM = ["--mca", "pml", "ob1", "--mca", "btl", "vader,self"]

# name -> label, venv (None: this interpreter), rank script, how ranks are started
IMPLS = {
    "ours": dict(label="ours", venv=None, script="ours.py", start="ours"),
    # Another build of ours side by side (a refactor's before/after): BENCH_BEFORE is the
    # directory it was installed into (pip install --target DIR), put first on its PYTHONPATH.
    "ours-before": dict(label="ours, the earlier build", venv=None, script="ours.py",
                        start="ours", pythonpath="BENCH_BEFORE"),
    "ours-eager": dict(label="ours eager", venv=None, script="ours.py", start="ours",
                       env={"BENCH_DISPATCH": "eager"}),
    # The flight recorder off (it is on by default): what recording costs, side by side.
    "ours-norecorder": dict(label="ours, flight recorder off", venv=None, script="ours.py",
                            start="ours", env={"MLXDIST_FLIGHT_RECORDER": "0"}),
    "ours-eager-norecorder": dict(label="ours eager, flight recorder off", venv=None, script="ours.py",
                                  start="ours", env={"BENCH_DISPATCH": "eager", "MLXDIST_FLIGHT_RECORDER": "0"}),
    "ours-tokens": dict(label="ours, JAX's runtime tokens", venv=None, script="ours.py",
                        start="ours", env={"MLXDIST_RUNTIME_TOKENS": "1"}),
    "ours-jaccl": dict(label="ours JACCL", venv=None, script="ours.py", start="ours",
                       env={"BENCH_BACKEND": "jaccl"}),
    "ours-jaccl-ring": dict(label="ours JACCL ring", venv=None, script="ours.py", start="ours",
                            env={"BENCH_BACKEND": "jaccl", "MLX_JACCL_RING": "1"}),
    "mlx": dict(label="MLX ring", venv="mlx", script="mlx_ring.py", start="mlx"),
    "torch": dict(label="torch gloo", venv="torch", script="torch_gloo.py", start="plain"),
    "jax": dict(label="JAX gloo", venv="jax", script="jax_gloo.py", start="plain"),
    "ours-mpi-tcp": dict(label="ours MPI TCP", venv=None, script="ours.py", start="mpi",
                         mca=MPI_TCP, env={"BENCH_BACKEND": "mpi"}),
    "ours-mpi-shm": dict(label="ours MPI shm", venv=None, script="ours.py", start="mpi",
                         mca=MPI_SHM, env={"BENCH_BACKEND": "mpi"}),
    "mpi4jax-tcp": dict(label="mpi4jax TCP", venv="mpi4jax", script="mpi4jax_rank.py",
                        start="mpi", mca=MPI_TCP),
    "mpi4jax-shm": dict(label="mpi4jax shm", venv="mpi4jax", script="mpi4jax_rank.py",
                        start="mpi", mca=MPI_SHM),
    # MPICH from PyPI (the MPICH ABI), in the mpi4jax-mpich venv; ours loads its libmpi.
    "ours-mpich": dict(label="ours MPI (MPICH)", venv=None, script="ours.py", start="mpi",
                       mpich=True, env={"BENCH_BACKEND": "mpi"}),
    "mpi4jax-mpich": dict(label="mpi4jax (MPICH)", venv="mpi4jax-mpich", script="mpi4jax_rank.py",
                          start="mpi", mpich=True),
}
VERSIONS = "ours: jax_mlxdist as installed ({checkout}), MLX ring: mlx[cpu] 0.32.4, torch gloo: torch 2.13.0+cpu, " \
           "JAX gloo: jax 0.10.2, mpi4jax: mpi4jax 0.9.1.post2 + mpi4py 4.1.2 + Open MPI (or MPICH " \
           "from PyPI)"


# ---------------------------------------------------------------------------------------------
# Rank groups


class GroupFailed(RuntimeError):
    pass


class Group:
    """One implementation's n ranks, driven over a control socket each."""

    def __init__(self, name: str, n: int, logdir: str):
        self.name, self.n, self.spec = name, n, IMPLS[name]
        self.log = os.path.join(logdir, f"{name}-n{n}.log")
        self.procs: list[subprocess.Popen] = []
        self.conns: dict[int, tuple[socket.socket, object]] = {}
        self.dead: str | None = None
        self._start()

    def _python(self) -> str:
        venv = self.spec["venv"]
        if venv is None:
            return sys.executable
        py = venv_python(venv)
        if not os.path.exists(py):
            raise GroupFailed(f"{py} is missing: run `python benchmarks/compare.py --setup`")
        return py

    def _start(self) -> None:
        py, script = self._python(), os.path.join(PEERS, self.spec["script"])
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))  # port 0: the OS picks; passed on to the ranks
        listener.listen(self.n)
        ctl = ["--control", str(listener.getsockname()[1])]
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": "",
               "PYTHONUNBUFFERED": "1", "GLOO_SOCKET_IFNAME": "lo"}
        if self.name == "torch":
            env["OMP_NUM_THREADS"] = "1"
        env.update(self.spec.get("env", {}))
        if "pythonpath" in self.spec:
            where = os.environ.get(self.spec["pythonpath"], "")
            if not where:
                raise GroupFailed(f"{self.name} needs {self.spec['pythonpath']}: the directory "
                                  "that build was installed into")
            env["PYTHONPATH"] = where + os.pathsep + env.get("PYTHONPATH", "")
        out = open(self.log, "wb")
        reservations: list[socket.socket] = []
        hostfile = None
        start = self.spec["start"]
        try:
            if start == "ours":
                # Our launcher binds every rank's listening sockets on port 0 before starting
                # them and hands the sockets down (race-free; src/jax_mlxdist/launch/local.py).
                self._popen([py, "-m", "jax_mlxdist.launch", "-n", str(self.n), "--no-prefix",
                             script, *ctl], env, out)
            elif start == "mlx":
                # MLX binds its hostfile ports itself, so they cannot be handed down as ours are.
                # The plain way is bind-port-0, close, then let MLX bind it (a small race). MLX's
                # ring sets SO_REUSEPORT on its listening sockets, so we do better: hold each
                # port bound with SO_REUSEPORT (never listening, so no connection can land on
                # it) until every rank is up; no other user can take the port meanwhile.
                reservations = [reserve_port() for _ in range(self.n)]
                fd, hostfile = tempfile.mkstemp(prefix="bench-mlx-hosts-", suffix=".json")
                with os.fdopen(fd, "w") as f:
                    json.dump([[f"127.0.0.1:{s.getsockname()[1]}"] for s in reservations], f)
                for r in range(self.n):
                    self._popen([py, script, *ctl], {**env, "MLX_RANK": str(r),
                                                     "MLX_HOSTFILE": hostfile}, out)
            elif start == "plain":
                for r in range(self.n):
                    self._popen([py, script, *ctl], {**env, "BENCH_RANK": str(r),
                                                     "BENCH_SIZE": str(self.n)}, out)
            elif start == "mpi" and self.spec.get("mpich"):
                # MPICH's mpirun (Hydra) from the mpi4jax-mpich venv, first on PATH so that our
                # ranks load its libmpi too (the libmpi beside the mpirun on PATH).
                bin_dir = os.path.dirname(venv_python("mpi4jax-mpich"))
                if not os.path.exists(os.path.join(bin_dir, "mpirun")):
                    raise GroupFailed("MPICH not found: run `python benchmarks/compare.py --setup "
                                      "mpi4jax-mpich`")
                env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
                self._popen([os.path.join(bin_dir, "mpirun"), "-np", str(self.n), py, script, *ctl],
                            env, out)
            elif start == "mpi":
                if not shutil.which("mpirun"):
                    raise GroupFailed("mpirun not found: run `python benchmarks/compare.py --setup`")
                # Open MPI picks its own ports.
                self._popen(["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(self.n),
                             *self.spec["mca"], py, script, *ctl], env, out)
            self._accept(listener)
        except Exception:
            self.close(kill=True)
            raise
        finally:
            listener.close()
            for s in reservations:
                s.close()
            if hostfile:  # read by every rank during init, before it says hello
                os.unlink(hostfile)
            out.close()

    def _popen(self, cmd, env, out) -> None:
        self.procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, cwd=ROOT,
                                           start_new_session=True))

    def _accept(self, listener: socket.socket) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        hellos = {}
        while len(self.conns) < self.n:
            self._check_alive()
            listener.settimeout(max(0.1, min(1.0, deadline - time.monotonic())))
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                if time.monotonic() > deadline:
                    raise GroupFailed(f"{self.name}: ranks did not start in {START_TIMEOUT:.0f} s")
                continue
            conn.settimeout(START_TIMEOUT)
            f = conn.makefile("rwb")
            hello = json.loads(f.readline())
            self.conns[hello["hello"]] = (conn, f)
            hellos[hello["hello"]] = hello
        for r in range(self.n):  # what rank 0 published (a port), to every rank
            self._send(r, hellos[0])
        for r in range(self.n):
            self._recv(r, START_TIMEOUT)  # "ready": the library is initialised

    def _check_alive(self) -> None:
        for p in self.procs:
            if p.poll() is not None and p.returncode != 0:
                raise GroupFailed(f"{self.name}: a rank process exited with code {p.returncode}\n"
                                  + self.log_tail())

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def _send(self, r: int, obj) -> None:
        f = self.conns[r][1]
        f.write((json.dumps(obj) + "\n").encode())
        f.flush()

    def _recv(self, r: int, timeout: float):
        conn, f = self.conns[r]
        conn.settimeout(timeout)
        line = f.readline()
        if not line:
            raise GroupFailed(f"{self.name}: rank {r} closed its control channel\n" + self.log_tail())
        return json.loads(line)

    def request(self, cmd: dict, timeout: float) -> list[dict]:
        for r in range(self.n):
            self._send(r, cmd)
        try:
            return [self._recv(r, timeout) for r in range(self.n)]
        except (socket.timeout, TimeoutError) as e:
            raise GroupFailed(f"{self.name}: no answer in {timeout:.0f} s") from e

    def close(self, kill: bool = False) -> None:
        if not kill and self.conns:
            try:
                for r in range(self.n):
                    self._send(r, {"cmd": "quit"})
                for r in range(self.n):
                    self._recv(r, 30)
            except Exception:
                kill = True
        for _, f in self.conns.values():
            try:
                f.close()
            except OSError:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=0.5 if kill else 30)
            except subprocess.TimeoutExpired:
                pass
            if p.poll() is None:
                try:
                    os.killpg(p.pid, 9)
                except ProcessLookupError:
                    pass
                p.wait()


# ---------------------------------------------------------------------------------------------
# Schedule


def parse_size(s: str) -> int:
    s = s.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:], 1)
    return int(float(s[:-1] if mult > 1 else s) * mult)


def fmt_size(b: int) -> str:
    for unit, k in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if b >= 1 << k and b % (1 << k) == 0:
            return f"{b >> k} {unit}"
    return f"{b} B"


def count_for(op: str, nbytes: int, n: int) -> int:
    count = max(1, nbytes // 4)
    if op in ("sum_scatter", "all_to_all"):
        count = -(-count // n) * n
    return count


def schedule(op: str, count: int, n: int, scale: float) -> tuple[int, int]:
    """(iters per batch, batches): fewer iterations for large messages."""
    moved = 4 * count * (n if op in ("all_gather", "gather") else 1)
    iters = int(max(1, min(200, (8 << 20) * scale // moved)))
    batches = 7 if moved <= 1 << 20 else (5 if moved <= 16 << 20 else 3)
    return iters, batches


def bus_bytes(op: str, count: int, n: int) -> float:
    b = 4 * count
    return {"all_sum": 2 * (n - 1) / n * b, "all_gather": (n - 1) * b,
            "sum_scatter": (n - 1) / n * b, "all_to_all": (n - 1) / n * b, "sendrecv": b,
            "broadcast": b, "gather": b}[op]


# ---------------------------------------------------------------------------------------------
# Run


def run_n(n: int, args, results: list[dict], log) -> None:
    groups: dict[str, Group] = {}
    for name in args.impls:
        t = time.monotonic()
        try:
            groups[name] = Group(name, n, args.logdir)
            log(f"n={n}: {name} up in {time.monotonic() - t:.1f} s")
        except GroupFailed as e:
            log(f"n={n}: {name} did not start: {e}")
            results.append(dict(n=n, impl=name, error=f"did not start: {str(e).splitlines()[0]}"))
    unsupported: set[tuple[str, str, str]] = set()
    try:
        for p in range(1, args.passes + 1):
            for op in args.ops:
                for nbytes in args.sizes:
                    count = count_for(op, nbytes, n)
                    modes = ["single"] + (["batched"] if op == "all_sum" and nbytes in args.batched_sizes else [])
                    for mode in modes:
                        iters, batches = schedule(op, count, n, args.iters_scale)
                        if mode == "batched":
                            iters, batches = args.batch_k, 5
                        for name, g in groups.items():  # A B A B: alternate per size
                            if g.dead or (name, op, mode) in unsupported:
                                continue
                            row = dict(n=n, impl=name, op=op, nbytes=nbytes, count=count,
                                       mode=mode, pass_=p, iters=iters, batches=batches)
                            cmd = dict(cmd="measure", op=op, count=count, mode=mode,
                                       iters=iters, batches=batches)
                            t = time.monotonic()
                            try:
                                replies = g.request(cmd, timeout=args.timeout)
                            except GroupFailed as e:
                                g.dead = str(e)
                                log(f"  {name} failed and was stopped: {e}")
                                g.close(kill=True)
                                results.append({**row, "error": str(e).splitlines()[0]})
                                continue
                            if any("unsupported" in r for r in replies):
                                unsupported.add((name, op, mode))
                                reason = next(r["unsupported"] for r in replies if "unsupported" in r)
                                results.append({**row, "unsupported": reason})
                                continue
                            errs = [f"rank {r}: {x['error']}" for r, x in enumerate(replies) if "error" in x]
                            errs += [f"rank {r}: {e}" for r, x in enumerate(replies)
                                     for e in x.get("errors", [])]
                            if any("error" in x for x in replies):
                                results.append({**row, "error": "; ".join(errs)})
                                log(f"  {name} {op} {fmt_size(4 * count)} {mode}: ERROR {errs[0]}")
                                if len([x for x in replies if "error" in x]) < n:
                                    g.dead = "a rank failed alone"  # the others may be stuck
                                    g.close(kill=True)
                                continue
                            worst = max(x["median"] for x in replies)
                            results.append({**row, "time": worst, "per_rank": [x["median"] for x in replies],
                                            "correct": not errs, "check_errors": errs})
                            log(f"  pass {p} {op:11s} {fmt_size(4 * count):>7s} {mode:7s} {name:12s} "
                                f"{fmt_time(worst):>9s}{'' if not errs else '  WRONG: ' + errs[0]}"
                                f"  ({time.monotonic() - t:.1f} s)")
    finally:
        for g in groups.values():
            if not g.dead:
                g.close()


# ---------------------------------------------------------------------------------------------
# Report


def fmt_time(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.1f} us" if s < 1e-4 else f"{s * 1e6:.0f} us"
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def _cells(rows, impl, op, nbytes, mode, passes):
    out = []
    for p in range(1, passes + 1):
        out.append(next((r for r in rows if r["impl"] == impl and r["op"] == op and r["nbytes"] == nbytes
                         and r["mode"] == mode and r["pass_"] == p), None))
    return out


def _cell_text(rs, fmt):
    if all(r is None for r in rs):
        return "–"
    r0 = next(r for r in rs if r is not None)
    if "unsupported" in r0:
        return "n/a"
    texts = []
    for r in rs:
        if r is None or "time" not in r:
            texts.append("error" if r is not None else "–")
        else:
            texts.append(fmt(r) + ("" if r["correct"] else " WRONG"))
    return " / ".join(texts)


def _ratio_text(rows, impls, op, nbytes, mode, passes, n, bandwidth):
    parts = []
    peers = [i for i in impls if not i.startswith("ours")]  # other projects only
    for p in range(1, passes + 1):
        def get(i):
            return next((r for r in rows if r["impl"] == i and r["op"] == op and r["nbytes"] == nbytes
                         and r["mode"] == mode and r["pass_"] == p and "time" in r and r["correct"]), None)
        ours = get("ours")
        cand = [(get(i)["time"], i) for i in peers if get(i)]
        if ours is None or not cand:
            parts.append("–")
            continue
        best_t, best = min(cand)
        ratio = best_t / ours["time"] if bandwidth else ours["time"] / best_t
        parts.append(f"{ratio:.2f} ({IMPLS[best]['label']})")
    return " / ".join(parts)


def report(results: list[dict], args) -> str:
    lines = []
    for n in args.n:
        rows = [r for r in results if r["n"] == n and "op" in r]
        impls = [i for i in args.impls if any(r["impl"] == i for r in rows)]
        head = "| size | " + " | ".join(IMPLS[i]["label"] for i in impls)
        sep = "| --- " * (len(impls) + 2) + "|"
        for op in args.ops:
            if not any(r["op"] == op for r in rows):
                continue
            sizes = [s for s in args.sizes if any(r["op"] == op and r["nbytes"] == s for r in rows)]
            lines.append(f"\n### {op}, n = {n}: latency (median of the slower rank; "
                         f"{' / '.join(f'pass {p}' for p in range(1, args.passes + 1))})\n")
            lines.append(head + " | ours / best peer (time; < 1: ours faster) |")
            lines.append(sep)
            for s in sizes:
                shown = 4 * count_for(op, s, n)
                cells = [_cell_text(_cells(rows, i, op, s, "single", args.passes),
                                    lambda r: fmt_time(r["time"])) for i in impls]
                lines.append(f"| {fmt_size(shown)} | " + " | ".join(cells) + " | "
                             + _ratio_text(rows, impls, op, s, "single", args.passes, n, False) + " |")
            lines.append(f"\n### {op}, n = {n}: bus bandwidth, GB/s\n")
            lines.append(head + " | ours / best peer (bandwidth; > 1: ours faster) |")
            lines.append(sep)
            for s in sizes:
                c = count_for(op, s, n)
                cells = [_cell_text(_cells(rows, i, op, s, "single", args.passes),
                                    lambda r: f"{bus_bytes(op, c, n) / r['time'] / 1e9:.3f}") for i in impls]
                lines.append(f"| {fmt_size(4 * c)} | " + " | ".join(cells) + " | "
                             + _ratio_text(rows, impls, op, s, "single", args.passes, n, True) + " |")
        batched = [r for r in rows if r["mode"] == "batched"]
        for s in sorted({r["nbytes"] for r in batched}):
            lines.append(f"\n### all_sum {fmt_size(s)}, n = {n}: per op, single call vs batched "
                         f"(K = {args.batch_k} dependent ops per program or eval)\n")
            lines.append("| implementation | single call | batched, per op |")
            lines.append("| --- | --- | --- |")
            for i in impls:
                single = _cell_text(_cells(rows, i, "all_sum", s, "single", args.passes),
                                    lambda r: fmt_time(r["time"]))
                bat = _cell_text(_cells(rows, i, "all_sum", s, "batched", args.passes),
                                 lambda r: fmt_time(r["time"]))
                lines.append(f"| {IMPLS[i]['label']} | {single} | {bat} |")
            lines.append(f"| ours / best peer | {_ratio_text(rows, impls, 'all_sum', s, 'single', args.passes, n, False)}"
                         f" | {_ratio_text(rows, impls, 'all_sum', s, 'batched', args.passes, n, False)} |")
    problems = [r for r in results if "error" in r or ("correct" in r and not r["correct"])]
    unsupported = {}
    for r in results:
        if "unsupported" in r:
            unsupported.setdefault((r["impl"], r["op"], r["mode"]), r["unsupported"])
    if unsupported:
        lines.append("\nn/a: " + "; ".join(f"{IMPLS[i]['label']} {op} ({mode}): {why}"
                                           for (i, op, mode), why in unsupported.items()))
    if problems:
        lines.append("\nProblems:")
        for r in problems:
            what = r.get("error") or "; ".join(r["check_errors"])
            lines.append(f"- n={r['n']} {r['impl']} {r.get('op', '')} {r.get('nbytes', '')} "
                         f"{r.get('mode', '')} pass {r.get('pass_', '')}: {what}")
    else:
        lines.append("\nEvery result matched the expected values (checked before and after timing).")
    return "\n".join(lines)


def plot(results: list[dict], args, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(args.n), len(args.ops), figsize=(5 * len(args.ops), 4 * len(args.n)),
                             squeeze=False)
    for row, n in enumerate(args.n):
        for col, op in enumerate(args.ops):
            ax = axes[row][col]
            for i in args.impls:
                pts = []
                for s in args.sizes:
                    ts = [r["time"] for r in results if r["n"] == n and r.get("op") == op and r["impl"] == i
                          and r.get("nbytes") == s and r.get("mode") == "single" and "time" in r]
                    if ts:
                        c = count_for(op, s, n)
                        pts.append((4 * c, bus_bytes(op, c, n) / min(ts) / 1e9, min(ts)))
                if pts:
                    ax.plot([p[0] for p in pts], [p[2] for p in pts], marker="o",
                            label=IMPLS[i]["label"], lw=2.5 if i == "ours" else 1.2)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("bytes per rank (input)")
            ax.set_ylabel("time per op, s (slower rank, best pass)")
            ax.set_title(f"{op}, n = {n}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------------------------


def _checkout() -> str:
    try:
        head = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head = ""
    return f"checkout {head}" if head else "this checkout"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setup", nargs="*", metavar="VENV", default=None,
                   help="create .bench-venvs/<peer> (all, or the named: mlx torch jax mpi4jax mpi4jax-mpich) and exit")
    p.add_argument("-n", type=int, nargs="+", default=[2], help="rank counts (default 2)")
    p.add_argument("--sizes", nargs="+", default=["4", "64K", "1M", "16M", "64M"],
                   help="bytes per rank, K/M/G suffixes (default 4 64K 1M 16M 64M)")
    p.add_argument("--ops", nargs="+", default=OPS, choices=OPS)
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--batched-sizes", nargs="+", default=None,
                   help="all_sum sizes that also run the batched form (default: the smallest size)")
    p.add_argument("--batch-k", type=int, default=1000, help="dependent ops per batched program")
    p.add_argument("--iters-scale", type=float, default=1.0, help="scale the iterations per batch")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds one measurement may take")
    p.add_argument("--plot", metavar="PNG", help="save a plot of latency against size")
    p.add_argument("--json", metavar="PATH", help="save every measurement as JSON")
    p.add_argument("--logdir", help="where the ranks' output goes (default: a temporary directory)")
    args = p.parse_args(argv)
    if args.setup is not None:
        setup(args.setup)
        return 0
    args.sizes = [parse_size(s) for s in args.sizes]
    args.batched_sizes = [parse_size(s) for s in args.batched_sizes] if args.batched_sizes else [min(args.sizes)]
    args.logdir = args.logdir or tempfile.mkdtemp(prefix="bench-compare-")
    os.makedirs(args.logdir, exist_ok=True)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT), *(argv or sys.argv[1:])])
    log(f"ranks' output: {args.logdir}")
    t0, load0 = time.monotonic(), os.getloadavg()[0]
    results: list[dict] = []
    for n in args.n:
        run_n(n, args, results, log)
    elapsed = time.monotonic() - t0
    header = (f"## Side by side: `{command}`\n\n{platform.node() or 'this machine'}: {os.cpu_count()} cores, "
              f"Python {platform.python_version()}, loopback; {VERSIONS.format(checkout=_checkout())}; "
              f"{args.passes} passes in "
              f"{elapsed / 60:.1f} min. float32. Load average (1 min) {load0:.1f} at the start, "
              f"{os.getloadavg()[0]:.1f} at the end: other processes on the machine disturb the numbers.")
    text = header + "\n" + report(results, args)
    print(text, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(command=command, results=results), f, indent=1)
    if args.plot:
        plot(results, args, args.plot)
        log(f"plot: {args.plot}")
    # A peer's failure or wrong result is reported in the tables; only ours fails the command.
    return 1 if any(r["impl"] == "ours" and ("error" in r or ("correct" in r and not r["correct"]))
                    for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
