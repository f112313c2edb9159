"""Data-parallel training of a 10 M-parameter MLP (4 layers: 8 leaves, 40 MiB of float32
gradients), side by side: ours (one jitted step: gradients, nn.average_gradients, SGD), JAX's
own collectives (jax.distributed + gloo: shard_map with pmean of the gradients) and torch DDP
(gloo). Every rank trains on its own batch; the step time is the median over steps of the
slowest rank.

    python benchmarks/data_parallel.py [-n 2 4 8] [--steps 20] [--impls ours jax torch]

JAX gloo and torch come from the peers' venvs (compare.py --setup) or BENCH_PEERS_PYTHON.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers"))
from setup import venv_python  # noqa: E402

WIDTHS = [1024, 2048, 2048, 1536, 1024]
BATCH = 64


def ours_rank(steps: int) -> list:
    import time

    import jax
    import jax.numpy as jnp

    import jax_mlxdist as dist
    from jax_mlxdist import nn
    g = dist.init()
    key = jax.random.key(0)
    params = [{"w": jax.random.normal(k, (a, b)) * a ** -0.5, "b": jnp.zeros(b)}
              for k, a, b in zip(jax.random.split(key, 4), WIDTHS, WIDTHS[1:])]
    x = jax.random.normal(jax.random.key(g.rank() + 1), (BATCH, WIDTHS[0]))

    def loss(ps, x):
        for i, p in enumerate(ps):
            x = x @ p["w"] + p["b"]
            x = jax.nn.relu(x) if i < len(ps) - 1 else x
        return jnp.mean(x ** 2)

    @jax.jit
    def step(ps, x):
        grads = nn.average_gradients(jax.grad(loss)(ps, x), group=g)
        return jax.tree_util.tree_map(lambda p, d: p - 1e-3 * d, ps, grads)

    times = []
    for _ in range(steps + 2):
        t = time.perf_counter()
        params = jax.block_until_ready(step(params, x))
        times.append(time.perf_counter() - t)
    return times[2:]


JAX_RANK = r'''
import json, os, sys, time
import jax, jax.numpy as jnp, numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P
rank, size, port, steps = (int(a) for a in sys.argv[1:5])
widths, batch = json.loads(sys.argv[5]), int(sys.argv[6])
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=size, process_id=rank)
mesh = jax.make_mesh((size,), ("i",), axis_types=(jax.sharding.AxisType.Auto,))
keys = jax.random.split(jax.random.key(0), 4)
params = [{"w": jax.random.normal(k, (a, b)) * a ** -0.5, "b": jnp.zeros(b)}
          for k, a, b in zip(keys, widths, widths[1:])]
params = jax.device_put(params, NamedSharding(mesh, P()))
x_local = np.asarray(jax.random.normal(jax.random.key(rank + 1), (batch, widths[0])))
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("i")), x_local)
def loss(ps, x):
    for i, p in enumerate(ps):
        x = x @ p["w"] + p["b"]
        x = jax.nn.relu(x) if i < len(ps) - 1 else x
    return jnp.mean(x ** 2)
def local_step(ps, x):
    grads = lax.pmean(jax.grad(loss)(ps, x), "i")
    return jax.tree_util.tree_map(lambda p, d: p - 1e-3 * d, ps, grads)
step = jax.jit(jax.shard_map(local_step, mesh=mesh, in_specs=(P(), P("i")), out_specs=P(),
                             check_vma=False))
times = []
for _ in range(steps + 2):
    t = time.perf_counter()
    params = jax.block_until_ready(step(params, x))
    times.append(time.perf_counter() - t)
print("TIMES", json.dumps(times[2:]), flush=True)
jax.distributed.shutdown()
'''

TORCH_RANK = r'''
import json, os, sys, time
import torch, torch.distributed as dist
rank, size, port, steps = (int(a) for a in sys.argv[1:5])
widths, batch = json.loads(sys.argv[5]), int(sys.argv[6])
torch.set_num_threads(max(1, (os.cpu_count() or 2) // size))
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
torch.manual_seed(0)
layers = []
for i, (a, b) in enumerate(zip(widths, widths[1:])):
    layers.append(torch.nn.Linear(a, b))
    if i < len(widths) - 2:
        layers.append(torch.nn.ReLU())
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Sequential(*layers))
opt = torch.optim.SGD(model.parameters(), lr=1e-3)
torch.manual_seed(rank + 1)
x = torch.randn(batch, widths[0])
times = []
for _ in range(steps + 2):
    t = time.perf_counter()
    opt.zero_grad()
    model(x).pow(2).mean().backward()  # DDP all-reduces the gradients in buckets meanwhile
    opt.step()
    times.append(time.perf_counter() - t)
print("TIMES", json.dumps(times[2:]), flush=True)
dist.destroy_process_group()
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peer_ranks(script: str, venv: str, n: int, steps: int) -> list:
    py = venv_python(venv)
    port = free_port()
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(script)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": "", "GLOO_SOCKET_IFNAME": "lo"}
    procs = [subprocess.Popen([py, f.name, str(r), str(n), str(port), str(steps), json.dumps(WIDTHS),
                               str(BATCH)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for r in range(n)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        line = next((ln for ln in stdout.splitlines() if ln.startswith("TIMES ")), None)
        if p.returncode != 0 or line is None:
            raise RuntimeError(f"{venv} rank failed:\n{stderr[-2000:]}")
        out.append(json.loads(line[6:]))
    os.unlink(f.name)
    return out


def step_time(per_rank: list) -> float:
    return statistics.median(max(ts) for ts in zip(*per_rank))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("-n", type=int, nargs="+", default=[2])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--impls", nargs="+", default=["ours", "jax", "torch"])
    args = p.parse_args()
    from jax_mlxdist.testing import run_ranks
    print("| n | " + " | ".join(args.impls) + " | ours / best peer |")
    print("| --- |" + " --- |" * (len(args.impls) + 1))
    for n in args.n:
        got = {}
        for impl in args.impls:
            if impl == "ours":
                got[impl] = step_time(run_ranks(ours_rank, n, args=(args.steps,), timeout=600))
            else:
                script = JAX_RANK if impl == "jax" else TORCH_RANK
                got[impl] = step_time(peer_ranks(script, impl, n, args.steps))
        peers = {k: v for k, v in got.items() if k != "ours"}
        ratio = (f"{got['ours'] / min(peers.values()):.2f} ({min(peers, key=peers.get)})"
                 if "ours" in got and peers else "-")
        print(f"| {n} | " + " | ".join(f"{got[k] * 1e3:.1f} ms" for k in args.impls) + f" | {ratio} |",
              flush=True)
    params = sum(a * b + b for a, b in zip(WIDTHS, WIDTHS[1:]))
    print(f"\n{params / 1e6:.1f} M parameters (8 leaves), batch {BATCH} per rank, float32.")


if __name__ == "__main__":
    main()
