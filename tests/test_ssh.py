"""Remote ranks over ssh, against a real sshd on this machine (run per connection through ssh's
ProxyCommand, so it listens on no port), and `jax-mlxdist config`."""

import json
import os
import pwd
import shutil
import subprocess
import sys
import textwrap

import pytest

SSHD = shutil.which("sshd") or next((p for p in ("/usr/sbin/sshd",) if os.path.exists(p)), None)
SSH = shutil.which("ssh")
pytestmark = pytest.mark.skipif(
    SSHD is None or SSH is None or shutil.which("ssh-keygen") is None,
    reason="needs sshd and ssh: apt-get install openssh-server openssh-client (.ci/run does)")


@pytest.fixture(scope="module")
def ssh_cmd(tmp_path_factory):
    """An ssh command for which hosts h0, h1, h2 are this machine, with a throw-away key."""
    d = tmp_path_factory.mktemp("ssh")
    for key in ("host_key", "id"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)],
                       check=True)
    (d / "authorized_keys").write_text((d / "id.pub").read_text())
    (d / "sshd_config").write_text(textwrap.dedent(f"""
        HostKey {d}/host_key
        AuthorizedKeysFile {d}/authorized_keys
        StrictModes no
        PermitRootLogin prohibit-password
        PasswordAuthentication no
        KbdInteractiveAuthentication no
        UsePAM no
        PidFile none
        LogLevel ERROR
    """))
    (d / "ssh_config").write_text(textwrap.dedent(f"""
        Host h0 h1 h2
          User {pwd.getpwuid(os.getuid()).pw_name}
          IdentityFile {d}/id
          IdentitiesOnly yes
          UserKnownHostsFile /dev/null
          StrictHostKeyChecking no
          LogLevel ERROR
          BatchMode yes
          ProxyCommand {SSHD} -i -f {d}/sshd_config
    """))
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    cmd = f"{SSH} -F {d}/ssh_config"
    probe = subprocess.run([*cmd.split(), "h0", "true"], capture_output=True, text=True,
                           timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"a local sshd cannot be started here: {probe.stderr.strip()}")
    return cmd


def launch(tmp_path, source, ssh_cmd, hosts, *flags, args=()):
    (tmp_path / "hosts.json").write_text(json.dumps(hosts))
    (tmp_path / "script.py").write_text(textwrap.dedent(source))
    return subprocess.run([sys.executable, "-P", "-m", "jax_mlxdist.launch", "--ssh", ssh_cmd,
                           "--hostfile", str(tmp_path / "hosts.json"), *flags,
                           str(tmp_path / "script.py"), *args],
                          capture_output=True, text=True, timeout=180)


HOSTS = [{"ssh": f"h{i}", "ips": ["127.0.0.1"]} for i in range(3)]


def test_ranks_over_ssh(tmp_path, ssh_cmd):
    out = launch(tmp_path, """
        import os
        import jax_mlxdist as dist
        g = dist.init(strict=True)
        print("rank", g.rank(), "of", g.size(), "sum", float(dist.all_sum(1.0)),
              "in", os.getcwd(), os.environ.get("EXTRA"))
    """, ssh_cmd, HOSTS, "--env", "EXTRA=passed", "--cwd", str(tmp_path), "--verbose")
    assert out.returncode == 0, out.stderr
    for r in range(3):
        assert f"[rank {r}] rank {r} of 3 sum 3.0 in {tmp_path} passed" in out.stdout
    assert "3/3 ranks connected" in out.stderr and "authenticated" in out.stderr


def test_failing_remote_rank_stops_the_others(tmp_path, ssh_cmd):
    out = launch(tmp_path, """
        import os, sys, time
        import jax_mlxdist as dist
        g = dist.init()
        with open(os.path.join(sys.argv[1], f"pid{g.rank()}"), "w") as f:
            f.write(str(os.getpid()))
        dist.all_sum(1.0)  # every rank has written its pid
        if g.rank() == 2:
            sys.exit(5)
        time.sleep(600)
    """, ssh_cmd, HOSTS, args=(str(tmp_path),))
    assert out.returncode == 5, out.stderr
    assert "rank 2 exited with code 5; stopped the other ranks" in out.stderr
    for r in range(3):  # stopping ssh stopped the program on the "remote" host
        pid = int((tmp_path / f"pid{r}").read_text())
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_config_writes_a_hostfile(tmp_path, ssh_cmd):
    base = [sys.executable, "-P", "-m", "jax_mlxdist.launch", "config", "--ssh", ssh_cmd]
    out = subprocess.run([*base, "--hosts", "h0,h1", "--loopback", "-o",
                          str(tmp_path / "hosts.json")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    hosts = json.loads((tmp_path / "hosts.json").read_text())
    assert [h["ssh"] for h in hosts] == ["h0", "h1"]
    assert all(len(h["ips"]) == 1 and h["ips"][0].count(".") == 3 for h in hosts)
    out = subprocess.run([*base, "--hosts", "h0,nosuchhost.invalid", "--timeout", "20"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "nosuchhost.invalid: ssh failed" in out.stderr
