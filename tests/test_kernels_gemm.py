"""sgemm on every SIMD path vs tests/reference.py, edge tiles and bad input."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import rustgpt
from rustgpt import _kernels as K
from rustgpt.errors import ShapeMismatch, ValidationError
from tests import reference as ref

TRANS = [(False, False), (False, True), (True, False), (True, True)]

# (M, K, N): every dimension at 1, 7, 33 and 129 (none a multiple of a register block),
# 1 to 3 rows (the small-M kernels), 13 to 24 rows (B read in place over two row panels),
# the model's 80 rows with whole, ragged and narrow right edges, and sizes that cross the
# cache blocks (K cut into <= 512, MC = 96 rows, NC = 512 columns)
SHAPES = [(1, 1, 1), (7, 7, 7), (33, 33, 33), (129, 129, 129),
          (1, 129, 33), (129, 1, 7), (7, 33, 129), (33, 129, 1), (2, 33, 40), (3, 70, 17),
          (80, 128, 530), (80, 128, 65), (257, 300, 129), (100, 600, 520), (13, 1100, 40),
          (17, 128, 763), (24, 513, 100), (20, 4000, 33)]


def _operands(rng, M, Kd, N, trans_a, trans_b):
    A = rng.standard_normal((Kd, M) if trans_a else (M, Kd)).astype(np.float32)
    B = rng.standard_normal((N, Kd) if trans_b else (Kd, N)).astype(np.float32)
    return A, B


def _check(C, expected, Kd, name):
    # float32 dot products of unit normals: error grows like sqrt(K) * eps
    tol = 4e-6 * np.sqrt(Kd)
    ref.assert_close(C, expected, tol, tol * 4, name)


@pytest.mark.parametrize("M,Kd,N", SHAPES)
@pytest.mark.parametrize("trans_a,trans_b", TRANS)
def test_sgemm(simd, rng, M, Kd, N, trans_a, trans_b):
    """C = op(A) @ op(B), then C += op(A) @ op(B) onto what is there."""
    A, B = _operands(rng, M, Kd, N, trans_a, trans_b)
    expected = ref.matmul(A, B, trans_a, trans_b)
    C = rng.standard_normal((M, N)).astype(np.float32)
    K.sgemm(C, A, B, trans_a=trans_a, trans_b=trans_b)
    _check(C, expected, Kd, f"C[{simd}]")
    C0 = rng.standard_normal((M, N)).astype(np.float32)
    C = C0.copy()
    K.sgemm(C, A, B, trans_a=trans_a, trans_b=trans_b, accumulate=True)
    _check(C, expected + C0, Kd, f"C[{simd}, accumulate]")


@pytest.mark.parametrize("trans_a,trans_b", TRANS)
def test_sgemm_every_row_count(simd, rng, trans_a, trans_b):
    """M = 1 .. 25: every row count of a last row panel on every path (the micro-kernels
    are inlined per count), in place (M <= 24) and packed, both sides of a 32-column edge."""
    for M in range(1, 26):
        A, B = _operands(rng, M, 37, 45, trans_a, trans_b)
        C = np.full((M, 45), np.nan, np.float32)
        K.sgemm(C, A, B, trans_a=trans_a, trans_b=trans_b)
        _check(C, ref.matmul(A, B, trans_a, trans_b), 37, f"C[{simd}, M={M}]")


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
def test_sgemm_threads(rng, threads):
    """Any thread count splits C into rectangles that cover it exactly once."""
    before = rustgpt.get_num_threads()
    try:
        rustgpt.set_num_threads(threads)
        for M, Kd, N in [(80, 128, 128), (1024, 64, 40), (40, 64, 1024), (5, 200, 300),
                          (13, 70, 3), (17, 128, 763)]:
            A, B = _operands(rng, M, Kd, N, False, False)
            C = np.full((M, N), np.nan, np.float32)
            K.sgemm(C, A, B)
            _check(C, ref.matmul(A, B), Kd, f"C[{threads} threads, {M}x{Kd}x{N}]")
    finally:
        rustgpt.set_num_threads(before)


def test_sgemm_concurrent_callers(rng):
    """Python threads calling at once (the GIL is released) each get their own pack buffers."""
    problems = [_operands(rng, 97, 300, 75 + i, i % 2 == 1, i % 3 == 1) + (i % 2 == 1, i % 3 == 1)
                for i in range(8)]

    def run(problem):
        A, B, ta, tb = problem
        C = np.empty((A.shape[1] if ta else A.shape[0], B.shape[0] if tb else B.shape[1]),
                     np.float32)
        for _ in range(5):
            K.sgemm(C, A, B, trans_a=ta, trans_b=tb)
        return C

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, problems))
    for (A, B, ta, tb), C in zip(problems, results):
        _check(C, ref.matmul(A, B, ta, tb), 300, "C")


def test_sgemm_overwrites_nan(simd, rng):
    """Without accumulate, C's old contents (even NaN) never leak into the result; nor do
    the NaNs a previous call left in the pack buffers past the edge of a smaller problem."""
    K.sgemm(np.empty((129, 129), np.float32), np.full((129, 600), np.nan, np.float32),
            np.full((600, 129), np.nan, np.float32))
    for M, Kd, N in [(33, 300, 70), (7, 300, 33), (1, 129, 7)]:
        A, B = _operands(rng, M, Kd, N, False, False)
        C = np.full((M, N), np.nan, np.float32)
        K.sgemm(C, A, B)
        _check(C, ref.matmul(A, B), Kd, "C")


def test_sgemm_bad_shapes():
    A = np.zeros((4, 5), np.float32)
    B = np.zeros((5, 6), np.float32)
    with pytest.raises(ShapeMismatch):
        K.sgemm(np.zeros((4, 6), np.float32), A, B.T.copy())  # K mismatch
    with pytest.raises(ShapeMismatch):
        K.sgemm(np.zeros((4, 6), np.float32), A, B, trans_a=True)
    with pytest.raises(ShapeMismatch):
        K.sgemm(np.zeros((6, 4), np.float32), A, B)  # wrong C shape
    with pytest.raises(ValidationError):
        K.sgemm(np.zeros((4, 6), np.float32), A[None], B)  # 3-d A


def test_sgemm_bad_dtype_layout_and_aliasing():
    A = np.zeros((4, 5), np.float32)
    B = np.zeros((5, 6), np.float32)
    C = np.zeros((4, 6), np.float32)
    with pytest.raises(ValidationError):
        K.sgemm(C.astype(np.float64), A, B)
    with pytest.raises(ValidationError):
        K.sgemm(C, A.astype(np.float64), B)
    with pytest.raises(ValidationError):
        K.sgemm(C, A, np.asfortranarray(B))  # not C-contiguous
    with pytest.raises(ValidationError):
        K.sgemm(C, A.tolist(), B)
    with pytest.raises(ValidationError):
        K.sgemm(np.zeros((4, 0), np.float32), A, np.zeros((5, 0), np.float32))  # empty
    ro = C.copy()
    ro.flags.writeable = False
    with pytest.raises(ValidationError):
        K.sgemm(ro, A, B)
    buf = np.zeros((6, 6), np.float32)
    with pytest.raises(ValidationError):
        K.sgemm(buf, buf, buf)  # C is A and B
    flat = np.zeros(64, np.float32)
    with pytest.raises(ValidationError):  # C overlaps A without being A
        K.sgemm(flat[:36].reshape(6, 6), flat[28:].reshape(6, 6), np.zeros((6, 6), np.float32))
