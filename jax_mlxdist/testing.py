"""Run a function on n subprocess ranks on 127.0.0.1: for tests and quick experiments.

    from jax_mlxdist.testing import run_ranks
    sums = run_ranks(lambda: float(dist.all_sum(1.0)), 4)   # [4.0, 4.0, 4.0, 4.0]

Each rank is a fresh interpreter with the ring configured (race-free ports, see
launch/local.py). A rank that raises, dies or outlives the timeout makes run_ranks raise
RanksFailed with every rank's traceback and last output; no rank process is left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import cloudpickle

from jax_mlxdist.launch.local import LocalRanks

OUTPUT_TAIL = 40  # lines of each rank's output quoted in a failure report


class RanksFailed(AssertionError):
    """Some rank failed. results[r] is rank r's return value, or None where it failed."""

    def __init__(self, message: str, results: list):
        super().__init__(message)
        self.results = results


def _by_value(fn: Callable) -> None:
    # Functions from test files are not importable in a fresh interpreter: ship them by value.
    module = sys.modules.get(getattr(fn, "__module__", None) or "")
    if module is None or module.__name__ in ("__main__", "builtins"):
        return
    path = getattr(module, "__file__", "") or ""
    if "site-packages" not in path and not module.__name__.startswith("jax_mlxdist"):
        cloudpickle.register_pickle_by_value(module)


def _tail(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-OUTPUT_TAIL:])
    except OSError:
        return ""


def run_ranks(fn: Callable, n: int, *, args: tuple = (), kwargs: dict | None = None,
              timeout: float = 120.0, env: dict[str, str] | None = None,
              connections_per_rank: int = 1) -> list[Any]:
    """fn(*args, **kwargs) on n ranks; returns the per-rank results in rank order."""
    for f in (fn, *args):  # functions passed along (a test body, say) travel by value too
        if callable(f):
            _by_value(f)
    with tempfile.TemporaryDirectory(prefix="mlxdist-ranks-") as tmp, \
            LocalRanks(n, connections_per_rank) as ranks:
        payload = os.path.join(tmp, "payload.pkl")
        with open(payload, "wb") as f:
            cloudpickle.dump((fn, args, kwargs or {}), f)
        procs, outputs, result_paths = [], [], []
        try:
            for r in range(n):
                rank_env = dict(os.environ)
                rank_env.setdefault("JAX_PLATFORMS", "cpu")
                rank_env.update(env or {})
                rank_env.update(ranks.env_for(r))
                outputs.append(os.path.join(tmp, f"rank{r}.out"))
                result_paths.append(os.path.join(tmp, f"rank{r}.result"))
                with open(outputs[-1], "wb") as out:
                    procs.append(subprocess.Popen(
                        [sys.executable, "-P", "-m", "jax_mlxdist._rank_worker", payload, result_paths[-1]],
                        # -P: the current directory must not shadow the installed package.
                        env=rank_env, stdout=out, stderr=subprocess.STDOUT,
                        pass_fds=ranks.pass_fds_for(r), start_new_session=True))
            ranks.close_sockets()  # the ranks hold their own copies of the listening sockets
            deadline = time.monotonic() + timeout
            while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
                try:
                    next(p for p in procs if p.poll() is None).wait(timeout=0.05)
                except subprocess.TimeoutExpired:
                    pass
            hung = [r for r, p in enumerate(procs) if p.poll() is None]
        finally:
            for p in procs:
                _kill_group(p)
        return _collect(procs, outputs, result_paths, hung, timeout)


def _kill_group(p: subprocess.Popen) -> None:
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    p.wait()


def _collect(procs, outputs, result_paths, hung, timeout) -> list[Any]:
    results, problems = [], []
    for r, p in enumerate(procs):
        outcome = None
        if os.path.exists(result_paths[r]):
            with open(result_paths[r], "rb") as f:
                outcome = cloudpickle.load(f)
        if outcome is not None and outcome[0] == "ok":
            results.append(outcome[1])
            continue
        results.append(None)
        if r in hung:
            problems.append(f"rank {r} was still running after the {timeout:g} s timeout and was killed")
        elif outcome is not None:
            problems.append(f"rank {r} raised {outcome[1]}\n{outcome[2]}")
        else:
            problems.append(f"rank {r} exited with code {p.returncode} without a result")
    if problems:
        report = "\n\n".join(problems)
        for r, path in enumerate(outputs):
            report += f"\n\n--- rank {r} output (last {OUTPUT_TAIL} lines) ---\n{_tail(path)}"
        raise RanksFailed(report, results)
    return results
