"""Observability on real ranks: MLXDIST_DEBUG's op log, the flight recorder in error messages,
dumps (dump_flight_recorder, SIGUSR1), the launcher's summary of where ranks are, Group.stats()
and profiler spans."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import textwrap

import pytest

from jax_mlxdist.testing import launch, run_ranks


def write(tmp_path, source: str) -> pathlib.Path:
    path = tmp_path / "job.py"
    path.write_text(textwrap.dedent(source))
    return path


def test_op_log_has_a_line_per_op_per_rank(tmp_path, monkeypatch):
    monkeypatch.setenv("MLXDIST_DEBUG", "1")
    job = write(tmp_path, """
        import jax.numpy as jnp
        import jax_mlxdist as dist
        g = dist.init()
        x = jnp.ones(1024)
        dist.all_sum(x)
        dist.all_gather(x[:8])
        if g.rank() == 0:
            dist.send(x, 1)
        else:
            dist.recv_like(x, 0)
    """)
    out = launch(job, 2)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [ln for ln in out.stderr.splitlines() if "[mlxdist]" in ln]
    for r in (0, 1):
        mine = [ln for ln in lines if f"(rank {r} of 2) op " in ln]
        assert any(re.search(r"op 1: all_sum\(float32, 4096 bytes, shape#\w+, call #\d+\): "
                             r"queued \d+ us, waiting \d+ (us|ms), moving \d+ (us|ms)", ln) for ln in mine), mine
        assert any("op 2: all_gather(float32, 32 bytes" in ln for ln in mine), mine
        p2p = "send to rank 1 (float32, 4096 bytes" if r == 0 else "recv from rank 0 (float32, 4096 bytes"
        assert any(f"op 3: {p2p}" in ln for ln in mine), mine
        assert all(re.match(r"\[rank \d\] \[mlxdist\] ring group \w+ \(rank \d of 2\) op \d+: ", ln) for ln in mine)


def body_timeout():
    import jax.numpy as jnp
    import jax_mlxdist as dist
    from jax_mlxdist.testing import wait_for_peer_hangup
    g = dist.init()
    x = jnp.ones(256)
    dist.all_gather(x)
    dist.all_sum(x)
    if g.rank() == 2:  # never calls the third op; stays connected until the others give up
        wait_for_peer_hangup(60)
        return None
    try:
        dist.all_sum(x * 2)
    except dist.DistributedError as e:
        return str(e)
    return "no error"


def test_a_timeout_names_the_op_in_flight_and_the_ones_before_on_every_rank():
    results = run_ranks(body_timeout, 3, env={"MLXDIST_TIMEOUT": "2"}, timeout=120)
    for r in (0, 1):
        text = results[r]
        assert "timed out after 2 s" in text, text
        assert re.search(r"in flight on this rank: op 3, all_sum\(float32, 1024 bytes, shape#\w+, "
                         r"call #\d+\), for \d+ (ms|us)", text), text
        assert re.search(r"completed before it on this rank:\n    op 2, all_sum\(float32, 1024 bytes"
                         r".*\n    op 1, all_gather\(float32, 1024 bytes", text), text


def body_dumps(folder):
    import json
    import os
    import signal
    import time
    import jax.numpy as jnp
    import jax_mlxdist as dist
    g = dist.init()
    x = jnp.ones(100, jnp.int32)
    for _ in range(3):
        dist.all_sum(x)
    sub = g.split(0)
    dist.all_max(x, group=sub)
    mine = os.path.join(folder, f"by-call-{g.rank()}.json")
    record = dist.dump_flight_recorder(mine)
    with open(mine) as f:
        assert json.load(f) == record
    os.kill(os.getpid(), signal.SIGUSR1)  # written by the recorder's own thread
    path = os.path.join(folder, f"rank{g.rank()}.json")
    deadline = time.monotonic() + 30
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    with open(path) as f:
        by_signal = json.load(f)
    return record, by_signal, g.stats(), sub.stats(), g.flight_record()


def test_flight_record_dumps_stats(tmp_path):
    results = run_ranks(body_dumps, 2, args=(str(tmp_path),),
                        env={"MLXDIST_FLIGHT_DIR": str(tmp_path)}, timeout=120)
    for r, (record, by_signal, stats, sub_stats, ops) in enumerate(results):
        for dump in (record, by_signal):
            assert dump["rank"] == r and len(dump["groups"]) == 2
            world, sub = dump["groups"]
            assert f"(rank {r} of 2)" in world["label"]
            sums = [op for op in world["ops"] if op["kind"] == "all_sum"]
            assert len(sums) == 3 and all(op["bytes"] == 400 and op["state"] == "done" for op in sums)
            assert [op["call"] for op in sums] == sorted(op["call"] for op in sums)
            for op in sums:
                assert 0 < op["queued_ns"] <= op["started_ns"] <= op["peer_ns"] <= op["done_ns"]
            assert any(op["kind"] == "all_max" for op in sub["ops"])
        assert stats["all_sum"]["ops"] == 3 and stats["all_sum"]["bytes"] == 1200
        assert stats["all_sum"]["failed"] == 0
        assert all(stats["all_sum"][k] >= 0 for k in ("queued_s", "waiting_s", "moving_s"))
        assert sub_stats["all_max"]["ops"] == 1 and "all_sum" not in sub_stats
        assert [op["kind"] for op in ops].count("all_sum") == 3


STOPPED = """
    import os, signal, sys, threading
    import jax.numpy as jnp
    import jax_mlxdist as dist
    g = dist.init()
    x = jnp.ones(64)
    dist.all_gather(x)
    dist.all_sum(x)
    if g.rank() == 2:
        os.kill(os.getpid(), signal.SIGSTOP)

    def announce():  # once this rank's third op is in flight (its flight record says so)
        while True:
            ops = g.flight_record()
            if ops and ops[-1]["index"] == 3 and ops[-1]["state"] == "running":
                print("inside", flush=True)
                return

    threading.Thread(target=announce, daemon=True).start()
    dist.all_sum(x * 2)
"""


def test_launcher_prints_where_every_rank_is_when_interrupted(tmp_path):
    job = write(tmp_path, STOPPED)
    env = {**os.environ, "MLXDIST_TIMEOUT": "120"}
    p = subprocess.Popen([sys.executable, "-P", "-m", "jax_mlxdist.launch", "-n", "3", str(job)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    inside = set()
    try:
        for line in p.stdout:
            if line.rstrip().endswith("inside"):
                inside.add(line.split("]")[0])
            if len(inside) == 2:
                break
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert len(inside) == 2, (inside, err)
    assert "where the ranks are:" in err, err
    for r in (0, 1):
        assert re.search(rf"rank {r}: ring group \w+ \(rank {r} of 3\): in op 3, all_sum\(float32, "
                         r"256 bytes, shape#\w+, call #\d+\), for [\d.]+ s", err), err
    assert "rank 2: no flight record (stopped, or not answering SIGUSR1)" in err, err
    assert p.returncode == 130


def body_profile(folder):
    import jax
    import jax.numpy as jnp
    import jax_mlxdist as dist
    g = dist.init()
    x = jnp.ones(1000)
    gather = jax.jit(dist.all_gather)
    dist.all_sum(x)  # compiled before the trace
    gather(x)
    with jax.profiler.trace(f"{folder}/rank{g.rank()}"):
        dist.all_sum(x)
        gather(x)
        if g.rank() == 0:
            dist.send(x, 1)
        else:
            dist.recv_like(x, 0)
    return g.rank()


def test_profiler_trace_has_our_spans(tmp_path):
    """Eager calls: a span per op from the Python dispatch (name, bytes, peer). Jitted ones: XLA's
    spans of our custom calls, including their end on the engine thread."""
    import gzip
    run_ranks(body_profile, 2, args=(str(tmp_path),), timeout=180)
    for r, p2p, peer in ((0, "mlxdist.send", "dst 1"), (1, "mlxdist.recv", "src 0")):
        traces = list((tmp_path / f"rank{r}").rglob("*.trace.json.gz"))
        assert traces, list(tmp_path.rglob("*"))
        events = [e for t in traces for e in json.loads(gzip.decompress(t.read_bytes()))["traceEvents"]]
        spans = {e["name"]: e.get("args", {}) for e in events if e.get("ph") == "X"}
        assert spans["mlxdist.all_reduce"] == {"bytes": "4000", "peer": "all"}, spans.get("mlxdist.all_reduce")
        assert spans[p2p]["peer"] == peer
        names = " ".join(spans)
        assert "mlxdist_all_gather" in names and "end: mlxdist_all_gather" in names, names
