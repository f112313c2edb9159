"""Where ranks run: `--hosts`/`-n`, or a launcher hostfile in either of MLX's forms.

    [{"ssh": "node1", "ips": ["10.0.0.1"], "rdma": [null, "rdma_en2"]}, ...]
    {"backend": "ring", "envs": ["KEY=VALUE", ...], "hosts": [<entries as above>]}

Each entry is one rank, in rank order.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass, field

LOCAL_NAMES = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}


class HostfileError(ValueError):
    pass


@dataclass
class Host:
    ssh: str  # how to reach it with ssh
    ips: list[str] = field(default_factory=list)  # addresses its ranks listen on
    rdma: list = field(default_factory=list)

    @property
    def local(self) -> bool:
        """This machine: started directly, without ssh."""
        return self.ssh in LOCAL_NAMES or self.ssh in (socket.gethostname(), socket.getfqdn())


@dataclass
class Plan:
    hosts: list[Host]  # one per rank
    backend: str | None = None
    env: dict[str, str] = field(default_factory=dict)


def parse_env(items, where: str) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        if not sep or not key:
            raise HostfileError(f"{where}: expected KEY=VALUE, got {item!r}")
        env[key] = value
    return env


def load(path: str) -> Plan:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise HostfileError(f"cannot read the hostfile {path}: {e}") from None
    plan = Plan([])
    if isinstance(data, dict):
        unknown = set(data) - {"backend", "envs", "hosts"}
        if unknown:
            raise HostfileError(f"{path}: unknown keys {sorted(unknown)}")
        plan.backend = data.get("backend")
        plan.env = parse_env(data.get("envs", []), f"{path}: envs")
        data = data.get("hosts")
    if not isinstance(data, list) or not data:
        raise HostfileError(f"{path}: expected a list of hosts (or an object with \"hosts\")")
    for i, entry in enumerate(data):
        if isinstance(entry, str):
            entry = {"ssh": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("ssh"), str):
            raise HostfileError(f"{path}: host {i} must be an object with an \"ssh\" name")
        ips = entry.get("ips", [])
        if not isinstance(ips, list) or not all(isinstance(a, str) for a in ips):
            raise HostfileError(f"{path}: host {i}'s \"ips\" must be a list of addresses")
        plan.hosts.append(Host(entry["ssh"], list(ips), list(entry.get("rdma") or [])))
    return plan


def from_hosts(hosts: str) -> Plan:
    names = [h.strip() for h in hosts.split(",") if h.strip()]
    if not names:
        raise HostfileError(f"--hosts {hosts!r} names no host")
    return Plan([Host(h) for h in names])


def repeat(plan: Plan, n: int) -> Plan:
    """Each host n times in a row (MLX's --repeat-hosts): ranks 0..n-1 on the first host."""
    return Plan([h for h in plan.hosts for _ in range(n)], plan.backend, plan.env)
