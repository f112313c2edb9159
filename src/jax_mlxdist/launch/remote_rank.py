"""Runs one rank on a remote host, started there over ssh by `jax-mlxdist launch`.

Run by path (standard library only, so it starts at once): it reads the rank's spec (one JSON
line) from stdin, starts the program, and stops it when stdin closes, that is when the
launcher or its ssh connection goes away, so no rank is left running. For rank 0 it first
listens on the coordinator address and names it on stdout; every rank's "connected" signal is
forwarded on stdout too. Both as lines starting with MARKER, which the launcher filters out.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading

MARKER = "\0jax_mlxdist:"
GRACE_SECONDS = 5.0


def _say(what: str) -> None:
    sys.stdout.write(MARKER + what + "\n")
    sys.stdout.flush()


def _stop(child: subprocess.Popen) -> None:
    for sig in (signal.SIGCONT, signal.SIGTERM):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return
    try:
        child.wait(GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)


def main() -> int:
    spec = json.loads(sys.stdin.readline())
    env = {**os.environ, **spec["env"]}
    keep = []
    if spec.get("listen"):  # rank 0: the coordinator's socket, bound before anyone connects
        host, _, port = spec["listen"].rpartition(":")
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, int(port)))
        s.listen(512)
        s.set_inheritable(True)
        env["MLXDIST_COORDINATOR"] = f"{host}:{s.getsockname()[1]}"
        env["MLXDIST_LISTEN_FDS"] = str(s.fileno())
        keep.append(s)
        _say("coordinator " + env["MLXDIST_COORDINATOR"])
    ready_r, ready_w = os.pipe()
    env["MLXDIST_READY_FD"] = str(ready_w)
    child = subprocess.Popen(spec["argv"], env=env, cwd=spec.get("cwd") or None,
                             pass_fds=[ready_w] + [s.fileno() for s in keep],
                             start_new_session=True)
    os.close(ready_w)
    for s in keep:
        s.close()

    def forward_ready():
        if os.read(ready_r, 1):
            _say("ready")

    def watch_stdin():
        sys.stdin.read()  # returns at EOF: the launcher is gone or stopping us
        _stop(child)

    threading.Thread(target=forward_ready, daemon=True).start()
    threading.Thread(target=watch_stdin, daemon=True).start()
    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):  # ssh going away, or a stop
        signal.signal(sig, lambda *_: threading.Thread(target=_stop, args=(child,)).start())
    code = child.wait()
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main())
