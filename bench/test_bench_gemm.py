"""sgemm vs numpy's BLAS (float32 `@`), side by side per shape.

Run: pytest --benchmark-only bench/test_bench_gemm.py
(unset OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE first for a fair numpy). Each shape and
transpose combination is one benchmark group holding a rustgpt and a numpy row;
extra_info carries the GFLOP/s of the median time.
"""

import numpy as np
import pytest

from rustgpt import _kernels as K

# (M, K, N): square, then the model's (B*T rows, D = 128, hidden 512, ...) shapes
SHAPES = [(1024, 1024, 1024), (80, 128, 128), (80, 128, 256), (1024, 128, 512),
          (1024, 512, 2048)]
# forward x @ W, dx = dy @ W^T, dW = x^T @ dy
TRANS = {"nn": (False, False), "nt": (False, True), "tn": (True, False)}
CASES = [(s, t) for s in SHAPES for t in TRANS if t == "nn" or s != (1024, 1024, 1024)]


def _operands(M, Kd, N, trans_a, trans_b):
    rng = np.random.default_rng(0)
    A = rng.standard_normal((Kd, M) if trans_a else (M, Kd)).astype(np.float32)
    B = rng.standard_normal((N, Kd) if trans_b else (Kd, N)).astype(np.float32)
    return A, B, np.empty((M, N), np.float32)


def _run(benchmark, lib, shape, trans):
    M, Kd, N = shape
    trans_a, trans_b = TRANS[trans]
    A, B, C = _operands(M, Kd, N, trans_a, trans_b)
    if lib == "rustgpt":
        benchmark(K.sgemm, C, A, B, trans_a, trans_b)
    else:
        opA, opB = (A.T if trans_a else A), (B.T if trans_b else B)  # views: BLAS transposes
        benchmark(np.matmul, opA, opB, out=C)
    benchmark.extra_info["gflops"] = round(2.0 * M * Kd * N / benchmark.stats.stats.median / 1e9, 1)


@pytest.mark.parametrize("lib", ["rustgpt", "numpy"])
@pytest.mark.parametrize("shape,trans", CASES, ids=[f"{m}x{k}x{n}-{t}" for (m, k, n), t in CASES])
def test_sgemm(benchmark, lib, shape, trans):
    M, Kd, N = shape
    benchmark.group = f"sgemm {M}x{Kd}x{N} {trans}"
    _run(benchmark, lib, shape, trans)
