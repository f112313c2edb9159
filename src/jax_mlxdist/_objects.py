"""Python objects between ranks (host side): pickled into uint8 arrays that travel through the
array ops, so they carry the same headers, timeouts and errors. Unpickling runs what a peer
sent: only for the ranks of your own job (MLXDIST_TOKEN authenticates them)."""

from __future__ import annotations

import pickle

import numpy as np

from jax_mlxdist import _ops
from jax_mlxdist._errors import DistributedError
from jax_mlxdist._group import Group, resolve


def _host_only(op: str, alternative: str) -> None:
    if not _ops._at_top_level():
        raise DistributedError(f"{op}: Python objects travel outside traced functions (jit, grad, "
                               f"vmap); inside one use {alternative} on arrays")


def _pickled(obj, op: str) -> tuple[np.ndarray | None, str]:
    """(bytes, "") or (None, why): the peers still hear of a failure (length -1), so none of
    them waits for bytes that never come."""
    try:
        return np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8), ""
    except Exception as e:  # noqa: BLE001 - whatever pickling raises, said as ours
        return None, f"{op}: cannot pickle {type(obj).__name__}: {e}"


def _length(data) -> np.ndarray:
    return np.array([-1 if data is None else data.size], np.int64)


def _failed_at(op: str, peer: int) -> DistributedError:
    return DistributedError(f"{op}: rank {peer} could not pickle its object (its error says why)")


def _unpickled(data, op: str, peer: int):
    try:
        return pickle.loads(np.asarray(data, np.uint8).tobytes())
    except Exception as e:  # noqa: BLE001
        raise DistributedError(f"{op}: what rank {peer} sent does not unpickle: {e}") from None


def send_object(obj, dst: int, *, group: Group | None = None) -> None:
    """Send a picklable Python object to rank dst (its length, then its bytes)."""
    _host_only("send_object", "send")
    g = resolve(group, "send_object")
    dst = _ops._peer(g, dst, "send_object", "destination")
    data, why = _pickled(obj, "send_object")
    _ops.send(_length(data), dst, group=g)
    if data is None:
        raise DistributedError(why)
    _ops.send(data, dst, group=g)


def recv_object(src: int, *, group: Group | None = None):
    """The object rank src passed to send_object."""
    _host_only("recv_object", "recv")
    g = resolve(group, "recv_object")
    src = _ops._peer(g, src, "recv_object", "source")
    size = int(_ops.recv((1,), np.int64, src, group=g)[0])
    if size < 0:
        raise _failed_at("recv_object", src)
    return _unpickled(_ops.recv((size,), np.uint8, src, group=g), "recv_object", src)


def broadcast_object(obj, root: int = 0, *, group: Group | None = None):
    """root's obj on every rank (the others' obj is ignored): a config, a seed, file names."""
    _host_only("broadcast_object", "all_gather or send/recv")
    g = resolve(group, "broadcast_object")
    root = _ops._root(g, root, "broadcast_object")
    if g.size() == 1:
        return obj
    if g.rank() == root:
        data, why = _pickled(obj, "broadcast_object")
        for p in range(g.size()):  # sends never wait for their receiver
            if p != root:
                _ops.send(_length(data), p, group=g)
                if data is not None:
                    _ops.send(data, p, group=g)
        if data is None:
            raise DistributedError(why)
        return obj
    try:
        return recv_object(root, group=g)
    except DistributedError as e:
        raise DistributedError(str(e).replace("recv_object", "broadcast_object", 1)) from None


def all_gather_object(obj, *, group: Group | None = None) -> list:
    """Every rank's obj, in rank order."""
    _host_only("all_gather_object", "all_gather")
    g = resolve(group, "all_gather_object")
    data, why = _pickled(obj, "all_gather_object")
    if g.size() == 1:
        if data is None:
            raise DistributedError(why)
        return [obj]
    sizes = np.asarray(_ops.all_gather(_length(data), group=g))
    if data is None:
        raise DistributedError(why)
    if (sizes < 0).any():
        raise _failed_at("all_gather_object", int(np.argmax(sizes < 0)))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    rows = np.asarray(_ops.all_gather(padded[None, :], group=g))
    return [obj if p == g.rank() else _unpickled(rows[p, :sizes[p]], "all_gather_object", p)
            for p in range(g.size())]
