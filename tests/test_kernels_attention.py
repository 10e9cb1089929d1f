"""Causal attention kernels (forward, backward, KV-cache step) vs tests/reference.py.

Every numeric test runs once per SIMD path (the `simd` fixture) and with the thread count
the machine gives, so the vectorized and the row-split paths are both exercised; long
sequences too, and the scratch each kernel takes.
"""

import numpy as np
import pytest

from rustgpt import _kernels as K
from rustgpt.errors import ShapeMismatch, ValidationError
from tests import reference as ref
from tests.native import run_c_test

# (B, T, D, NH): odd sizes, one row, head sizes 1..128, T longer than a key tile
SHAPES = [(1, 1, 1, 1), (2, 7, 33, 1), (1, 33, 129, 3), (2, 80, 128, 1), (2, 64, 128, 4),
          (1, 129, 64, 8), (1, 17, 24, 1), (3, 40, 80, 5)]


def _qkv(rng, B, T, D, scale=1.0):
    return tuple((rng.standard_normal((B, T, D)) * scale).astype(np.float32) for _ in range(3))


def _forward(q, k, v, NH):
    """out, att from the C forward, outputs prefilled with NaN to catch unwritten entries."""
    B, T, D = q.shape
    out = np.full((B, T, D), np.nan, np.float32)
    att = np.full((B, NH, T, T), np.nan, np.float32)
    K.attention_forward(out, att, q, k, v, NH)
    return out, att


def _backward(dout, att, q, k, v, NH):
    """dq, dk, dv from the C backward, prefilled with NaN: the kernel must overwrite them.
    Its scratch too: entries of ds the kernel reads without writing them first would show."""
    dq, dk, dv = (np.full(q.shape, np.nan, np.float32) for _ in range(3))
    ds = np.full(att.shape, np.nan, np.float32)
    K.attention_backward(dq, dk, dv, dout, att, q, k, v, NH, ds)
    return dq, dk, dv


@pytest.mark.parametrize("B,T,D,NH", SHAPES)
def test_attention_forward(rng, simd, B, T, D, NH):
    q, k, v = _qkv(rng, B, T, D)
    out, att = _forward(q, k, v, NH)
    e_out, e_att = ref.attention_forward(q, k, v, NH)
    ref.assert_close(att, e_att, 1e-4, 1e-6, "att")
    ref.assert_close(out, e_out, 1e-4, 1e-5, "out")


@pytest.mark.parametrize("B,T,D,NH", SHAPES)
def test_attention_forward_zero_above_diagonal(rng, simd, B, T, D, NH):
    q, k, v = _qkv(rng, B, T, D)
    _, att = _forward(q, k, v, NH)
    above = np.triu(np.ones((T, T), bool), k=1)
    assert np.all(att[..., above] == 0.0)
    ref.assert_close(att.sum(-1), np.ones((B, NH, T)), 1e-5, 1e-6, "att row sums")


@pytest.mark.parametrize("B,T,D,NH", SHAPES)
def test_attention_backward(rng, simd, B, T, D, NH):
    q, k, v = _qkv(rng, B, T, D)
    dout = rng.standard_normal((B, T, D)).astype(np.float32)
    _, att = _forward(q, k, v, NH)
    dq, dk, dv = _backward(dout, att, q, k, v, NH)
    e_dq, e_dk, e_dv = ref.attention_backward(dout, q, k, v, NH)
    ref.assert_close(dq, e_dq, 1e-3, 1e-4, "dq")
    ref.assert_close(dk, e_dk, 1e-3, 1e-4, "dk")
    ref.assert_close(dv, e_dv, 1e-3, 1e-4, "dv")


@pytest.mark.parametrize("B,T,D,NH", [(2, 5, 6, 2), (1, 4, 3, 1)])
def test_attention_backward_matches_finite_differences(rng, simd, B, T, D, NH):
    q, k, v = (rng.standard_normal((B, T, D)) for _ in range(3))
    w = rng.standard_normal((B, T, D))  # loss = sum(w * out)
    loss = lambda: float((w * ref.attention_forward(q, k, v, NH)[0]).sum())
    num = [ref.numerical_gradient(loss, a) for a in (q, k, v)]
    q32, k32, v32 = (a.astype(np.float32) for a in (q, k, v))
    _, att = _forward(q32, k32, v32, NH)
    grads = _backward(w.astype(np.float32), att, q32, k32, v32, NH)
    for name, g, e in zip(("dq", "dk", "dv"), grads, num):
        ref.assert_close(g, e, 1e-3, 1e-4, name)


@pytest.mark.parametrize("B,T,D,NH", [(2, 9, 24, 3), (3, 33, 64, 4), (1, 70, 128, 1)])
def test_attention_step_matches_forward(rng, simd, B, T, D, NH):
    q, k, v = _qkv(rng, B, T, D)
    e_out, _ = _forward(q, k, v, NH)
    Tmax = T + 3  # a cache longer than what is filled
    kcache = np.full((B, Tmax, D), np.nan, np.float32)  # unfilled rows must not be read
    vcache = np.full((B, Tmax, D), np.nan, np.float32)
    out = np.empty((B, D), np.float32)
    for n in range(1, T + 1):
        kcache[:, n - 1] = k[:, n - 1]
        vcache[:, n - 1] = v[:, n - 1]
        q_n = np.ascontiguousarray(q[:, n - 1])
        out.fill(np.nan)
        K.attention_step(out, q_n, kcache, vcache, n, NH)
        ref.assert_close(out, e_out[:, n - 1], 1e-4, 1e-5, f"out at n={n}")


@pytest.mark.parametrize("B,Tmax,D,NH", [(5, 9, 24, 3), (7, 33, 64, 4), (3, 80, 128, 1),
                                         (16, 129, 33, 1)])
def test_attention_step_length_per_row(rng, simd, B, Tmax, D, NH):
    """Rows at different positions in one call (a server's batch) against float64; each row
    equals the same row decoded alone, bit for bit, and reads no cache row past its length."""
    q = rng.standard_normal((B, D)).astype(np.float32)
    lengths = rng.integers(1, Tmax + 1, B).astype(np.intc)
    lengths[0], lengths[-1] = 1, Tmax  # the shortest and the longest
    kcache, vcache = (np.full((B, Tmax, D), np.nan, np.float32) for _ in range(2))
    for b, n in enumerate(lengths):
        kcache[b, :n], vcache[b, :n] = rng.standard_normal((2, n, D))
    out = np.full((B, D), np.nan, np.float32)
    K.attention_step(out, q, kcache, vcache, lengths, NH)
    ref.assert_close(out, ref.attention_step(q, kcache, vcache, lengths, NH), 1e-4, 1e-5, "out")
    for b, n in enumerate(lengths):
        alone = np.empty((1, D), np.float32)
        K.attention_step(alone, q[b:b + 1], kcache[b:b + 1], vcache[b:b + 1], int(n), NH)
        np.testing.assert_array_equal(alone[0], out[b], err_msg=f"row {b} of length {n}")


def test_attention_step_rejects_bad_lengths():
    B, Tmax, D = 3, 8, 6
    kc = np.zeros((B, Tmax, D), np.float32)
    qs, os_ = np.zeros((B, D), np.float32), np.empty((B, D), np.float32)
    for bad in (0, 9):
        lengths = np.array([3, bad, 2], np.intc)
        with pytest.raises(ValidationError, match=rf"attention_step: n\[1\] = {bad}, expected "
                                                  rf"1 <= n <= Tmax = 8"):
            K.attention_step(os_, qs, kc, kc, lengths, 2)
    with pytest.raises(ShapeMismatch, match=r"attention_step: n has shape \(2,\), expected \(3,\)"):
        K.attention_step(os_, qs, kc, kc, np.array([1, 2], np.intc), 2)
    with pytest.raises(ValidationError, match="attention_step: n has dtype int64, expected int32"):
        K.attention_step(os_, qs, kc, kc, np.array([1, 2, 3]), 2)


@pytest.mark.parametrize("B,T,D,NH", [(2, 20, 32, 2), (1, 80, 128, 1)])
def test_attention_large_scores_are_stable(rng, simd, B, T, D, NH):
    q, k, v = _qkv(rng, B, T, D)
    q *= 100  # scores of several hundred: exp overflows without the max shift
    out, att = _forward(q, k, v, NH)
    e_out, e_att = ref.attention_forward(q, k, v, NH)
    assert np.isfinite(out).all() and np.isfinite(att).all()
    ref.assert_close(att, e_att, 1e-2, 1e-4, "att")  # near one-hot; float32 scores of ~1e3
    ref.assert_close(out, e_out, 1e-2, 1e-3, "out")
    dq, dk, dv = _backward(np.ones_like(q), att, q, k, v, NH)
    assert np.isfinite(dq).all() and np.isfinite(dk).all() and np.isfinite(dv).all()
    step = np.empty((B, D), np.float32)
    K.attention_step(step, np.ascontiguousarray(q[:, -1]), k, v, T, NH)
    assert np.isfinite(step).all()
    ref.assert_close(step, out[:, -1], 1e-3, 1e-4, "step")


def test_attention_rejects_bad_input(rng):
    B, T, D = 2, 4, 6
    q, k, v = _qkv(rng, B, T, D)
    out, att = np.empty_like(q), np.empty((B, 2, T, T), np.float32)
    for nh in (4, 0, -1):
        with pytest.raises(ValidationError, match=rf"attention_forward: num_heads = {nh} must"):
            K.attention_forward(out, np.empty((B, max(nh, 1), T, T), np.float32), q, k, v, nh)
    with pytest.raises(ShapeMismatch, match=r"att has shape \(2, 2, 4, 4\), expected \(2, 3, 4, 4\)"):
        K.attention_forward(out, att, q, k, v, 3)
    with pytest.raises(ShapeMismatch, match=r"attention_forward: k has shape \(2, 3, 6\)"):
        K.attention_forward(out, att, q, k[:, :3].copy(), v, 2)
    with pytest.raises(ShapeMismatch, match="attention_forward: out has shape"):
        K.attention_forward(out[:1].copy(), att, q, k, v, 2)
    with pytest.raises(ValidationError, match="q has 2 dimensions"):
        K.attention_forward(out, att, q[0], k, v, 2)
    with pytest.raises(ValidationError, match="v has dtype float64"):
        K.attention_forward(out, att, q, k, v.astype(np.float64), 2)

    K.attention_forward(out, att, q, k, v, 2)
    g = np.empty_like(q)
    with pytest.raises(ValidationError, match="attention_backward: num_heads = 4 must"):
        K.attention_backward(g, g.copy(), g.copy(), q, att, q, k, v, 4)
    with pytest.raises(ShapeMismatch, match=r"attention_backward: att has shape \(2, 2, 4, 4\)"):
        K.attention_backward(g, g.copy(), g.copy(), q, att, q, k, v, 1)
    with pytest.raises(ShapeMismatch, match="attention_backward: dv has shape"):
        K.attention_backward(g, g.copy(), g[:, :2].copy(), q, att, q, k, v, 2)
    with pytest.raises(ShapeMismatch, match="attention_backward: dout has shape"):
        K.attention_backward(g, g.copy(), g.copy(), q[:1].copy(), att, q, k, v, 2)
    with pytest.raises(ShapeMismatch, match=r"attention_backward: ds has shape \(2, 1, 4, 4\)"):
        K.attention_backward(g, g.copy(), g.copy(), q, att, q, k, v, 2, att[:, :1].copy())
    with pytest.raises(ValidationError, match="attention_backward: ds overlaps att, expected"):
        K.attention_backward(g, g.copy(), g.copy(), q, att, q, k, v, 2, att)
    flat = np.empty(att.size + q.size, np.float32)  # dv's first 8 floats are ds's last 8
    ds, dv = flat[:att.size].reshape(att.shape), flat[att.size - 8:-8].reshape(q.shape)
    with pytest.raises(ValidationError, match="attention_backward: ds overlaps dv"):
        K.attention_backward(g, g.copy(), dv, q, att, q, k, v, 2, ds)

    kc, vc = np.zeros((B, 8, D), np.float32), np.zeros((B, 8, D), np.float32)
    qs, os_ = np.zeros((B, D), np.float32), np.empty((B, D), np.float32)
    for n in (0, -1, 9):
        with pytest.raises(ValidationError, match=rf"attention_step: n = {n}, expected 1 <= n <= Tmax = 8"):
            K.attention_step(os_, qs, kc, vc, n, 2)
    with pytest.raises(ValidationError, match="attention_step: num_heads = 5 must"):
        K.attention_step(os_, qs, kc, vc, 3, 5)
    with pytest.raises(ShapeMismatch, match=r"attention_step: vcache has shape \(2, 7, 6\)"):
        K.attention_step(os_, qs, kc, vc[:, :7].copy(), 3, 2)
    with pytest.raises(ShapeMismatch, match=r"attention_step: q has shape \(1, 6\), expected \(2, 6\)"):
        K.attention_step(os_, qs[:1].copy(), kc, vc, 3, 2)
    with pytest.raises(ValidationError, match="attention_step: out is read-only"):
        ro = np.empty((B, D), np.float32)
        ro.flags.writeable = False
        K.attention_step(ro, qs, kc, vc, 3, 2)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("B,T,D,NH", [(1, 37, 64, 1), (3, 20, 48, 1), (1, 50, 96, 2)])
def test_attention_any_thread_count(rng, set_threads, threads, B, T, D, NH):
    """Heads split into row ranges (fewer heads than threads) give the same answer."""
    q, k, v = _qkv(rng, B, T, D)
    dout = rng.standard_normal((B, T, D)).astype(np.float32)
    set_threads(threads)
    out, att = _forward(q, k, v, NH)
    dq, dk, dv = _backward(dout, att, q, k, v, NH)
    e_out, _ = ref.attention_forward(q, k, v, NH)
    ref.assert_close(out, e_out, 1e-4, 1e-5, "out")
    for name, g, e in zip(("dq", "dk", "dv"), (dq, dk, dv),
                          ref.attention_backward(dout, q, k, v, NH)):
        ref.assert_close(g, e, 1e-3, 1e-4, name)


# (B, T, D, NH) far past the 2,036 positions at head size 128 that the kernels' stack
# scratch once allowed: one head (its rows read in place), and two whose rows are packed
LONG = [(1, 4096, 128, 1), (1, 2100, 256, 2)]


@pytest.fixture(scope="module", params=LONG, ids=lambda s: "B{}-T{}-D{}-NH{}".format(*s))
def long_case(request):
    """NH, the inputs (q, k, v, dout) and their float64 results (out, dq, dk, dv), computed
    once per shape for every SIMD path."""
    B, T, D, NH = request.param
    rng = np.random.default_rng(7)
    q, k, v, dout = (rng.standard_normal((B, T, D)).astype(np.float32) for _ in range(4))
    return NH, (q, k, v, dout), (ref.attention_forward(q, k, v, NH)[0],
                                 *ref.attention_backward(dout, q, k, v, NH))


def test_attention_long_sequences(long_case, simd):
    """Forward, backward and the KV-cache step at the last of T positions, against float64."""
    NH, (q, k, v, dout), (e_out, e_dq, e_dk, e_dv) = long_case
    out, att = _forward(q, k, v, NH)
    ref.assert_close(out, e_out, 1e-4, 1e-5, "out")
    dq, dk, dv = _backward(dout, att, q, k, v, NH)
    for name, g, e in (("dq", dq, e_dq), ("dk", dk, e_dk), ("dv", dv, e_dv)):
        ref.assert_close(g, e, 1e-3, 1e-4, name)
    B, T, D = q.shape
    step = np.full((B, D), np.nan, np.float32)
    K.attention_step(step, np.ascontiguousarray(q[:, -1]), k, v, T, NH)
    ref.assert_close(step, e_out[:, -1], 1e-4, 1e-5, "step")


@pytest.mark.parametrize("B,T,D,NH", [(1, 300, 128, 1), (3, 90, 96, 2), (2, 33, 64, 4)])
def test_attention_scratch_areas_set_the_threads_not_the_results(rng, set_threads, B, T, D,
                                                                 NH):
    """Scratch holds one area per thread and the kernels run on at most that many threads:
    one area, or more than there are threads, gives the same bits as one per thread. Its
    contents on entry and where it starts (the areas are aligned inside it) do not matter."""
    set_threads(3)
    q, k, v = _qkv(rng, B, T, D)
    dout = rng.standard_normal((B, T, D)).astype(np.float32)
    areas, S = K.attention_scratch_shape(T, D, NH)
    assert areas == max(3, K.physical_cores()) and S <= (D // NH) * (2 * T + 32) + 32
    flat = np.full(areas * S + 16, np.nan, np.float32)
    skew = (4 - flat.ctypes.data) % 64 // 4  # floats to a start 4 bytes past a cache line
    results = []
    for scratch in (np.full((areas, S), np.nan, np.float32), np.zeros((1, S), np.float32),
                    np.full((areas + 2, S), np.inf, np.float32),
                    flat[skew:skew + areas * S].reshape(areas, S)):
        out, att = np.empty_like(q), np.empty((B, NH, T, T), np.float32)
        K.attention_forward(out, att, q, k, v, NH, scratch)
        grads = [np.empty_like(q) for _ in range(3)]
        K.attention_backward(*grads, dout, att, q, k, v, NH, None, scratch)
        results.append((out, att, *grads))
    for other in results[1:]:
        for a, b in zip(other, results[0]):
            np.testing.assert_array_equal(a, b)


def test_attention_rejects_bad_scratch(rng):
    B, T, D, NH = 2, 5, 8, 2
    q, k, v = _qkv(rng, B, T, D)
    out, att = np.empty_like(q), np.empty((B, NH, T, T), np.float32)
    areas, S = K.attention_scratch_shape(T, D, NH)
    g = [np.empty_like(q) for _ in range(3)]
    with pytest.raises(ShapeMismatch, match=rf"attention_forward: scratch has shape "
                                            rf"\(2, {S + 1}\), expected \(2, {S}\)"):
        K.attention_forward(out, att, q, k, v, NH, np.empty((2, S + 1), np.float32))
    with pytest.raises(ValidationError, match="attention_backward: scratch has 1 dimensions"):
        K.attention_backward(*g, q, att, q, k, v, NH, None, np.empty(S, np.float32))
    with pytest.raises(ValidationError, match="attention_forward: scratch is empty"):
        K.attention_forward(out, att, q, k, v, NH, np.empty((0, S), np.float32))
    with pytest.raises(ValidationError, match="attention_forward: scratch has dtype float64"):
        K.attention_forward(out, att, q, k, v, NH, np.empty((1, S), np.float64))
    flat = np.empty(att.size + S, np.float32)  # att's last 8 floats are scratch's first 8
    shared_att = flat[:att.size].reshape(att.shape)
    with pytest.raises(ValidationError, match="attention_forward: scratch overlaps att"):
        K.attention_forward(out, shared_att, q, k, v, NH, flat[att.size - 8:-8].reshape(1, S))
    flat = np.empty(q.size + S, np.float32)  # dq's last 8 floats are scratch's first 8
    dq, scratch = flat[:q.size].reshape(q.shape), flat[q.size - 8:-8].reshape(1, S)
    with pytest.raises(ValidationError, match="attention_backward: scratch overlaps dq"):
        K.attention_backward(dq, *g[1:], q, att, q, k, v, NH, None, scratch)
    with pytest.raises(ValidationError, match="attention_scratch_shape: num_heads = 3 must"):
        K.attention_scratch_shape(T, D, 3)
    with pytest.raises(ValidationError, match="attention_scratch_shape: T = 0, expected >= 1"):
        K.attention_scratch_shape(0, D, NH)

    kc, vc = np.zeros((B, 8, D), np.float32), np.zeros((B, 8, D), np.float32)
    qs, os_ = np.zeros((B, D), np.float32), np.empty((B, D), np.float32)
    with pytest.raises(ShapeMismatch, match=r"attention_step: scratch has shape \(2, 2, 7\), "
                                            r"expected \(2, 2, 8\)"):
        K.attention_step(os_, qs, kc, vc, 3, NH, np.empty((B, NH, 7), np.float32))
    with pytest.raises(ValidationError, match="attention_step: scratch overlaps kcache"):
        K.attention_step(os_, qs, kc, vc, 3, NH, kc.reshape(-1)[:B * NH * 8].reshape(B, NH, 8))


def test_avx512_variants_compiled_for_this_cpu(tmp_path):
    """The AVX-512 variants' 16-lane paths (score and mix blocks, the step's dot products)
    run on any x86 CPU (tests/avx512_generic.c compiles them for it) and agree with the
    generic variant: forward, backward and step, head sizes 8 to 128, 1 and 2 threads."""
    assert "largest difference" in run_c_test(tmp_path, "avx512_generic")
