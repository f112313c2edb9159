"""The public collectives: argument checks, the default group, size-1 shortcuts.

Each op binds one primitive of _primitives.py. Eager calls (outside any trace) wait for their
result so that a failure raises DistributedError right there; inside jit the op is asynchronous
and a failure surfaces when the program's results are used.
"""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import core as jax_core

from jax_mlxdist import _observe
from jax_mlxdist import _primitives as P
from jax_mlxdist._errors import DistributedTypeError, DistributedValueError, raise_translated
from jax_mlxdist._group import Group, resolve

SUPPORTED_DTYPES = frozenset(np.dtype(d) for d in (
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", jnp.bfloat16, "float32", "float64", "complex64", "complex128"))
BITWISE = ("and", "or", "xor")


def _resolve(group: Group | None, op: str) -> Group:
    """The group a collective runs on; the calling thread must be the one using it."""
    g = resolve(group, op)
    g._claim(op)
    return g


def _array(x, op: str) -> jax.Array:
    if isinstance(x, (jax.Array, jax.core.Tracer)) and x.dtype in SUPPORTED_DTYPES:
        return x  # the common case, without jnp.asarray's few microseconds
    try:
        x = jnp.asarray(x)
    except TypeError as e:
        raise DistributedTypeError(
            f"{op}: expected an array, got {type(x).__name__}: {e}") from None
    if x.dtype not in SUPPORTED_DTYPES:
        raise DistributedTypeError(f"{op}: dtype {x.dtype} is not supported; supported: "
                                   f"{sorted(str(d) for d in SUPPORTED_DTYPES)}")
    return x


# Eager calls: one jitted bind per primitive and params, called straight from here. It is the
# program JAX's own eager path (apply_primitive) compiles, without JAX's bind machinery in front
# of it (half of a small eager call's cost).
_eager_programs: dict = {}
# Outside every trace? Where JAX lacks the check, every call takes the bind path as before.
_at_top_level = getattr(jax_core, "trace_state_clean", lambda: False)


def _eager(prim, params):
    key = (prim, *params.items())  # our callers pass params in one order
    program = _eager_programs.get(key)
    if program is None:
        program = _eager_programs[key] = jax.jit(functools.partial(prim.bind, **params))
    return program


def _bind(prim, *args, **params):
    """Binds prim; eager results are waited for, so failures raise DistributedError here."""
    try:
        if _at_top_level() and not any(isinstance(a, jax.core.Tracer) for a in args):
            with _observe.span(prim.name, args, params):
                return jax.block_until_ready(_eager(prim, params)(*args))
        out = prim.bind(*args, **params)
        if any(isinstance(o, jax.core.Tracer) for o in jax.tree_util.tree_leaves(out)):
            return out
        return jax.block_until_ready(out)
    except (jax.errors.JaxRuntimeError, ValueError) as e:
        raise_translated(e)


def _is_tree(x) -> bool:
    """A pytree of arrays rather than one array (None, lists, dicts, dataclasses...)."""
    return not jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(x))


def _leafwise(op):
    """Lets op take a pytree as its first argument: one call per leaf, in leaf order (every
    rank flattens the same structure the same way), the same structure back."""
    @functools.wraps(op)
    def wrapper(x, *args, **kwargs):
        if not _is_tree(x):
            return op(x, *args, **kwargs)
        like = kwargs.pop("like", None)
        if like is not None:  # sendrecv's template: a tree of the same structure
            return jax.tree_util.tree_map(
                lambda leaf, t: op(leaf, *args, like=t, **kwargs), x, like)
        return jax.tree_util.tree_map(lambda leaf: op(leaf, *args, **kwargs), x)
    return wrapper


# Leaves up to this size are reduced together, packed into one message (csrc/core/rooted.cc
# packs up to the same size); larger ones get an op each, reduced in place, so XLA overlaps
# what it does with one leaf with the network moving the next.
PACK_BYTES = 1 << 20


def _reduce_tree(tree, g: Group, op: str, vjp: str, name: str):
    """A pytree's leaves reduced, one op each; for sums the small leaves of each dtype share
    one op instead."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    leaves = [_array(leaf, name) for leaf in leaves]
    for leaf in leaves:
        _check_op(leaf, op, name)
    if g.size() == 1 or not leaves:
        return jax.tree_util.tree_unflatten(treedef, leaves)
    if op != "sum":  # packing pays for gradient sums; the others keep their per-array rules
        return jax.tree_util.tree_unflatten(treedef, [
            _bind(P.all_reduce_p, leaf, group=g._handle, reduce=P.REDUCE[op], vjp=vjp,
                  rank=g.rank(), size=g.size()) for leaf in leaves])
    by_dtype: dict = {}
    out = list(leaves)
    for i, leaf in enumerate(leaves):
        if leaf.size * leaf.dtype.itemsize > PACK_BYTES:
            out[i] = _bind(P.all_reduce_p, leaf, group=g._handle, reduce=P.REDUCE[op], vjp=vjp,
                           rank=g.rank(), size=g.size())
        else:
            by_dtype.setdefault(leaf.dtype, []).append(i)
    for indices in by_dtype.values():
        reduced = _bind(P.all_reduce_many_p, *(leaves[i] for i in indices), group=g._handle,
                        reduce=P.REDUCE[op], vjp=vjp, rank=g.rank(), size=g.size())
        for i, y in zip(indices, reduced):
            out[i] = y
    return jax.tree_util.tree_unflatten(treedef, out)


VJP_MODES = ("identity", "all_sum")


def _check_op(x, op: str, name: str) -> None:
    if op not in P.REDUCE:
        raise DistributedValueError(f"{name}: op must be one of {list(P.REDUCE)}, got {op!r}")
    if op in BITWISE and not (jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == np.bool_):
        raise DistributedTypeError(f"{name}: op={op!r} is bitwise: integer or bool arrays only, "
                                   f"got {x.dtype}")


def _reduce(x, group: Group | None, op: str, vjp: str = "identity", name: str = ""):
    name = name or f"all_{op}"
    g = _resolve(group, name)
    if vjp not in VJP_MODES:
        raise DistributedValueError(f"{name}: vjp must be one of {VJP_MODES}, got {vjp!r}")
    if _is_tree(x):
        return _reduce_tree(x, g, op, vjp, name)
    x = _array(x, name)
    _check_op(x, op, name)
    if g.size() == 1:
        return x
    return _bind(P.all_reduce_p, x, group=g._handle, reduce=P.REDUCE[op], vjp=vjp,
                 rank=g.rank(), size=g.size())


def all_sum(x, *, group: Group | None = None, vjp: str = "identity"):
    """Sum of x over the ranks of the group; every rank gets the same bits.

    vjp picks the gradient rule. "identity" (MLX's): the sum is one replicated value and each
    rank's cotangent passes through unchanged; right when every rank computes the same loss
    from it (replicated loss, tensor-parallel layers). "all_sum": the exact transpose, the sum
    of every rank's cotangent; right when each rank computes its own loss and you
    differentiate the sum of those losses.
    """
    return _reduce(x, group, "sum", vjp)


def all_max(x, *, group: Group | None = None):
    """Element-wise maximum over the ranks (NaN wins; complex: by real, then imaginary part)."""
    return _reduce(x, group, "max")


def all_min(x, *, group: Group | None = None):
    """Element-wise minimum over the ranks (NaN wins; complex: by real, then imaginary part)."""
    return _reduce(x, group, "min")


def all_prod(x, *, group: Group | None = None):
    """Element-wise product over the ranks."""
    return _reduce(x, group, "prod")


def all_reduce(x, op: str = "sum", *, group: Group | None = None):
    """Element-wise reduction over the ranks: op is "sum", "max", "min", "prod", or bitwise
    "and", "or", "xor" (integers and bool; bool xor is parity)."""
    return _reduce(x, group, op, name="all_reduce")


def all_mean(x, *, group: Group | None = None, vjp: str = "identity"):
    """all_sum(x) / size (inexact dtypes: floats and complex)."""
    g = resolve(group, "all_mean")
    leaves = [_array(leaf, "all_mean") for leaf in jax.tree_util.tree_leaves(x)]
    for leaf in leaves:
        if not jnp.issubdtype(leaf.dtype, jnp.inexact):
            raise DistributedTypeError(
                f"all_mean: needs floating or complex dtypes, got {leaf.dtype}")
    return jax.tree_util.tree_map(lambda s: s / jnp.asarray(g.size(), s.dtype),
                                  all_sum(x, group=group, vjp=vjp))


@_leafwise
def all_gather(x, *, group: Group | None = None):
    """Every rank's x concatenated along axis 0, in rank order; a scalar gives shape (size,)."""
    g = _resolve(group, "all_gather")
    x = _array(x, "all_gather")
    if g.size() == 1:
        return x.reshape(1) if x.ndim == 0 else x
    return _bind(P.all_gather_p, x, group=g._handle, rank=g.rank(), size=g.size())


@_leafwise
def sum_scatter(x, *, group: Group | None = None):
    """This rank's block (axis 0 split in size() equal parts) of the sum of x over the ranks."""
    g = _resolve(group, "sum_scatter")
    x = _array(x, "sum_scatter")
    if x.ndim == 0 or x.shape[0] % g.size() != 0:
        raise DistributedValueError(
            f"sum_scatter: Invalid shape={x.shape} for a group of size {g.size()}. The first "
            "dimension (axis 0) must be divisible by the group size")
    if g.size() == 1:
        return x
    return _bind(P.sum_scatter_p, x, group=g._handle, rank=g.rank(), size=g.size())


def _peer(g: Group, peer, op: str, role: str) -> int:
    if g.size() == 1:
        raise DistributedValueError(f"{op}: cannot {op} on a singleton group (a group of size 1 "
                                    "has no other rank)")
    if isinstance(peer, (bool, np.bool_)) or not isinstance(peer, (int, np.integer)):
        raise DistributedTypeError(f"{op}: {role} must be an int rank, got {peer!r}")
    peer = int(peer)
    if not 0 <= peer < g.size() or peer == g.rank():
        raise DistributedValueError(f"{op}: Invalid {role}={peer} for rank {g.rank()} of a group "
                                    f"of size {g.size()}")
    return peer


@_leafwise
def send(x, dst: int, *, group: Group | None = None):
    """Send x to rank dst; returns x, so the send stays in the computation."""
    g = _resolve(group, "send")
    x = _array(x, "send")
    dst = _peer(g, dst, "send", "destination")
    return _bind(P.send_p, x, group=g._handle, dst=dst, tag=0)


def recv(shape, dtype, src: int, *, group: Group | None = None):
    """Receive an array of this shape and dtype sent by rank src."""
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise DistributedTypeError(f"recv: {dtype!r} is not a dtype") from None
    if dtype not in SUPPORTED_DTYPES:
        raise DistributedTypeError(f"recv: dtype {dtype} is not supported")
    try:  # operator.index: 2.5 is not a dimension (int() would quietly make it 2)
        shape = tuple(operator.index(d) for d in (shape if np.iterable(shape) else (shape,)))
    except TypeError:
        raise DistributedTypeError(f"recv: shape must be a tuple of ints, got {shape!r}") from None
    if any(d < 0 for d in shape):
        raise DistributedValueError(f"recv: negative dimension in shape {shape}")
    if int(np.prod(shape, dtype=object)) * dtype.itemsize >= 2**62:
        raise DistributedValueError(f"recv: shape {shape} is too large")
    return recv_like(jnp.zeros(shape, dtype), src, group=group)


@_leafwise
def recv_like(x, src: int, *, group: Group | None = None):
    """Receive an array shaped like x from rank src.

    x is only a template, but gradients and vmap follow it: receive into a template that is
    differentiable (or batched) exactly when the matching send's array is.
    """
    g = _resolve(group, "recv")
    x = _array(x, "recv")
    src = _peer(g, src, "recv", "source")
    return _bind(P.recv_p, x, group=g._handle, src=src, tag=0)


@_leafwise
def sendrecv(x, dst: int, src: int, *, group: Group | None = None, like=None):
    """Send x to rank dst and receive from rank src in one op (as MPI_Sendrecv, or one step
    of lax.ppermute); returns what src sent, shaped like `like` (default: like x).

    It pairs with a plain recv on dst and a plain send on src. The gradient sends the
    cotangent back the other way.
    """
    g = _resolve(group, "sendrecv")
    x = _array(x, "sendrecv")
    dst = _peer(g, dst, "sendrecv", "destination")
    src = _peer(g, src, "sendrecv", "source")
    like = x if like is None else _array(like, "sendrecv")
    return _bind(P.sendrecv_p, x, like, group=g._handle, dst=dst, src=src, tag=0)


def _sizes(sizes, n: int, rows: int, what: str) -> tuple:
    if sizes is None:
        if rows % n:
            raise DistributedValueError(f"all_to_all: the first dimension ({rows}) must be "
                                        f"divisible by the group size {n}, or give {what}=")
        return (rows // n,) * n
    try:
        sizes = tuple(operator.index(s) for s in sizes)
    except TypeError:
        raise DistributedTypeError(f"all_to_all: {what} must be ints, got {sizes!r}") from None
    if len(sizes) != n or any(s < 0 for s in sizes):
        raise DistributedValueError(f"all_to_all: {what} must be {n} sizes >= 0 (one per "
                                    f"rank), got {sizes}")
    return sizes


@_leafwise
def all_to_all(x, *, group: Group | None = None, split_sizes=None, recv_sizes=None):
    """Axis 0 of x split in size() blocks, block i sent to rank i; returns the blocks every
    rank sent here, concatenated on axis 0 in rank order (as lax.all_to_all with
    split_axis=concat_axis=0, or torch's all_to_all_single).

    Uneven blocks: split_sizes (rows sent to each rank) and recv_sizes (rows received from
    each rank), static ints as torch takes them; recv_sizes is needed whenever split_sizes is
    given (the output's shape must be known while tracing). Its gradient is the reverse
    all_to_all.
    """
    g = _resolve(group, "all_to_all")
    x = _array(x, "all_to_all")
    if x.ndim == 0:
        raise DistributedValueError("all_to_all: expected an array with a first dimension, got a "
                                    "scalar")
    n = g.size()
    if split_sizes is not None and recv_sizes is None:
        raise DistributedValueError("all_to_all: split_sizes= needs recv_sizes= (how many rows "
                                    "each rank sends here), as the output's shape must be known "
                                    "while tracing")
    send = _sizes(split_sizes, n, x.shape[0], "split_sizes")
    if sum(send) != x.shape[0]:
        raise DistributedValueError(f"all_to_all: split_sizes {send} add up to {sum(send)}, but "
                                    f"the first dimension is {x.shape[0]}")
    recv = send if recv_sizes is None else _sizes(recv_sizes, n, x.shape[0], "recv_sizes")
    if recv[g.rank()] != send[g.rank()]:
        raise DistributedValueError(f"all_to_all: this rank ({g.rank()}) keeps {send[g.rank()]} "
                                    f"rows of its own but recv_sizes expects {recv[g.rank()]}")
    if n == 1:
        return x
    return _bind(P.all_to_all_p, x, group=g._handle, send_sizes=send, recv_sizes=recv,
                 rank=g.rank(), size=n)


def _root(g: Group, root, op: str) -> int:
    if isinstance(root, (bool, np.bool_)) or not isinstance(root, (int, np.integer)):
        raise DistributedTypeError(f"{op}: root must be an int rank, got {root!r}")
    if not 0 <= root < g.size():
        raise DistributedValueError(f"{op}: root must be a rank of the group (0 to "
                                    f"{g.size() - 1}), got {root!r}")
    return int(root)


@_leafwise
def broadcast(x, root: int = 0, *, group: Group | None = None):
    """root's x on every rank (every rank passes an x of that shape and dtype; only root's
    values are used). Its gradient sums every rank's cotangent at root."""
    g = _resolve(group, "broadcast")
    x = _array(x, "broadcast")
    root = _root(g, root, "broadcast")
    if g.size() == 1:
        return x
    return _bind(P.broadcast_p, x, group=g._handle, root=root, rank=g.rank(), size=g.size())


@_leafwise
def reduce(x, root: int = 0, op: str = "sum", *, group: Group | None = None):
    """The reduction of x over the ranks (op: "sum", "max", "min", "prod"), at root, with the
    bits all_reduce gives; the other ranks get their own x back (as mpi4jax's reduce)."""
    g = _resolve(group, "reduce")
    x = _array(x, "reduce")
    root = _root(g, root, "reduce")
    _check_op(x, op, "reduce")
    if g.size() == 1:
        return x
    return _bind(P.reduce_p, x, group=g._handle, root=root, reduce=P.REDUCE[op], rank=g.rank(),
                 size=g.size())


@_leafwise
def gather(x, root: int = 0, *, group: Group | None = None):
    """At root, every rank's x concatenated on axis 0 in rank order (a scalar gives shape
    (size,)); the other ranks get their own x back (as mpi4jax's gather). Every rank's x has
    one shape."""
    g = _resolve(group, "gather")
    x = _array(x, "gather")
    root = _root(g, root, "gather")
    if g.size() == 1:
        return x.reshape(1) if x.ndim == 0 else x
    scalar = x.ndim == 0
    out = _bind(P.gather_p, x.reshape(1) if scalar else x, group=g._handle, root=root,
                rank=g.rank(), size=g.size())
    return out.reshape(()) if scalar and g.rank() != root else out


@_leafwise
def scatter(x, root: int = 0, *, group: Group | None = None):
    """Root's x split on axis 0 into size() equal blocks, block i to rank i. Elsewhere x gives
    only the shape and dtype of one block (as mpi4jax's scatter)."""
    g = _resolve(group, "scatter")
    x = _array(x, "scatter")
    root = _root(g, root, "scatter")
    if g.rank() == root and (x.ndim == 0 or x.shape[0] % g.size() != 0):
        raise DistributedValueError(f"scatter: at the root the first dimension of the input "
                                    f"(shape {x.shape}) must be divisible by the group size "
                                    f"{g.size()}")
    if g.size() == 1:
        return x
    return _bind(P.scatter_p, x, group=g._handle, root=root, rank=g.rank(), size=g.size())


def sum_gradients(group: Group | None = None):
    """A function that is the identity forward and all_sums the cotangent backward (as MLX's
    nn.layers.distributed.sum_gradients); jax_mlxdist.nn exports it.

    Put it where a replicated input enters a sharded computation (the first layer of a
    tensor-parallel block): each rank's partial gradient of the input is then summed.
    """
    g = resolve(group, "sum_gradients")

    def f(x):
        x = _array(x, "sum_gradients")
        if g.size() == 1:
            return x
        return P.grad_sum_p.bind(x, group=g._handle, rank=g.rank(), size=g.size())

    return f


def barrier(*, group: Group | None = None) -> None:
    """Return once every rank of the group has reached this barrier."""
    g = _resolve(group, "barrier")
    if g.size() > 1:
        _bind(P.barrier_p, group=g._handle)
        if _at_top_level():
            g._settle()  # eager: no result to wait on, so wait for the program itself
