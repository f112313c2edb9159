"""`jax-mlxdist launch`: start ranks here or over ssh, with mlx.launch's flags and hostfiles.

Output lines are prefixed with the rank; the exit code is non-zero when any rank fails, and
one failing rank (or Ctrl-C) stops every other rank, local and remote. Before stopping local
ranks it prints where each one was, from their flight records.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shlex
import shutil
import signal
import sys
import tempfile

from jax_mlxdist._config import timeout
from jax_mlxdist.launch import hostfile, ranks
from jax_mlxdist.launch.local import LocalRanks, gpu_env

BACKENDS = ("ring", "any", "nccl", "jaccl")
RECORD_WAIT_S = 2.0  # how long live ranks get to write their flight records


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jax-mlxdist launch",
                                description="Run a Python script or a command on N ranks, here or over ssh.")
    p.add_argument("-n", "--repeat-hosts", dest="n", type=int, default=1,
                   help="ranks per host (each host repeated n times)")
    p.add_argument("--hosts", default="127.0.0.1", help="comma-separated hosts, one rank each")
    p.add_argument("--hostfile", help="MLX launcher hostfile (JSON)")
    p.add_argument("--backend", help="ring (default), any, jaccl, nccl (one GPU per rank); "
                                      "mpi jobs start with mpirun")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for every rank (repeatable)")
    p.add_argument("--cwd", help="working directory of the ranks")
    p.add_argument("--python", default=sys.executable, help="interpreter for the ranks")
    p.add_argument("--print-python", action="store_true", help="print the interpreter and exit")
    p.add_argument("--connections-per-ip", type=int, default=1,
                   help="sockets per rank (MLX's ring: one per hostfile entry)")
    p.add_argument("--starting-port", type=int, default=0,
                   help="first port to listen on (default: free ports chosen without races)")
    p.add_argument("--ssh", default="ssh", help="ssh command for remote hosts (e.g. 'ssh -F cfg')")
    p.add_argument("--no-prefix", action="store_true", help="do not prefix output with the rank")
    p.add_argument("--verbose", action="store_true", help="log connection set-up (MLX_RING_VERBOSE)")
    p.add_argument("-m", dest="module", help="run this module as a script (python -m)")
    p.add_argument("script", nargs="?",
                   help="a Python script (run with --python), or any command: `python train.py`, "
                        "`./run.sh`, `pytest -q` (run as given, as mlx.launch does)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script or command")
    return p


def rank_command(python: str, script: str | None, module: str | None, args: list[str]) -> list[str]:
    """What every rank runs: a .py file or a module with the interpreter, anything else (an
    interpreter, a program on PATH, an executable file) as given. ValueError when it is none."""
    if module:
        return [python, "-m", module, *([script] if script else []), *args]
    if script is None:
        raise ValueError("the script or command to run is missing")
    if script.endswith(".py") or (os.path.isfile(script) and not os.access(script, os.X_OK)):
        return [python, script, *args]
    if (os.sep in script and os.access(script, os.X_OK)) or shutil.which(script):
        return [script, *args]
    raise ValueError(f"{script!r} is neither a Python script nor a command on PATH")


USAGE = """usage: jax-mlxdist {launch,config} ...   (or python -m jax_mlxdist.launch ...)

commands:
  launch   run a Python script or a command on N ranks, here or over ssh
           (`jax-mlxdist launch --help`; `launch` may be left out)
  config   check ssh to hosts, find their addresses and write a launcher hostfile
           (`jax-mlxdist config --help`)
"""


def console(argv: list[str] | None = None) -> int:
    """`jax-mlxdist` and `python -m jax_mlxdist.launch`: the subcommands (a script or command
    alone means launch)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "config":
        from jax_mlxdist.launch import config_hosts as config
        return config.main(argv[1:])
    return main(argv[1:] if argv[0] == "launch" else argv)


def main(argv: list[str] | None = None) -> int:
    """`jax-mlxdist launch`."""
    # Ctrl-C (SIGINT) stops the job even where it was started ignored (a background job of a
    # script inherits SIGINT ignored, and Python then raises no KeyboardInterrupt).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    opts = parser.parse_args(argv)
    if opts.print_python:
        print(opts.python)
        return 0
    try:
        command = rank_command(opts.python, opts.script, opts.module, opts.args)
    except ValueError as e:
        parser.error(str(e))
    if opts.n < 1 or opts.connections_per_ip < 1:
        parser.error("-n and --connections-per-ip must be at least 1")
    if not 0 <= opts.starting_port < 65536:
        parser.error("--starting-port must be a port number")
    try:
        plan = hostfile.load(opts.hostfile) if opts.hostfile else hostfile.from_hosts(opts.hosts)
        plan = hostfile.repeat(plan, opts.n)
        extra = {**plan.env, **hostfile.parse_env(opts.env, "--env")}
    except hostfile.HostfileError as e:
        parser.error(str(e))
    backend = opts.backend or plan.backend or "ring"
    if backend == "mpi":
        parser.error("--backend mpi: MPI jobs start with the MPI's own launcher, e.g. "
                     f"`mpirun -np {len(plan.hosts)} {shlex.join(command)}`; init() picks the "
                     "MPI backend in ranks that mpirun started")
    if backend not in BACKENDS:
        parser.error(f"--backend {backend!r}: this launcher starts {', '.join(BACKENDS)} or "
                     "mpi jobs")
    if backend in ("nccl", "jaccl"):
        extra["MLXDIST_BACKEND"] = backend
    if opts.verbose:
        extra["MLX_RING_VERBOSE"] = "1"
    # The job's secret: every connection between its ranks proves it (MLXDIST_TOKEN).
    extra.setdefault("MLXDIST_TOKEN", secrets.token_hex(16))
    out = ranks.Output(len(plan.hosts), prefix=not opts.no_prefix, progress=True,
                       verbose=opts.verbose)
    started: list[ranks.Rank] = []
    cleanup = contextlib.ExitStack()
    local = all(h.local for h in plan.hosts)
    records = None
    if local:  # where ranks write their flight records when asked (SIGUSR1)
        records = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="mlxdist-flight-"))
        extra["MLXDIST_FLIGHT_DIR"] = records
    try:
        if local:
            cleanup.enter_context(_start_here(plan, opts, extra, command, out, started))
        else:
            _start_over_ssh(plan, opts, extra, command, out, started)
        failed = ranks.wait_for_first_failure(started)
        if failed is not None and records:
            _report_where(started, records, out, failed[0])
    except KeyboardInterrupt:
        out.note("interrupted, stopping all ranks")
        if records:
            try:
                _report_where(started, records, out, None)
            except (KeyboardInterrupt, OSError, ValueError) as e:  # a second Ctrl-C: just stop
                out.note(f"no summary of where the ranks are ({type(e).__name__})")
        return 130
    except LaunchError as e:
        out.note(str(e))
        return 1
    finally:
        ranks.stop_all(started)
        for r in started:  # their output to its end; bounded, in case a descendant keeps a pipe
            for t in r.pumps:
                t.join(timeout=ranks.GRACE_SECONDS)
        cleanup.close()
    if failed is not None:
        r, code = failed
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        out.note(f"rank {r} {how}; stopped the other ranks")
        return code if 0 < code < 256 else 1
    return 0


class LaunchError(Exception):
    pass


def _report_where(started, folder: str, out, failed: int | None) -> None:
    """Asks every live rank for its flight record (SIGUSR1) and prints where each one is: one
    line per rank and group (which op, for how long, waiting for peers or moving bytes)."""
    from jax_mlxdist import _observe
    live = [r for r in started if r.proc.poll() is None and not r.remote]
    for r in live:
        try:
            os.kill(r.proc.pid, signal.SIGUSR1)
        except ProcessLookupError:
            pass
    found = _observe.collect(folder, [r.rank for r in live], RECORD_WAIT_S)
    lines = _observe.summarize(found)
    if failed is not None:
        lines.insert(0, f"rank {failed}: exited (code {started[failed].proc.returncode})")
    out.note("where the ranks are:\n  " + "\n  ".join(lines))


def _start_here(plan, opts, extra, command, out, started) -> LocalRanks:
    """Local ranks: a hostfile and listening sockets bound here before any rank starts.
    Returns what to close (the hostfile) once the ranks are done."""
    ips = [h.ips[0] if h.ips else "127.0.0.1" for h in plan.hosts]
    try:
        local = LocalRanks(len(ips), opts.connections_per_ip, ips, opts.starting_port)
    except OSError as e:
        raise LaunchError(f"cannot listen for the ranks: {e}") from None
    ready_r, ready_w = os.pipe()
    for r in range(len(ips)):
        env = {**os.environ, **local.env_for(r), **extra, "MLXDIST_READY_FD": str(ready_w)}
        if extra.get("MLXDIST_BACKEND") == "nccl":
            env.update(gpu_env(r))
        rank = ranks.start_local(r, command, env, opts.cwd, (*local.pass_fds_for(r), ready_w))
        started.append(rank)
        rank.pump(out)
    local.close_sockets()
    os.close(ready_w)
    ranks.count_ready(ready_r, out)
    return local


def _start_over_ssh(plan, opts, extra, command, out, started) -> None:
    """Remote ranks: rank 0 listens for the others (coordinator start-up) and names its port."""
    ssh = shlex.split(opts.ssh)
    first = plan.hosts[0]
    coordinator_ip = first.ips[0] if first.ips else _address_of(first.ssh)
    base = {**extra, "MLXDIST_WORLD_SIZE": str(len(plan.hosts))}
    for r, host in enumerate(plan.hosts):
        env = {**base, "MLXDIST_RANK": str(r)}
        if base.get("MLXDIST_BACKEND") == "nccl":  # the k-th rank on a host takes its GPU k
            env["CUDA_VISIBLE_DEVICES"] = str(sum(h == host for h in plan.hosts[:r]))
        if r > 0:
            env["MLXDIST_COORDINATOR"] = started[0].coordinator
        listen = f"{coordinator_ip}:{opts.starting_port}" if r == 0 else None
        rank = ranks.start_remote(r, host, ssh, opts.python, command, env, opts.cwd, listen)
        started.append(rank)
        rank.pump(out)
        if r == 0:
            rank.announced.wait(timeout())
            if rank.coordinator is None:
                raise LaunchError(f"rank 0 on {first.ssh} did not start (see its output above)")


def _address_of(host: str) -> str:
    import socket
    try:
        return socket.gethostbyname(host)
    except OSError:
        raise LaunchError(f"cannot resolve {host!r}: give its address in the hostfile's \"ips\"")
