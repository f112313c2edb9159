"""Race-free start-up of ranks on this machine.

The parent binds every rank's listening sockets on port 0 before any rank starts and hands
them down (MLXDIST_LISTEN_FDS), so no other process can take a port between choosing it and
using it, and no port range is ever fixed.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import tempfile


class LocalRanks:
    """Listening sockets and a hostfile (MLX's ring format) for n ranks on one host."""

    def __init__(self, n: int, connections_per_rank: int = 1, hosts="127.0.0.1",
                 starting_port: int = 0):
        """hosts: one address for all ranks or one per rank; starting_port: 0 for free ports,
        else consecutive ports from it (MLX's --starting-port)."""
        if n < 1 or connections_per_rank < 1:
            raise ValueError("need at least one rank and one connection per rank")
        self.n = n
        hosts = [hosts] * n if isinstance(hosts, str) else list(hosts)
        self.sockets: list[list[socket.socket]] = []
        for r in range(n):
            socks = []
            for k in range(connections_per_rank):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                if starting_port:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    s.bind((hosts[r], starting_port + r * connections_per_rank + k))
                else:
                    s.bind((hosts[r], 0))
                s.listen(512)
                s.set_inheritable(True)
                socks.append(s)
            self.sockets.append(socks)
        # The job's secret: every connection between its ranks proves it (MLXDIST_TOKEN).
        self.token = secrets.token_hex(16)
        self.hostfile = [[f"{h}:{s.getsockname()[1]}" for s in socks]
                         for h, socks in zip(hosts, self.sockets)]
        fd, self.path = tempfile.mkstemp(prefix="mlxdist-hosts-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(self.hostfile, f)

    def env_for(self, rank: int) -> dict[str, str]:
        return {
            "MLX_RANK": str(rank),
            "MLX_HOSTFILE": self.path,
            "MLXDIST_LISTEN_FDS": ",".join(str(s.fileno()) for s in self.sockets[rank]),
            "MLXDIST_TOKEN": self.token,
        }

    def pass_fds_for(self, rank: int) -> tuple[int, ...]:
        return tuple(s.fileno() for s in self.sockets[rank])

    def close_sockets(self) -> None:
        """Closes the parent's copies once the ranks have started with theirs."""
        for socks in self.sockets:
            for s in socks:
                s.close()
        self.sockets = []

    def close(self) -> None:
        """Closes the parent's sockets and removes the hostfile."""
        self.close_sockets()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> "LocalRanks":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def gpu_env(rank: int) -> dict[str, str]:
    """One GPU per local rank (the NCCL backend needs it): rank r sees the r-th of this
    process's visible GPUs, round-robin; empty when no GPU is found."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        gpus = [g for g in visible.split(",") if g.strip()]
    else:
        gpus = [str(i) for i in range(gpu_count())]
    return {"CUDA_VISIBLE_DEVICES": gpus[rank % len(gpus)]} if gpus else {}


def gpu_count() -> int:
    """NVIDIA GPUs on this host, by nvidia-smi (0 without one)."""
    import shutil
    import subprocess
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in out.splitlines())
