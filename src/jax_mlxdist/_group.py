"""Groups: init, is_available, the default group, split and lifecycle.

Configuration is read here (MLX's environment variables, see README); every byte of
communication happens in the C++ extension.
"""

from __future__ import annotations

import atexit
import dataclasses
import operator
import os
import threading
import weakref

import jax

from jax_mlxdist import _C, _config, _dispatch, _observe
from jax_mlxdist._config import (coordinator_config, default_backend, jaccl_config,
                                 mpi_launched, mpi_library, ring_config)
from jax_mlxdist._errors import DistributedError, DistributedTypeError, DistributedValueError

BACKENDS = ("any", "ring", "mpi", "jaccl", "nccl")


class Group:
    """A set of ranks that run collectives together (MLX's ``mx.distributed.Group``)."""

    def __init__(self, handle: int | None, rank: int, size: int, backend: str):
        self._handle = handle  # C++ group handle; None for a size-1 group without peers
        self._rank = rank
        self._size = size
        self._backend = backend
        self._closed = False
        self._owner: threading.Thread | None = None  # the thread issuing its collectives
        if handle is not None:
            _live.add(self)
            _observe.set_up(rank if _world is None else _world.rank())

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size

    @property
    def backend(self) -> str:
        return self._backend

    @property
    def closed(self) -> bool:
        return self._closed

    def split(self, color: int, key: int = -1) -> "Group":
        """Ranks passing the same color form a new group, ordered by key then by rank.

        Collective over this group: every rank must call it. key=-1 keeps this group's order.
        """
        self._check_open("split")
        self._claim("split")
        try:
            color, key = operator.index(color), operator.index(key)
        except TypeError:
            raise DistributedTypeError(
                f"split: color and key must be ints, got {color!r}, {key!r}") from None
        if not -2**31 <= color < 2**31 or not -2**31 <= key < 2**31:
            raise DistributedValueError(
                f"split: color and key must fit in 32 bits, got {color}, {key}")
        if self._handle is None:
            return Group(None, 0, 1, self._backend)
        self._settle()  # earlier collectives on this group finish first
        handle = _call(_C.split, self._handle, color, self._rank if key == -1 else key)
        rank, size = _C.group_info(handle)
        return Group(handle, rank, size, self._backend)

    def stats(self) -> dict:
        """Per op kind on this rank: {"all_sum": {"ops", "failed", "bytes", "queued_s",
        "waiting_s", "moving_s"}, ...}; waiting is until the first peer answered."""
        return _observe.stats(self._handle)

    def flight_record(self) -> list[dict]:
        """This group's last 256 ops on this rank, oldest first (see dump_flight_recorder)."""
        return _observe.flight_record(self._handle)

    def close(self) -> None:
        """Wait for pending collectives, then release this group's sockets and thread."""
        if self._closed:
            return
        self._closed = True
        _live.discard(self)
        global _world
        if _world is self:
            _world = None
        if self._handle is not None:
            try:
                self._settle()  # raises if a pending collective failed
            finally:
                late = _C.close_group(self._handle)  # released even then
            if late:  # found after its op returned (NCCL's watchdog): its output is undefined
                raise DistributedError(f"close: {late}")

    def __enter__(self) -> "Group":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = ", closed" if self._closed else ""
        return f"Group(rank={self._rank}, size={self._size}, backend={self._backend!r}{state})"

    def _settle(self) -> None:
        """Waits for the collectives this thread dispatched on the group; raises if one failed."""
        jax.effects_barrier()  # programs that carry JAX's runtime token (MLXDIST_RUNTIME_TOKENS)
        _dispatch.fence()      # programs that do not
        _call(_C.drain, self._handle)

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise DistributedError(f"{what}: the group {self!r} is closed")

    def _claim(self, what: str) -> None:
        """Collectives on a group come from one thread at a time.

        Ranks pair calls by their order on the group; two threads issuing collectives would
        order them differently on different ranks and pair the wrong calls (silently, when
        shapes agree). The first thread to issue one owns the group until it exits; another
        thread raises. Checked by the collectives (and split) when called eagerly or traced.
        """
        me = threading.current_thread()
        owner = self._owner
        if owner is me:
            return
        if owner is not None and owner.is_alive():
            raise DistributedError(
                f"{what}: {self!r} is used by thread {owner.name!r}; collectives on one group "
                f"must all be issued from one thread (called from {me.name!r}). Ranks pair "
                "calls by their order, which two threads would not keep. Give each thread its "
                "own group (g.split(0) once per thread, in the same order on every rank)")
        self._owner = me


_world: Group | None = None
_live: "weakref.WeakSet[Group]" = weakref.WeakSet()


def _call(fn, *args):
    try:
        return fn(*args)
    except _C.DistError as e:
        raise DistributedError(str(e)) from None


def is_available(backend: str = "any") -> bool:
    """Whether a backend can be used in this process (as ``mx.distributed.is_available``: an
    unknown name is not available)."""
    if backend not in BACKENDS:
        return False
    if backend == "mpi":
        return _C.mpi_available(mpi_library())[0]
    if backend == "nccl":
        return _nccl_device()[0] is not None and _C.nccl_available(_config.nccl_library())[0]
    return backend in ("any", "ring", "jaccl")  # jaccl: shared memory needs nothing else


def init(strict: bool = False, backend: str = "any") -> Group:
    """The world group, connecting to the other ranks on first call (as ``mx.distributed.init``).

    With no configuration, strict=False gives a size-1 group; strict=True raises.
    """
    global _world
    _check_backend(backend, "init")
    if _world is not None:
        return _world
    if backend == "any":
        backend = default_backend()
        if backend not in BACKENDS:  # the environment's mistake, not the caller's
            raise DistributedError(f"init: MLXDIST_BACKEND={backend!r}: expected one of {BACKENDS}")
    if backend == "jaccl":
        _world = _join_jaccl(strict)
        _tell_launcher()
        return _world
    if backend == "mpi" or (backend == "any" and _mpi_by_default()):
        _world = _join_mpi(strict)
        return _world
    config = ring_config() if backend in ("any", "ring", "nccl") else None
    meet = coordinator_config() if config is None and backend in ("any", "ring", "nccl") else None
    if config is None and meet is None:
        if strict:
            raise DistributedError(
                f"init(strict=True, backend={backend!r}): no configuration found; for the ring "
                "backend set MLX_RANK and MLX_HOSTFILE (jax-mlxdist launch does this), or "
                "MLXDIST_COORDINATOR with MLXDIST_RANK and MLXDIST_WORLD_SIZE")
        _world = Group(None, 0, 1, "ring" if backend == "any" else backend)
        return _world
    _world = _connect(config, meet, "nccl" if backend == "nccl" else "ring")
    _tell_launcher()
    return _world


def _join_jaccl(strict: bool) -> Group:
    """JACCL from MLX's variables, or over shared memory from the ring's configuration."""
    jaccl = jaccl_config()
    meet, devices = jaccl if jaccl else (None, [])
    config = ring_config() if meet is None else None
    if config is None and meet is None:
        meet = coordinator_config()
    if config is None and meet is None:
        if strict:
            raise DistributedError(
                "init(strict=True, backend='jaccl'): no configuration found; set MLX_RANK, "
                "MLX_IBV_DEVICES and MLX_JACCL_COORDINATOR (as for MLX), or the ring's "
                "MLX_RANK and MLX_HOSTFILE for ranks on one host")
        return Group(None, 0, 1, "jaccl")
    return _connect(config, meet, "jaccl", devices)


def _connect(config, meet, backend: str = "ring", devices: list[str] | None = None) -> Group:
    size = len(config[1]) if config else meet.size
    if size == 1:
        if meet:
            meet.done()
        return Group(None, 0, 1, backend)
    rank = config[0] if config else meet.rank
    try:
        try:  # checked before connecting, so no peer waits on a rank that cannot join
            settings = _config.settings(backend)
            if backend == "nccl":
                lib, device = _nccl_setup(settings.nccl_lib)
                settings = dataclasses.replace(settings, nccl_lib=lib, nccl_device=device)
        except DistributedError:
            if meet:
                meet.done()
            raise
        if config:
            hosts, fds = config[1], config[2]
        else:  # every rank's address, gathered by rank 0
            try:
                table = _call(_C.rendezvous, meet.address, rank, size, meet.listen_fd,
                              settings.for_cxx())
            except DistributedError as e:
                raise DistributedError(f"meeting at the coordinator {meet.address} ({meet.source} "
                                       f"variables): {e}") from None
            finally:
                meet.done()
            hosts, fds = [[a] for a in table], []
        handle = _call(_C.connect, backend, rank, hosts, fds, settings.for_cxx(), devices or [])
    except DistributedError as e:  # say which step failed: connecting, not a collective
        raise DistributedError(f"init (rank {rank} of {size}): {e}") from None
    return Group(handle, rank, size, backend)


def _nccl_device():
    """(this process's first CUDA device as JAX numbers it, why not). Asking JAX first also
    starts its CUDA backend before NCCL, which then shares the device's context."""
    try:
        gpus = [d for d in jax.local_devices() if d.platform == "gpu"]
    except RuntimeError as e:
        return None, str(e)
    if not gpus:
        return None, f"JAX sees no CUDA GPU here (its devices: {jax.local_devices()})"
    return gpus[0].local_hardware_id, ""


def _nccl_setup(lib: str) -> tuple[str, int]:
    """(NCCL library, CUDA device) for this rank, or DistributedError saying what is missing."""
    device, why = _nccl_device()
    if device is None:
        raise DistributedError(f"backend 'nccl' needs arrays on a CUDA GPU: {why}. Use the "
                               "ring backend for CPU arrays")
    ok, why = _C.nccl_available(lib)
    if not ok:
        raise DistributedError(f"backend 'nccl': {why}")
    return lib, device


def _mpi_by_default() -> bool:
    """backend="any": MPI when an MPI launcher started us and no ring configuration is set."""
    return (mpi_launched() and not _config.ring_variables_set()
            and _C.mpi_available(mpi_library())[0])


def _join_mpi(strict: bool) -> Group:
    settings = _config.settings("mpi")
    ok, why = _C.mpi_available(settings.mpi_lib)
    if not ok:
        if strict:
            raise DistributedError(f"init(strict=True, backend='mpi'): {why}")
        return Group(None, 0, 1, "mpi")
    handle = _call(_C.connect, "mpi", 0, [], [], settings.for_cxx())
    rank, size = _C.group_info(handle)
    _tell_launcher()
    return Group(handle, rank, size, "mpi")


def _tell_launcher() -> None:
    """Signals `jax-mlxdist launch` that this rank is connected (for its progress line)."""
    fd = _config.take_ready_fd()
    if fd is not None:
        try:
            os.write(fd, b"r")
            os.close(fd)
        except OSError:
            pass


def default_group() -> Group:
    return _world if _world is not None else init()


def resolve(group: Group | None, op: str) -> Group:
    """The group an op runs on: group=None means the default group."""
    if group is None:
        return default_group()
    if not isinstance(group, Group):
        raise DistributedTypeError(
            f"{op}: group must be a jax_mlxdist Group, got {type(group).__name__}")
    group._check_open(op)
    return group


def _check_backend(backend: str, op: str) -> None:
    if backend not in BACKENDS:
        raise DistributedValueError(
            f"{op}: unknown backend {backend!r}; the only valid values for backend are "
            f"{', '.join(repr(b) for b in BACKENDS)}")


@atexit.register
def _close_all() -> None:
    # Pending collectives finish before sockets close, so peers are not cut off mid-message.
    for g in list(_live):
        try:
            g.close()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass
    _C.mpi_finalize()  # only if MPI was started here and nothing was left pending
