"""Failures on real ranks, on every data path where it applies: mismatches, a peer killed
before, during or after a collective, stalled or stopped past the timeout, closing its sockets
mid-message, or never starting; bad arguments; the launcher's exit code. Every surviving rank
raises a DistributedError naming the peer within MLXDIST_TIMEOUT plus a small margin, never a
hang. (Edge cases of the same promises: test_promises.py; an adversary's run:
test_adversarial.py.)"""

import subprocess
import sys
import textwrap
import time

import pytest

from jax_mlxdist.testing import RanksFailed, attempt, data_path_env, run_ranks

TIMEOUT = 3.0  # MLXDIST_TIMEOUT for these ranks
MARGIN = 2.5   # what a surviving rank may take beyond it (slow CI machines)


@pytest.fixture(params=["tcp", "shm", "jaccl"])
def env(request):
    return data_path_env(request.param, TIMEOUT)


def env_for(transport):
    return data_path_env(transport, TIMEOUT)


def body_shape_mismatch():
    import jax.numpy as jnp
    import jax_mlxdist as dist
    r = dist.init().rank()
    first = attempt(lambda: dist.all_sum(jnp.ones(10 + (r == 1))))
    after = attempt(lambda: dist.all_sum(jnp.ones(3)))  # the group stays failed, no wrong data
    return first, after


@pytest.mark.parametrize("n", [2, 3])
def test_mismatched_shapes_raise_on_all_ranks(n, env):
    results = run_ranks(body_shape_mismatch, n, env=env)
    for r, ((err, took), (err2, _)) in enumerate(results):
        assert err is not None and "all_sum" in err, (r, err)
        assert took < TIMEOUT, (r, took)  # detected, not timed out
        assert err2 is not None and "earlier error" in err2
    # The ranks next to the odd one name both calls.
    assert any("mismatch" in err and "40 bytes" in err and "44 bytes" in err
               for (err, _), _ in results)


def body_order_mismatch():
    import jax
    import jax.numpy as jnp
    import jax_mlxdist as dist
    r = dist.init().rank()

    @jax.jit
    def f(x):
        if r == 0:
            return dist.all_gather(dist.all_sum(x))
        return dist.all_sum(dist.all_gather(x))[:4]

    return attempt(lambda: f(jnp.ones(4)).block_until_ready())


def test_mismatched_order_raises_on_all_ranks(env):
    results = run_ranks(body_order_mismatch, 2, env=env)
    for r, (err, took) in enumerate(results):
        assert err is not None and "mismatch" in err, (r, err)
        assert "all_sum" in err and "all_gather" in err
        assert took < TIMEOUT


def body_killed_mid_collective():
    import os
    import jax.numpy as jnp
    import jax_mlxdist as dist
    g = dist.init()
    dist.barrier()
    if g.rank() == 1:
        # Dies with the collective in flight on the others.
        os.kill(os.getpid(), 9)
    return attempt(lambda: dist.all_sum(jnp.ones(4_000_000)))


def test_killed_rank_makes_others_raise(env):
    from jax_mlxdist.testing import RanksFailed
    with pytest.raises(RanksFailed) as info:
        run_ranks(body_killed_mid_collective, 3, env=env)
    report = info.value
    assert "rank 1" in str(report)
    for r in (0, 2):
        err, took = report.results[r]
        assert err is not None and "rank 1" in err, (r, err)
        assert took < TIMEOUT + 2


def body_stalled_peer():
    import time
    import jax.numpy as jnp
    import jax_mlxdist as dist
    g = dist.init()
    if g.rank() == 1:
        time.sleep(TIMEOUT + 2)  # a stalled peer (the subject of the test), alive but silent
        return None
    return attempt(lambda: dist.all_sum(jnp.ones(8)))


def test_stalled_peer_times_out_with_its_name(env):
    results = run_ranks(body_stalled_peer, 2, env=env, timeout=60)
    err, took = results[0]
    assert err is not None and "timed out" in err and "rank 1" in err
    assert TIMEOUT - 0.5 < took < TIMEOUT + 3


def body_bad_arguments():
    import jax.numpy as jnp
    import jax_mlxdist as dist
    g = dist.init()
    errors = [
        attempt(lambda: dist.send(jnp.ones(2), g.size())),
        attempt(lambda: dist.send(jnp.ones(2), g.rank())),
        attempt(lambda: dist.recv((2,), jnp.float32, -1)),
        attempt(lambda: dist.sum_scatter(jnp.ones(g.size() + 1))),
        attempt(lambda: dist.all_reduce(jnp.ones(2), op="xor")),  # bitwise on floats
        attempt(lambda: dist.all_sum("text")),
    ]
    ok = float(dist.all_sum(jnp.float32(1)))  # bad calls never reach the wire
    return errors, ok


def test_bad_arguments_raise_before_communicating():
    for errors, ok in run_ranks(body_bad_arguments, 2):
        assert ok == 2.0
        for err, _ in errors:
            assert err is not None


def _data_sockets():
    """This rank's connected TCP sockets (its links to peers), as duplicated socket objects."""
    import os
    import socket
    found, seen = [], set()
    for name in os.listdir("/proc/self/fd"):  # our own dups may reuse listed numbers: dedupe
        fd = int(name)
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            s = socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM)
        except OSError:
            continue
        try:
            listening = s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            ends = (s.getsockname(), s.getpeername())
        except OSError:
            s.close()
            continue
        if listening or ends in seen:
            s.close()
        else:
            seen.add(ends)
            found.append(s)
    return found


def body_killed(when):
    import os
    import signal
    import jax.numpy as jnp
    import jax_mlxdist as dist
    g = dist.init()
    first = None
    if when == "after":
        first = dist.all_sum(jnp.arange(4.0) + g.rank())  # completes on every rank
    if g.rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    second = attempt(lambda: dist.all_sum(jnp.ones(1000)))
    third = attempt(lambda: dist.all_gather(jnp.ones(3)))  # the group stays failed
    return first, second, third


@pytest.mark.parametrize("when,transport", [("before", "tcp"), ("after", "shm")])
def test_peer_killed_before_or_after_a_collective(when, transport):
    with pytest.raises(RanksFailed) as info:
        run_ranks(body_killed, 3, args=(when,), env=env_for(transport), timeout=60)
    assert "rank 1 exited with code -9" in str(info.value)
    for r in (0, 2):
        first, (err, took), (err3, _) = info.value.results[r]
        if when == "after":  # the result returned before the death is intact
            assert first.tolist() == [3.0, 6.0, 9.0, 12.0]
        assert err is not None and "rank 1" in err and "all_sum" in err, (r, err)
        assert took < TIMEOUT + MARGIN, (r, took)
        assert err3 is not None and "earlier error" in err3 and "rank 1" in err3, (r, err3)


def body_stopped():
    import os
    import signal
    import jax.numpy as jnp
    import jax_mlxdist as dist
    g = dist.init()
    pids = dist.all_gather(jnp.int32(os.getpid())).tolist()
    if g.rank() == 1:
        os.kill(os.getpid(), signal.SIGSTOP)  # rank 0 resumes us once it has given up
        dist.all_sum(jnp.ones(8))  # may still complete from buffered bytes
        return None, attempt(lambda: dist.barrier())
    err = attempt(lambda: dist.all_sum(jnp.ones(8)))
    os.kill(pids[1], signal.SIGCONT)
    return err, None


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_stopped_peer_times_out_then_fails_when_resumed(transport):
    try:
        results = run_ranks(body_stopped, 2, env=env_for(transport), timeout=60)
    except RanksFailed as e:  # rank 1's all_sum may raise too: its group is then failed
        assert e.results[0] is not None, str(e)
        assert "DistributedError" in str(e) and "rank 0" in str(e), str(e)
        results = e.results
    err, took = results[0][0]
    assert err is not None and "timed out" in err and "rank 1" in err and "MLXDIST_TIMEOUT" in err
    assert TIMEOUT - 0.5 < took < TIMEOUT + MARGIN, took
    if results[1] is not None:  # resumed: the peer's sockets are gone, so it fails fast
        err1, took1 = results[1][1]
        assert err1 is not None and "rank 0" in err1, err1
        assert took1 < TIMEOUT + MARGIN


def body_closes_sockets_mid_message():
    import select
    import socket
    import jax.numpy as jnp
    import jax_mlxdist as dist
    g = dist.init()
    dist.barrier()
    if g.rank() != 1:
        return attempt(lambda: dist.all_sum(jnp.ones(4_000_000)))
    socks = _data_sockets()
    assert len(socks) == 2, socks  # one link to each peer
    # Wait (bounded) until a peer's 16 MB all_sum is streaming into us, then cut it: half a
    # header out, both directions shut down, with the peers mid-message.
    readable, _, _ = select.select(socks, [], [], 30)
    assert readable, "no peer started sending"
    for s in socks:
        s.send(b"DXLM\x01\x0b\x00\x00" + bytes(12))
        s.shutdown(socket.SHUT_RDWR)
        s.close()
    return attempt(lambda: dist.all_sum(jnp.ones(4)))


def test_peer_closing_its_sockets_mid_message():
    results = run_ranks(body_closes_sockets_mid_message, 3, env=env_for("tcp"), timeout=60)
    for r in (0, 2):
        err, took = results[r]
        assert err is not None and "rank 1" in err and "all_sum" in err, (r, err)
        assert took < TIMEOUT + MARGIN, (r, took)
    err, _ = results[1]
    assert err is not None and "all_sum" in err  # its own group is broken too


def body_never_starts():
    import jax_mlxdist as dist
    if dist.__name__ and __import__("os").environ["MLX_RANK"] == "1":
        return None  # exits without ever calling init()
    return attempt(dist.init)


def test_rank_that_never_starts_is_named():
    results = run_ranks(body_never_starts, 3, env=env_for("tcp"), timeout=60)
    for r in (0, 2):
        err, took = results[r]
        assert err is not None and "rank 1 at 127.0.0.1:" in err, (r, err)
        assert took < TIMEOUT + MARGIN, (r, took)


def _launch(tmp_path, source, n, env_args, timeout=60):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(source))
    t = time.monotonic()
    out = subprocess.run([sys.executable, "-P", "-m", "jax_mlxdist.launch", "-n", str(n),
                          *env_args, str(script)],
                         capture_output=True, text=True, timeout=timeout)
    return out, time.monotonic() - t


@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGSTOP"])
def test_launcher_ends_the_job_nonzero(tmp_path, signal_name):
    out, took = _launch(tmp_path, f"""
        import os, signal
        import jax.numpy as jnp
        import jax_mlxdist as dist
        g = dist.init()
        dist.barrier()
        if g.rank() == 1:
            os.kill(os.getpid(), signal.{signal_name})
        dist.all_sum(jnp.ones(1000))
        print("finished", flush=True)
    """, 3, ["--env", "MLXDIST_TIMEOUT=2"])
    assert out.returncode != 0, out
    assert "finished" not in out.stdout
    if signal_name == "SIGSTOP":  # a survivor times out and names the stopped rank
        assert "DistributedError" in out.stderr and "rank 1" in out.stderr, out.stderr
    else:
        assert "rank 1 was killed by signal 9" in out.stderr, out.stderr
    assert took < 40, took
