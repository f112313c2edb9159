"""The launcher on real local ranks: ranks and sizes, prefixes, exit codes, MLX hostfiles,
stopping every rank on failure or Ctrl-C, the progress line."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

CHECK = """
    import os, sys
    import jax_mlxdist as dist
    g = dist.init(strict=True)
    total = float(dist.all_sum(float(g.rank() + 1)))
    assert total == g.size() * (g.size() + 1) / 2, total
    print("rank", g.rank(), "of", g.size(), "sum", total, os.environ.get("EXTRA", ""))
"""

# A rank that records its pid and then would run for ten minutes unless stopped.
LINGER = """
    import os, sys, time
    import jax_mlxdist as dist
    g = dist.init()
    with open(os.path.join(sys.argv[1], f"pid{g.rank()}"), "w") as f:
        f.write(str(os.getpid()))
    print("started", flush=True)
    if g.rank() == int(sys.argv[2]):
        sys.exit(7)
    time.sleep(600)
"""


def command(tmp_path, source, *flags, args=()):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(source))
    return [sys.executable, "-P", "-m", "jax_mlxdist.launch", *flags, str(script), *args]


def launch(tmp_path, source, *flags, args=(), timeout=120):
    return subprocess.run(command(tmp_path, source, *flags, args=args), capture_output=True,
                          text=True, timeout=timeout)


def assert_gone(folder, n):
    """Every rank that wrote its pid is no longer running."""
    for r in range(n):
        path = folder / f"pid{r}"
        if path.exists():
            pid = int(path.read_text())
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_ranks_check_rank_size_and_sum(tmp_path, n):
    out = launch(tmp_path, CHECK, "-n", str(n), "--env", "EXTRA=yes")
    assert out.returncode == 0, out.stderr
    for r in range(n):
        assert f"[rank {r}] rank {r} of {n} sum {n * (n + 1) / 2} yes" in out.stdout


def test_single_rank_and_no_prefix(tmp_path):
    out = launch(tmp_path, "import jax_mlxdist as dist; print('size', dist.init().size())",
                 "-n", "1", "--no-prefix")
    assert out.returncode == 0 and out.stdout.strip() == "size 1"


def test_failing_rank_stops_the_job(tmp_path):
    out = launch(tmp_path, LINGER, "-n", "3", args=(str(tmp_path), "1"))
    assert out.returncode == 7
    assert "rank 1 exited with code 7; stopped the other ranks" in out.stderr
    assert_gone(tmp_path, 3)


def test_interrupt_stops_every_rank(tmp_path):
    p = subprocess.Popen(command(tmp_path, LINGER, "-n", "2", args=(str(tmp_path), "-1")),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = set()
        while len(seen) < 2:  # both ranks are running their program
            line = p.stdout.readline()
            assert line, p.stderr.read()
            seen.add(line.split("]")[0])
        p.send_signal(signal.SIGINT)
        try:
            code = p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            raise AssertionError(f"the launcher did not stop: {p.communicate()}") from None
        assert code == 130
        assert "interrupted, stopping all ranks" in p.stderr.read()
    finally:
        p.kill()
        p.wait()
    assert_gone(tmp_path, 2)


@pytest.mark.parametrize("form", ["list", "object"])
def test_mlx_hostfiles(tmp_path, form):
    hosts = [{"ssh": "localhost", "ips": ["127.0.0.1"]}, {"ssh": "127.0.0.1", "ips": []},
             {"ssh": "localhost", "ips": ["127.0.0.1"], "rdma": [None, None, None]}]
    data = hosts if form == "list" else {"backend": "ring", "envs": ["EXTRA=from-file"],
                                         "hosts": hosts}
    (tmp_path / "hosts.json").write_text(json.dumps(data))
    out = launch(tmp_path, CHECK, "--hostfile", str(tmp_path / "hosts.json"))
    assert out.returncode == 0, out.stderr
    extra = "from-file" if form == "object" else ""
    for r in range(3):
        assert f"[rank {r}] rank {r} of 3 sum 6.0 {extra}".rstrip() in out.stdout


def test_bad_hostfile_and_flags_are_clear(tmp_path):
    (tmp_path / "hosts.json").write_text(json.dumps([{"ips": ["127.0.0.1"]}]))
    out = launch(tmp_path, CHECK, "--hostfile", str(tmp_path / "hosts.json"))
    assert out.returncode == 2 and "host 0 must be an object with an \"ssh\" name" in out.stderr
    out = launch(tmp_path, CHECK, "--backend", "mpi")  # mpirun starts MPI jobs
    assert out.returncode == 2 and "--backend mpi: MPI jobs start with" in out.stderr
    out = launch(tmp_path, CHECK, "--env", "NOEQUALS")
    assert out.returncode == 2 and "expected KEY=VALUE" in out.stderr


def test_verbose_reports_connections_and_print_python(tmp_path):
    out = launch(tmp_path, CHECK, "-n", "2", "--verbose", "--connections-per-ip", "2")
    assert out.returncode == 0, out.stderr
    assert "2/2 ranks connected in" in out.stderr
    assert "connected to 1 peers x 2 links, authenticated" in out.stderr
    out = launch(tmp_path, CHECK, "--print-python", "--python", "/opt/py/bin/python3")
    assert out.returncode == 0 and out.stdout.strip() == "/opt/py/bin/python3"


LAUNCH = [sys.executable, "-P", "-m", "jax_mlxdist.launch"]


def test_commands_run_as_given_scripts_with_the_interpreter(tmp_path):
    """As mlx.launch: `launch python x.py`, `launch ./run.sh`, `launch -m module` all work."""
    (tmp_path / "check.py").write_text(textwrap.dedent(CHECK))
    run_sh = tmp_path / "run.sh"
    run_sh.write_text(f"#!/bin/sh\nexec {sys.executable} {tmp_path / 'check.py'} \"$@\"\n")
    run_sh.chmod(0o755)
    forms = {
        "interpreter": [sys.executable, str(tmp_path / "check.py")],
        "executable": [str(run_sh)],
        "module": ["-m", "check"],
    }
    for name, form in forms.items():
        out = subprocess.run([*LAUNCH, "-n", "2", "--cwd", str(tmp_path), *form],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, (name, out.stderr)
        for r in range(2):
            assert f"[rank {r}] rank {r} of 2 sum 3.0" in out.stdout, (name, out.stdout)


def test_unknown_command_is_a_clear_error(tmp_path):
    out = subprocess.run([*LAUNCH, "-n", "2", "no-such-command-here", "x"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2
    assert "'no-such-command-here' is neither a Python script nor a command on PATH" in out.stderr


def test_top_level_help_lists_the_commands():
    import shutil
    exe = shutil.which("jax-mlxdist")
    assert exe, "the console script is installed with the package"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "launch" in out.stdout and "config" in out.stdout, out
    out = subprocess.run([exe, "launch", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--repeat-hosts" in out.stdout


def test_backend_jaccl_runs_and_mpi_says_how(tmp_path):
    source = CHECK + "    assert g.backend == 'jaccl', g.backend\n"
    out = launch(tmp_path, source, "-n", "2", "--backend", "jaccl")
    assert out.returncode == 0, out.stderr
    assert "[rank 1] rank 1 of 2 sum 3.0" in out.stdout
    out = launch(tmp_path, CHECK, "-n", "2", "--backend", "mpi")
    assert out.returncode == 2 and "mpirun -np 2" in out.stderr, out.stderr
