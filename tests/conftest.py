"""Shared fixtures: a seeded generator per test, every SIMD path the CPU has, and a thread
count set for one test."""

import logging

import numpy as np
import pytest

import rustgpt
from rustgpt import _kernels as K

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


@pytest.fixture
def set_threads():
    """K.set_num_threads for this test: the count it had before is put back after it."""
    before = K.get_num_threads()
    yield K.set_num_threads
    K.set_num_threads(before)


_LOGGER = logging.getLogger("rustgpt")
_PRISTINE = (list(_LOGGER.handlers), _LOGGER.level, _LOGGER.propagate)


@pytest.fixture(autouse=True)
def rustgpt_logger():
    """Put the "rustgpt" logger back as it was at start-up after each test: the CLI's
    setup_logging changes it (also in module-scoped fixtures), and caplog needs propagation."""
    yield _LOGGER
    handlers, level, propagate = _PRISTINE
    for h in _LOGGER.handlers:
        if h not in handlers:
            h.close()
    _LOGGER.handlers = list(handlers)
    _LOGGER.setLevel(level)
    _LOGGER.propagate = propagate
