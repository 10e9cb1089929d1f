"""Attention forward + backward and the KV-cache step: the C kernels vs float32 numpy, and
the kernels alone on long sequences.

Run from the repository root:
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m pytest --benchmark-only bench/test_bench_attention.py
Each workload is one benchmark group, so the C and numpy rows sit side by side. The long
sequences (one group per head size) also print their time / T^2, which stays flat when the
time grows as the arithmetic does (6 T^2 hs floating-point operations a step).
"""

import numpy as np
import pytest

from rustgpt import _kernels as K
from rustgpt.layers import Workspace

# (B, T, D, NH): RustGPT's default at batch 1, then training-sized batches
WORKLOADS = [(1, 80, 128, 1), (16, 64, 128, 1), (16, 128, 256, 4), (8, 256, 512, 8)]


def _ids(w):
    return "B{}-T{}-D{}-NH{}".format(*w)


def _inputs(B, T, D):
    rng = np.random.default_rng(0)
    return tuple(rng.standard_normal((B, T, D)).astype(np.float32) for _ in range(4))


# ---- the same math in float32 numpy: batched matmuls over (B, NH) ------------------------

def numpy_forward(q, k, v, NH):
    """out (B, T, D), att (B, NH, T, T)."""
    B, T, D = q.shape
    hs = D // NH
    split = lambda a: a.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)  # (B, NH, T, hs)
    scores = split(q) @ split(k).transpose(0, 1, 3, 2)  # (B, NH, T, T)
    scores *= np.float32(1.0 / np.sqrt(hs))
    scores[..., np.triu(np.ones((T, T), bool), k=1)] = -np.inf
    scores -= scores.max(axis=-1, keepdims=True)
    att = np.exp(scores, out=scores)
    att /= att.sum(axis=-1, keepdims=True)
    out = (att @ split(v)).transpose(0, 2, 1, 3).reshape(B, T, D)
    return out, att


def numpy_backward(dout, att, q, k, v, NH):
    """dq, dk, dv (B, T, D) given the forward's att."""
    B, T, D = q.shape
    hs = D // NH
    split = lambda a: a.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)
    merge = lambda a: a.transpose(0, 2, 1, 3).reshape(B, T, D)
    doh = split(dout)
    dv = att.transpose(0, 1, 3, 2) @ doh
    datt = doh @ split(v).transpose(0, 1, 3, 2)
    dpre = att * (datt - (att * datt).sum(axis=-1, keepdims=True))
    dpre *= np.float32(1.0 / np.sqrt(hs))
    return merge(dpre @ split(k)), merge(dpre.transpose(0, 1, 3, 2) @ split(q)), merge(dv)


# ---- forward + backward ---------------------------------------------------------------------

@pytest.mark.parametrize("w", WORKLOADS, ids=_ids)
def test_bench_attention_c(benchmark, w):
    B, T, D, NH = w
    benchmark.group = f"attention fwd+bwd {_ids(w)}"
    benchmark(_c_step(B, T, D, NH))


@pytest.mark.parametrize("w", WORKLOADS, ids=_ids)
def test_bench_attention_numpy(benchmark, w):
    B, T, D, NH = w
    benchmark.group = f"attention fwd+bwd {_ids(w)}"
    q, k, v, dout = _inputs(B, T, D)

    def step():
        _, att = numpy_forward(q, k, v, NH)
        return numpy_backward(dout, att, q, k, v, NH)

    benchmark(step)


def _c_step(B, T, D, NH):
    """Forward + backward on fixed inputs, its arrays and scratch kept in a Workspace (huge
    pages for the large ones), as the model does."""
    q, k, v, dout = _inputs(B, T, D)
    ws = Workspace()
    out, dq, dk, dv = (ws.get(name, (B, T, D)) for name in ("out", "dq", "dk", "dv"))
    att, ds = ws.get("att", (B, NH, T, T)), ws.get("ds", (B, NH, T, T))
    scratch = ws.get("scratch", K.attention_scratch_shape(T, D, NH))

    def step():
        K.attention_forward(out, att, q, k, v, NH, scratch)
        K.attention_backward(dq, dk, dv, dout, att, q, k, v, NH, ds, scratch)

    return step


# ---- long sequences: time / T^2 -------------------------------------------------------------

LONG = [(T, hs) for hs in (64, 128) for T in (512, 1024, 2048, 4096)]  # one batch row, one head


@pytest.fixture(scope="module")
def per_t2(request):
    """Collects (hs, T, best seconds) of the long rows; prints their time / T^2 after them."""
    rows = []
    yield rows
    plugins = request.config.pluginmanager
    write = plugins.get_plugin("terminalreporter").write_line
    with plugins.get_plugin("capturemanager").global_and_fixture_disabled():
        for hs in sorted({hs for hs, _, _ in rows}):
            cells = [f"T {T}: {s / T**2 * 1e9:.2f} ns ({6 * T * T * hs / s / 1e9:.0f} GFLOP/s)"
                     for h, T, s in rows if h == hs]
            write(f"attention fwd+bwd, head size {hs}, time / T^2: " + ", ".join(cells))


@pytest.mark.parametrize("T,hs", LONG, ids=[f"T{T}-hs{hs}" for T, hs in LONG])
def test_bench_attention_long(benchmark, per_t2, T, hs):
    benchmark.group = f"attention fwd+bwd B1 NH1 hs{hs}, by T"
    benchmark.pedantic(_c_step(1, T, hs, 1), rounds=max(3, 2**27 // (T * T * hs) * 5),
                       warmup_rounds=1)
    best = benchmark.stats.stats.min
    benchmark.extra_info["ns_per_T2"] = best / T**2 * 1e9
    benchmark.extra_info["gflops"] = 6 * T * T * hs / best / 1e9
    per_t2.append((hs, T, best))


# ---- one KV-cache decoding step -------------------------------------------------------------

STEP = dict(B=1, n=64, Tmax=80, D=128)


@pytest.mark.parametrize("NH", [1, 4])
def test_bench_attention_step_c(benchmark, NH):
    B, n, Tmax, D = STEP["B"], STEP["n"], STEP["Tmax"], STEP["D"]
    benchmark.group = f"attention step B{B}-n{n}-D{D}-NH{NH}"
    kc, vc, _, _ = _inputs(B, Tmax, D)
    q, out = kc[:, n - 1].copy(), np.empty((B, D), np.float32)
    scores = np.empty((B, NH, Tmax), np.float32)
    benchmark(K.attention_step, out, q, kc, vc, n, NH, scores)


@pytest.mark.parametrize("NH", [1, 4])
def test_bench_attention_step_numpy(benchmark, NH):
    B, n, Tmax, D = STEP["B"], STEP["n"], STEP["Tmax"], STEP["D"]
    benchmark.group = f"attention step B{B}-n{n}-D{D}-NH{NH}"
    kc, vc, _, _ = _inputs(B, Tmax, D)
    q, hs = kc[:, n - 1].copy(), D // NH

    def step():
        qh = q.reshape(B, NH, 1, hs)
        kh = kc[:, :n].reshape(B, n, NH, hs).transpose(0, 2, 3, 1)  # (B, NH, hs, n)
        vh = vc[:, :n].reshape(B, n, NH, hs).transpose(0, 2, 1, 3)  # (B, NH, n, hs)
        s = (qh @ kh) * np.float32(1.0 / np.sqrt(hs))
        p = np.exp(s - s.max(axis=-1, keepdims=True))
        return ((p / p.sum(axis=-1, keepdims=True)) @ vh).reshape(B, D)

    benchmark(step)


def test_numpy_versions_match_the_kernels():
    """The numpy side computes the same thing, so the comparison is fair."""
    B, T, D, NH = 2, 16, 32, 2
    q, k, v, dout = _inputs(B, T, D)
    out, att = np.empty_like(q), np.empty((B, NH, T, T), np.float32)
    K.attention_forward(out, att, q, k, v, NH)
    e_out, e_att = numpy_forward(q, k, v, NH)
    np.testing.assert_allclose(out, e_out, rtol=1e-4, atol=1e-5)
    grads = [np.empty_like(q) for _ in range(3)]
    K.attention_backward(*grads, dout, att, q, k, v, NH)
    for g, e in zip(grads, numpy_backward(dout, e_att, q, k, v, NH)):
        np.testing.assert_allclose(g, e, rtol=1e-3, atol=1e-4)
