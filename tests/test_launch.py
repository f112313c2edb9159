"""The launcher on real ranks: prefixes, exit codes, stopping the others on failure."""

import subprocess
import sys
import textwrap


def launch(tmp_path, source, *flags, timeout=120):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(source))
    return subprocess.run([sys.executable, "-P", "-m", "jax_mlxdist.launch", *flags, str(script)],
                          capture_output=True, text=True, timeout=timeout)


def test_ranks_run_with_prefixed_output(tmp_path):
    out = launch(tmp_path, """
        import jax_mlxdist as dist
        g = dist.init()
        print("sum", float(dist.all_sum(1.0)), "of", g.size())
    """, "-n", "3")
    assert out.returncode == 0, out.stderr
    for r in range(3):
        assert f"[rank {r}] sum 3.0 of 3" in out.stdout


def test_single_rank_and_no_prefix(tmp_path):
    out = launch(tmp_path, "import jax_mlxdist as dist; print('size', dist.init().size())",
                 "-n", "1", "--no-prefix")
    assert out.returncode == 0 and out.stdout.strip() == "size 1"


def test_failing_rank_stops_the_job(tmp_path):
    out = launch(tmp_path, """
        import sys, time
        import jax_mlxdist as dist
        g = dist.init()
        if g.rank() == 1:
            sys.exit(7)
        time.sleep(600)  # the surviving ranks would run on; the launcher must stop them
    """, "-n", "3")
    assert out.returncode == 7
    assert "rank 1 exited with code 7" in out.stderr
