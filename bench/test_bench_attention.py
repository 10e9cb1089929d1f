"""Attention forward + backward and the KV-cache step: the C kernels vs float32 numpy.

Run from the repository root:
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m pytest --benchmark-only bench/test_bench_attention.py
Each workload is one benchmark group, so the C and numpy rows sit side by side.
"""

import numpy as np
import pytest

from rustgpt import _kernels as K

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
    q, k, v, dout = _inputs(B, T, D)
    out, att = np.empty_like(q), np.empty((B, NH, T, T), np.float32)
    dq, dk, dv, ds = np.empty_like(q), np.empty_like(q), np.empty_like(q), np.empty_like(att)

    def step():  # with its scratch kept, as the model does
        K.attention_forward(out, att, q, k, v, NH)
        K.attention_backward(dq, dk, dv, dout, att, q, k, v, NH, ds)

    benchmark(step)


@pytest.mark.parametrize("w", WORKLOADS, ids=_ids)
def test_bench_attention_numpy(benchmark, w):
    B, T, D, NH = w
    benchmark.group = f"attention fwd+bwd {_ids(w)}"
    q, k, v, dout = _inputs(B, T, D)

    def step():
        _, att = numpy_forward(q, k, v, NH)
        return numpy_backward(dout, att, q, k, v, NH)

    benchmark(step)


# ---- one KV-cache decoding step -------------------------------------------------------------

STEP = dict(B=1, n=64, Tmax=80, D=128)


@pytest.mark.parametrize("NH", [1, 4])
def test_bench_attention_step_c(benchmark, NH):
    B, n, Tmax, D = STEP["B"], STEP["n"], STEP["Tmax"], STEP["D"]
    benchmark.group = f"attention step B{B}-n{n}-D{D}-NH{NH}"
    kc, vc, _, _ = _inputs(B, Tmax, D)
    q, out = kc[:, n - 1].copy(), np.empty((B, D), np.float32)
    benchmark(K.attention_step, out, q, kc, vc, n, NH)


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
