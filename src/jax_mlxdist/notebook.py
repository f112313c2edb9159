"""Drive N live ranks from a notebook.

    %load_ext jax_mlxdist.notebook

    %%ranks -n 4
    import jax_mlxdist as dist
    g = dist.init()
    dist.all_sum(g.rank())          # each rank's value of the last expression is shown

Or in Python: ``cluster = Cluster(4); cluster.run("x = 1"); cluster.gather("x")``.
Ranks are persistent processes on this machine: state survives between cells, output is
streamed with a ``[rank i]`` prefix, the first traceback is shown in full, figures drawn on a
rank appear in the notebook. ``%ranks interrupt`` / ``restart`` / ``close`` manage them;
``%ranks timeline`` plots every rank's last ops (waiting for peers vs moving bytes).
"""

from __future__ import annotations

import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
from multiprocessing.connection import Listener, wait

import cloudpickle

from jax_mlxdist.launch.local import LocalRanks


class CellError(RuntimeError):
    """A cell raised on some ranks; the message holds the first rank's traceback."""


class Cluster:
    """N persistent ranks on this machine, each with its own namespace."""

    def __init__(self, n: int = 2, *, env: dict[str, str] | None = None, start_timeout: float = 120.0):
        self.n = n
        self._env = dict(env or {})
        self._start_timeout = start_timeout
        self._procs: list[subprocess.Popen] = []
        self._conns = []
        self.results: list = []  # each rank's repr of the last cell's final expression
        self._start()

    # --- lifecycle -----------------------------------------------------------------------
    def _start(self) -> None:
        key = secrets.token_bytes(16)
        listener = Listener(("127.0.0.1", 0), authkey=key)
        listener._listener._socket.settimeout(1.0)  # so the start-up deadline is checked
        host, port = listener.address
        # Kept until the ranks stop: a rank reads the hostfile whenever its code calls init().
        self._ranks = LocalRanks(self.n)
        try:
            for r in range(self.n):
                env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
                       "MPLBACKEND": "Agg", **self._env, **self._ranks.env_for(r),
                       "MLXDIST_NOTEBOOK_ADDRESS": f"{host}:{port}",
                       "MLXDIST_NOTEBOOK_KEY": key.hex()}
                self._procs.append(subprocess.Popen(
                    [sys.executable, "-P", "-m", "jax_mlxdist._notebook_worker"], env=env,
                    pass_fds=self._ranks.pass_fds_for(r), start_new_session=True))
            self._ranks.close_sockets()
            by_rank = {}
            progress = _Progress(self.n)
            deadline = time.monotonic() + self._start_timeout
            while len(by_rank) < self.n:
                if time.monotonic() > deadline or any(p.poll() is not None for p in self._procs):
                    raise RuntimeError(f"ranks did not start within {self._start_timeout:g} s "
                                       "(or one exited); see their output above")
                try:
                    conn = listener.accept()
                except OSError:  # accept timed out: check the deadline again
                    continue
                _, rank = conn.recv()
                by_rank[rank] = conn
                progress.update(len(by_rank))
            self._conns = [by_rank[r] for r in range(self.n)]
        except BaseException:
            self._kill()
            raise
        finally:
            listener.close()

    def _kill(self) -> None:
        for p in self._procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        for c in self._conns:
            c.close()
        self._procs, self._conns = [], []
        if getattr(self, "_ranks", None) is not None:
            self._ranks.close()
            self._ranks = None

    def restart(self) -> None:
        """Kill every rank and start fresh ones (all state is lost)."""
        self._kill()
        self._start()

    def close(self) -> None:
        self._kill()

    def interrupt(self) -> None:
        """Raise KeyboardInterrupt in every rank's running cell; the ranks stay alive."""
        for p in self._procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGINT)

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self._kill()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # --- running code --------------------------------------------------------------------
    def run(self, code: str, *, quiet: bool = False) -> list:
        """Runs code on every rank; streams output; returns each rank's last-expression repr.

        Raises CellError with the lowest failing rank's traceback if any rank raised.
        """
        if not self._conns:
            raise RuntimeError("the cluster is closed; call restart()")
        for c in self._conns:
            c.send(("cell", code))
        pending = {c: r for r, c in enumerate(self._conns)}
        results, errors = [None] * self.n, {}
        try:
            while pending:
                self._pump(pending, results, errors, quiet)
        except KeyboardInterrupt:
            self.interrupt()  # the notebook's interrupt reaches the ranks' cells
            while pending:
                self._pump(pending, results, errors, quiet)
        self.results = results
        if errors:
            first = min(errors)
            others = sorted(set(errors) - {first})
            also = f"\n(ranks {others} raised too)" if others else ""
            verb = "" if errors[first].startswith("(it exited") else "raised "
            raise CellError(f"rank {first} {verb}{errors[first]}{also}")
        if not quiet:
            for r, value in enumerate(results):
                if value is not None:
                    print(f"[rank {r}] {value}")
        return results

    def _pump(self, pending, results, errors, quiet) -> None:
        for c in wait(list(pending), timeout=1.0):
            r = pending[c]
            try:
                msg = c.recv()
            except EOFError:
                del pending[c]
                errors[r] = self._exit_text(r)
                continue
            if msg[0] == "stream" and not quiet:
                stream = sys.stdout if msg[1] == "stdout" else sys.stderr
                for line in msg[2].splitlines(keepends=True):
                    stream.write(f"[rank {r}] {line}")
                stream.flush()
            elif msg[0] == "image":
                _show_png(msg[1])
            elif msg[0] == "done":
                del pending[c]
                results[r] = msg[1]
                if msg[2] is not None:
                    errors[r] = msg[2]
        for c, r in list(pending.items()):  # a rank that died without a word
            if self._procs[r].poll() is not None and not c.poll():
                del pending[c]
                errors[r] = self._exit_text(r)

    def _exit_text(self, r: int) -> str:
        try:
            code = self._procs[r].wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = "unknown"
        return f"(it exited with code {code} during the cell; %ranks restart starts it again)"

    def timeline(self, last: int = 30):
        """A matplotlib figure of each rank's last ops on its world group (queued, waiting for
        peers, moving bytes), from the ranks' flight records; shown in the notebook."""
        from jax_mlxdist._observe import timeline_figure
        self.run("import jax_mlxdist as _mlxdist\n_mlxdist_record = _mlxdist.dump_flight_recorder()",
                 quiet=True)
        figure = timeline_figure(self.gather("_mlxdist_record"), last)
        try:
            from IPython import get_ipython
            from IPython.display import display
            if get_ipython() is not None:
                display(figure)
        except ImportError:
            pass
        return figure

    def gather(self, name: str) -> list:
        """The value of variable `name` on every rank, in rank order."""
        values = []
        for r, c in enumerate(self._conns):
            c.send(("get", name))
            while True:
                msg = c.recv()
                if msg[0] == "value":
                    values.append(cloudpickle.loads(msg[1]))
                    break
                if msg[0] == "done" and msg[2] is not None:
                    raise CellError(f"rank {r}: {msg[2].splitlines()[0]}")
        return values


class _Progress:
    """A one-line progress display while ranks start (updated in place in a notebook)."""

    def __init__(self, n: int):
        self.n = n
        self._handle = None
        try:
            from IPython import get_ipython
            from IPython.display import display
            if get_ipython() is not None:
                self._handle = display(self._text(0), display_id=True)
        except ImportError:
            pass

    def _text(self, k: int) -> str:
        bar = "#" * k + "." * (self.n - k)
        return f"starting ranks [{bar}] {k}/{self.n}"

    def update(self, k: int) -> None:
        if self._handle is not None:
            self._handle.update(self._text(k))
        elif k == self.n:
            print(self._text(k))


def _show_png(data: bytes) -> None:
    try:
        from IPython import get_ipython
        from IPython.display import Image, display
        if get_ipython() is not None:
            display(Image(data=data))
            return
    except ImportError:
        pass
    print(f"<figure: {len(data)} bytes of PNG>")


# --- IPython magics --------------------------------------------------------------------------
_current: Cluster | None = None


def cluster(n: int | None = None) -> Cluster:
    """The ranks that %%ranks cells run on, for use from Python (`cluster().gather("loss")`).

    With n: those ranks, started (or started anew) with n ranks unless they already run.
    Without: the ranks the last %%ranks cell used."""
    global _current
    if n is None:
        if _current is None:
            raise RuntimeError("no ranks are running: run a %%ranks cell or call cluster(n)")
        return _current
    if _current is None or _current.n != n or not _current._conns:
        if _current is not None:
            _current.close()
        _current = Cluster(n)
    return _current


def ranks_magic(line: str, cell: str | None = None):
    """%%ranks [-n N]: run the cell on N ranks.  %ranks interrupt|restart|close, and
    %ranks timeline [LAST]: a plot of every rank's last ops."""
    global _current
    args = shlex.split(line)
    if cell is None:
        if args[:1] == ["timeline"] and _current is not None and len(args) <= 2:
            _current.timeline(*(int(a) for a in args[1:]))
        elif args == ["interrupt"] and _current is not None:
            _current.interrupt()
        elif args == ["restart"] and _current is not None:
            _current.restart()
        elif args == ["close"] and _current is not None:
            _current.close()
            _current = None
        elif args[:1] != ["timeline"] and args not in (["interrupt"], ["restart"], ["close"]):
            raise ValueError("usage: %ranks interrupt|restart|close|timeline [LAST], or %%ranks -n N "
                             "as a cell magic")
        return None
    n = 2
    if args[:1] in (["-n"], ["--n"]) and len(args) >= 2:
        n = int(args[1])
    elif args:
        raise ValueError(f"usage: %%ranks -n N, got {line!r}")
    ranks = cluster(n)
    try:
        ranks.run(cell)
    except CellError as e:
        print(str(e), file=sys.stderr)
    return None


def load_ipython_extension(ipython) -> None:
    ipython.register_magic_function(ranks_magic, magic_kind="line_cell", magic_name="ranks")


def unload_ipython_extension(ipython) -> None:
    global _current
    if _current is not None:
        _current.close()
        _current = None
