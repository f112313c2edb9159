"""The pytest plugin, tested with pytester: passing, failing-on-one-rank and hanging bodies."""


pytest_plugins = ["pytester"]


def run(pytester, source, *args):
    pytester.makepyfile(source)
    # A subprocess run, as a user's would be: the plugin comes from the installed entry point.
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args)


def test_passing_bodies_on_ranks(pytester):
    result = run(pytester, """
        import pytest
        import jax_mlxdist as dist

        @pytest.mark.ranks(2, 3)
        def test_sum(group, rank, size):
            assert float(dist.all_sum(1.0, group=group)) == size == group.size()
            assert rank == group.rank()

        @pytest.mark.parametrize("scale", [1.0, 2.0])
        @pytest.mark.ranks(2)
        def test_parametrized(group, scale):
            assert float(dist.all_sum(scale, group=group)) == 2 * scale
    """, "-v")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["*test_sum?2ranks? PASSED*", "*test_sum?3ranks? PASSED*"])


def test_failure_on_one_rank_shows_its_traceback(pytester):
    result = run(pytester, """
        import pytest
        import jax_mlxdist as dist

        @pytest.mark.ranks(3)
        def test_rank_two_disagrees(group, rank):
            total = float(dist.all_sum(1.0, group=group))
            assert rank != 2, f"rank two saw {total}"
    """)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*rank 2 raised AssertionError: rank two saw 3.0*"])
    assert "rank 0 raised" not in result.stdout.str()


def test_hanging_rank_is_killed_with_its_output(pytester):
    result = run(pytester, """
        import time
        import pytest

        @pytest.mark.ranks(2, timeout=8)
        def test_hangs(rank):
            if rank == 1:
                print("rank one is about to hang", flush=True)
                time.sleep(600)  # the hang under test
    """)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*rank 1 was still running after the 8 s timeout*",
                                 "*rank one is about to hang*"])
