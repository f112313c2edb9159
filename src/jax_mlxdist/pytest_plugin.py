"""pytest plugin (registered through an entry point): run a test body on subprocess ranks.

    @pytest.mark.ranks(4)                 # 4 ranks
    def test_sum(group, rank):
        assert float(dist.all_sum(1.0, group=group)) == group.size()

    @pytest.mark.ranks(2, 4, timeout=60, env={"JAX_ENABLE_X64": "1"})  # on 2 ranks, then 4
    def test_gather(group, rank, size): ...

Inside the body the fixtures `group` (the initialised world group), `rank` and `size` are the
rank's own; other arguments (parametrize values, tmp_path...) travel by value. A failing rank
fails the test with that rank's traceback; a rank still running at the timeout is killed and
its last output shown. MLXDIST_TEST_RANKS (say "8" or "2,4,8") replaces the rank counts of
every marker, to run a suite at other sizes.
"""

from __future__ import annotations

import os

import pytest

RANK_FIXTURES = ("group", "rank", "size")
NRANKS = "mlxdist_nranks"
DEFAULT_TIMEOUT = 120.0


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "ranks(*counts, timeout=120, env=None): run the test body on subprocess ranks "
        "(jax_mlxdist), once per rank count; fixtures group/rank/size are the rank's own")


def pytest_generate_tests(metafunc):
    marker = metafunc.definition.get_closest_marker("ranks")
    if marker is None:
        return
    counts = marker.args or (2,)
    override = os.environ.get("MLXDIST_TEST_RANKS", "").replace(",", " ").split()
    if override:
        try:
            counts = tuple(int(c) for c in override)
        except ValueError:
            raise pytest.UsageError(
                f"MLXDIST_TEST_RANKS={override!r}: expected rank counts") from None
    if not all(isinstance(n, int) and n >= 1 for n in counts):
        raise pytest.UsageError(f"ranks() takes positive rank counts, got {counts!r}")
    metafunc.fixturenames.append(NRANKS)
    metafunc.parametrize(NRANKS, counts, ids=[f"{n}ranks" for n in counts])


class _OnRanks:
    """Placeholder for rank-side fixtures in the parent process."""

    def __repr__(self):
        return "<given to each rank>"


@pytest.fixture
def group():
    return _OnRanks()


@pytest.fixture
def rank():
    return _OnRanks()


@pytest.fixture
def size():
    return _OnRanks()


def _run_on_rank(fn, kwargs, wanted):
    import jax_mlxdist as dist
    g = dist.init()
    given = {"group": g, "rank": g.rank(), "size": g.size()}
    fn(**kwargs, **{k: given[k] for k in wanted})


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    marker = pyfuncitem.get_closest_marker("ranks")
    if marker is None:
        return None
    from jax_mlxdist.testing import run_ranks

    n = pyfuncitem.callspec.params[NRANKS]
    names = pyfuncitem._fixtureinfo.argnames
    wanted = [k for k in RANK_FIXTURES if k in names]
    kwargs = {k: pyfuncitem.funcargs[k] for k in names if k not in RANK_FIXTURES}
    timeout = float(marker.kwargs.get("timeout", DEFAULT_TIMEOUT))
    run_ranks(_run_on_rank, n, args=(pyfuncitem.obj, kwargs, wanted), timeout=timeout,
              env=marker.kwargs.get("env"))
    return True
