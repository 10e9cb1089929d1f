"""The fused Adam update (gradient norm, clipping to 5, update) vs the same math in float32
numpy, over the default model's size. `pytest --benchmark-only bench/test_bench_adam.py`."""

import numpy as np
import pytest

from rustgpt import _kernels as K

N = 553_083  # parameters of the default model on the bundled data


@pytest.fixture
def state(rng):
    p, m, g = (rng.standard_normal(N).astype(np.float32) for _ in range(3))
    return p, m, np.abs(rng.standard_normal(N)).astype(np.float32), g


def test_bench_adam_rustgpt(benchmark, state, bench_threads):
    p, m, v, g = state
    benchmark.group = f"adam {N} parameters"
    benchmark(K.adam_update, p, m, v, g, 1e-4, t=10, max_norm=5.0)


def numpy_adam(p, m, v, g, lr=1e-4, t=1, max_norm=5.0) -> None:
    """The kernel's math in float32 numpy, in place: norm, clip to max_norm, update."""
    c1, c2 = 1 / (1 - 0.9**t), 1 / (1 - 0.999**t)
    gs = g * min(1.0, max_norm / float(np.sqrt(np.dot(g, g))))
    m[...] = 0.9 * m + 0.1 * gs
    v[...] = 0.999 * v + 0.001 * gs * gs
    p[...] -= lr * (m * c1) / (np.sqrt(v * c2) + 1e-8)


def test_bench_adam_numpy(benchmark, state, bench_threads):
    benchmark.group = f"adam {N} parameters"
    benchmark(numpy_adam, *state, t=10)
