"""Fixtures of bench/: a seeded generator per test, and the thread count benchmarks run at."""

import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def bench_threads():
    """rustgpt, torch (if installed) and numpy's BLAS at compare.DEFAULT_THREADS threads;
    returns a note on how numpy's threads were set, for extra_info."""
    from bench.compare import DEFAULT_THREADS, limit_threads

    restore, note = limit_threads(DEFAULT_THREADS)
    yield note
    restore()
