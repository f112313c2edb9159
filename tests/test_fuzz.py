"""Fuzzing: configuration parsing and the wire-header decoder give clear errors, never crashes.

Runs in this process (no ranks). Example counts: FUZZ_EXAMPLES per property by default, 20x
that with MLXDIST_STRESS=1.
"""

import contextlib
import json
import os
import socket
import struct
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jax_mlxdist import DistributedError, _C, _config

STRESS = os.environ.get("MLXDIST_STRESS", "") not in ("", "0")
FUZZ_EXAMPLES = 150 * (40 if STRESS else 1)
fuzz = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=not STRESS,
                suppress_health_check=[HealthCheck.too_slow])

# Text that can live in an environment variable: no NUL, no lone surrogates.
env_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                   max_size=40)

# Plausible-looking but arbitrary hostfile content.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | env_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(env_text, inner, max_size=3),
    max_leaves=12)
address = st.one_of(
    st.builds(lambda h, p: f"{h}:{p}", st.sampled_from(["127.0.0.1", "localhost", "", "::1", "h"]),
              st.integers(-5, 70000)),
    env_text)
hostfiles = st.one_of(
    st.lists(st.lists(address, max_size=3), max_size=4).map(json.dumps),
    json_values.map(json.dumps),
    st.binary(max_size=80).map(lambda b: b.decode("latin-1")),
    st.integers(1, 3000).map(lambda depth: "[" * depth + "]" * depth),  # very deep nesting
)


@contextlib.contextmanager
def environment(**values):
    """Sets (or, for None, removes) environment variables, restoring them afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def hostfile_path():
    fd, path = tempfile.mkstemp(prefix="mlxdist-fuzz-", suffix=".json")
    os.close(fd)
    yield path
    os.unlink(path)


@fuzz
@given(content=hostfiles, rank=st.one_of(st.none(), env_text, st.integers(-3, 6).map(str)),
       fds=st.one_of(st.none(), env_text, st.lists(st.integers(-3, 2**40), max_size=3).map(
           lambda xs: ",".join(map(str, xs)))))
def test_ring_config_gives_only_distributed_error(hostfile_path, content, rank, fds):
    with open(hostfile_path, "w", encoding="utf-8", errors="surrogatepass") as f:
        f.write(content)
    with environment(MLX_HOSTFILE=hostfile_path, MLX_RANK=rank, MLXDIST_LISTEN_FDS=fds):
        try:
            config = _config.ring_config()
        except DistributedError as e:
            assert str(e).startswith("init: ")
            return
    # Accepted: then it is well formed.
    r, hosts, listen = config
    assert 0 <= r < len(hosts) and len({len(h) for h in hosts}) == 1
    for entry in (a for h in hosts for a in h):
        host, _, port = entry.rpartition(":")
        assert host and 0 <= int(port) <= 65535
    assert listen == [] or len(listen) == len(hosts[r])


def test_ring_config_accepts_a_good_configuration(hostfile_path):
    with open(hostfile_path, "w") as f:
        json.dump([["127.0.0.1:5000"], ["127.0.0.1:5001"]], f)
    with socket.socket() as s, environment(MLX_HOSTFILE=hostfile_path, MLX_RANK="1",
                                           MLXDIST_LISTEN_FDS=str(s.fileno())):
        assert _config.ring_config() == (1, [["127.0.0.1:5000"], ["127.0.0.1:5001"]], [s.fileno()])
    with environment(MLX_HOSTFILE=hostfile_path, MLX_RANK="0", MLXDIST_LISTEN_FDS="0"):
        with pytest.raises(DistributedError, match="not an open socket"):  # stdin is no socket
            _config.ring_config()


@fuzz
@given(raw=st.one_of(env_text, st.floats().map(repr), st.integers().map(str)))
def test_timeout_gives_only_distributed_error(raw):
    with environment(MLXDIST_TIMEOUT=raw):
        try:
            value = _config.timeout()
        except DistributedError as e:
            assert "MLXDIST_TIMEOUT" in str(e)
            return
    assert 0 < value <= _config.MAX_TIMEOUT  # finite: NaN and inf never reach the C++ deadlines


def test_timeout_values():
    for raw, expected in [("", 300.0), ("2.5", 2.5), ("inf", _config.MAX_TIMEOUT), ("1e300", 1e7)]:
        with environment(MLXDIST_TIMEOUT=raw):
            assert _config.timeout() == expected
    for raw in ("nan", "0", "-1", "abc", "-inf"):
        with environment(MLXDIST_TIMEOUT=raw), pytest.raises(DistributedError):
            _config.timeout()


@fuzz
@given(raw=st.one_of(env_text, st.sampled_from(["tcp", "shm", "auto"])))
def test_transport_gives_only_distributed_error(raw):
    with environment(MLXDIST_TRANSPORT=raw):
        try:
            assert _config.transport() in _config.TRANSPORTS
        except DistributedError as e:
            assert "MLXDIST_TRANSPORT" in str(e)


# --- the wire-header decoder -----------------------------------------------------------------

MAGIC = 0x4D4C5844
HEADER = struct.Struct("=IBBBBQQQQ")  # magic, op, dtype, reduce, tag, group, seq, nbytes, shape
assert HEADER.size == 40

headers = st.builds(
    HEADER.pack, st.just(MAGIC), st.integers(0, 255), st.integers(0, 255), st.integers(0, 255),
    st.integers(0, 255), *[st.integers(0, 2**64 - 1)] * 4)


def _check(mine: bytes, theirs: bytes):
    """None when the decoder accepts, else its error text; anything else fails the test."""
    try:
        _C._check_header(mine, theirs)
        return None
    except _C.DistError as e:
        return str(e)


@fuzz
@given(mine=st.binary(min_size=0, max_size=48), theirs=st.binary(min_size=0, max_size=48))
def test_random_bytes_never_crash_the_header_decoder(mine, theirs):
    err = _check(mine, theirs)
    if len(mine) != 40 or len(theirs) != 40:
        assert err is not None and "40 bytes" in err
    elif err is None:  # accepted only when every compared field agrees
        assert theirs[:4] == struct.pack("=I", MAGIC) and theirs[4:] == mine[4:]


@fuzz
@given(mine=headers, flips=st.lists(st.tuples(st.integers(0, 39), st.integers(1, 255)),
                                    min_size=0, max_size=4))
def test_header_mutations_are_named(mine, flips):
    theirs = bytearray(mine)
    for pos, mask in flips:
        theirs[pos] ^= mask
    err = _check(mine, bytes(theirs))
    if bytes(theirs) == mine:
        assert err is None
        return
    assert err is not None
    if theirs[:4] != mine[:4]:
        assert "not a jax_mlxdist message" in err
    elif theirs[8:16] != mine[8:16]:
        assert "group mismatch" in err
    elif mine[4] == theirs[4] == 4:  # point to point: the receiver checks a send
        assert err.startswith("send/recv mismatch: this rank called recv(")
        assert "the peer called send(" in err
    else:  # both calls are described, whatever the op/dtype codes say
        assert err.startswith("collective mismatch: this rank called ") and "the peer called" in err


def test_header_decoder_names_both_calls():
    mine = HEADER.pack(MAGIC, 1, 11, 0, 0, 7, 3, 64, 9)
    theirs = HEADER.pack(MAGIC, 2, 11, 0, 0, 7, 3, 64, 9)
    assert _check(mine, mine) is None
    err = _check(mine, theirs)
    assert "all_sum(float32, 64 bytes" in err and "all_gather(float32, 64 bytes" in err
    garbage = HEADER.pack(MAGIC, 200, 250, 99, 3, 7, 3, 64, 9)  # unknown codes still print
    assert "op#200(unknown" in _check(mine, garbage)
