"""What a job is doing: the op log, the flight recorder, per-op counters, profiler spans.

Recording happens in C++ (csrc/core/recorder.h: each group's last 256 ops with their timings,
kept by its engine thread); this module reads it, writes dumps and sums them up for people.
"""

from __future__ import annotations

import json
import os
import time

import jax

from jax_mlxdist import _C, _config

RECORD_FILE = "rank{rank}.json"  # in MLXDIST_FLIGHT_DIR (the launcher sets it)
_set_up = False


def set_up(world_rank: int) -> None:
    """Once per process, with its first group: MLXDIST_FLIGHT_RECORDER, MLXDIST_DEBUG's op log,
    and SIGUSR1 writing the flight record (to MLXDIST_FLIGHT_DIR/rank<r>.json, else stderr)."""
    global _set_up
    if _set_up:
        return
    _set_up = True
    _C.set_recording(_config.flight_recorder())
    _C.set_op_log(_config.op_log())
    folder = _config.flight_dir()
    path = os.path.join(folder, RECORD_FILE.format(rank=world_rank)) if folder else ""
    _C.dump_flight_record_on_signal(path, world_rank)


def _rank() -> int:
    from jax_mlxdist import _group
    world = _group._world
    return world.rank() if world is not None else 0


def dump_flight_recorder(path: str | os.PathLike | None = None) -> dict:
    """This process's flight record: every live group's last 256 ops (what, bytes, call
    number, and when each was queued, started, first heard from a peer and ended, in ns since
    the epoch). Written as JSON to path when given; returned as a dict."""
    record = json.loads(_C.flight_record(_rank()))
    if path is not None:
        tmp = f"{os.fspath(path)}.tmp"
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.replace(tmp, path)
    return record


def stats(handle: int | None) -> dict:
    """Group.stats(): per op kind, ops, failed ops, bytes (this rank's input), and seconds
    queued, waiting for peers (until the first peer's header arrived) and moving bytes."""
    if handle is None:
        return {}
    return {kind: {"ops": ops, "failed": failed, "bytes": nbytes, "queued_s": q / 1e9,
                   "waiting_s": w / 1e9, "moving_s": m / 1e9}
            for kind, (ops, failed, nbytes, q, w, m) in _C.group_stats(handle).items()}


def flight_record(handle: int | None) -> list[dict]:
    """Group.flight_record(): the group's last 256 ops on this rank, oldest first."""
    return [] if handle is None else json.loads(_C.group_record(handle))["ops"]


def span(name: str, args: tuple, params: dict):
    """A jax.profiler span for an op dispatched from Python, named by op, with its bytes and
    peer (MLXDIST's engine-side timings are in the flight record)."""
    peer = next((f"{k} {params[k]}" for k in ("dst", "src", "root") if k in params), "all")
    nbytes = sum(getattr(a, "nbytes", 0) for a in args)
    return jax.profiler.TraceAnnotation(f"mlxdist.{name.removeprefix('mlxdist_')}", bytes=nbytes,
                                        peer=peer)


def _describe(op: dict, now_ns: int) -> str:
    took = ((op["done_ns"] or now_ns) - op["started_ns"]) / 1e9
    if op["state"] == "running":
        heard = "a peer has answered" if op["peer_ns"] else "no peer has answered yet"
        return f"in op {op['index']}, {op['what']}, for {took:.2f} s ({heard})"
    ago = (now_ns - op["done_ns"]) / 1e9
    return f"idle; last op {op['index']}, {op['what']}, {op['state']} {ago:.2f} s ago"


def summarize(records: dict[int, dict | None]) -> list[str]:
    """One line per rank and group saying where each rank is, from their flight records
    (None: the rank did not answer, e.g. stopped or stuck outside Python and C++)."""
    lines = []
    for rank in sorted(records):
        record = records[rank]
        if record is None:
            lines.append(f"rank {rank}: no flight record (stopped, or not answering SIGUSR1)")
            continue
        groups = [g for g in record["groups"] if g["ops"]]
        if not groups:
            lines.append(f"rank {rank}: no ops yet")
        for g in groups:
            lines.append(f"rank {rank}: {g['label']}: {_describe(g['ops'][-1], record['time_ns'])}")
    return lines


def collect(folder: str, ranks: list[int], timeout: float) -> dict[int, dict | None]:
    """The flight records ranks wrote into folder (after SIGUSR1), waiting up to timeout for
    the ones still missing; None for a rank that wrote none."""
    deadline = time.monotonic() + timeout
    found: dict[int, dict | None] = {}
    while True:
        for r in ranks:
            path = os.path.join(folder, RECORD_FILE.format(rank=r))
            if r not in found and os.path.exists(path):
                with open(path) as f:
                    found[r] = json.load(f)
        if len(found) == len(ranks) or time.monotonic() >= deadline:
            return {r: found.get(r) for r in ranks}
        time.sleep(0.02)  # polling files the ranks write; bounded by timeout


def timeline_figure(records: list[dict], last: int = 30):
    """Each rank's last ops on its first (world) group as bars on one time axis: queued (grey),
    waiting for peers (orange, until the first peer answered), moving bytes (blue)."""
    import matplotlib.pyplot as plt
    rows = []
    for record in records:
        ops = record["groups"][0]["ops"][-last:] if record["groups"] else []
        rows.append((record["rank"], [op for op in ops if op["done_ns"]]))
    starts = [op["queued_ns"] for _, ops in rows for op in ops]
    t0 = min(starts) if starts else 0
    ms = lambda ns: (ns - t0) / 1e6
    fig, ax = plt.subplots(figsize=(10, 0.6 * len(rows) + 1.2))
    for y, (rank, ops) in enumerate(rows):
        for op in ops:
            heard = op["peer_ns"] or op["done_ns"]
            for a, b, color in ((op["queued_ns"], op["started_ns"], "0.8"),
                                (op["started_ns"], heard, "tab:orange"),
                                (heard, op["done_ns"], "tab:blue")):
                if b > a:
                    ax.broken_barh([(ms(a), ms(b) - ms(a))], (y - 0.35, 0.7), color=color)
            ax.text(ms(op["started_ns"]), y + 0.38, op["kind"], fontsize=6, va="bottom")
    ax.set_yticks(range(len(rows)), [f"rank {rank}" for rank, _ in rows])
    ax.invert_yaxis()
    ax.set_xlabel("ms")
    ax.set_title(f"last {last} ops per rank: queued (grey), waiting for peers (orange), "
                 "moving bytes (blue)", fontsize=9)
    fig.tight_layout()
    return fig
