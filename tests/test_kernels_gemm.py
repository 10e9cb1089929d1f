"""sgemm on every SIMD path vs tests/reference.py, edge tiles and bad input."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

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
def test_sgemm_threads(rng, set_threads, threads):
    """Any thread count splits C into rectangles that cover it exactly once."""
    set_threads(threads)
    for M, Kd, N in [(80, 128, 128), (1024, 64, 40), (40, 64, 1024), (5, 200, 300),
                      (13, 70, 3), (17, 128, 763)]:
        A, B = _operands(rng, M, Kd, N, False, False)
        C = np.full((M, N), np.nan, np.float32)
        K.sgemm(C, A, B)
        _check(C, ref.matmul(A, B), Kd, f"C[{threads} threads, {M}x{Kd}x{N}]")


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


@pytest.mark.parametrize("M", [7, 25, 129, 384, 385])
@pytest.mark.parametrize("threads", [1, 2])
def test_sgemm_transposed_a_read_in_place_equals_packed(simd, rng, set_threads, M, threads):
    """A transposed is read in place for M up to 384 (else packed, as A not transposed
    always is): the same products in the same order, so the same bits as the product of
    A's transpose copied, with K over two cache blocks and ragged edges."""
    A = rng.standard_normal((1030, M)).astype(np.float32)
    B = rng.standard_normal((1030, 70)).astype(np.float32)
    set_threads(threads)
    for accumulate in (False, True):
        C, expected = (np.ones((M, 70), np.float32) for _ in range(2))
        K.sgemm(C, A, B, trans_a=True, accumulate=accumulate)
        K.sgemm(expected, np.ascontiguousarray(A.T), B, accumulate=accumulate)
        np.testing.assert_array_equal(C, expected)


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


ACTIVATIONS = {"relu": K.relu_forward, "gelu": K.gelu_forward}


@pytest.mark.parametrize("M,Kd,N", SHAPES)
@pytest.mark.parametrize("trans_a,trans_b", TRANS)
@pytest.mark.parametrize("threads", [1, 2])
def test_sgemm_epilogue_equals_its_own_passes(simd, rng, set_threads, M, Kd, N, trans_a,
                                              trans_b, threads):
    """sgemm(bias=, activation=, pre=) gives the bits of sgemm, then bias_add, then a copy
    into pre, then relu_forward or gelu_forward, on every path (B in place, dot products,
    packed; edges; K over a cache block), with and without accumulate, bias, activation
    and pre each alone and together."""
    A, B = _operands(rng, M, Kd, N, trans_a, trans_b)
    bias = rng.standard_normal(N).astype(np.float32)
    C0 = rng.standard_normal((M, N)).astype(np.float32)
    set_threads(threads)
    cases = [(bias, "relu", False), (bias, None, False), (None, "relu", False),
             (bias, "gelu", True), (None, "gelu", True), (bias, "gelu", False),
             (bias, "relu", True), (bias, None, True)]
    for accumulate in (False, True):
        for b, activation, keep in cases:
            expected = C0.copy()
            K.sgemm(expected, A, B, trans_a, trans_b, accumulate)
            if b is not None:
                K.bias_add(expected, b)
            expected_pre = expected.copy()
            if activation:
                ACTIVATIONS[activation](expected, expected)
            C, pre = C0.copy(), np.full((M, N), np.nan, np.float32) if keep else None
            K.sgemm(C, A, B, trans_a, trans_b, accumulate, bias=b, activation=activation,
                    pre=pre)
            np.testing.assert_array_equal(C, expected, err_msg=f"{b is not None, activation}")
            if keep:
                np.testing.assert_array_equal(pre, expected_pre)


@pytest.mark.parametrize("M,Kd,N", [(7, 33, 129), (80, 128, 256)])
def test_sgemm_gelu_matches_the_float64_reference(simd, rng, M, Kd, N):
    A, B = _operands(rng, M, Kd, N, False, False)
    bias = rng.standard_normal(N).astype(np.float32)
    C, pre = np.empty((M, N), np.float32), np.empty((M, N), np.float32)
    K.sgemm(C, A, B, bias=bias, activation="gelu", pre=pre)
    u = ref.matmul(A, B) + bias
    tol = 4e-6 * np.sqrt(Kd)
    ref.assert_close(pre, u, tol, tol * 4, "pre")
    ref.assert_close(C, ref.gelu(u), tol, tol * 4, "C")


def test_sgemm_epilogue_bad_input():
    A, B, C = (np.zeros(shape, np.float32) for shape in ((4, 5), (5, 6), (4, 6)))
    with pytest.raises(ShapeMismatch, match=r"sgemm: bias has shape \(5,\), expected \(6,\)"):
        K.sgemm(C, A, B, bias=np.zeros(5, np.float32))
    with pytest.raises(ValidationError, match="sgemm: bias has dtype float64"):
        K.sgemm(C, A, B, bias=np.zeros(6))
    with pytest.raises(ValidationError, match="sgemm: C overlaps bias"):
        K.sgemm(C, A, B, bias=C[0])
    with pytest.raises(ValidationError, match="sgemm: activation = 'tanh', expected None, "
                                              "'relu' or 'gelu'"):
        K.sgemm(C, A, B, activation="tanh")
    with pytest.raises(ShapeMismatch, match=r"sgemm: pre has shape \(6, 4\), expected \(4, 6\)"):
        K.sgemm(C, A, B, activation="gelu", pre=np.zeros((6, 4), np.float32))
    with pytest.raises(ValidationError, match="sgemm: pre overlaps C or an input"):
        K.sgemm(C, A, B, activation="gelu", pre=C)
    with pytest.raises(ValidationError, match="sgemm: pre overlaps C or an input"):
        K.sgemm(C, A, B, bias=np.zeros(6, np.float32), pre=B.reshape(-1)[:24].reshape(4, 6))


def test_sgemm_pre_is_recorded_as_an_output(rng):
    """A plan records sgemm's pre as written (the two-stream schedule must know), and its
    replay fills it again."""
    A, B = _operands(rng, 5, 16, 24, False, False)
    C, pre, out = (np.empty((5, 24), np.float32) for _ in range(3))
    with K.Plan() as plan:
        K.sgemm(C, A, B, activation="gelu", pre=pre)               # 0
        K.colsum(np.empty(24, np.float32), pre, accumulate=False)  # 1: a leaf, reads pre
        K.relu_forward(out, C)                                     # 2
        K.add(out, out, out)                                       # 3
    assert plan.streams(0)[1] == (1, 0, ("call", 1))  # on the other stream, waiting for 0
    C[...] = pre[...] = np.nan
    plan.run()
    _check(pre, ref.matmul(A, B), 16, "pre")
    _check(C, ref.gelu(ref.matmul(A, B)), 16, "C")


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


# (M, K, N): in place (small M) and packed, edges on every side, K over a cache block
MANY_SHAPES = [(17, 128, 128), (3, 33, 40), (24, 70, 65), (80, 128, 129), (129, 600, 33)]


@pytest.mark.parametrize("M,Kd,N", MANY_SHAPES)
@pytest.mark.parametrize("trans_a,trans_b", TRANS)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_sgemm_many_equals_sgemm_calls(simd, rng, set_threads, M, Kd, N, trans_a, trans_b,
                                       threads):
    """Separate outputs with one A (q, k, v = x Wq, x Wk, x Wv), then one output
    accumulating over every product (dx = dq Wq^T + ...): bit for bit the sgemm calls."""
    set_threads(threads)
    A, _ = _operands(rng, M, Kd, N, trans_a, trans_b)
    As = [_operands(rng, M, Kd, N, trans_a, trans_b)[0] for _ in range(4)]
    Bs = [_operands(rng, M, Kd, N, trans_a, trans_b)[1] for _ in range(4)]
    start = [rng.standard_normal((M, N)).astype(np.float32) for _ in range(4)]
    flags = (False, True, False, True)
    Cs, expected = [c.copy() for c in start], [c.copy() for c in start]
    K.sgemm_many(Cs, [A] * 4, Bs, trans_a=trans_a, trans_b=trans_b, accumulate=flags)
    for C, B, acc in zip(expected, Bs, flags):
        K.sgemm(C, A, B, trans_a=trans_a, trans_b=trans_b, accumulate=acc)
    for i in range(4):
        np.testing.assert_array_equal(Cs[i], expected[i])
        plain = ref.matmul(A, Bs[i], trans_a, trans_b)
        _check(Cs[i], plain + start[i] if flags[i] else plain, Kd, f"C[{simd}, {i}]")
    C = np.full((M, N), np.nan, np.float32)
    K.sgemm_many([C] * 3, As[:3], Bs[:3], trans_a=trans_a, trans_b=trans_b,
                 accumulate=(False, True, True))
    total = np.full((M, N), np.nan, np.float32)
    for i in range(3):
        K.sgemm(total, As[i], Bs[i], trans_a=trans_a, trans_b=trans_b, accumulate=i > 0)
    np.testing.assert_array_equal(C, total)
    _check(C, sum(ref.matmul(As[i], Bs[i], trans_a, trans_b) for i in range(3)), 3 * Kd,
           f"sum[{simd}]")


def test_sgemm_many_is_recorded_in_plans(rng):
    A, B = _operands(rng, 17, 64, 48, False, False)
    Cs = [np.empty((17, 48), np.float32) for _ in range(2)]
    plan = K.Plan()
    with plan:
        K.sgemm_many(Cs, [A, A], [B, 2 * B])
    Cs[0][...] = Cs[1][...] = np.nan
    A *= -1  # the replay reads the arrays' contents now
    plan.run()
    _check(Cs[0], ref.matmul(A, B), 64, "C0")
    _check(Cs[1], ref.matmul(A, 2 * B), 64, "C1")


def test_sgemm_many_bad_input():
    A = np.zeros((4, 5), np.float32)
    B = np.zeros((5, 6), np.float32)
    C = np.zeros((4, 6), np.float32)
    with pytest.raises(ValidationError, match="expected the same number, 1 to 4"):
        K.sgemm_many([C, C], [A], [B, B])
    with pytest.raises(ValidationError, match="expected the same number, 1 to 4"):
        K.sgemm_many([C] * 5, [A] * 5, [B] * 5)
    with pytest.raises(ValidationError, match="expected the same number, 1 to 4"):
        K.sgemm_many([], [], [])
    with pytest.raises(ValidationError, match="expected a bool or 2 bools"):
        K.sgemm_many([C, C], [A, A], [B, B], accumulate=(False,))
    with pytest.raises(ValidationError, match="expected a bool or 2 bools"):
        K.sgemm_many([C, C], [A, A], [B, B], accumulate=(0, 1))
    with pytest.raises(ValidationError, match="expected a bool or 2 bools"):
        K.sgemm_many([C, C], [A, A], [B, B], accumulate=None)
    with pytest.raises(ValidationError, match="must be sequences of arrays"):
        K.sgemm_many(C, A, 3)
    with pytest.raises(ShapeMismatch, match=r"As\[1\]"):
        K.sgemm_many([C, C], [A, np.zeros((4, 6), np.float32)], [B, B])
    with pytest.raises(ShapeMismatch, match=r"Cs\[1\]"):
        K.sgemm_many([C, C.T.copy()], [A, A], [B, B])
    sq = [np.zeros((4, 4), np.float32) for _ in range(3)]
    with pytest.raises(ValidationError, match=r"Cs\[1\] overlaps an input"):
        K.sgemm_many([sq[0], sq[1]], [sq[1], sq[2]], [sq[2], sq[2]])  # C[1] is A[0]
    buf = np.zeros(48, np.float32)
    with pytest.raises(ValidationError, match=r"Cs\[1\] overlaps Cs\[0\] without being it"):
        K.sgemm_many([buf[:24].reshape(4, 6), buf[12:36].reshape(4, 6)], [A, A], [B, B])
    square = np.zeros((5, 5), np.float32)
    with pytest.raises(ValidationError, match=r"Cs\[0\] overlaps an input"):
        K.sgemm_many([square, np.zeros((5, 5), np.float32)], [np.eye(5, dtype=np.float32)] * 2,
                     [np.ones((5, 5), np.float32), square])  # C[0] is a later B
