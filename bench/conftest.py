"""Fixtures of bench/: a seeded generator per test, and the thread count benchmarks run at."""

import numpy as np
import pytest

BENCH_THREADS = 2  # every side-by-side benchmark row runs at this many threads


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def bench_threads():
    """rustgpt, torch (if installed) and numpy's BLAS at BENCH_THREADS threads; returns a
    note on how numpy's threads were set, for extra_info."""
    from bench.compare import limit_threads

    restore, note = limit_threads(BENCH_THREADS)
    yield note
    restore()
