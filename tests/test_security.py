"""Only ranks that prove the job's token (MLXDIST_TOKEN) can join; strangers are refused and
logged without disturbing the job."""

import pytest

from jax_mlxdist.testing import run_ranks

HELLO_MAGIC = 0x4D4C4832


def _capture_stderr():
    """Redirects fd 2 (where the C++ side logs) to a file; returns a function reading it."""
    import os
    import tempfile
    f = tempfile.NamedTemporaryFile(delete=False)
    os.dup2(f.fileno(), 2)
    return lambda: open(f.name).read()


def body_strangers():
    import json
    import os
    import socket
    import struct
    import time
    import jax.numpy as jnp
    import jax_mlxdist as dist

    rank = int(os.environ["MLX_RANK"])
    read_log = _capture_stderr()
    strangers = []
    if rank == 0:  # rank 0 plays the stranger against rank 1's listening address
        host, port = json.load(open(os.environ["MLX_HOSTFILE"]))[1][0].split(":")
        target = (host, int(port))

        def connect():
            s = socket.create_connection(target)
            strangers.append(s)
            return s

        connect().close()                                    # a port scan
        connect().sendall(b"GET / HTTP/1.1\r\n\r\n" * 3)     # garbage
        connect().sendall(b"\x32\x48")                       # slow-loris: half a greeting, then silence
        s = connect()                                        # a wrong token
        s.sendall(struct.pack("<IIQII16s", HELLO_MAGIC, 0, 0, 0, 1, b"n" * 16))
        s.recv(56)
        s.sendall(b"\0" * 32)
    t = time.monotonic()
    dist.init()
    joined = time.monotonic() - t
    total = float(dist.all_sum(jnp.float32(1)))
    dist.barrier()
    return total, joined, read_log() if rank == 1 else ""


def test_strangers_are_refused_and_logged():
    results = run_ranks(body_strangers, 2)
    (total0, joined0, _), (total1, joined1, log) = results
    assert total0 == total1 == 2.0
    assert joined0 < 4 and joined1 < 4  # the silent connection did not hold up the job
    assert "not a jax_mlxdist greeting" in log
    assert "wrong job token" in log
    assert "closed during the handshake" in log


def body_token(tokens):
    import os
    import jax_mlxdist as dist
    rank = int(os.environ["MLX_RANK"])
    if tokens[rank] is None:
        os.environ.pop("MLXDIST_TOKEN", None)
    else:
        os.environ["MLXDIST_TOKEN"] = tokens[rank]
    try:
        dist.init()
        return None
    except dist.DistributedError as e:
        return str(e)


def test_ranks_with_different_tokens_do_not_connect():
    errors = run_ranks(body_token, 2, args=(["secret-a", "secret-b"],), env={"MLXDIST_TIMEOUT": "4"})
    assert "MLXDIST_TOKEN differs" in errors[0]
    assert errors[1] is not None  # rank 1 refused rank 0 and timed out waiting for a real one


def test_token_on_one_side_only_is_a_clear_error():
    errors = run_ranks(body_token, 2, args=([None, "secret"],), env={"MLXDIST_TIMEOUT": "4"})
    assert "requires a job token" in errors[0]
    assert errors[1] is not None


def test_same_token_connects():
    assert run_ranks(body_token, 3, args=(["s3cret"] * 3,)) == [None] * 3


def body_idle_flood():
    import json
    import os
    import time
    import jax.numpy as jnp
    import jax_mlxdist as dist
    from jax_mlxdist.testing import IdleFlood

    rank = int(os.environ["MLX_RANK"])
    g = dist.init()
    first = float(dist.all_sum(jnp.float32(1)))
    host, port = json.load(open(os.environ["MLX_HOSTFILE"]))[1][0].split(":")
    with IdleFlood((host, int(port)), 400) if rank == 0 else _nothing() as flood:
        dist.barrier()  # rank 1 goes on only once the stranger holds its connections
        t = time.monotonic()
        sums = []
        for i in range(3):  # every split forms new connections to rank 1's port
            sub = g.split(0)
            sums.append(float(dist.all_sum(jnp.float32(i + 1), group=sub)))
            sub.close()
        took = time.monotonic() - t
        dist.barrier()
        opened = flood.opened if flood else 0
    return first, sums, took, opened


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None


@pytest.mark.parametrize("transport", ["tcp", "shm", "jaccl"])
@pytest.mark.parametrize("token", [None, "s3cret"])
def test_idle_connection_flood_does_not_break_split(transport, token):
    env = {"MLXDIST_TIMEOUT": "10"}
    env.update({"MLXDIST_BACKEND": "jaccl"} if transport == "jaccl" else {"MLXDIST_TRANSPORT": transport})
    if token:
        env["MLXDIST_TOKEN"] = token
    results = run_ranks(body_idle_flood, 2, env=env)
    for first, sums, took, _ in results:
        assert first == 2.0 and sums == [2.0, 4.0, 6.0]
        assert took < 8  # never waited for a timeout
    assert results[0][3] >= 400  # the stranger really held (and re-opened) its connections
