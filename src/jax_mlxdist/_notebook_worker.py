"""A persistent rank for jax_mlxdist.notebook.Cluster: runs cells sent by the notebook.

Each cell runs in one namespace that lives as long as the rank (like a kernel). Output is
streamed back as it is printed; figures made with matplotlib come back as PNG.
"""

import ast
import io
import os
import signal
import sys
import traceback
from multiprocessing.connection import Client

import cloudpickle


class _Stream(io.TextIOBase):
    """stdout/stderr replacement that forwards whole lines to the notebook as they complete."""

    def __init__(self, conn, name):
        self.conn, self.name, self.buf = conn, name, ""

    def writable(self):
        return True

    def write(self, text):
        self.buf += text
        if "\n" in self.buf:
            lines, self.buf = self.buf.rsplit("\n", 1)
            self.conn.send(("stream", self.name, lines + "\n"))
        return len(text)

    def flush(self):
        if self.buf:
            self.conn.send(("stream", self.name, self.buf + "\n"))
            self.buf = ""


def _run_cell(code, namespace):
    """Executes code; returns the value of a trailing expression (or None)."""
    tree = ast.parse(code, "<cell>", "exec")
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    exec(compile(tree, "<cell>", "exec"), namespace)
    if last is not None:
        return eval(compile(ast.Expression(last.value), "<cell>", "eval"), namespace)
    return None


def _figures(conn):
    if "matplotlib.pyplot" not in sys.modules:
        return
    plt = sys.modules["matplotlib.pyplot"]
    for num in plt.get_fignums():
        buf = io.BytesIO()
        plt.figure(num).savefig(buf, format="png", bbox_inches="tight")
        conn.send(("image", buf.getvalue()))
    plt.close("all")


def main():
    address = os.environ.pop("MLXDIST_NOTEBOOK_ADDRESS").rsplit(":", 1)
    key = bytes.fromhex(os.environ.pop("MLXDIST_NOTEBOOK_KEY"))
    conn = Client((address[0], int(address[1])), authkey=key)
    conn.send(("ready", int(os.environ.get("MLX_RANK", "0"))))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # interrupts raise in the cell
    sys.stdout, sys.stderr = _Stream(conn, "stdout"), _Stream(conn, "stderr")
    namespace = {"__name__": "__main__"}
    while True:
        try:
            kind, payload = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        try:
            if kind == "cell":
                try:
                    value = _run_cell(payload, namespace)
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                _figures(conn)
                conn.send(("done", repr(value) if value is not None else None, None))
            elif kind == "get":
                conn.send(("value", cloudpickle.dumps(namespace[payload])))
        except BaseException as e:  # noqa: BLE001 - every failure goes back to the notebook
            tb = traceback.format_exc()
            conn.send(("done", None, f"{type(e).__name__}: {e}\n{tb}"))


if __name__ == "__main__":
    main()
