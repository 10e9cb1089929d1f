"""Layer norm, cross-entropy, Adam, relu, GELU, dropout, bias, embedding and norm kernels vs
tests/reference.py."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from rustgpt import _kernels as K
from rustgpt.errors import ShapeMismatch, TokenError, ValidationError
from tests import reference as ref

SIZES = [(1, 1), (7, 33), (33, 129), (80, 128), (9, 300)]


@pytest.mark.parametrize("N,D", SIZES)
def test_layernorm_forward(rng, simd, N, D):
    x = (rng.standard_normal((N, D)) * 3 + 2).astype(np.float32)
    g = rng.standard_normal(D).astype(np.float32)
    b = rng.standard_normal(D).astype(np.float32)
    out, mean, rstd = np.empty_like(x), np.empty(N, np.float32), np.empty(N, np.float32)
    K.layernorm_forward(out, mean, rstd, x, g, b)
    e_out, e_mean, e_rstd = ref.layernorm_forward(x, g, b)
    ref.assert_close(out, e_out, 1e-4, 1e-4, "out")
    ref.assert_close(mean, e_mean, 1e-5, 1e-5, "mean")
    ref.assert_close(rstd, e_rstd, 1e-4, 1e-5, "rstd")


@pytest.mark.parametrize("N,D", SIZES)
def test_layernorm_backward(rng, simd, N, D):
    x = rng.standard_normal((N, D)).astype(np.float32)
    g = rng.standard_normal(D).astype(np.float32)
    b = rng.standard_normal(D).astype(np.float32)
    dout = rng.standard_normal((N, D)).astype(np.float32)
    out, mean, rstd = np.empty_like(x), np.empty(N, np.float32), np.empty(N, np.float32)
    K.layernorm_forward(out, mean, rstd, x, g, b)
    dx = np.empty_like(x)
    dg = np.ones(D, np.float32)  # accumulates onto what is there
    db = np.ones(D, np.float32)
    K.layernorm_backward(dx, dg, db, dout, x, g, mean, rstd)
    e_dx, e_dg, e_db = ref.layernorm_backward(dout, x, g)
    ref.assert_close(dx, e_dx, 1e-3, 1e-4, "dx")
    ref.assert_close(dg, e_dg + 1, 1e-4, 1e-4, "dg")
    ref.assert_close(db, e_db + 1, 1e-4, 1e-4, "db")
    dg.fill(np.nan), db.fill(np.nan)
    K.layernorm_backward(dx, dg, db, dout, x, g, mean, rstd, accumulate=False)
    ref.assert_close(dg, e_dg, 1e-4, 1e-4, "dg")
    ref.assert_close(db, e_db, 1e-4, 1e-4, "db")


def test_layernorm_backward_matches_finite_differences(rng):
    N, D = 3, 7
    x = rng.standard_normal((N, D))
    g = rng.standard_normal(D)
    b = rng.standard_normal(D)
    w = rng.standard_normal((N, D))  # loss = sum(w * out)
    loss = lambda: float((w * ref.layernorm_forward(x, g, b)[0]).sum())
    num_dx = ref.numerical_gradient(loss, x)
    num_dg = ref.numerical_gradient(loss, g)
    x32, g32, b32 = (a.astype(np.float32) for a in (x, g, b))
    out, mean, rstd = np.empty_like(x32), np.empty(N, np.float32), np.empty(N, np.float32)
    K.layernorm_forward(out, mean, rstd, x32, g32, b32)
    dx, dg, db = np.empty_like(x32), np.zeros(D, np.float32), np.zeros(D, np.float32)
    K.layernorm_backward(dx, dg, db, w.astype(np.float32), x32, g32, mean, rstd)
    ref.assert_close(dx, num_dx, 1e-3, 1e-4, "dx")
    ref.assert_close(dg, num_dg, 1e-3, 1e-4, "dg")


@pytest.mark.parametrize("N,D", SIZES)
def test_layernorm_without_bias(rng, simd, N, D):
    """b = None: out = xhat * g, and backward leaves the bias gradient out (dg, dx as with
    a bias)."""
    x = rng.standard_normal((N, D)).astype(np.float32)
    g = rng.standard_normal(D).astype(np.float32)
    dout = rng.standard_normal((N, D)).astype(np.float32)
    out, mean, rstd = np.empty_like(x), np.empty(N, np.float32), np.empty(N, np.float32)
    K.layernorm_forward(out, mean, rstd, x, g, None)
    ref.assert_close(out, ref.layernorm_forward(x, g, None)[0], 1e-4, 1e-4, "out")
    dx, dg = np.empty_like(x), np.ones(D, np.float32)
    K.layernorm_backward(dx, dg, None, dout, x, g, mean, rstd)
    e_dx, e_dg, _ = ref.layernorm_backward(dout, x, g)
    ref.assert_close(dx, e_dx, 1e-3, 1e-4, "dx")
    ref.assert_close(dg, e_dg + 1, 1e-4, 1e-4, "dg")
    with K.Plan() as plan:  # recorded with two outputs, replayed the same
        K.layernorm_backward(dx, dg, None, dout, x, g, mean, rstd, accumulate=False)
    dx.fill(np.nan), dg.fill(np.nan)
    plan.run()
    ref.assert_close(dx, e_dx, 1e-3, 1e-4, "dx replayed")
    ref.assert_close(dg, e_dg, 1e-4, 1e-4, "dg replayed")


def test_layernorm_backward_in_place(rng):
    x = rng.standard_normal((5, 33)).astype(np.float32)
    g, b = np.ones(33, np.float32), np.zeros(33, np.float32)
    out, mean, rstd = np.empty_like(x), np.empty(5, np.float32), np.empty(5, np.float32)
    K.layernorm_forward(out, mean, rstd, x, g, b)
    dout = rng.standard_normal((5, 33)).astype(np.float32)
    dx = np.empty_like(x)
    K.layernorm_backward(dx, np.zeros(33, np.float32), np.zeros(33, np.float32), dout, x, g, mean, rstd)
    K.layernorm_backward(dout, np.zeros(33, np.float32), np.zeros(33, np.float32), dout, x, g, mean, rstd)
    np.testing.assert_array_equal(dout, dx)


@pytest.mark.parametrize("N,V", [(1, 1), (7, 33), (33, 530), (64, 4099)])
def test_crossentropy(rng, simd, N, V):
    logits = (rng.standard_normal((N, V)) * 5).astype(np.float32)
    targets = rng.integers(0, V, N).astype(np.intc)
    targets[::3] = -1  # ignored positions (padding)
    targets[1::3] = logits[1::3].argmax(axis=1)  # predicted right: hits
    losses, hits = np.empty(N, np.float32), np.full(N, 7, np.intc)
    K.crossentropy_forward(losses, hits, logits, targets)
    e_losses, e_dlogits, e_hits = ref.crossentropy(logits, targets, dscale=0.25)
    ref.assert_close(losses, e_losses, 1e-5, 1e-5, "losses")
    np.testing.assert_array_equal(hits, e_hits)
    losses2, dlogits, hits2 = np.empty(N, np.float32), np.empty_like(logits), np.full(N, 7, np.intc)
    K.crossentropy_forward_backward(losses2, dlogits, hits2, logits, targets, -1, 0.25)
    ref.assert_close(losses2, e_losses, 1e-5, 1e-5, "losses")
    ref.assert_close(dlogits, e_dlogits, 1e-5, 1e-6, "dlogits")
    np.testing.assert_array_equal(hits2, e_hits)
    K.crossentropy_forward_backward(losses2, logits, hits2, logits, targets, -1, 0.25)  # in place
    ref.assert_close(logits, e_dlogits, 1e-5, 1e-6, "dlogits in place")
    np.testing.assert_array_equal(hits2, e_hits)


def test_crossentropy_propagates_nan(simd):
    logits = np.zeros((2, 40), np.float32)
    logits[0, 17] = np.nan  # not the target: NaN must still reach the loss and gradient
    losses, dlogits, hits = np.empty(2, np.float32), np.empty_like(logits), np.empty(2, np.intc)
    K.crossentropy_forward_backward(losses, dlogits, hits, logits, np.array([3, 3], np.intc),
                                    -1, 1.0)
    assert np.isnan(losses[0]) and np.isnan(dlogits[0]).any() and np.isfinite(losses[1])
    assert hits.tolist() == [0, 1]  # a NaN row predicts nothing; a tie (all zero) counts


def test_crossentropy_is_stable_for_huge_logits():
    logits = np.array([[1e4, 0.0, -1e4]], np.float32)
    losses = np.empty(1, np.float32)
    K.crossentropy_forward(losses, np.empty(1, np.intc), logits, np.array([1], np.intc))
    assert np.isfinite(losses).all() and abs(losses[0] - 1e4) < 1


@pytest.mark.parametrize("n", [1, 7, 129, 100_003])
@pytest.mark.parametrize("weight_decay,clip", [(0.0, None), (0.01, 0.5), (0.0, 1e9)])
def test_adam(rng, simd, n, weight_decay, clip):
    p = rng.standard_normal(n).astype(np.float32)
    m = rng.standard_normal(n).astype(np.float32) * 0.1
    v = np.abs(rng.standard_normal(n)).astype(np.float32) * 0.01
    g = rng.standard_normal(n).astype(np.float32)
    norm = float(np.sqrt((g.astype(np.float64) ** 2).sum()))
    max_norm = None if clip is None else clip * norm  # 0.5: clipped to half; 1e9: untouched
    scale = min(1.0, max_norm / norm) if max_norm else 1.0
    e_p, e_m, e_v = ref.adam_update(p, m, v, g, 1e-3, weight_decay=weight_decay, t=7,
                                    grad_scale=scale)
    got = K.adam_update(p, m, v, g, 1e-3, weight_decay=weight_decay, t=7,
                        max_norm=max_norm or 0.0)
    assert got == pytest.approx(norm, rel=1e-12)
    ref.assert_close(p, e_p, 1e-5, 1e-6, "params")
    ref.assert_close(m, e_m, 1e-5, 1e-7, "m")
    ref.assert_close(v, e_v, 1e-5, 1e-8, "v")


def decay_table(*bounds):
    """An adam_update decay argument: (R, 2) intp ranges [start, end)."""
    return np.array(bounds, np.intp).reshape(-1, 2)


# range boundaries inside 4-, 8- and 16-float vectors, at a piece's end (4096), past a
# sum-of-squares chunk (16384), a one-element range, and ranges to the buffer's end
DECAY_CASES = [(7, [(1, 3)]), (129, [(0, 5), (6, 7), (37, 129)]),
               (100_003, [(3, 4101), (4103, 16385), (16400, 16401), (20_000, 100_003)])]


@pytest.mark.parametrize("n,bounds", DECAY_CASES, ids=["n7", "n129", "n100003"])
def test_adam_decays_only_inside_its_ranges(rng, simd, n, bounds):
    """Weight decay inside the decay ranges, none outside; against the float64 reference
    with its mask, and bit for bit: each element as a run of the whole buffer with decay
    (inside) or without (outside) computes it, wherever a range starts or ends."""
    decay = decay_table(*bounds)
    mask = np.zeros(n, bool)
    for start, end in bounds:
        mask[start:end] = True
    state = adam_state(rng, n)
    p, m, v, g = (a.copy() for a in state)
    max_norm = 0.5 * float(np.sqrt((g.astype(np.float64) ** 2).sum()))  # clipped to half
    e_p, e_m, e_v = ref.adam_update(p, m, v, g, 1e-2, weight_decay=0.1, t=7, grad_scale=0.5,
                                    decay_mask=mask)
    K.adam_update(p, m, v, g, 1e-2, weight_decay=0.1, t=7, max_norm=max_norm, decay=decay)
    ref.assert_close(p, e_p, 1e-5, 1e-6, "params")
    ref.assert_close(m, e_m, 1e-5, 1e-7, "m")
    ref.assert_close(v, e_v, 1e-5, 1e-8, "v")
    for weight_decay, where in ((0.1, mask), (0.0, ~mask)):
        whole = [a.copy() for a in state]
        K.adam_update(*whole, 1e-2, weight_decay=weight_decay, t=7, max_norm=max_norm)
        np.testing.assert_array_equal(p[where], whole[0][where])
    np.testing.assert_array_equal(m, whole[1])  # the moments never see the decay
    np.testing.assert_array_equal(v, whole[2])


def test_adam_refuses_bad_decay_ranges():
    p = np.zeros(10, np.float32)
    args = (p, p.copy(), p.copy(), p.copy(), 1e-3)
    for bad, match in ((np.array([[0, 3]], np.int32), "decay has dtype int32"),
                       (np.arange(4, dtype=np.intp), "decay has 1 dimensions"),
                       (np.zeros((2, 3), np.intp), r"shape \(2, 3\), expected"),
                       (np.zeros((4, 2), np.intp)[::2], "expected a C-contiguous"),
                       (decay_table((0, 4), (3, 6)), r"range 1 is \[3, 6\), expected 4 <="),
                       (decay_table((5, 6), (0, 2)), r"range 1 is \[0, 2\)"),
                       (decay_table((2, 2)), r"range 0 is \[2, 2\)"),
                       (decay_table((4, 11)), "start < end <= 10"),
                       (decay_table((-1, 3)), r"range 0 is \[-1, 3\)"),
                       ([[0, 3]], "decay is a list")):
        with pytest.raises(ValidationError, match=match):
            K.adam_update(*args, weight_decay=0.1, decay=bad)
        with pytest.raises(ValidationError, match=match):
            K.AdamStep(*args, 0.9, 0.999, 1e-8, 0.1, 1, 0.0, 1.0, bad)
    before = p.copy()
    K.adam_update(*args, weight_decay=0.1, decay=np.zeros((0, 2), np.intp))  # nothing decays
    np.testing.assert_array_equal(p, before)


def test_column_sums_do_not_depend_on_the_thread_count(rng, set_threads):
    """colsum and layernorm_backward's dg, db give bit-identical results on 1 to 4 threads:
    threads split the columns, and each column adds its rows in order."""
    N, D = 300, 333
    dy, x = (rng.standard_normal((N, D)).astype(np.float32) for _ in range(2))
    g, b = (rng.standard_normal(D).astype(np.float32) for _ in range(2))
    out, mean, rstd = np.empty_like(x), np.empty(N, np.float32), np.empty(N, np.float32)
    K.layernorm_forward(out, mean, rstd, x, g, b)
    results = []
    for threads in (1, 2, 3, 4):
        set_threads(threads)
        db, dg, dbeta = (np.ones(D, np.float32) for _ in range(3))  # accumulate onto 1
        dx = np.empty_like(x)
        K.colsum(db, dy)
        K.layernorm_backward(dx, dg, dbeta, dy, x, g, mean, rstd)
        results.append((db, dg, dbeta, dx))
    for other in results[1:]:
        for a, b_ in zip(other, results[0]):
            np.testing.assert_array_equal(a, b_)


def test_norm_and_adam_do_not_depend_on_the_thread_count(rng, set_threads):
    """sum_squares and adam_update (its clipping and ranged weight decay included) give
    bit-identical results on 1 to 4 threads: the squares are summed over fixed chunks,
    added in order."""
    n = 1_000_003
    p0, m0, g = (rng.standard_normal(n).astype(np.float32) for _ in range(3))
    v0 = np.abs(rng.standard_normal(n)).astype(np.float32)
    decay = decay_table((5, 300_001), (300_013, 700_000), (999_999, n))
    results = []
    for threads in (1, 2, 3, 4):
        set_threads(threads)
        p, m, v = p0.copy(), m0.copy(), v0.copy()
        norm = K.adam_update(p, m, v, g, 1e-3, weight_decay=0.1, t=3, max_norm=1.0,
                             decay=decay)
        results.append((K.sum_squares(g), norm, p, m, v))
    for other in results[1:]:
        assert other[:2] == results[0][:2]
        for a, b in zip(other[2:], results[0][2:]):
            assert np.array_equal(a, b)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_adam_leaves_everything_on_a_non_finite_gradient(rng, bad):
    p, m, v, g = (rng.standard_normal(100_003).astype(np.float32) for _ in range(4))
    g[77_777] = bad
    before = [a.copy() for a in (p, m, v)]
    assert not np.isfinite(K.adam_update(p, m, v, g, 1e-3, t=3, max_norm=5.0))
    for a, b in zip((p, m, v), before):
        np.testing.assert_array_equal(a, b)


def adam_state(rng, n):
    """params, m, v, grads of length n: m, v as after some steps."""
    p, m, g = (rng.standard_normal(n).astype(np.float32) for _ in range(3))
    return p, m * 0.1, np.abs(rng.standard_normal(n)).astype(np.float32) * 0.01, g


@pytest.mark.parametrize("n", [1, 4095, 4097, 100_003])
@pytest.mark.parametrize("max_norm", [0.0, 1.0])
@pytest.mark.parametrize("ranged", [False, True], ids=["decay-all", "decay-ranges"])
def test_adam_step_applied_later_equals_adam_update(rng, simd, n, max_norm, ranged):
    """AdamStep with the norm from sum_squares gives adam_update's parameters and
    moments, bit for bit (its pieces of 4096 split the decay ranges elsewhere than
    adam_update's chunks do); it applies once, with the decay ranges it was given."""
    p, m, v, g = adam_state(rng, n)
    decay = decay_table(*((i, min(i + 4093, n)) for i in range(n // 3, n, 4099))) \
        if ranged else None
    e_p, e_m, e_v = p.copy(), m.copy(), v.copy()
    K.adam_update(e_p, e_m, e_v, g, 1e-3, weight_decay=0.01, t=4, max_norm=max_norm,
                  decay=decay)
    step = K.AdamStep(p, m, v, g, 1e-3, 0.9, 0.999, 1e-8, 0.01, 4, max_norm,
                      np.sqrt(K.sum_squares(g)), decay)
    if ranged:
        decay[...] = 0  # the step checked and copied its ranges: later changes do not reach it
    assert not step.applied
    step.apply()
    assert step.applied
    for got, expected in zip((p, m, v), (e_p, e_m, e_v)):
        np.testing.assert_array_equal(got, expected)
    with pytest.raises(ValidationError, match="applied already"):
        step.apply()


def chain_plan(params, x, widths):
    """A plan of matmuls x @ W_i through weights laid out one after another in params
    (as the model's forward reads its flat buffer), with a relu after each."""
    outs, offset = [], 0
    with K.Plan() as plan:
        for rows, cols in widths:
            w = params[offset:offset + rows * cols].reshape(rows, cols)
            offset += rows * cols
            outs.append(np.empty((x.shape[0], cols), np.float32))
            K.sgemm(outs[-1], x, w)
            K.relu_forward(outs[-1], outs[-1])
            x = outs[-1]
    return plan, outs


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("overlap", [0, 1, 5, 8])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_plan_run_beside_an_update_equals_update_then_run(rng, set_threads, threads, overlap,
                                                          weight_decay):
    """Plan.run(step, overlap) applies the step while replaying the first `overlap`
    calls, each after the part of the parameters it reads: the same parameters, moments
    and outputs as step.apply() then plan.run(), bit for bit (with weight decay on the
    matrices' ranges, as the optimizer gives them)."""
    widths = [(16, 300), (300, 200), (200, 64), (64, 64)]  # 4 matmuls and 4 relus
    n = sum(r * c for r, c in widths) + 1000  # parameters the plan never reads, at the end
    decay = decay_table((0, 16 * 300), (16 * 300 + 60_000, 16 * 300 + 60_000 + 12_800 - 3))
    x = rng.standard_normal((5, 16)).astype(np.float32)
    results = []
    set_threads(threads)
    for overlapped in (False, True):
        p, m, v, g = adam_state(np.random.default_rng(7), n)
        plan, outs = chain_plan(p, x, widths)
        for t in (1, 2, 3):  # three steps, the recorded grads each time
            step = K.AdamStep(p, m, v, g, 1e-2, 0.9, 0.999, 1e-8, weight_decay, t, 5.0,
                              np.sqrt(K.sum_squares(g)), decay)
            if overlapped:
                plan.run(step, overlap)
            else:
                step.apply()
                plan.run()
            assert step.applied
        results.append([p, m, v, *outs])
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_plan_run_beside_an_update_refuses_bad_use(rng):
    p, m, v, g = adam_state(rng, 5000)
    x = rng.standard_normal((3, 16)).astype(np.float32)
    plan, _ = chain_plan(p, x, [(16, 32)])
    step = K.AdamStep(p, m, v, g, 1e-3, 0.9, 0.999, 1e-8, 0.0, 1, 0.0, 1.0)
    with pytest.raises(ValidationError, match="forward = 3, expected 0 to 2 calls"):
        plan.run(step, 3)
    with K.Plan() as touches_grads:
        K.relu_forward(g[:48], x.reshape(-1))
    with pytest.raises(ValidationError, match="call 0 of the overlapped ones uses the "
                                              "update's grads"):
        touches_grads.run(step, 1)
    assert not step.applied  # refused before anything ran
    plan.run(step, 2)
    with pytest.raises(ValidationError, match="applied already"):
        plan.run(step, 2)
    with pytest.raises(ValidationError, match="norm = nan, expected the finite"):
        K.AdamStep(p, m, v, g, 1e-3, 0.9, 0.999, 1e-8, 0.0, 1, 0.0, float("nan"))
    with pytest.raises(ValidationError, match="t = 0, expected a step number"):
        K.AdamStep(p, m, v, g, 1e-3, 0.9, 0.999, 1e-8, 0.0, 0, 0.0, 1.0)
    with pytest.raises(ShapeMismatch, match="AdamStep: m"):
        K.AdamStep(p, m[:10], v, g, 1e-3, 0.9, 0.999, 1e-8, 0.0, 1, 0.0, 1.0)
    with K.Plan(), pytest.raises(ValidationError, match="cannot be recorded"):
        K.AdamStep(p, m, v, g, 1e-3, 0.9, 0.999, 1e-8, 0.0, 1, 0.0, 1.0).apply()


def hazard_plan(rng):
    """A plan whose leaf calls (weight-gradient-like: outputs nobody reads later) share
    buffers with the rest in every order that needs a wait; their outputs lie in one flat
    gradient buffer of three sum_squares chunks (16384 floats each, the last shorter)."""
    x = rng.standard_normal((40, 128)).astype(np.float32)
    h, g = np.empty_like(x), rng.standard_normal((40, 128)).astype(np.float32)
    grads = np.full(2 * 128 * 128 + 128, np.nan, np.float32)
    dw1, dw2 = (grads[i * 16384:(i + 1) * 16384].reshape(128, 128) for i in range(2))
    db = grads[2 * 16384:]
    with K.Plan() as plan:
        K.relu_forward(h, x)                       # 0 chain: writes h
        K.sgemm(dw1, h, g, trans_a=True)           # 1 leaf: reads h (after 0)
        K.relu_backward(h, g, x)                   # 2 chain: overwrites h (after 1 read it)
        K.colsum(db, h, accumulate=False)          # 3 leaf: reads the new h (after 2)
        K.add(g, g, h)                             # 4 chain: writes g, which 1 read
        K.sgemm(dw2, x, g, trans_a=True)           # 5 leaf: reads the new g (after 4)
    return plan, grads, [h, g, grads]


def test_plan_streams_wait_for_shared_memory(rng):
    plan, grads, _ = hazard_plan(rng)
    # call 5, a leaf after the last other call, runs on stream 0 (idle by then)
    calls = [(0, -1), (1, 0), (0, 1), (1, 2), (0, 1), (0, -1)]
    assert plan.streams(0) == [(s, w, ("call", j)) for j, (s, w) in enumerate(calls)]
    assert plan.streams(2) == [(0, -1, ("call", 0)), (1, 0, ("call", 1)),
                               (0, -1, ("call", 2)), (0, -1, ("call", 3))]  # from call 2 on
    # each chunk of the gradients summed right after its last writer: on stream 1, the
    # chunk written by call 5 waiting for it on stream 0
    assert plan.streams(0, grads) == [
        (0, -1, ("call", 0)), (1, 0, ("call", 1)), (1, -1, ("norm", 0)),
        (0, 1, ("call", 2)), (1, 3, ("call", 3)), (1, -1, ("norm", 2)),
        (0, 1, ("call", 4)), (0, -1, ("call", 5)), (1, 7, ("norm", 1))]
    with pytest.raises(ValidationError, match="forward = 7, expected 0 to 6"):
        plan.streams(7)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_plan_run_as_two_streams_equals_in_order(set_threads, threads):
    """Run as two streams, the calls give what they give in order, bit for bit, every
    time (a missing wait would let a leaf read a buffer too early or too late); with
    grads, run returns sum_squares(grads) as it ends up, the same bits."""
    set_threads(threads)
    for forward in (0, 1, 3):
        results = []
        for streams in (False, True):
            plan, grads, arrays = hazard_plan(np.random.default_rng(3))
            for _ in range(50):
                total = plan.run(None, forward, streams, grads)
                assert total == K.sum_squares(grads)
            assert plan.run(None, forward, streams) is None
            results.append(arrays)
        for a, b in zip(*results):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("n", [1, 33, 100_003])
def test_relu(rng, simd, n):
    x = rng.standard_normal(n).astype(np.float32)
    out = np.empty_like(x)
    K.relu_forward(out, x)
    np.testing.assert_array_equal(out, np.maximum(x, 0))
    dout = rng.standard_normal(n).astype(np.float32)
    dx = np.empty_like(x)
    K.relu_backward(dx, dout, out)
    np.testing.assert_array_equal(dx, np.where(x > 0, dout, 0))
    K.relu_forward(x, x)  # in place
    np.testing.assert_array_equal(x, out)


@pytest.mark.parametrize("n", [1, 7, 33, 129, 4097, 100_003])
def test_gelu(rng, simd, n):
    """gelu_forward and gelu_backward vs the float64 erf form, on odd sizes (the vector
    loops' tails) and past the size that splits them between threads; in place too."""
    x = (rng.standard_normal(n) * 3).astype(np.float32)
    x[:min(n, 4)] = [0.0, -9.5, 40.0, -0.75][:min(n, 4)]  # zero, the tails, gelu' ~ 0
    out = np.empty_like(x)
    K.gelu_forward(out, x)
    ref.assert_close(out, ref.gelu(x), 2e-6, 1e-6, "gelu")
    dout = rng.standard_normal(n).astype(np.float32)
    dx = np.empty_like(x)
    K.gelu_backward(dx, dout, x)
    ref.assert_close(dx, ref.gelu_backward(dout, x), 2e-6, 1e-6, "gelu backward")
    K.gelu_backward(dout, dout, x)  # in place
    np.testing.assert_array_equal(dout, dx)
    K.gelu_forward(x, x)
    np.testing.assert_array_equal(x, out)


def test_gelu_reference_backward_matches_finite_differences(rng):
    x = rng.standard_normal(40) * 3
    w = rng.standard_normal(40)
    numeric = ref.numerical_gradient(lambda: float((w * ref.gelu(x)).sum()), x)
    ref.assert_close(ref.gelu_backward(w, x), numeric, 1e-6, 1e-8, "gelu'")


def test_gelu_propagates_nan_and_keeps_the_tails(simd):
    x = np.array([np.nan, np.inf, -np.inf, -30.0, 30.0, 1e-30], np.float32)
    out, dx = np.empty_like(x), np.empty_like(x)
    K.gelu_forward(out, x)
    K.gelu_backward(dx, np.ones_like(x), x)
    assert np.isnan(out[0]) and np.isnan(dx[0]) and out[1] == np.inf
    assert np.isnan(out[2])  # -inf * Phi(-inf) = -inf * 0, as torch's
    assert abs(out[3]) < 1e-30 and out[4] == 30.0 and out[5] == np.float32(5e-31)
    assert abs(dx[3]) < 1e-30 and dx[4] == 1.0


@pytest.mark.parametrize("n", [1, 7, 33, 129, 100_003])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
def test_dropout(rng, simd, n, p):
    """dropout vs the reference mask (the same hash, in numpy), on odd sizes and past the
    size that splits it between threads: x / (1 - p) where kept; about p dropped; the same
    mask again for the same seed and site (dropout's backward), another for another."""
    x = rng.standard_normal(n).astype(np.float32)
    seed = np.array([7, -3, 0], np.intc)
    out = np.empty_like(x)
    K.dropout(out, x, p, seed, 5)
    keep = ref.dropout_keep(x.shape, p, seed, 5)
    ref.assert_close(out, ref.dropout(x, p, seed, 5), 1e-7, 1e-7, "dropout")
    np.testing.assert_array_equal(out != 0, keep & (x != 0))
    if n > 10_000:
        assert abs(1 - keep.mean() - p) < 0.01
    again = x.copy()
    K.dropout(again, again, p, seed, 5)  # in place
    np.testing.assert_array_equal(again, out)
    if p > 0 and n > 10_000:
        for other_seed, site in (([7, -2, 0], 5), ([8, -3, 0], 5), ([7, -3, 0], 6)):
            other = np.empty_like(x)
            K.dropout(other, x, p, np.array(other_seed, np.intc), site)
            assert not np.array_equal(other != 0, out != 0)
            assert abs(((other != 0) & (out != 0)).mean() - (1 - p) ** 2) < 0.02  # independent


def test_dropout_replays_the_seed_the_array_holds_then(rng):
    x = rng.standard_normal((3, 50)).astype(np.float32)
    seed, out = np.array([1, 2, 0], np.intc), np.empty_like(x)
    with K.Plan() as plan:
        K.dropout(out, x, 0.5, seed, 0)
    seed[1] = 3
    plan.run()
    ref.assert_close(out, ref.dropout(x, 0.5, [1, 3, 0], 0), 1e-7, 1e-7, "replayed")
    with pytest.raises(ValidationError, match="dropout: p = 1.0, expected 0 <= p < 1"):
        K.dropout(out, x, 1.0, seed)
    with pytest.raises(ValidationError, match="dropout: seed has dtype int64, expected int32"):
        K.dropout(out, x, 0.5, np.array([1, 2, 0]))
    with pytest.raises(ShapeMismatch, match=r"dropout: seed has shape \(2,\), expected \(3,\)"):
        K.dropout(out, x, 0.5, np.zeros(2, np.intc))
    with pytest.raises(ShapeMismatch, match="dropout: out"):
        K.dropout(out[:2], x, 0.5, seed)


def test_dropout_masks_follow_the_row_in_the_whole_batch(rng):
    """Rows 2..4 of a batch, given as a batch of their own with seed[2] = 2, get the masks
    they have in the whole batch (a data-parallel process's part)."""
    x = rng.standard_normal((5, 3, 8)).astype(np.float32)
    whole, part = np.empty_like(x), np.empty_like(x[2:])
    K.dropout(whole, x, 0.4, np.array([9, 1, 0], np.intc), 3)
    K.dropout(part, x[2:].copy(), 0.4, np.array([9, 1, 2], np.intc), 3)
    np.testing.assert_array_equal(part, whole[2:])
    ref.assert_close(part, ref.dropout(x[2:], 0.4, [9, 1, 2], 3), 1e-7, 1e-7, "offset")


@pytest.mark.parametrize("N,C", SIZES + [(1024, 2048)])
def test_bias_add_and_colsum(rng, simd, N, C):
    x = rng.standard_normal((N, C)).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    expected = x.astype(np.float64) + b
    K.bias_add(x, b)
    ref.assert_close(x, expected, 1e-6, 1e-6, "bias_add")
    db = np.ones(C, np.float32)
    K.colsum(db, x)
    ref.assert_close(db, expected.sum(0) + 1, 1e-5, 1e-3, "colsum")
    db.fill(np.nan)
    K.colsum(db, x, accumulate=False)
    ref.assert_close(db, expected.sum(0), 1e-5, 1e-3, "colsum")


@pytest.mark.parametrize("B,T,D,V", [(1, 1, 1, 1), (2, 7, 33, 11), (4, 80, 128, 530)])
def test_embedding(rng, B, T, D, V):
    Tmax = T + 3
    ids = rng.integers(0, V, (B, T)).astype(np.intc)
    ids[0, :] = 0  # repeated ids must add up, not overwrite
    wte = rng.standard_normal((V, D)).astype(np.float32)
    wpe = rng.standard_normal((Tmax, D)).astype(np.float32)
    out = np.empty((B, T, D), np.float32)
    K.embedding_forward(out, ids, wte, wpe)
    ref.assert_close(out, ref.embedding_forward(ids, wte, wpe), 1e-6, 1e-6, "out")
    dout = rng.standard_normal((B, T, D)).astype(np.float32)
    dwte, dwpe = np.zeros_like(wte), np.zeros_like(wpe)
    K.embedding_backward(dwte, dwpe, dout, ids)
    e_dwte, e_dwpe = ref.embedding_backward(dout, ids, V, Tmax)
    ref.assert_close(dwte, e_dwte, 1e-5, 1e-5, "dwte")
    ref.assert_close(dwpe, e_dwpe, 1e-5, 1e-5, "dwpe")
    dwte.fill(np.nan), dwpe.fill(np.nan)  # every row set, the unused ones to zero
    K.embedding_backward(dwte, dwpe, dout, ids, accumulate=False)
    ref.assert_close(dwte, e_dwte, 1e-5, 1e-5, "dwte")
    ref.assert_close(dwpe, e_dwpe, 1e-5, 1e-5, "dwpe")
    for acc_wte, acc_wpe in ((True, False), (False, True)):  # one added to, one overwritten
        dwte.fill(1.0), dwpe.fill(1.0)
        K.embedding_backward(dwte, dwpe, dout, ids, accumulate=(acc_wte, acc_wpe))
        ref.assert_close(dwte, e_dwte + acc_wte, 1e-5, 1e-5, "dwte")
        ref.assert_close(dwpe, e_dwpe + acc_wpe, 1e-5, 1e-5, "dwpe")
    with pytest.raises(ValidationError, match=r"accumulate = \(True,\), expected a bool or 2"):
        K.embedding_backward(dwte, dwpe, dout, ids, accumulate=(True,))


def test_sum_squares(rng, simd):
    x = rng.standard_normal(100_003).astype(np.float32)
    assert K.sum_squares(x) == pytest.approx(float((x.astype(np.float64) ** 2).sum()), rel=1e-9)


# ---- bad input: a clear error, never a crash ------------------------------------------------

def test_crossentropy_forward_replays_and_checks_its_targets_again(rng):
    """crossentropy_forward recorded in a plan: a replay writes the losses and hits of the
    logits and targets as they are then, and refuses a target changed out of range."""
    logits = rng.standard_normal((6, 5)).astype(np.float32)
    targets = np.array([0, 4, -1, 2, 3, 1], np.intc)
    losses, hits = np.empty(6, np.float32), np.empty(6, np.intc)
    with K.Plan() as plan:
        K.crossentropy_forward(losses, hits, logits, targets)
    logits[...] = rng.standard_normal((6, 5))
    targets[0] = 3
    plan.run()
    expected_losses, expected_hits = np.empty(6, np.float32), np.empty(6, np.intc)
    K.crossentropy_forward(expected_losses, expected_hits, logits, targets)
    np.testing.assert_array_equal(losses, expected_losses)
    np.testing.assert_array_equal(hits, expected_hits)
    targets[1] = 5
    with pytest.raises(TokenError, match="targets holds token id 5 at flat index 1"):
        plan.run()


def test_run_pair_replays_two_plans_side_by_side(rng, set_threads):
    """Two plans on arrays of their own, side by side on two threads or one after the
    other on one: each array as each plan alone makes it."""
    A, B = rng.standard_normal((2, 40, 30)).astype(np.float32)
    W = rng.standard_normal((30, 50)).astype(np.float32)
    outs = [np.empty((40, 50), np.float32) for _ in range(2)]
    plans = []
    for x, out in zip((A, B), outs):
        with K.Plan() as plan:
            K.sgemm(out, x, W, activation="gelu")
            K.add(out, out, out)
        plans.append(plan)
    expected = [out.copy() for out in outs]
    for threads in (2, 1):
        set_threads(threads)
        for out in outs:
            out[...] = np.nan
        K.run_pair(*plans)
        for out, want in zip(outs, expected):
            np.testing.assert_array_equal(out, want)
    with K.Plan() as recording, pytest.raises(ValidationError, match="still being recorded"):
        K.run_pair(recording, plans[0])


def test_token_ids_out_of_range_are_refused():
    wte = np.zeros((5, 4), np.float32)
    wpe = np.zeros((8, 4), np.float32)
    out = np.empty((1, 3, 4), np.float32)
    for bad in (5, -1):
        with pytest.raises(ValidationError, match=rf"ids holds token id {bad} .* \[0, 5\)"):
            K.embedding_forward(out, np.array([[0, bad, 1]], np.intc), wte, wpe)
    with pytest.raises(ValidationError, match="T = 9 exceeds max_seq_len = 8"):
        K.embedding_forward(np.empty((1, 9, 4), np.float32), np.zeros((1, 9), np.intc), wte, wpe)
    with pytest.raises(ValidationError, match=r"targets\[1\] = 7"):
        K.crossentropy_forward(np.empty(2, np.float32), np.empty(2, np.intc),
                               np.zeros((2, 5), np.float32), np.array([1, 7], np.intc))


def test_wrong_shape_dtype_layout_and_readonly_are_refused():
    x = np.zeros((4, 8), np.float32)
    g = b = np.ones(8, np.float32)
    mean, rstd = np.empty(4, np.float32), np.empty(4, np.float32)
    with pytest.raises(ShapeMismatch, match=r"layernorm_forward: out has shape \(4, 7\), expected \(4, 8\)"):
        K.layernorm_forward(np.empty((4, 7), np.float32), mean, rstd, x, g, b)
    with pytest.raises(ValidationError, match="x has dtype float64, expected float32"):
        K.layernorm_forward(np.empty_like(x), mean, rstd, x.astype(np.float64), g, b)
    with pytest.raises(ValidationError, match="x is not C-contiguous"):
        K.layernorm_forward(np.empty_like(x), mean, rstd, np.zeros((8, 4), np.float32).T, g, b)
    ro = np.empty_like(x)
    ro.flags.writeable = False
    with pytest.raises(ValidationError, match="out is read-only"):
        K.layernorm_forward(ro, mean, rstd, x, g, b)
    with pytest.raises(ValidationError, match="x is a list, expected a numpy array"):
        K.layernorm_forward(np.empty_like(x), mean, rstd, [[1.0]], g, b)
    with pytest.raises(ValidationError, match="x has 1 dimensions"):
        K.layernorm_forward(np.empty_like(x), mean, rstd, g, g, b)
    with pytest.raises(ValidationError, match="is empty"):
        K.relu_forward(np.empty(0, np.float32), np.empty(0, np.float32))
    with pytest.raises(ValidationError, match="t = 0"):
        p = np.zeros(3, np.float32)
        K.adam_update(p, p.copy(), p.copy(), p.copy(), 1e-3, t=0)


@pytest.mark.skipif(not K.kernels_info()["openmp"], reason="needs OpenMP")
def test_thread_counts_apply_to_every_thread_and_local_ones_to_one():
    """set_num_threads is process-wide (OpenMP's own setting would hold only for the
    calling thread); set_local_threads holds for its thread, until set back to 0."""
    def elsewhere():
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(K.get_num_threads).result()

    old = K.get_num_threads()
    try:
        K.set_num_threads(3)
        assert K.get_num_threads() == 3 and elsewhere() == 3
        assert K.set_local_threads(1) == 0
        assert K.get_num_threads() == 1 and elsewhere() == 3
        assert K.set_local_threads(2) == 1
        assert K.set_local_threads(0) == 2
        assert K.get_num_threads() == 3
    finally:
        K.set_local_threads(0)
        K.set_num_threads(old)


def test_runtime_switches():
    info = K.kernels_info()
    assert info["num_threads"] >= 1 and info["simd"] in ("generic", "avx2", "avx512")
    old = K.get_num_threads()
    K.set_num_threads(1)
    assert K.get_num_threads() == 1 or not info["openmp"]
    K.set_num_threads(old)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValidationError, match="set_num_threads"):
            K.set_num_threads(bad)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValidationError, match="set_local_threads"):
            K.set_local_threads(bad)
    with pytest.raises(ValidationError, match="set_simd"):
        K.set_simd("sse9")
    assert K.set_simd("generic") == "generic"
    K.set_simd(info["simd_supported"])


# ---- property-based: random shapes vs the reference ---------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(N=st.integers(1, 40), D=st.integers(1, 70), seed=st.integers(0, 2**32 - 1))
def test_layernorm_random_shapes(N, D, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, D)).astype(np.float32)
    g, b = rng.standard_normal(D).astype(np.float32), rng.standard_normal(D).astype(np.float32)
    out, mean, rstd = np.empty_like(x), np.empty(N, np.float32), np.empty(N, np.float32)
    K.layernorm_forward(out, mean, rstd, x, g, b)
    ref.assert_close(out, ref.layernorm_forward(x, g, b)[0], 2e-3, 2e-3, "out")


@settings(max_examples=60, deadline=None)
@given(N=st.integers(1, 30), V=st.integers(1, 300), seed=st.integers(0, 2**32 - 1))
def test_crossentropy_random_shapes(N, V, seed):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((N, V)) * 4).astype(np.float32)
    targets = rng.integers(-1, V, N).astype(np.intc)
    losses, dlogits, hits = np.empty(N, np.float32), np.empty_like(logits), np.empty(N, np.intc)
    K.crossentropy_forward_backward(losses, dlogits, hits, logits, targets, -1, 0.5)
    e_losses, e_dlogits, e_hits = ref.crossentropy(logits, targets, dscale=0.5)
    ref.assert_close(losses, e_losses, 1e-4, 1e-4, "losses")
    ref.assert_close(dlogits, e_dlogits, 1e-4, 1e-5, "dlogits")
    np.testing.assert_array_equal(hits, e_hits)


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 3), T=st.integers(1, 20), NH=st.integers(1, 4), hs=st.integers(1, 20),
       seed=st.integers(0, 2**32 - 1))
def test_attention_random_shapes(B, T, NH, hs, seed):
    rng = np.random.default_rng(seed)
    D = NH * hs
    q, k, v, dout = (rng.standard_normal((B, T, D)).astype(np.float32) for _ in range(4))
    out, att = np.empty_like(q), np.empty((B, NH, T, T), np.float32)
    K.attention_forward(out, att, q, k, v, NH)
    ref.assert_close(out, ref.attention_forward(q, k, v, NH)[0], 1e-3, 1e-4, "out")
    dq, dk, dv = np.empty_like(q), np.empty_like(q), np.empty_like(q)
    K.attention_backward(dq, dk, dv, dout, att, q, k, v, NH)
    for name, got, want in zip("qkv", (dq, dk, dv), ref.attention_backward(dout, q, k, v, NH)):
        ref.assert_close(got, want, 2e-3, 2e-4, "d" + name)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(-2**31, 2**31 - 1), min_size=1, max_size=6))
def test_bad_ids_never_reach_the_kernel(ids):
    wte = np.zeros((7, 4), np.float32)
    wpe = np.zeros((8, 4), np.float32)
    arr = np.array([ids], np.intc)
    out = np.empty((1, arr.shape[1], 4), np.float32)
    if all(0 <= i < 7 for i in ids):
        K.embedding_forward(out, arr, wte, wpe)
    else:
        with pytest.raises(ValidationError):
            K.embedding_forward(out, arr, wte, wpe)


def test_plan_replays_the_recorded_calls_on_current_contents(rng):
    ids = np.array([[1, 2, 2]], np.intc)
    wte = rng.standard_normal((5, 4)).astype(np.float32)
    wpe = rng.standard_normal((3, 4)).astype(np.float32)
    emb, out = np.empty((1, 3, 4), np.float32), np.empty((1, 3, 4), np.float32)
    with K.Plan() as plan:
        K.embedding_forward(emb, ids, wte, wpe)
        K.relu_forward(out, emb)
        K.add(out, out, emb)
    assert len(plan) == 3
    ids[0] = [4, 0, 3]
    wte *= 2
    plan.run()
    e = np.asarray(wte, np.float64)[ids] + wpe
    ref.assert_close(out, np.maximum(e, 0) + e, 1e-6, 1e-6, "replayed")


def test_plan_checks_ids_again_before_a_replay():
    ids = np.array([[1, 2]], np.intc)
    wte, wpe = np.ones((3, 2), np.float32), np.ones((2, 2), np.float32)
    out = np.empty((1, 2, 2), np.float32)
    with K.Plan() as plan:
        K.embedding_forward(out, ids, wte, wpe)
    ids[0, 1] = 3  # out of range since the recording: refused, never read by the C
    with pytest.raises(TokenError, match=r"embedding_forward: ids holds token id 3 at flat index 1"):
        plan.run()


def test_plan_refuses_what_it_could_not_replay():
    x = np.ones(4, np.float32)
    with K.Plan() as plan:
        with pytest.raises(ValidationError, match="sum_squares cannot be recorded"):
            K.sum_squares(x)
        with pytest.raises(ValidationError, match="one at a time"), K.Plan():
            pass
    with pytest.raises(ValidationError, match="already recorded"), plan:
        pass
    assert K.sum_squares(x) == 4.0  # recording ended with the with-block, even on errors


def test_plan_records_only_its_own_thread():
    import threading

    a, out = np.ones(8, np.float32), np.empty(8, np.float32)
    with K.Plan() as plan:
        worker = threading.Thread(target=K.add, args=(out, a, a))
        worker.start()
        worker.join()
        K.relu_forward(out, a)
    assert len(plan) == 1
