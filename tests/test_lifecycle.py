"""Lifecycle: init/close and split/close cycles leak no fds, threads or memory; exiting with
collectives pending neither hangs nor loses results already returned.

Counts: 1,000 init/close and 200 split/close cycles over TCP; over shared memory (slower to set
up, ~20 ms per group) 200 and 40 by default, the full counts with MLXDIST_STRESS=1.
"""

import os
import subprocess
import sys
import textwrap

import pytest

from jax_mlxdist.testing import run_ranks

STRESS = os.environ.get("MLXDIST_STRESS", "") not in ("", "0")


def body_cycles(inits, splits):
    import os
    import jax.numpy as jnp
    import jax_mlxdist as dist

    def our_threads():
        # Ours are named mlxdist-*; JAX's own pools start and stop threads as they please.
        # One acceptor per process (mlxdist-accept) lives as long as its listening sockets, and
        # one flight-record writer (mlxdist-dump, for SIGUSR1) as long as the process.
        names = []
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/comm") as f:
                    names.append(f.read().strip())
            except FileNotFoundError:  # the thread ended while listing
                pass
        per_process = ("mlxdist-accept", "mlxdist-dump")
        assert all(names.count(name) <= 1 for name in per_process), names
        return sum(name.startswith("mlxdist-") and name not in per_process for name in names)

    def usage():
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        return len(os.listdir("/proc/self/fd")), our_threads(), rss

    def cycle_inits(n):
        for i in range(n):
            g = dist.init()
            if i % 100 == 0:  # a new group compiles its ops anew: only now and then
                assert float(dist.all_sum(jnp.float32(1))) == g.size()
            g.close()

    def cycle_splits(g, n):
        for i in range(n):
            s = g.split(i % 2, key=-1)
            if i % 50 == 0:
                assert float(dist.all_sum(jnp.float32(1), group=s)) == s.size()
            s.close()

    def settled_usage():
        # Counted in a world group between barriers: no peer is connecting meanwhile (ranks
        # accept at any time, so a peer already starting its next init would add a socket).
        g = dist.init()
        dist.barrier()
        counted = usage()
        dist.barrier()
        return g, counted

    cycle_inits(20)  # warm-up: JAX's caches, the listening sockets
    g, start = settled_usage()
    g.close()
    cycle_inits(inits)
    g, after_inits = settled_usage()
    cycle_splits(g, 10)
    before_splits = usage()
    cycle_splits(g, splits)
    after_splits = usage()
    g.close()
    return start, after_inits, before_splits, after_splits


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_init_and_split_cycles_leak_nothing(transport):
    inits, splits = (1000, 200) if STRESS or transport == "tcp" else (200, 40)
    results = run_ranks(body_cycles, 2, args=(inits, splits),
                        env={"MLXDIST_TRANSPORT": transport}, timeout=300)
    for start, after_inits, before_splits, after_splits in results:
        assert start[1] == 1 and before_splits[1] == 1, (start, before_splits)  # engines named
        assert after_inits[:2] == start[:2], (start, after_inits)  # fds, threads
        assert after_splits[:2] == before_splits[:2], (before_splits, after_splits)
        # RSS: a few compiled programs (one per new group used) may stay in JAX's caches.
        assert after_inits[2] - start[2] < 32 << 20, (start, after_inits)
        assert after_splits[2] - before_splits[2] < 16 << 20, (before_splits, after_splits)


def test_exit_with_pending_collectives(tmp_path):
    """Ranks leave with 50 jitted all_sums still running: they finish, nothing hangs."""
    script = tmp_path / "script.py"
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    script.write_text(textwrap.dedent(f"""
        import os
        import jax, jax.numpy as jnp
        import numpy as np
        import jax_mlxdist as dist
        g = dist.init()
        step = jax.jit(lambda x: dist.all_sum(x) / g.size() + 1)
        first = np.asarray(step(jnp.full(1000, float(g.rank()))))  # returned: must be kept
        np.save(os.path.join({str(out_dir)!r}, f"first{{g.rank()}}.npy"), first)
        x = jnp.ones(200_000)
        for _ in range(50):
            x = step(x)  # dispatched, not waited for
        print("leaving", flush=True)
    """))
    out = subprocess.run([sys.executable, "-P", "-m", "jax_mlxdist.launch", "-n", "3",
                          str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("leaving") == 3
    import numpy as np
    for r in range(3):
        assert (np.load(out_dir / f"first{r}.npy") == 2.0).all()
