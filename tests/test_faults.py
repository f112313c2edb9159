"""Faults on real ranks: a peer killed before or after a collective, stopped past the timeout,
closing its sockets mid-message, or never starting. Every surviving rank raises a
DistributedError naming the peer within MLXDIST_TIMEOUT plus a small margin; the launcher ends
such a job with a non-zero code. (A peer killed during a collective: tests/test_failures.py.)
"""

import subprocess
import sys
import textwrap
import time

import pytest

from jax_mlxdist.testing import RanksFailed, run_ranks

TIMEOUT = 3.0  # MLXDIST_TIMEOUT for these ranks
MARGIN = 2.5   # what a surviving rank may take beyond it (slow CI machines)


def env_for(transport):
    return {"MLXDIST_TIMEOUT": str(TIMEOUT), "MLXDIST_TRANSPORT": transport}


def _attempt(fn):
    """(error text or None, seconds taken); any error must be a DistributedError."""
    import jax
    import jax_mlxdist as dist
    t = time.monotonic()
    try:
        fn()
        return None, time.monotonic() - t
    except jax.errors.JaxRuntimeError as e:
        assert dist.is_distributed_error(e), e
        return str(e), time.monotonic() - t


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
    second = _attempt(lambda: dist.all_sum(jnp.ones(1000)))
    third = _attempt(lambda: dist.all_gather(jnp.ones(3)))  # the group stays failed
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
        return None, _attempt(lambda: dist.barrier())
    err = _attempt(lambda: dist.all_sum(jnp.ones(8)))
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
        return _attempt(lambda: dist.all_sum(jnp.ones(4_000_000)))
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
    return _attempt(lambda: dist.all_sum(jnp.ones(4)))


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
    return _attempt(dist.init)


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
