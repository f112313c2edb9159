"""Configuration from the environment: a hostfile (MLX's ring variables), or a coordinator
address with rank and size (our own variables, SLURM's, or an MPI launcher's); the timeout and
the transport. Parsing only; connecting happens in the C++ extension.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import socket
import stat
import time
import zlib
from dataclasses import dataclass

from jax_mlxdist._errors import DistributedError

DEFAULT_TIMEOUT = 300.0
MAX_TIMEOUT = 1e7  # longer (or inf) means no timeout in practice; keeps deadlines finite
TRANSPORTS = ("auto", "tcp", "shm")
JACCL_TRANSPORTS = ("auto", "shm", "ibverbs")

# (rank variable, size variable, who sets them), in the order they are looked for.
WORLD_VARIABLES = (
    ("MLXDIST_RANK", "MLXDIST_WORLD_SIZE", "MLXDIST_*"),
    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "Open MPI"),
    ("PMI_RANK", "PMI_SIZE", "MPICH"),
)
SLURM_BASE_PORT = 20000  # SLURM's coordinator port: this + a hash of the job and step ids


def ring_config() -> tuple[int, list[list[str]], list[int]] | None:
    """(rank, hostfile entries, inherited listening fds) from MLX_RANK/MLX_HOSTFILE, if set."""
    path = os.environ.get("MLX_HOSTFILE")
    if not path:
        return None
    try:
        with open(path) as f:
            hosts = json.load(f)
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: absurdly deep JSON
        raise DistributedError(f"init: cannot read MLX_HOSTFILE={path!r}: {e}") from None
    if (not isinstance(hosts, list) or not hosts
            or not all(isinstance(h, list) and h and all(isinstance(a, str) for a in h)
                       for h in hosts)):
        raise DistributedError(
            f"init: MLX_HOSTFILE={path!r} must hold a JSON list, per rank, of \"ip:port\" lists")
    if len({len(h) for h in hosts}) != 1:
        raise DistributedError("init: every rank in MLX_HOSTFILE must list the same number of "
                               "addresses (one socket per entry)")
    for r, entries in enumerate(hosts):
        for a in entries:
            _check_address(a, r, path)
    raw = os.environ.get("MLX_RANK")
    try:
        rank = int(raw)
    except (TypeError, ValueError):
        raise DistributedError(
            f"init: MLX_HOSTFILE is set but MLX_RANK={raw!r} is missing or not an int") from None
    if not 0 <= rank < len(hosts):
        raise DistributedError(f"init: MLX_RANK={rank} but MLX_HOSTFILE lists {len(hosts)} ranks")
    return rank, hosts, _listen_fds(len(hosts[rank]))


def _check_address(entry: str, rank: int, path: str) -> None:
    host, sep, port = entry.rpartition(":")
    if (not sep or not host or not port.isascii() or not port.isdigit()
            or not 0 <= int(port) <= 65535 or "\0" in host):
        raise DistributedError(
            f"init: MLX_HOSTFILE={path!r}: rank {rank}'s address {entry!r} is not \"ip:port\"")


def _listen_fds(count: int) -> list[int]:
    """MLXDIST_LISTEN_FDS: inherited listening sockets, one per hostfile entry of this rank."""
    raw = os.environ.get("MLXDIST_LISTEN_FDS", "")
    fds = []
    for item in raw.split(","):
        if not item.strip():
            continue
        try:
            fd = int(item)
        except ValueError:
            fd = -1
        if not 0 <= fd < 2**31:
            raise DistributedError(f"init: MLXDIST_LISTEN_FDS={raw!r}: {item!r} is not an fd")
        try:
            is_socket = stat.S_ISSOCK(os.fstat(fd).st_mode)
        except OSError:
            is_socket = False
        if not is_socket:
            raise DistributedError(
                f"init: MLXDIST_LISTEN_FDS={raw!r}: fd {fd} is not an open socket (it must be "
                "inherited from the launcher)")
        fds.append(fd)
    if fds and len(fds) != count:
        raise DistributedError(
            f"init: MLXDIST_LISTEN_FDS={raw!r} has {len(fds)} sockets but the hostfile lists "
            f"{count} addresses for this rank")
    return fds


def timeout() -> float:
    """MLXDIST_TIMEOUT in seconds: how long any wait on a peer may stall.

    Values above MAX_TIMEOUT (115 days), "inf" included, are cut to it.
    """
    raw = os.environ.get("MLXDIST_TIMEOUT", "")
    try:
        value = float(raw) if raw.strip() else DEFAULT_TIMEOUT
    except ValueError:
        raise DistributedError(f"MLXDIST_TIMEOUT={raw!r} is not a number of seconds") from None
    if math.isnan(value) or value <= 0:
        raise DistributedError(f"MLXDIST_TIMEOUT={raw!r} must be a positive number of seconds")
    return min(value, MAX_TIMEOUT)


def transport() -> str:
    """MLXDIST_TRANSPORT: auto (shared memory when every rank is on this host), tcp or shm."""
    value = os.environ.get("MLXDIST_TRANSPORT", "auto") or "auto"
    if value not in TRANSPORTS:
        raise DistributedError(f"MLXDIST_TRANSPORT={value!r}: expected one of {TRANSPORTS}")
    return value


def jaccl_transport() -> str:
    """MLXDIST_JACCL_TRANSPORT: auto (shared memory when every rank is on this host, else
    ibverbs), shm or ibverbs."""
    value = os.environ.get("MLXDIST_JACCL_TRANSPORT", "auto") or "auto"
    if value not in JACCL_TRANSPORTS:
        raise DistributedError(
            f"MLXDIST_JACCL_TRANSPORT={value!r}: expected one of {JACCL_TRANSPORTS}")
    return value


def jaccl_ring() -> bool:
    """MLX_JACCL_RING: JACCL runs the ring algorithms instead of the mesh ones."""
    return os.environ.get("MLX_JACCL_RING", "") not in ("", "0")


def ibverbs_library() -> str:
    """MLXDIST_IBV_LIB: the libibverbs to load (default: libibverbs.so.1)."""
    return os.environ.get("MLXDIST_IBV_LIB", "")


def ibv_gid_index() -> int:
    """MLXDIST_IBV_GID_INDEX: the RoCE GID table entry to use (default -1: pick one)."""
    raw = os.environ.get("MLXDIST_IBV_GID_INDEX", "").strip()
    if not raw:
        return -1
    if not raw.isdigit() or int(raw) > 255:
        raise DistributedError(f"MLXDIST_IBV_GID_INDEX={raw!r}: expected a GID index from 0 to 255")
    return int(raw)


def verbose() -> bool:
    """MLX_RING_VERBOSE: say on stderr how the group connected (as MLX's ring)."""
    return os.environ.get("MLX_RING_VERBOSE", "") not in ("", "0")


def token() -> str:
    """MLXDIST_TOKEN: the job's secret that every connection proves ("" for none)."""
    return os.environ.get("MLXDIST_TOKEN", "")


@dataclass(frozen=True)
class Settings:
    """Everything a world's connection is configured by, each variable read and checked once
    (at init); _C.Settings mirrors it (csrc/core/settings.h)."""
    timeout_s: float
    token: str
    verbose: bool
    transport: str
    jaccl_transport: str
    jaccl_ring: bool
    ibverbs_lib: str
    ibv_gid_index: int
    nccl_lib: str = ""
    nccl_device: int = 0
    nccl_check: bool = True
    mpi_lib: str = ""

    def for_cxx(self):
        from jax_mlxdist import _C
        out = _C.Settings()
        for name, value in dataclasses.asdict(self).items():
            setattr(out, name, value)
        return out


def settings(backend: str) -> Settings:
    """This process's settings for a world on backend (ring, jaccl, nccl, mpi): only the
    variables that backend reads are read."""
    common = dict(timeout_s=timeout(), token=token(), verbose=verbose(), transport=transport())
    if backend == "jaccl":
        return Settings(**common, jaccl_transport=jaccl_transport(), jaccl_ring=jaccl_ring(),
                        ibverbs_lib=ibverbs_library(), ibv_gid_index=ibv_gid_index())
    plain = dict(jaccl_transport="auto", jaccl_ring=False, ibverbs_lib="", ibv_gid_index=-1)
    if backend == "nccl":
        return Settings(**common, **plain, nccl_lib=nccl_library(), nccl_check=nccl_check())
    if backend == "mpi":
        return Settings(**common, **plain, mpi_lib=mpi_library())
    return Settings(**common, **plain)


def op_log() -> bool:
    """MLXDIST_DEBUG=1 (or =ops): a line on stderr per op per rank, as it ends."""
    raw = os.environ.get("MLXDIST_DEBUG", "").strip().lower()
    if raw not in ("", "0", "1", "ops"):
        raise DistributedError(f"MLXDIST_DEBUG={raw!r}: expected 1 or ops (or 0)")
    return raw in ("1", "ops")


def flight_recorder() -> bool:
    """MLXDIST_FLIGHT_RECORDER=0 turns the flight recorder (and Group.stats()) off."""
    return os.environ.get("MLXDIST_FLIGHT_RECORDER", "1").strip() not in ("0", "off", "false")


def flight_dir() -> str:
    """MLXDIST_FLIGHT_DIR: where SIGUSR1 writes this rank's flight record (rank<r>.json);
    unset: to stderr. The launcher sets it to collect every rank's record on a failure."""
    return os.environ.get("MLXDIST_FLIGHT_DIR", "")


def runtime_tokens() -> bool:
    """MLXDIST_RUNTIME_TOKENS=1: keep JAX's runtime token per jitted call (see _dispatch.py)."""
    return os.environ.get("MLXDIST_RUNTIME_TOKENS", "") not in ("", "0")


def default_backend() -> str:
    """MLXDIST_BACKEND: what init(backend="any") means in this process (set by launchers and
    test harnesses to run unchanged programs on another backend)."""
    return os.environ.get("MLXDIST_BACKEND", "") or "any"


@dataclass
class Coordinator:
    """Start-up without a hostfile: rank 0 listens at `address` and hands out the ring."""
    rank: int
    size: int
    address: str
    source: str  # who set rank and size, for messages
    listen_fd: int = -1  # rank 0: a socket already listening at address
    published: str | None = None  # rank 0: the file naming address, removed once all met

    def done(self) -> None:
        if self.published:
            try:
                os.unlink(self.published)
            except FileNotFoundError:
                pass


def coordinator_config() -> Coordinator | None:
    """Rank, size and coordinator address from the environment, if a launcher set them.

    The coordinator is MLXDIST_COORDINATOR; else, under SLURM, the first host of the step's
    node list on a port derived from the job id (MLXDIST_COORDINATOR_PORT overrides); else,
    under Open MPI with every rank on this host, a port rank 0 picks and publishes in the job's
    session directory.
    """
    world = _world_from_env()
    if world is None:
        return None
    rank, size, source = world
    address = os.environ.get("MLXDIST_COORDINATOR", "").strip()
    if not address and source == "SLURM":
        address = f"{_slurm_first_host()}:{_slurm_port()}"
    if address:
        _check_coordinator(address)
        fds = _listen_fds(1) if rank == 0 else []  # a launcher may have bound it for rank 0
        return Coordinator(rank, size, address, source, fds[0] if fds else -1)
    if source == "Open MPI" and os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE") == str(size):
        return _published_coordinator(rank, size, source)
    raise DistributedError(
        f"init: rank {rank} of {size} (from {source} variables) but no coordinator: set "
        "MLXDIST_COORDINATOR=host:port, an address of rank 0's host that every rank can "
        "reach (rank 0 listens there)")


def jaccl_config() -> tuple[Coordinator, list[str]] | None:
    """MLX's JACCL variables, if set: MLX_RANK, MLX_JACCL_COORDINATOR (rank 0's address, where
    the others meet it) and MLX_IBV_DEVICES (a JSON file: for each rank, the RDMA device that
    reaches each other rank, null for itself). Returns the meeting and this rank's row."""
    path = os.environ.get("MLX_IBV_DEVICES", "")
    address = os.environ.get("MLX_JACCL_COORDINATOR", "").strip()
    if not path and not address:
        return None
    if not (path and address):
        missing = "MLX_JACCL_COORDINATOR" if path else "MLX_IBV_DEVICES"
        raise DistributedError(f"init(backend='jaccl'): {missing} is not set (JACCL needs "
                               "MLX_RANK, MLX_IBV_DEVICES and MLX_JACCL_COORDINATOR)")
    try:
        with open(path) as f:
            matrix = json.load(f)
    except (OSError, ValueError) as e:
        raise DistributedError(f"MLX_IBV_DEVICES={path!r}: {e}") from None
    n = len(matrix) if isinstance(matrix, list) else 0
    if n == 0 or any(not isinstance(row, list) or len(row) != n or
                     any(d is not None and not isinstance(d, str) for d in row) for row in matrix):
        raise DistributedError(f"MLX_IBV_DEVICES={path!r}: expected a square JSON list of lists "
                               "of device names (null on the diagonal)")
    raw = os.environ.get("MLX_RANK", "")
    try:
        rank = int(raw)
    except ValueError:
        raise DistributedError(f"MLX_RANK={raw!r} is not a rank") from None
    if not 0 <= rank < n:
        raise DistributedError(f"MLX_RANK={rank} but MLX_IBV_DEVICES lists {n} ranks")
    _check_coordinator(address)
    fds = _listen_fds(1) if rank == 0 else []
    return (Coordinator(rank, n, address, "JACCL", fds[0] if fds else -1),
            [d or "" for d in matrix[rank]])


def _world_from_env() -> tuple[int, int, str] | None:
    for rank_var, size_var, source in WORLD_VARIABLES:
        raw_rank, raw_size = os.environ.get(rank_var), os.environ.get(size_var)
        if raw_rank is None and raw_size is None:
            continue
        try:
            rank, size = int(raw_rank), int(raw_size)
        except (TypeError, ValueError):
            raise DistributedError(
                f"init: {rank_var}={raw_rank!r} and {size_var}={raw_size!r} must both be "
                "set to integers") from None
        if not 0 <= rank < size:
            raise DistributedError(f"init: {rank_var}={rank} is not a rank of "
                                   f"{size_var}={size}")
        return rank, size, source
    return None


def _check_coordinator(address: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedError(f"init: MLXDIST_COORDINATOR={address!r} is not \"host:port\"")


def _slurm_first_host() -> str:
    """The first host of SLURM's compressed node list ("gpu[003-010,12],login1" -> "gpu003")."""
    nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "")
    m = re.match(r"\s*([^,\[\s]+)(?:\[([^\]\-,]+))?", nodes)
    if not m:
        raise DistributedError(
            f"init: SLURM_JOB_NODELIST={nodes!r} names no host; set MLXDIST_COORDINATOR")
    return m.group(1) + (m.group(2) or "")


def _slurm_port() -> int:
    raw = os.environ.get("MLXDIST_COORDINATOR_PORT")
    if raw:
        if not raw.isdigit() or not 0 < int(raw) < 65536:
            raise DistributedError(f"init: MLXDIST_COORDINATOR_PORT={raw!r} is not a port")
        return int(raw)
    job = os.environ.get("SLURM_JOB_ID", "0") + "." + os.environ.get("SLURM_STEP_ID", "0")
    return SLURM_BASE_PORT + zlib.crc32(job.encode()) % 20000


def _published_coordinator(rank: int, size: int, source: str) -> Coordinator:
    """Ranks of one host under mpirun: rank 0 listens on a free loopback port and names it in
    a file of the job's session directory (private to this mpirun); the others read it."""
    folder = (os.environ.get("OMPI_MCA_orte_jobfam_session_dir")
              or os.environ.get("PMIX_SERVER_TMPDIR"))
    job = os.environ.get("PMIX_NAMESPACE") or os.environ.get("OMPI_MCA_ess_base_jobid")
    if not folder or not job:
        raise DistributedError("init: started by mpirun but its session directory is unknown; "
                               "set MLXDIST_COORDINATOR=host:port")
    path = os.path.join(folder, f"jax_mlxdist-{job}.coordinator")
    if rank == 0:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        s.listen(512)
        address = f"127.0.0.1:{s.getsockname()[1]}"
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(address)
        os.replace(tmp, path)  # readers see the whole address or nothing
        return Coordinator(0, size, address, source, s.detach(), path)
    deadline = time.monotonic() + timeout()
    while True:  # bounded wait for rank 0 to start, as a connect would retry
        try:
            with open(path) as f:
                return Coordinator(rank, size, f.read().strip(), source)
        except FileNotFoundError:
            if time.monotonic() > deadline:
                raise DistributedError(
                    f"init: rank {rank} of {size}: rank 0 did not publish its address in "
                    f"{path} within MLXDIST_TIMEOUT={timeout():g}s (did it start?)") from None
            time.sleep(0.01)


def mpi_launched() -> bool:
    """Whether an MPI launcher (mpirun, mpiexec, srun --mpi) started this process."""
    return any(v in os.environ for v in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"))


def take_ready_fd() -> int | None:
    """MLXDIST_READY_FD, once: the pipe on which `jax-mlxdist launch` waits for this rank to
    say it connected (removed, so a child process does not say it again)."""
    fd = os.environ.pop("MLXDIST_READY_FD", "")
    return int(fd) if fd.isdigit() else None


def ring_variables_set() -> bool:
    """Whether the ring's own configuration (a hostfile or a coordinator) is set: then an MPI
    launcher's presence does not make MPI the default backend."""
    return bool(os.environ.get("MLX_HOSTFILE") or os.environ.get("MLXDIST_COORDINATOR"))


def mpi_library() -> str:
    """MLXDIST_MPI_LIB, else the libmpi of the MPI whose mpirun is on PATH (an Open MPI or MPICH
    installed from PyPI lives in a venv, off the loader's path), else "" (the loader finds
    Open MPI's libmpi.so.40 or the MPICH ABI's libmpi.so.12)."""
    path = os.environ.get("MLXDIST_MPI_LIB", "")
    if path:
        return path
    mpirun = shutil.which("mpirun") or shutil.which("mpiexec")
    if mpirun:
        lib = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(mpirun))), "lib")
        for name in ("libmpi.so.40", "libmpi.so.12"):
            if os.path.exists(os.path.join(lib, name)):
                return os.path.join(lib, name)
    return ""


def nccl_library() -> str:
    """MLXDIST_NCCL_LIB, else the nvidia-nccl-cu13/cu12 wheel's libnccl.so.2, else "" (the
    system's, by the library path)."""
    path = os.environ.get("MLXDIST_NCCL_LIB", "")
    if path:
        return path
    try:
        import nvidia.nccl  # the wheels' namespace package
    except ImportError:
        return ""
    for root in getattr(nvidia.nccl, "__path__", []):
        candidate = os.path.join(root, "lib", "libnccl.so.2")
        if os.path.exists(candidate):
            return candidate
    return ""


def nccl_check() -> bool:
    """MLXDIST_NCCL_CHECK=0 skips the per-op header agreement over the control ring (less
    latency for small ops; mismatched ops across ranks then stall until MLXDIST_TIMEOUT)."""
    return os.environ.get("MLXDIST_NCCL_CHECK", "1") not in ("0", "false", "no")
