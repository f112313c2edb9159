"""The launcher's ranks: started here or over ssh, their output streamed with a rank prefix,
a progress line while they connect, and all of them stopped when one fails or on Ctrl-C.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time

from jax_mlxdist.launch import remote_rank
from jax_mlxdist.launch.hostfile import Host

GRACE_SECONDS = 5.0  # between SIGTERM and SIGKILL when stopping ranks
MARKER = remote_rank.MARKER.encode()


class Output:
    """Rank output and the progress line, written under one lock so lines never mix."""

    def __init__(self, n: int, prefix: bool, progress: bool, verbose: bool):
        self.n, self.prefix, self.verbose = n, prefix, verbose
        self.live = progress and sys.stderr.isatty()
        self.lock = threading.Lock()
        self.ready = 0
        self.started = time.monotonic()
        self.drawn = False

    def line(self, rank: int, data: bytes, sink) -> None:
        with self.lock:
            self._erase()
            sink.buffer.write((f"[rank {rank}] ".encode() if self.prefix else b"") + data)
            sink.flush()
            self._draw()

    def rank_ready(self) -> None:
        with self.lock:
            self._erase()
            self.ready += 1
            if self.ready == self.n and (self.verbose or self.live):
                took = time.monotonic() - self.started
                sys.stderr.write(f"jax-mlxdist launch: {self.n}/{self.n} ranks connected "
                                 f"in {took:.1f} s\n")
            self._draw()

    def note(self, text: str) -> None:
        with self.lock:
            self._erase()
            sys.stderr.write(f"jax-mlxdist launch: {text}\n")
            sys.stderr.flush()
            self._draw()

    def _draw(self) -> None:
        if self.live and self.ready < self.n:
            bar = "#" * self.ready + "." * (self.n - self.ready)
            sys.stderr.write(f"\rconnecting ranks [{bar}] {self.ready}/{self.n}")
            sys.stderr.flush()
            self.drawn = True

    def _erase(self) -> None:
        if self.drawn:
            sys.stderr.write("\r\033[K")
            self.drawn = False


class Rank:
    """One rank's process: the program itself, or ssh running remote_rank on its host."""

    def __init__(self, rank: int, proc: subprocess.Popen, remote: bool):
        self.rank, self.proc, self.remote = rank, proc, remote
        self.pumps: list[threading.Thread] = []
        self.coordinator: str | None = None
        self.announced = threading.Event()  # rank 0 over ssh: its coordinator address

    def pump(self, out: Output) -> None:
        for stream, sink in ((self.proc.stdout, sys.stdout), (self.proc.stderr, sys.stderr)):
            t = threading.Thread(target=self._pump, args=(stream, sink, out), daemon=True)
            t.start()
            self.pumps.append(t)

    def _pump(self, stream, sink, out: Output) -> None:
        for data in iter(stream.readline, b""):
            if self.remote and data.startswith(MARKER):
                what = data[len(MARKER):].decode().strip()
                if what == "ready":
                    out.rank_ready()
                elif what.startswith("coordinator "):
                    self.coordinator = what.split(" ", 1)[1]
                    self.announced.set()
                continue
            out.line(self.rank, data, sink)
        stream.close()
        self.announced.set()  # exited without announcing: stop waiting

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        if self.remote and self.proc.stdin:
            try:
                self.proc.stdin.close()  # remote_rank stops the program when stdin closes
            except OSError:
                pass
        for sig in (signal.SIGCONT, signal.SIGTERM):  # SIGCONT: a stopped rank must see TERM
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return


def start_local(rank: int, argv: list[str], env: dict, cwd: str | None, pass_fds) -> Rank:
    p = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         pass_fds=pass_fds, start_new_session=True)
    return Rank(rank, p, remote=False)


def start_remote(rank: int, host: Host, ssh: list[str], python: str, argv: list[str],
                 env: dict, cwd: str | None, listen: str | None) -> Rank:
    """Starts the rank on host over ssh; remote_rank runs there at this file's path."""
    helper = os.path.abspath(remote_rank.__file__)
    command = shlex.join([python, "-P", helper])
    p = subprocess.Popen([*ssh, host.ssh, command], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    spec = {"argv": argv, "env": env, "cwd": cwd or os.getcwd(), "listen": listen}
    p.stdin.write((json.dumps(spec) + "\n").encode())  # the token travels inside ssh, not argv
    p.stdin.flush()
    return Rank(rank, p, remote=True)


def stop_all(ranks: list[Rank]) -> None:
    for r in ranks:
        r.stop()
    deadline = time.monotonic() + GRACE_SECONDS
    for r in ranks:
        try:
            r.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(r.proc.pid, signal.SIGKILL)
            r.proc.wait()


def wait_for_first_failure(ranks: list[Rank]) -> tuple[int, int] | None:
    """Waits until every rank succeeded (None) or one failed: (rank, exit code)."""
    pending = {r.rank: r for r in ranks}
    while pending:
        pid, status = os.wait()  # any child; ranks are our only children
        for r in list(pending.values()):
            if r.proc.pid == pid:
                r.proc.returncode = os.waitstatus_to_exitcode(status)
                del pending[r.rank]
                if r.proc.returncode != 0:
                    return r.rank, r.proc.returncode
    return None


def count_ready(fd: int, out: Output) -> None:
    """Local ranks write one byte each to fd once connected (MLXDIST_READY_FD)."""
    def read():
        with os.fdopen(fd, "rb", buffering=0) as f:
            while f.read(1):
                out.rank_ready()
    threading.Thread(target=read, daemon=True).start()
