"""sgemm vs numpy's BLAS (float32 `@`), side by side per shape.

Run: pytest --benchmark-only bench/test_bench_gemm.py, or python bench/test_bench_gemm.py for
an interleaved best-of table (unset OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE first for a fair
numpy). Each case is one benchmark group holding a rustgpt and a numpy row; extra_info
carries the GFLOP/s of the median time. Shapes are (M, K, N) of op(A) (M, K) @ op(B) (K, N).
"""

import sys
import time

import numpy as np
import pytest

from rustgpt import _kernels as K

# forward x @ W as (M, K, N): x (M, K), W (K, N); the square case, then the model's (17 rows:
# the output projection of a batch-1 step of the bundled data's average length)
SHAPES = [(1024, 1024, 1024), (80, 128, 128), (80, 128, 256), (17, 128, 763), (1024, 128, 512),
          (1024, 512, 2048)]


def _cases():
    """(name, (M, K, N), trans_a, trans_b): each forward shape and its two backward matmuls,
    dx = dy @ W^T (M, N, K) with trans_b, and dW = x^T @ dy (K, M, N) with trans_a."""
    for M, Kd, N in SHAPES:
        yield f"{M}x{Kd}x{N}-fwd", (M, Kd, N), False, False
        if (M, Kd, N) != (1024, 1024, 1024):
            yield f"{M}x{Kd}x{N}-dx", (M, N, Kd), False, True
            yield f"{M}x{Kd}x{N}-dW", (Kd, M, N), True, False


CASES = list(_cases())


def _operands(M, Kd, N, trans_a, trans_b):
    rng = np.random.default_rng(0)
    A = rng.standard_normal((Kd, M) if trans_a else (M, Kd)).astype(np.float32)
    B = rng.standard_normal((N, Kd) if trans_b else (Kd, N)).astype(np.float32)
    return A, B, np.empty((M, N), np.float32)


def _run(benchmark, lib, shape, trans_a, trans_b):
    M, Kd, N = shape
    A, B, C = _operands(M, Kd, N, trans_a, trans_b)
    if lib == "rustgpt":
        benchmark(K.sgemm, C, A, B, trans_a, trans_b)
    else:
        opA, opB = (A.T if trans_a else A), (B.T if trans_b else B)  # views: BLAS transposes
        benchmark(np.matmul, opA, opB, out=C)
    benchmark.extra_info["gflops"] = round(2.0 * M * Kd * N / benchmark.stats.stats.median / 1e9, 1)


@pytest.mark.parametrize("lib", ["rustgpt", "numpy"])
@pytest.mark.parametrize("name,shape,trans_a,trans_b", CASES, ids=[c[0] for c in CASES])
def test_sgemm(benchmark, lib, name, shape, trans_a, trans_b):
    M, Kd, N = shape
    benchmark.group = f"sgemm {name}: {M}x{Kd}x{N} trans_a={int(trans_a)} trans_b={int(trans_b)}"
    _run(benchmark, lib, shape, trans_a, trans_b)


# A batch-1 training step's attention matmuls (T = 17, D = 128), three at a time: q, k, v =
# x Wq, x Wk, x Wv; dWq, dWk, dWv = x^T dq, ...; dx = dq Wq^T + dk Wk^T + dv Wv^T.
QKV = {"qkv": (False, False), "dW": (True, False), "dx": (False, True)}


@pytest.mark.parametrize("how", ["sgemm_many", "3 x sgemm"])
@pytest.mark.parametrize("part", list(QKV))
def test_sgemm_many(benchmark, part, how):
    """One sgemm_many call against three sgemm calls, as a step replays them (a Plan of 100
    repetitions, so Python's call overhead is left out); extra_info has the time per group."""
    trans_a, trans_b = QKV[part]
    T, D = 17, 128
    rng = np.random.default_rng(0)
    As = [rng.standard_normal((T, D)).astype(np.float32) for _ in range(3)]  # dq, dk, dv
    if part != "dx":
        As = [As[0]] * 3  # x, shared
    Bs = [rng.standard_normal((T, D) if part == "dW" else (D, D)).astype(np.float32)
          for _ in range(3)]
    Cs = [np.empty((D, D) if part == "dW" else (T, D), np.float32) for _ in range(3)]
    accumulate = [False, False, False]
    if part == "dx":
        Cs, accumulate = [Cs[0]] * 3, [False, True, True]
    plan = K.Plan()
    with plan:
        for _ in range(100):
            if how == "sgemm_many":
                K.sgemm_many(Cs, As, Bs, trans_a, trans_b, accumulate)
            else:
                for C, A, B, acc in zip(Cs, As, Bs, accumulate):
                    K.sgemm(C, A, B, trans_a, trans_b, acc)
    benchmark.group = f"sgemm_many {part}: three {'x'.join(map(str, Cs[0].shape))} products"
    benchmark(plan.run)
    benchmark.extra_info["us_per_group"] = round(benchmark.stats.stats.median / 100 * 1e6, 2)


def _best_time(fn, calls):
    best = float("inf")
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(sweeps=3):
    """Interleaved best-of timings, robust to other processes sharing the cores: every case
    runs rustgpt and numpy alternately, `sweeps` times over all cases, keeping each one's
    fastest call. Run: python bench/test_bench_gemm.py [sweeps]"""
    best = {name: [float("inf"), float("inf")] for name, *_ in CASES}
    for _ in range(sweeps):
        for name, (M, Kd, N), trans_a, trans_b in CASES:
            A, B, C = _operands(M, Kd, N, trans_a, trans_b)
            opA, opB = (A.T if trans_a else A), (B.T if trans_b else B)
            calls = max(10, min(2000, int(3e8 / (2.0 * M * Kd * N))))
            for _ in range(3):
                best[name][0] = min(best[name][0], _best_time(
                    lambda: K.sgemm(C, A, B, trans_a, trans_b), calls))
                best[name][1] = min(best[name][1], _best_time(
                    lambda: np.matmul(opA, opB, out=C), calls))
    for name, (M, Kd, N), trans_a, trans_b in CASES:
        ours, theirs = best[name]
        flops = 2.0 * M * Kd * N
        print(f"{name:20s} {M}x{Kd}x{N:<10d} ta={int(trans_a)} tb={int(trans_b)}  "
              f"rustgpt {flops / ours / 1e9:6.1f} GFLOP/s {ours * 1e6:9.1f} us  "
              f"numpy {flops / theirs / 1e9:6.1f} GFLOP/s  ratio {theirs / ours:.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
