"""The launcher: start ranks on this machine, stream their output, stop them all on failure.

Output lines are prefixed with the rank; the exit code is non-zero when any rank fails, and
one failing rank (or Ctrl-C) stops every other rank.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading

from jax_mlxdist.launch.local import LocalRanks

GRACE_SECONDS = 5.0  # between SIGTERM and SIGKILL when stopping ranks


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jax-mlxdist launch",
                                description="Run a Python script on N local ranks.")
    p.add_argument("-n", "--repeat-hosts", dest="n", type=int, default=1,
                   help="number of ranks to start on this machine")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for every rank (repeatable)")
    p.add_argument("--cwd", help="working directory of the ranks")
    p.add_argument("--python", default=sys.executable, help="interpreter for the ranks")
    p.add_argument("--connections-per-ip", type=int, default=1,
                   help="sockets per rank (MLX's ring: one per hostfile entry)")
    p.add_argument("--no-prefix", action="store_true", help="do not prefix output with the rank")
    p.add_argument("--verbose", action="store_true", help="log connection set-up (MLX_RING_VERBOSE)")
    p.add_argument("script", help="the Python script to run")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    return p


def _pump(stream, prefix: str, sink, lock: threading.Lock) -> None:
    for line in iter(stream.readline, b""):
        with lock:
            sink.buffer.write(prefix.encode() + line)
            sink.flush()
    stream.close()


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["launch"]:  # console script: jax-mlxdist launch ...
        argv = argv[1:]
    opts = _parser().parse_args(argv)
    if opts.n < 1:
        _parser().error("-n must be at least 1")
    extra = {}
    for item in opts.env:
        key, sep, value = item.partition("=")
        if not sep:
            _parser().error(f"--env expects KEY=VALUE, got {item!r}")
        extra[key] = value
    if opts.verbose:
        extra["MLX_RING_VERBOSE"] = "1"

    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    with LocalRanks(opts.n, opts.connections_per_ip) as ranks:
        try:
            for r in range(opts.n):
                env = {**os.environ, **extra, **ranks.env_for(r)}
                p = subprocess.Popen([opts.python, opts.script, *opts.args], env=env, cwd=opts.cwd,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     pass_fds=ranks.pass_fds_for(r), start_new_session=True)
                procs.append(p)
                prefix = "" if opts.no_prefix else f"[rank {r}] "
                for stream, sink in ((p.stdout, sys.stdout), (p.stderr, sys.stderr)):
                    t = threading.Thread(target=_pump, args=(stream, prefix, sink, lock), daemon=True)
                    t.start()
                    pumps.append(t)
            ranks.close_sockets()
            failed = _wait_for_first_failure(procs)
        except KeyboardInterrupt:
            print("jax-mlxdist launch: interrupted, stopping all ranks", file=sys.stderr)
            _stop(procs)
            return 130
        finally:
            _stop(procs)
            for t in pumps:
                t.join()
    if failed is not None:
        r, code = failed
        print(f"jax-mlxdist launch: rank {r} exited with code {code}; stopped the other ranks",
              file=sys.stderr)
        return code if 0 < code < 256 else 1
    return 0


def _wait_for_first_failure(procs: list[subprocess.Popen]) -> tuple[int, int] | None:
    """Waits until all ranks succeed (None) or one fails: (rank, exit code)."""
    pending = set(range(len(procs)))
    while pending:
        for r in sorted(pending):
            try:
                code = procs[r].wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                continue
            pending.discard(r)
            if code != 0:
                return r, code
    return None
