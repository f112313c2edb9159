"""`jax-mlxdist config`: check ssh reachability of hosts, find their addresses, and write a
launcher hostfile (the ethernet part of mlx.distributed_config)."""

from __future__ import annotations

import argparse
import ipaddress
import json
import shlex
import subprocess
import sys

# Each host's IPv4 addresses with their interface, from iproute2 (JSON output).
ADDRESSES = "ip -j -4 addr show"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jax-mlxdist config",
                                description="Write a launcher hostfile for hosts reached over ssh.")
    p.add_argument("--hosts", required=True, help="comma-separated ssh names")
    p.add_argument("--output", "-o", help="hostfile to write (default: print it)")
    p.add_argument("--ssh", default="ssh", help="ssh command (e.g. 'ssh -F cfg')")
    p.add_argument("--timeout", type=float, default=20.0, help="seconds per host")
    p.add_argument("--loopback", action="store_true",
                   help="keep loopback addresses (for hosts that are all this machine)")
    return p


def addresses(host: str, ssh: list[str], timeout: float, loopback: bool) -> list[str]:
    """host's IPv4 addresses, routable ones first; raises RuntimeError when unreachable."""
    try:
        done = subprocess.run([*ssh, "-o", "BatchMode=yes", host, ADDRESSES],
                              capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{host}: no answer over ssh within {timeout:g} s") from None
    if done.returncode != 0:
        raise RuntimeError(f"{host}: ssh failed ({done.returncode}): "
                           f"{done.stderr.decode(errors='replace').strip()}")
    found = []
    for iface in json.loads(done.stdout or b"[]"):
        for a in iface.get("addr_info", []):
            ip = ipaddress.ip_address(a["local"])
            if ip.is_loopback and not loopback:
                continue
            found.append((ip.is_loopback, ip.is_link_local, str(ip)))
    return [ip for *_, ip in sorted(found)]


def main(argv: list[str] | None = None) -> int:
    opts = _parser().parse_args(argv)
    ssh = shlex.split(opts.ssh)
    hosts, failed = [], []
    for name in [h.strip() for h in opts.hosts.split(",") if h.strip()]:
        try:
            ips = addresses(name, ssh, opts.timeout, opts.loopback)
        except (RuntimeError, ValueError) as e:
            failed.append(str(e))
            continue
        if not ips:
            failed.append(f"{name}: reachable, but it has no usable IPv4 address")
            continue
        print(f"{name}: reachable, addresses {', '.join(ips)}", file=sys.stderr)
        hosts.append({"ssh": name, "ips": ips[:1]})
    if failed:
        print("jax-mlxdist config: " + "\n  ".join(["some hosts failed:", *failed]), file=sys.stderr)
        return 1
    text = json.dumps(hosts, indent=2) + "\n"
    if opts.output:
        with open(opts.output, "w") as f:
            f.write(text)
        print(f"wrote {opts.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
