"""The rustgpt model in plain float32 numpy: forward, full backward and Adam; the "numpy"
column of bench/ (what the same model costs without the C kernels).

Parameters and gradients live in flat float32 buffers with named views keyed like rustgpt
(``blocks.0.attn.wq`` ...), so weights copy over from an LLM by name and Adam is a handful
of whole-buffer numpy operations. Matmuls go to numpy's BLAS (OpenBLAS in the wheels).
"""

from __future__ import annotations

import math

import numpy as np

F32 = np.float32
IGNORE_INDEX = -1
LN_EPS = 1e-5


class NumpyGPT:
    """Build from rustgpt's parameter table: ``NumpyGPT.from_rustgpt(llm)`` copies an LLM's
    weights, ``NumpyGPT(shapes, num_heads)`` starts from zeros (name -> shape, in order)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], num_heads: int) -> None:
        self.num_heads = num_heads
        self.num_layers = sum(1 for n in shapes if n.endswith(".attn.wq"))
        total = sum(math.prod(s) for s in shapes.values())
        self.data, self.grad = np.zeros(total, F32), np.zeros(total, F32)
        self.m, self.v, self.t = np.zeros(total, F32), np.zeros(total, F32), 0
        self.values: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}
        offset = 0
        for name, shape in shapes.items():
            n = math.prod(shape)
            self.values[name] = self.data[offset:offset + n].reshape(shape)
            self.grads[name] = self.grad[offset:offset + n].reshape(shape)
            offset += n

    @classmethod
    def from_rustgpt(cls, model) -> NumpyGPT:
        """A copy of an LLM's weights (the Adam state starts fresh)."""
        net = cls({n: v.shape for n, v in model.params.values.items()}, model.config.num_heads)
        net.data[...] = model.params.data
        return net

    # ---- forward ---------------------------------------------------------------------------

    def forward(self, ids) -> np.ndarray:
        """Logits (B, T, V) of token ids (B, T); keeps the activations for backward."""
        p = self.values
        ids = np.atleast_2d(np.asarray(ids))
        B, T = ids.shape
        x = p["embeddings.token"][ids] + p["embeddings.position"][:T]  # (B, T, D)
        self._ids, self._blocks = ids, []
        for i in range(self.num_layers):
            x = self._block_forward(f"blocks.{i}.", x)
        self._xout = x
        return x @ p["output.w"] + p["output.b"]  # (B, T, V)

    def _block_forward(self, prefix: str, x: np.ndarray) -> np.ndarray:
        p, B, T, D = self.values, *x.shape
        NH = self.num_heads
        hs = D // NH
        split = lambda a: a.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)  # (B, NH, T, hs)
        q, k, v = (split(x @ p[prefix + "attn." + w]) for w in ("wq", "wk", "wv"))
        scores = q @ k.transpose(0, 1, 3, 2)  # (B, NH, T, T)
        scores *= F32(1.0 / math.sqrt(hs))
        scores[..., np.triu(np.ones((T, T), bool), k=1)] = -np.inf
        scores -= scores.max(axis=-1, keepdims=True)
        att = np.exp(scores, out=scores)
        att /= att.sum(axis=-1, keepdims=True)
        a = (att @ v).transpose(0, 2, 1, 3).reshape(B, T, D)
        x1, ln1 = _layernorm(x + a, p[prefix + "ln1.gamma"], p[prefix + "ln1.beta"])
        h = x1 @ p[prefix + "ffn.w1"] + p[prefix + "ffn.b1"]  # (B, T, H)
        np.maximum(h, 0, out=h)
        f = h @ p[prefix + "ffn.w2"] + p[prefix + "ffn.b2"]
        out, ln2 = _layernorm(x1 + f, p[prefix + "ln2.gamma"], p[prefix + "ln2.beta"])
        self._blocks.append((x, q, k, v, att, x1, ln1, h, ln2))
        return out

    # ---- backward --------------------------------------------------------------------------

    def loss_and_backward(self, inputs, targets) -> float:
        """Mean cross-entropy over targets != -1; fills ``grads`` with its gradient."""
        logits = self.forward(inputs)
        B, T, V = logits.shape
        tgt = np.asarray(targets).reshape(-1)
        keep = tgt != IGNORE_INDEX
        count = int(keep.sum())
        z = logits.reshape(-1, V)
        z -= z.max(axis=-1, keepdims=True)
        rows, safe = np.arange(B * T), np.where(keep, tgt, 0)
        picked = z[rows, safe]  # shifted logit of each target
        np.exp(z, out=z)
        total = z.sum(axis=-1)
        loss = float(np.sum((np.log(total) - picked)[keep], dtype=np.float64)) / count
        z /= total[:, None]  # softmax, then dlogits = (softmax - onehot) * keep / count
        z[rows, safe] -= 1.0
        z *= (keep / F32(count)).astype(F32)[:, None]
        self._backward(z.reshape(B, T, V))
        return loss

    def _backward(self, dlogits: np.ndarray) -> None:
        p, g = self.values, self.grads
        B, T, V = dlogits.shape
        D = self._xout.shape[2]
        dl2 = dlogits.reshape(-1, V)
        np.matmul(self._xout.reshape(-1, D).T, dl2, out=g["output.w"])
        np.sum(dl2, axis=0, out=g["output.b"])
        dx = dlogits @ p["output.w"].T  # (B, T, D)
        for i in reversed(range(self.num_layers)):
            dx = self._block_backward(f"blocks.{i}.", dx)
        ids = self._ids
        g["embeddings.token"].fill(0.0)
        np.add.at(g["embeddings.token"], ids.reshape(-1), dx.reshape(-1, D))
        g["embeddings.position"].fill(0.0)
        np.sum(dx, axis=0, out=g["embeddings.position"][:T])

    def _block_backward(self, prefix: str, dout: np.ndarray) -> np.ndarray:
        p, g = self.values, self.grads
        x, q, k, v, att, x1, ln1, h, ln2 = self._blocks.pop()
        B, T, D = x.shape
        NH = self.num_heads
        hs = D // NH
        rows = lambda a: a.reshape(-1, a.shape[-1])
        dr2 = _layernorm_backward(dout, ln2, p[prefix + "ln2.gamma"], g[prefix + "ln2.gamma"],
                                  g[prefix + "ln2.beta"])
        # f = relu(x1 W1 + b1) W2 + b2
        np.matmul(rows(h).T, rows(dr2), out=g[prefix + "ffn.w2"])
        np.sum(rows(dr2), axis=0, out=g[prefix + "ffn.b2"])
        dh = dr2 @ p[prefix + "ffn.w2"].T
        dh *= h > 0
        np.matmul(rows(x1).T, rows(dh), out=g[prefix + "ffn.w1"])
        np.sum(rows(dh), axis=0, out=g[prefix + "ffn.b1"])
        dx1 = dh @ p[prefix + "ffn.w1"].T
        dx1 += dr2  # the residual
        dr1 = _layernorm_backward(dx1, ln1, p[prefix + "ln1.gamma"], g[prefix + "ln1.gamma"],
                                  g[prefix + "ln1.beta"])
        # a = softmax(q k^T / sqrt(hs)) v, per head
        merge = lambda a: a.transpose(0, 2, 1, 3).reshape(B, T, D)
        do = dr1.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)  # (B, NH, T, hs)
        dv = att.transpose(0, 1, 3, 2) @ do
        datt = do @ v.transpose(0, 1, 3, 2)
        datt -= (att * datt).sum(axis=-1, keepdims=True)
        datt *= att
        datt *= F32(1.0 / math.sqrt(hs))
        dq, dk, dv = merge(datt @ k), merge(datt.transpose(0, 1, 3, 2) @ q), merge(dv)
        dx = dr1.copy()  # the residual
        for name, d in (("wq", dq), ("wk", dk), ("wv", dv)):
            np.matmul(rows(x).T, rows(d), out=g[prefix + "attn." + name])
            dx += d @ p[prefix + "attn." + name].T
        return dx

    # ---- training --------------------------------------------------------------------------

    def train_step(self, inputs, targets, lr: float, max_grad_norm: float = 5.0,
                   beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> tuple[float, float]:
        """Loss and backward, clip to global L2 norm, Adam. Returns (loss, norm before clip)."""
        loss = self.loss_and_backward(inputs, targets)
        norm = math.sqrt(float(np.dot(self.grad, self.grad)))
        scale = max_grad_norm / norm if norm > max_grad_norm else 1.0
        self.t += 1
        grad = self.grad * F32(scale)
        self.m *= F32(beta1)
        self.m += F32(1 - beta1) * grad
        grad *= grad
        self.v *= F32(beta2)
        self.v += F32(1 - beta2) * grad
        # p -= lr * mhat / (sqrt(vhat) + eps), mhat = m / (1 - beta1^t), vhat = v / (1 - beta2^t)
        denom = np.sqrt(self.v * F32(1.0 / (1 - beta2 ** self.t)))
        denom += F32(eps)
        step = self.m * F32(lr / (1 - beta1 ** self.t))
        step /= denom
        self.data -= step
        return loss, norm

    def generate_no_cache(self, ids, max_tokens: int) -> list[int]:
        """Greedy decoding that recomputes the whole prefix for every token (no cache)."""
        seq = list(np.asarray(ids).reshape(-1))
        new = []
        for _ in range(max_tokens):
            token = int(self.forward(np.asarray([seq]))[0, -1].argmax())
            new.append(token)
            seq.append(token)
        return new


def _layernorm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray):
    """out (B, T, D) and (xhat, rstd) for backward; biased variance, eps 1e-5."""
    mean = x.mean(axis=-1, keepdims=True)
    xhat = x - mean
    rstd = 1.0 / np.sqrt((xhat * xhat).mean(axis=-1, keepdims=True) + F32(LN_EPS))
    xhat *= rstd
    return xhat * gamma + beta, (xhat, rstd)


def _layernorm_backward(dout, cache, gamma, dgamma, dbeta) -> np.ndarray:
    """dx of _layernorm; writes dgamma, dbeta."""
    xhat, rstd = cache
    D = xhat.shape[-1]
    np.sum((dout * xhat).reshape(-1, D), axis=0, out=dgamma)
    np.sum(dout.reshape(-1, D), axis=0, out=dbeta)
    dxhat = dout * gamma
    dx = dxhat - dxhat.mean(axis=-1, keepdims=True)
    dx -= xhat * (dxhat * xhat).mean(axis=-1, keepdims=True)
    dx *= rstd
    return dx
