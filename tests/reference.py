"""Float64 numpy references of every kernel, the ground truth for tests/ and bench/.

Each function restates one kernel of csrc/rustgpt_kernels.h in plain numpy, returning new
arrays instead of writing into outputs.
"""

from __future__ import annotations

import math

import numpy as np

# RustGPT's architecture, each option toggled alone, and the gpt preset (--arch gpt): the
# ModelConfig options every architecture test runs over
ARCHS = {"rustgpt": {}, "gpt": {"arch": "gpt"}, "pre-norm": {"norm": "pre"},
         "gelu": {"activation": "gelu"}, "projection": {"attention_projection": True},
         "tied": {"tie_embeddings": True}, "no-bias": {"bias": False}}


def matmul(A, B, trans_a=False, trans_b=False):
    """op(A) @ op(B) in float64."""
    A = np.asarray(A, np.float64)
    B = np.asarray(B, np.float64)
    return (A.T if trans_a else A) @ (B.T if trans_b else B)


def _causal_mask(T):
    return np.triu(np.ones((T, T), bool), k=1)  # True above the diagonal: future positions


def attention_forward(q, k, v, num_heads):
    """out (B, T, D), att (B, NH, T, T) of causal softmax attention."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    B, T, D = q.shape
    hs = D // num_heads
    split = lambda a: a.reshape(B, T, num_heads, hs).transpose(0, 2, 1, 3)  # (B, NH, T, hs)
    qh, kh, vh = split(q), split(k), split(v)
    scores = qh @ kh.transpose(0, 1, 3, 2) / np.sqrt(hs)  # (B, NH, T, T)
    scores = np.where(_causal_mask(T), -np.inf, scores)
    scores -= scores.max(axis=-1, keepdims=True)
    att = np.exp(scores)
    att /= att.sum(axis=-1, keepdims=True)
    out = (att @ vh).transpose(0, 2, 1, 3).reshape(B, T, D)
    return out, att


def attention_backward(dout, q, k, v, num_heads):
    """dq, dk, dv (B, T, D) of attention_forward given dout."""
    q, k, v, dout = (np.asarray(a, np.float64) for a in (q, k, v, dout))
    B, T, D = q.shape
    hs = D // num_heads
    split = lambda a: a.reshape(B, T, num_heads, hs).transpose(0, 2, 1, 3)
    merge = lambda a: a.transpose(0, 2, 1, 3).reshape(B, T, D)
    qh, kh, vh, doh = split(q), split(k), split(v), split(dout)
    _, att = attention_forward(q, k, v, num_heads)
    dvh = att.transpose(0, 1, 3, 2) @ doh
    datt = doh @ vh.transpose(0, 1, 3, 2)
    dpre = att * (datt - (att * datt).sum(axis=-1, keepdims=True)) / np.sqrt(hs)
    dqh = dpre @ kh
    dkh = dpre.transpose(0, 1, 3, 2) @ qh
    return merge(dqh), merge(dkh), merge(dvh)


def attention_step(q, kcache, vcache, lengths, num_heads):
    """out (B, D) of one decoding step: row b's query q[b] attends to rows 0..lengths[b]-1
    of kcache[b], vcache[b] (B, Tmax, D)."""
    q, kcache, vcache = (np.asarray(a, np.float64) for a in (q, kcache, vcache))
    B, D = q.shape
    hs = D // num_heads
    out = np.empty((B, D))
    for b, n in enumerate(lengths):
        qh = q[b].reshape(num_heads, 1, hs)
        kh, vh = (c[b, :n].reshape(n, num_heads, hs).transpose(1, 0, 2)
                  for c in (kcache, vcache))  # (NH, n, hs)
        scores = qh @ kh.transpose(0, 2, 1) / np.sqrt(hs)  # (NH, 1, n)
        att = np.exp(scores - scores.max(axis=-1, keepdims=True))
        att /= att.sum(axis=-1, keepdims=True)
        out[b] = (att @ vh).reshape(D)
    return out


def layernorm_forward(x, g, b, eps=1e-5):
    """out, mean, rstd of row-wise layer norm (b None: without the bias)."""
    x = np.asarray(x, np.float64)
    mean = x.mean(axis=-1)
    rstd = 1.0 / np.sqrt(x.var(axis=-1) + eps)
    out = (x - mean[..., None]) * rstd[..., None] * g
    return (out if b is None else out + b), mean, rstd


def layernorm_backward(dout, x, g, eps=1e-5):
    """dx, dg, db of layernorm_forward given dout (N, D)."""
    dout = np.asarray(dout, np.float64)
    _, mean, rstd = layernorm_forward(x, g, np.zeros_like(g, np.float64), eps)
    xhat = (np.asarray(x, np.float64) - mean[:, None]) * rstd[:, None]
    dxhat = dout * g
    dx = rstd[:, None] * (dxhat - dxhat.mean(-1, keepdims=True)
                          - xhat * (dxhat * xhat).mean(-1, keepdims=True))
    return dx, (dout * xhat).sum(0), dout.sum(0)


_erf = np.vectorize(math.erf, otypes=[np.float64])
_erfc = np.vectorize(math.erfc, otypes=[np.float64])


def normal_cdf(x):
    """Phi(x) = (1 + erf(x / sqrt 2)) / 2, through erfc where x < 0 (no cancellation)."""
    x = np.asarray(x, np.float64)
    return np.where(x < 0, 0.5 * _erfc(-x / math.sqrt(2)), 0.5 * (1 + _erf(x / math.sqrt(2))))


def gelu(x):
    """gelu(x) = x Phi(x), the exact (erf) form."""
    x = np.asarray(x, np.float64)
    return x * normal_cdf(x)


def gelu_backward(dout, x):
    """dout * gelu'(x), gelu'(x) = Phi(x) + x e^(-x^2/2) / sqrt(2 pi)."""
    x = np.asarray(x, np.float64)
    return np.asarray(dout, np.float64) * (normal_cdf(x) + x * np.exp(-x * x / 2)
                                           / math.sqrt(2 * math.pi))


def _hash32(x):
    """lowbias32 on uint32 arrays (elementwise.c's hash32)."""
    x = np.array(x, np.uint32)
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


def dropout_keep(shape, p, seed, site):
    """The mask of K.dropout(out, x, p, seed, site) for x of `shape`: True where kept."""
    seed = np.asarray(seed).astype(np.int64) & 0xFFFFFFFF
    key = _hash32(_hash32([(int(seed[0]) + 0x9E3779B9 * site) & 0xFFFFFFFF])
                  ^ np.uint32(seed[1]))
    drop = np.uint32(int(float(np.float32(p)) * 2.0**32))
    first = int(seed[2]) * (math.prod(shape) // shape[0])  # the first row's first element
    i = ((np.arange(math.prod(shape), dtype=np.int64) + first) & 0xFFFFFFFF).astype(np.uint32)
    return (_hash32(_hash32(i) ^ key) >= drop).reshape(shape)


def dropout(x, p, seed, site):
    """x / (1 - p) where kept, 0 where dropped, as K.dropout (p = 0 or seed None: x)."""
    x = np.asarray(x, np.float64)
    if p == 0 or seed is None:
        return x
    return np.where(dropout_keep(x.shape, p, seed, site), x / (1 - np.float64(np.float32(p))),
                    0.0)


def log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def crossentropy(logits, targets, ignore_index=-1, dscale=1.0):
    """losses (N), dlogits (N, V) = (softmax - onehot) * dscale and hits (N), 1 where the
    target's logit is the row's largest (ties count); ignored rows are 0."""
    logp = log_softmax(logits)
    N, V = logp.shape
    keep = np.asarray(targets) != ignore_index
    safe = np.where(keep, targets, 0)
    losses = np.where(keep, -logp[np.arange(N), safe], 0.0)
    dlogits = np.exp(logp)
    dlogits[np.arange(N), safe] -= 1.0
    dlogits *= dscale * keep[:, None]
    hits = keep & (logits[np.arange(N), safe] >= logits.max(axis=1))
    return losses, dlogits, hits.astype(np.intc)


def adam_update(params, m, v, grads, lr, beta1=0.9, beta2=0.999, eps=1e-8,
                weight_decay=0.0, t=1, grad_scale=1.0, decay_mask=None):
    """New params, m, v after one Adam/AdamW step; the weight decay only where decay_mask
    (bool, params' shape) is true, everywhere when it is None."""
    p, m, v, g = (np.asarray(a, np.float64) for a in (params, m, v, grads))
    wd = weight_decay if decay_mask is None else np.where(decay_mask, weight_decay, 0.0)
    g = g * grad_scale
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    mhat = m / (1 - beta1**t)
    vhat = v / (1 - beta2**t)
    p = p - lr * (mhat / (np.sqrt(vhat) + eps) + wd * p)
    return p, m, v


def embedding_forward(ids, wte, wpe):
    T = ids.shape[1]
    return np.asarray(wte, np.float64)[ids] + np.asarray(wpe, np.float64)[:T]


def embedding_backward(dout, ids, V, Tmax):
    """dwte (V, D), dwpe (Tmax, D) given dout (B, T, D)."""
    B, T, D = dout.shape
    dwte = np.zeros((V, D))
    dwpe = np.zeros((Tmax, D))
    np.add.at(dwte, ids.reshape(-1), dout.reshape(-1, D))
    dwpe[:T] = dout.sum(0)
    return dwte, dwpe


def numerical_gradient(f, x, eps=1e-6):
    """Central finite differences of scalar f() with respect to float64 array x (in place)."""
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        fp = f()
        flat[i] = old - eps
        fm = f()
        flat[i] = old
        gflat[i] = (fp - fm) / (2 * eps)
    return grad


def assert_close(actual, expected, rtol, atol, name=""):
    """np.testing.assert_allclose that prints the max absolute and relative difference."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    diff = np.abs(actual - expected)
    rel = diff / np.maximum(np.abs(expected), atol)
    msg = f"{name}: max abs diff {diff.max(initial=0):.3g}, max rel diff {rel.max(initial=0):.3g}"
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=msg)


# ---- the model, layer by layer (params: dict of float64 arrays keyed like LLM's) --------------
# The architecture options follow the parameters p holds, as the LLM names them (attention's
# wo, bo; biases; output.w, absent when tied; ln_f), and the keywords norm and activation;
# dropout with a training step's seed (layers.dropout_seed), at the LLM's sites: the
# embeddings 0, block i's attention 2i+1 and feed-forward 2i+2.

def options(config):
    """The keywords of model_logits / model_loss for a ModelConfig (without dropout: the
    model in inference)."""
    return {"norm": config.norm, "activation": config.activation}


def _sub(p, prefix):
    return {k[len(prefix):]: v for k, v in p.items() if k.startswith(prefix)}


def self_attention(p, x, num_heads):
    out, _ = attention_forward(x @ p["wq"], x @ p["wk"], x @ p["wv"], num_heads)
    return out @ p["wo"] + p.get("bo", 0.0) if "wo" in p else out


def feed_forward(p, x, activation="relu"):
    u = x @ p["w1"] + p.get("b1", 0.0)
    h = np.maximum(u, 0.0) if activation == "relu" else gelu(u)
    return h @ p["w2"] + p.get("b2", 0.0)


def layer_norm(p, x):
    return layernorm_forward(x, p["gamma"], p.get("beta"))[0]


def transformer_block(p, x, num_heads, norm="post", activation="relu", drop=0.0, seed=None,
                      site=0):
    """A block; with drop > 0 and a step's seed, dropout on its sub-layers' outputs (sites
    `site`, site + 1)."""
    attn = lambda h: dropout(self_attention(_sub(p, "attn."), h, num_heads), drop, seed, site)
    ffn = lambda h: dropout(feed_forward(_sub(p, "ffn."), h, activation), drop, seed, site + 1)
    ln1 = lambda h: layer_norm(_sub(p, "ln1."), h)
    ln2 = lambda h: layer_norm(_sub(p, "ln2."), h)
    if norm == "pre":
        x = x + attn(ln1(x))
        return x + ffn(ln2(x))
    x = ln1(x + attn(x))
    return ln2(x + ffn(x))


def model_logits(p, ids, num_layers, num_heads, norm="post", activation="relu", drop=0.0,
                 seed=None):
    """Logits (B, T, V) of the whole model in float64 (drop, seed: a training step's
    dropout)."""
    T = ids.shape[1]
    x = dropout(p["embeddings.token"][ids] + p["embeddings.position"][:T], drop, seed, 0)
    for i in range(num_layers):
        x = transformer_block(_sub(p, f"blocks.{i}."), x, num_heads, norm, activation, drop,
                              seed, 2 * i + 1)
    if "ln_f.gamma" in p:
        x = layer_norm(_sub(p, "ln_f."), x)
    w = p["output.w"] if "output.w" in p else p["embeddings.token"].T  # tied
    return x @ w + p.get("output.b", 0.0)


def model_loss(p, ids, targets, num_layers, num_heads, ignore_index=-1, **options):
    """Mean next-token cross-entropy over the targets that are not ignore_index."""
    logits = model_logits(p, ids, num_layers, num_heads, **options)
    losses, _, _ = crossentropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                             ignore_index)
    return losses.sum() / np.count_nonzero(targets != ignore_index)


def bf16(x):
    """x rounded to bf16 (to nearest, ties to even; NaN stays NaN), in float64: the operands
    of the bf16 kernels as they multiply them."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint32)
    nan = (np.abs(np.asarray(x, np.float32)) != np.abs(np.asarray(x, np.float32)))
    half = np.where(nan, (u >> 16).astype(np.uint32) | 0x40, rounded)
    return (half.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def matmul_bf16(A, B, trans_a=False, trans_b=False):
    """op(A) @ op(B) of the operands rounded to bf16, in float64."""
    return matmul(bf16(A), bf16(B), trans_a, trans_b)
