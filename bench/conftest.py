"""Fixtures of bench/: tests/' seeded generator, and the thread count benchmarks run at."""

import pytest

from tests.conftest import rng  # noqa: F401  (the same fixture as the unit tests)


@pytest.fixture(scope="session")
def bench_threads():
    """rustgpt, torch (if installed) and numpy's BLAS at compare.DEFAULT_THREADS threads;
    returns a note on how numpy's threads were set, for extra_info."""
    from bench.compare import DEFAULT_THREADS, limit_threads

    restore, note = limit_threads(DEFAULT_THREADS)
    yield note
    restore()
