"""Creates one virtual environment per peer under .bench-venvs/ with the pinned versions.

    python benchmarks/compare.py --setup          # all peers
    python benchmarks/compare.py --setup mlx      # only some

Each peer lives in its own venv so that its pins (and its own jax, where it has one) never touch
the environment our package is installed in. Open MPI comes from Debian's packages (apt-get, as
root) because mpi4py and mpi4jax build against it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VENVS = os.path.join(ROOT, ".bench-venvs")

JAX_PINS = ["jax==0.10.2", "jaxlib==0.10.2"]

# venv name -> pip requirement lists, installed in order (one pip call each).
PEER_VENVS: dict[str, list[list[str]]] = {
    "mlx": [["numpy", "mlx[cpu]==0.32.4"]],
    # mlx-lm's own models and generation (benchmarks/llm.py); it brings transformers, not torch.
    "mlx-lm": [["numpy", "mlx[cpu]==0.32.4", "mlx-lm==0.32.2"]],
    "torch": [["numpy", "torch==2.13.0"]],          # this exact version is the CPU wheel here
    "jax": [["numpy", *JAX_PINS]],
    "mpi4jax": [["numpy", *JAX_PINS, "mpi4py==4.1.2"],
                ["mpi4jax==0.9.1.post2"]],
    # MPICH from PyPI; mpi4jax builds against it with the venv's mpicc.
    "mpi4jax-mpich": [["numpy", *JAX_PINS, "mpich", "mpi4py==4.1.2"],
                      ["mpi4jax==0.9.1.post2"]],
}


def venv_python(name: str) -> str:
    # BENCH_PEERS_PYTHON: one interpreter that already holds the peers (a machine without
    # network, where the peers come preinstalled or as carried wheels on PYTHONPATH).
    given = os.environ.get("BENCH_PEERS_PYTHON")
    return shutil.which(given) or given if given else os.path.join(VENVS, name, "bin", "python")


def _run(cmd: list[str], env: dict | None = None) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


def _ensure_openmpi() -> None:
    if shutil.which("mpirun") and shutil.which("mpicc"):
        return
    if os.geteuid() != 0:
        sys.exit("Open MPI is missing: apt-get install -y libopenmpi-dev openmpi-bin (as root)")
    _run(["apt-get", "update"])
    _run(["apt-get", "install", "-y", "libopenmpi-dev", "openmpi-bin"])


def setup(names: list[str] | None = None) -> None:
    names = names or list(PEER_VENVS)
    unknown = set(names) - set(PEER_VENVS)
    if unknown:
        sys.exit(f"unknown peer venv(s): {sorted(unknown)}; known: {list(PEER_VENVS)}")
    os.makedirs(VENVS, exist_ok=True)
    for name in names:
        if name == "mpi4jax":  # Debian's Open MPI; the mpi4jax-mpich venv brings its MPICH
            _ensure_openmpi()
        path = os.path.join(VENVS, name)
        if not os.path.exists(venv_python(name)):
            _run([sys.executable, "-m", "venv", path])
        for reqs in PEER_VENVS[name]:
            env = dict(os.environ)
            env["PATH"] = os.path.dirname(venv_python(name)) + os.pathsep + env.get("PATH", "")
            if "mpi4jax==0.9.1.post2" in reqs:
                # Its build finds nvcc when there is one and then fails on cuda_runtime.h:
                # point CUDA_PATH at an empty directory so it builds the CPU extension only.
                env["CUDA_PATH"] = tempfile.mkdtemp(prefix="no-cuda-")
            _run([venv_python(name), "-m", "pip", "install", "-q", *reqs], env=env)
        print(f"ready: {path}", flush=True)
