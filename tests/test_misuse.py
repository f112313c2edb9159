"""Misuse on real ranks: bad arguments, closed groups, threads, unmatched sends.

Argument errors raise before anything is sent and leave the group working; a communication
error (an unmatched large send times out) leaves the group failed, every later call raising
with the original error.
"""

import time

import pytest

from jax_mlxdist.testing import run_ranks

TIMEOUT = 3.0
MARGIN = 2.5


def _error(fn, exact=False):
    """The error text of fn(), or None; any error must carry a DistributedError (exact: be one).

    A plain jax.jit call that fails while JAX's C++ dispatch runs it raises a ValueError with
    the text; dist.jit and eager calls raise DistributedError itself."""
    import jax
    import jax_mlxdist as dist
    try:
        fn()
        return None
    except (jax.errors.JaxRuntimeError, ValueError) as e:
        assert dist.is_distributed_error(e), e
        assert not exact or isinstance(e, dist.DistributedError), repr(e)
        return str(e)


def body_bad_arguments():
    import numpy as np
    import jax.numpy as jnp
    import jax_mlxdist as dist
    g = dist.init()
    one = jnp.float32(1)
    errors = {}
    cases = {
        "split float color": lambda: g.split(1.5),
        "split str color": lambda: g.split("a"),
        "split color 2**31": lambda: g.split(2**31),
        "split key below 32 bits": lambda: g.split(0, key=-2**31 - 1),
        "split None key": lambda: g.split(0, key=None),
        "send float dst": lambda: dist.send(one, 1.0),
        "send bool dst": lambda: dist.send(one, True),
        "send huge dst": lambda: dist.send(one, 2**40),
        "send numpy dst out of range": lambda: dist.send(one, np.int64(2)),
        "recv negative src": lambda: dist.recv((2,), jnp.float32, -1),
        "recv src self": lambda: dist.recv_like(one, g.rank()),
        "recv fractional shape": lambda: dist.recv((2.5,), jnp.float32, 1 - g.rank()),
        "recv huge shape": lambda: dist.recv((2**40, 2**40), jnp.float32, 1 - g.rank()),
        "recv bad dtype": lambda: dist.recv((2,), "not a dtype", 1 - g.rank()),
        "sum_scatter scalar": lambda: dist.sum_scatter(one),
        "sum_scatter 3 over 2": lambda: dist.sum_scatter(jnp.ones(3)),
        "bitwise op on floats": lambda: dist.all_reduce(jnp.ones(2), op="xor"),
        "unknown op": lambda: dist.all_reduce(jnp.ones(2), op="mean"),
        "unsupported dtype": lambda: dist.all_sum(np.ones(2, np.float128)
                                                  if hasattr(np, "float128") else "text"),
        "group not a Group": lambda: dist.all_sum(one, group="world"),
    }
    for name, fn in cases.items():
        errors[name] = _error(fn)
        # After each argument error the group still works, with the right values.
        errors[name + ": then"] = float(dist.all_sum(one))
    sub = g.split(np.int64(0), key=np.int32(1 - g.rank()))  # numpy ints are fine; key reverses
    empty = dist.sum_scatter(jnp.ones((0, 3)))
    return errors, sub.rank(), empty.shape


def test_bad_arguments_raise_and_leave_the_group_working():
    for rank, (errors, sub_rank, empty_shape) in enumerate(run_ranks(body_bad_arguments, 2)):
        for name, value in errors.items():
            if name.endswith(": then"):
                assert value == 2.0, name
            else:
                assert value is not None, name
        assert "32 bits" in errors["split color 2**31"]
        assert "must be ints" in errors["split str color"]
        assert "Invalid destination=2 for rank" in errors["send numpy dst out of range"]
        assert "shape must be a tuple of ints" in errors["recv fractional shape"]
        assert "Invalid shape=(3,) for a group of size 2" in errors["sum_scatter 3 over 2"]
        assert sub_rank == 1 - rank
        assert empty_shape == (0, 3)


def body_argument_error_types():
    import jax
    import jax.numpy as jnp
    import jax_mlxdist as dist
    from jax_mlxdist import nn
    g = dist.init()
    one, peer = jnp.float32(1), 1 - g.rank()
    layer = {"weight": jnp.ones((4, 4))}
    # name: (the call, the type MLX and JAX raise for the mistake, the op the message names)
    cases = {
        "send dst out of range": (lambda: dist.send(one, 2), ValueError, "send"),
        "send to itself": (lambda: dist.send(one, g.rank()), ValueError, "send"),
        "send str dst": (lambda: dist.send(one, "1"), TypeError, "send"),
        "recv negative src": (lambda: dist.recv((1,), jnp.float32, -1), ValueError, "recv"),
        "recv_like src out of range": (lambda: dist.recv_like(one, 5), ValueError, "recv"),
        "recv bad dtype": (lambda: dist.recv((1,), "not a dtype", peer), TypeError, "recv"),
        "sendrecv bad src": (lambda: dist.sendrecv(one, peer, 7), ValueError, "sendrecv"),
        "all_reduce unknown op": (lambda: dist.all_reduce(one, op="mean"), ValueError, "all_reduce"),
        "bitwise op on floats": (lambda: dist.all_reduce(one, op="xor"), TypeError, "all_reduce"),
        "bitwise op on floats, jitted": (
            lambda: jax.jit(lambda x: dist.all_reduce(x, op="and"))(one), TypeError, "all_reduce"),
        "all_mean of ints": (lambda: dist.all_mean(jnp.ones(2, jnp.int32)), TypeError, "all_mean"),
        "unsupported input": (lambda: dist.all_sum("text"), TypeError, "all_sum"),
        "sum_scatter indivisible": (lambda: dist.sum_scatter(jnp.ones(3)), ValueError, "sum_scatter"),
        "all_to_all indivisible": (lambda: dist.all_to_all(jnp.ones(3)), ValueError, "all_to_all"),
        "all_to_all split sizes not adding up": (
            lambda: dist.all_to_all(jnp.ones(4), split_sizes=[1, 2], recv_sizes=[1, 3]),
            ValueError, "all_to_all"),
        "all_to_all one size per rank": (
            lambda: dist.all_to_all(jnp.ones(4), split_sizes=[4], recv_sizes=[4]),
            ValueError, "all_to_all"),
        "all_to_all float split sizes": (
            lambda: dist.all_to_all(jnp.ones(4), split_sizes=[2.0, 2.0], recv_sizes=[2, 2]),
            TypeError, "all_to_all"),
        "broadcast root out of range": (lambda: dist.broadcast(one, root=2), ValueError, "broadcast"),
        "reduce str root": (lambda: dist.reduce(one, root="0"), TypeError, "reduce"),
        "scatter indivisible": (lambda: dist.scatter(jnp.ones(3), root=g.rank()), ValueError,
                                "scatter"),
        "split str color": (lambda: g.split("a"), TypeError, "split"),
        "split color beyond 32 bits": (lambda: g.split(2**31), ValueError, "split"),
        "init unknown backend": (lambda: dist.init(backend="nope"), ValueError, "init"),
        "group not a Group": (lambda: dist.all_sum(one, group="world"), TypeError, "all_sum"),
        "nn group not a Group": (lambda: nn.average_gradients({"w": one}, group="world"),
                                 TypeError, "average_gradients"),
        "shard_linear unknown sharding": (lambda: nn.shard_linear(layer, "rows"), ValueError,
                                          "shard_linear"),
        "shard_inplace unknown sharding": (lambda: nn.shard_inplace(layer, "rows"), ValueError,
                                           "shard_inplace"),
        "shard_inplace sharding not a function": (lambda: nn.shard_inplace(layer, 5), TypeError,
                                                  "shard_inplace"),
        "AllToShardedLinear.create indivisible output": (
            lambda: nn.AllToShardedLinear.create(jax.random.key(0), 4, 3), ValueError,
            "AllToShardedLinear"),
        "ShardedToAllLinear.from_linear indivisible input": (
            lambda: nn.ShardedToAllLinear.from_linear({"weight": jnp.ones((4, 3))}), ValueError,
            "ShardedToAllLinear.from_linear"),
        "fully_shard indivisible": (lambda: nn.fully_shard({"w": jnp.ones((3, 2))}), ValueError,
                                    "fully_shard"),
    }
    out = {}
    for name, (fn, builtin, op) in cases.items():
        try:
            fn()
            out[name] = None
        except builtin as e:  # as code written for MLX or JAX catches it
            out[name] = (isinstance(e, dist.DistributedError), str(e).startswith(f"{op}:"), str(e))
    return out, float(dist.all_sum(one))


def test_argument_errors_are_value_and_type_errors():
    """An argument error is caught by `except ValueError` (or TypeError), as MLX's and JAX's
    are, and by `except dist.DistributedError`; it names the op and leaves the group working."""
    for out, after in run_ranks(body_argument_error_types, 2):
        for name, caught in out.items():
            assert caught is not None, f"{name}: no error"
            is_ours, names_op, text = caught
            assert is_ours and names_op, (name, text)
        assert "Invalid destination=2 for rank" in out["send dst out of range"][2]
        assert "Invalid source=-1 for rank" in out["recv negative src"][2]
        assert "the only valid values for backend are" in out["init unknown backend"][2]
        assert "Cannot shard the output of size 3 across 2 devices" in \
            out["AllToShardedLinear.create indivisible output"][2]
        assert after == 2.0


def body_closed_group():
    import jax
    import jax.numpy as jnp
    import jax_mlxdist as dist
    g = dist.init()
    sub = g.split(0)
    f = jax.jit(lambda x: dist.all_sum(x, group=sub))
    h = dist.jit(lambda x: dist.all_gather(x, group=sub))
    before = float(f(jnp.float32(2)))
    assert h(jnp.float32(2)).shape == (2,)
    sub.close()
    sub.close()  # closing twice is fine
    errors = [_error(lambda: dist.all_sum(jnp.ones(2), group=sub), exact=True),
              _error(lambda: f(jnp.float32(2)).block_until_ready()),  # compiled before close
              _error(lambda: h(jnp.float32(2)).block_until_ready(), exact=True),
              _error(lambda: sub.split(0)),
              _error(lambda: dist.barrier(group=sub))]
    after = float(dist.all_sum(jnp.float32(1)))  # the world group is unaffected
    g.close()
    again = float(dist.all_sum(jnp.float32(1)))  # a closed world: the next op re-initialises
    return before, errors, after, again, dist.init() is not g


def test_closed_group_raises_and_others_keep_working():
    for before, errors, after, again, fresh in run_ranks(body_closed_group, 2):
        assert before == 4.0 and after == 2.0 and again == 2.0 and fresh
        for err in errors:
            assert err is not None and "closed" in err, err


def body_threads():
    import threading
    import jax
    import jax.numpy as jnp
    import jax_mlxdist as dist
    g = dist.init()
    sub = g.split(0)
    assert float(dist.all_sum(jnp.float32(1))) == 2  # the main thread now uses the world group
    out = {}

    def worker():
        out["world"] = _error(lambda: dist.all_sum(jnp.float32(1)))
        out["jit"] = _error(lambda: jax.jit(lambda x: dist.all_gather(x))(jnp.ones(2)))
        out["split"] = _error(lambda: g.split(1))
        out["sub"] = float(dist.all_sum(jnp.float32(1), group=sub))  # its own group: fine

    t = threading.Thread(target=worker, name="worker")
    t.start()
    t.join(60)
    assert not t.is_alive()
    out["after"] = float(dist.all_sum(jnp.float32(3)))  # the main thread's calls were unharmed
    out["sub after worker"] = float(dist.all_sum(jnp.float32(1), group=sub))  # it has exited
    return out


def test_second_thread_on_a_group_is_refused():
    for out in run_ranks(body_threads, 2):
        for key in ("world", "jit", "split"):
            assert out[key] is not None and "used by thread 'MainThread'" in out[key], out
            assert "called from 'worker'" in out[key]
        assert out["sub"] == 2.0 and out["after"] == 6.0 and out["sub after worker"] == 2.0


def body_unmatched_send():
    import jax
    import jax.numpy as jnp
    import jax_mlxdist as dist
    g = dist.init()
    pair = g.split(0)  # the group that fails; the world stays usable as a side channel
    # Small: the send completes before the receiver has even posted its recv.
    if g.rank() == 0:
        dist.send(jnp.arange(3.0), 1, group=pair)
        dist.barrier()
        small = None
    else:
        dist.barrier()  # rank 0's send has returned by now
        small = dist.recv((3,), jnp.float32, 0, group=pair).tolist()
    # Large (64 MB, more than any socket or shared-memory buffer) and never received: the send
    # returns at once; the group fails when the send has not moved for MLXDIST_TIMEOUT, and
    # closing the group (which delivers pending sends first) says so.
    if g.rank() == 0:
        big = jnp.ones(16 << 20)
        # Compiled ahead, so the time below is the send's alone (not the compile).
        send = jax.jit(lambda x: dist.send(x, 1, group=pair)).lower(big).compile()
        t = time.monotonic()
        sent = _error(lambda: send(big).block_until_ready())
        returned = time.monotonic() - t
        t = time.monotonic()
        err = _error(lambda: pair.close())
        took = time.monotonic() - t
    else:
        from jax_mlxdist.testing import wait_for_peer_hangup
        assert wait_for_peer_hangup(60), "rank 0 never gave up"
        sent, returned, took = None, 0.0, 0.0
        err = _error(lambda: dist.all_sum(jnp.float32(1), group=pair))
    side_ok = float(dist.all_sum(jnp.float32(1)))  # another group is unaffected
    return small, sent, returned, err, took, side_ok



@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_send_without_recv(transport):
    env = {"MLXDIST_TIMEOUT": str(TIMEOUT), "MLXDIST_TRANSPORT": transport}
    (_, sent, returned, err, took, ok0), (small, _, _, err1, _, ok1) = run_ranks(
        body_unmatched_send, 2, env=env, timeout=60)
    assert small == [0.0, 1.0, 2.0]
    assert sent is None and returned < TIMEOUT / 2, (sent, returned)  # it never waits for recv
    assert err is not None and "timed out" in err and "sending to rank 1" in err, err
    assert "no matching recv" in err, err
    # The timeout bounds a stall: bytes the receiver's kernel still takes late (Linux collapses
    # a full receive queue on loopback, opening the window a little) restart it once at most.
    assert TIMEOUT - 0.5 < took + returned < 2 * TIMEOUT + MARGIN, took
    assert err1 is not None and "rank 0" in err1, err1  # the receiver learns why
    assert ok0 == ok1 == 2.0
