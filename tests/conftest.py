"""Shared fixtures: a seeded generator per test, and every SIMD path the CPU has."""

import numpy as np
import pytest

import rustgpt

SIMD_PATHS = [p for p in ("generic", "avx2", "avx512")
              if rustgpt.set_simd(p) == p] or ["generic"]
rustgpt.set_simd("avx512")  # back to the best the CPU has


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(params=SIMD_PATHS)
def simd(request):
    """Run the test once per SIMD path this CPU supports, restoring the best path after."""
    rustgpt.set_simd(request.param)
    yield request.param
    rustgpt.set_simd("avx512")
