"""README's failure promises at their edges, on every data path (the ring over sockets and over
shared memory, JACCL over shared memory): a survivor never completes a call its peer abandoned,
even when the peer's bytes are already in shared memory; a send/recv mismatch raises on both
sides, naming both calls; a split against another op is caught by the header check."""

import pytest

from jax_mlxdist.testing import DATA_PATHS, attempt, data_path_env, run_ranks

TIMEOUT = 3.0  # MLXDIST_TIMEOUT for these ranks


@pytest.fixture(params=DATA_PATHS)
def env(request):
    return data_path_env(request.param, TIMEOUT)


def body_abandoned_call():
    import jax.numpy as jnp
    import jax_mlxdist as dist
    from jax_mlxdist.testing import wait_for_peer_hangup
    g = dist.init()
    dist.barrier()
    if g.rank() == 1:
        # Rank 0 is not there yet: this call times out, after leaving its data for rank 0.
        return attempt(lambda: dist.all_sum(jnp.ones(4)).block_until_ready())[0]
    assert wait_for_peer_hangup(60), "rank 1 never gave up"
    return attempt(lambda: dist.all_sum(jnp.ones(4)).block_until_ready())[0]


def test_survivor_raises_for_a_call_its_peer_abandoned(env):
    late, early = run_ranks(body_abandoned_call, 2, env=env, timeout=120)
    assert early is not None and "timed out" in early, early
    # Not 2.0 from what rank 1 left behind: rank 0 names rank 1 and why it left.
    assert late is not None and "rank 1" in late, late
    assert "left the group after an error" in late and "timed out" in late, late


def body_interrupted():
    import os
    import signal
    import threading
    import jax.numpy as jnp
    import jax_mlxdist as dist
    from jax_mlxdist.testing import wait_for_peer_hangup
    g = dist.init()
    dist.barrier()
    if g.rank() == 1:
        # Interrupted in the call (or just before it: the promise below holds either way).
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
        try:
            dist.all_sum(jnp.ones(4)).block_until_ready()
        except BaseException as e:  # noqa: BLE001 - the interrupt, or the failed call
            return type(e).__name__
        return "returned"
    assert wait_for_peer_hangup(60), "rank 1 never left"
    return attempt(lambda: dist.all_sum(jnp.ones(4)).block_until_ready())[0]


@pytest.mark.parametrize("transport", ["shm", "jaccl"])
def test_survivor_raises_after_its_peer_is_interrupted(transport):
    env = {"MLXDIST_TIMEOUT": str(TIMEOUT)}
    env.update({"MLXDIST_BACKEND": "jaccl"} if transport == "jaccl" else {"MLXDIST_TRANSPORT": transport})
    late, interrupted = run_ranks(body_interrupted, 2, env=env, timeout=120)
    assert interrupted != "returned", interrupted
    assert late is not None and "rank 1" in late, late


def body_p2p_mismatch(count, jitted):
    import jax
    import jax.numpy as jnp
    import jax_mlxdist as dist
    g = dist.init()
    if g.rank() == 0:
        x = jnp.ones(count, jnp.float32)
        send = jax.jit(lambda x: dist.send(x, 1)) if jitted else (lambda x: dist.send(x, 1))
        # Sends never wait for their receiver: the send returns (unless rank 1's verdict is
        # already back), and the next call that waits for rank 1 raises.
        return [attempt(lambda: send(x).block_until_ready())[0], attempt(dist.barrier)[0]]
    recv = lambda: dist.recv((count + 1,), jnp.float32, 0)  # noqa: E731
    return [attempt(lambda: (jax.jit(recv) if jitted else recv)().block_until_ready())[0]]


@pytest.mark.parametrize("count, jitted", [(2, False), (2, True), (8 << 20, False)])
def test_send_recv_mismatch_raises_on_both_sides_naming_both_calls(env, count, jitted):
    sender, (receiver,) = run_ranks(body_p2p_mismatch, 2, args=(count, jitted), env=env,
                                    timeout=120)
    sent = f"send(float32, {4 * count} bytes"
    expected = f"recv(float32, {4 * count + 4} bytes"
    assert receiver is not None and sent in receiver and expected in receiver, receiver
    first = next((e for e in sender if e is not None), None)
    assert first is not None and sent in first and expected in first, sender


def body_split_against_all_sum():
    import jax.numpy as jnp
    import jax_mlxdist as dist
    g = dist.init()
    if g.rank() == 0:
        return attempt(lambda: g.split(0))[0]
    return attempt(lambda: dist.all_sum(jnp.ones(4)).block_until_ready())[0]


def test_split_against_another_op_names_both_calls(env):
    # Caught by the header check at once, not at the timeout (far beyond the test's limit).
    results = run_ranks(body_split_against_all_sum, 2, env={**env, "MLXDIST_TIMEOUT": "600"},
                        timeout=90)
    for err in results:
        assert err is not None and "split(" in err and "all_sum(" in err, results
