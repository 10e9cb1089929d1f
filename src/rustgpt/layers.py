"""The layers of the model, each a forward/backward pair over the C kernels.

Parameters and gradients live in two flat float32 buffers (``FlatParameters``); a layer
holds named views into them (``wq`` and its gradient ``dwq``). Activations live in a
``Workspace`` passed to every call, so one set of weights can serve many callers.
``backward`` returns the input gradient and adds (+=) into the parameter gradients, or, with
``accumulate=False``, overwrites them (no separate zeroing pass over the gradient buffer).
Dropout applies where the workspace carries a step's dropout seed (training) and nowhere
else (inference).
Shapes use DESIGN.md's letters: B batch, T sequence, D embedding, H hidden, V vocabulary.
"""

from __future__ import annotations

import copy
import math
import mmap
from typing import Iterator

import numpy as np

from rustgpt import _kernels as K

F32 = np.float32
HUGE_PAGE = 2 << 20
ARENA_MIN = 1 << 16  # floats (256 KiB): workspace buffers this big come from an arena
ARENA_CHUNK = 1 << 22  # floats (16 MiB) per arena chunk, or one buffer's size if larger


def zeros_hugepage(n: int) -> np.ndarray:
    """n float32 zeros starting on a 2 MiB boundary of memory marked for transparent huge
    pages (Linux; elsewhere, or below 2 MiB, plain ``np.zeros``).

    For the buffers a training step sweeps whole every step: parameters, gradients and the
    Adam moments, and the workspace's arena of activations. With 4 KiB pages such a sweep
    misses the TLB on nearly every page, and under a hypervisor each miss walks two page
    tables. (On the benchmark VM the default model's 2.2 MB buffers, one huge page each,
    measured no faster than 4 KiB pages: a batch-1 step's Adam sweep took 164-170 us either
    way. The activations of larger steps did gain: see Workspace.)"""
    nbytes = n * F32().itemsize
    if nbytes < HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return np.zeros(n, F32)
    # private: a shared mapping (mmap's default) is shmem, which gets no huge pages
    buf = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = -np.frombuffer(buf, np.uint8, count=1).ctypes.data % HUGE_PAGE
    buf.madvise(mmap.MADV_HUGEPAGE, start, nbytes)
    return np.frombuffer(buf, F32, count=n, offset=start)


class Workspace:
    """Grow-only float32 scratch arrays by name: ``get`` returns a C-contiguous view of the
    requested shape, allocating only when a name first needs more room. Views are cached
    per (name, shape), so a training loop of repeating shapes does no array bookkeeping.
    ``generation`` counts the allocations: views taken before a change may point at a
    buffer the workspace no longer uses.

    Buffers of ARENA_MIN floats or more are cut, 64-byte aligned, from chunks of memory
    marked for huge pages (``zeros_hugepage``): a step of batch 16 sweeps 30-200 MB of
    them, thousands of 4 KiB pages, more than a TLB holds. (bench/compare.py's training
    step (b), 33 MB of buffers, ran 1-4% faster so in one-process A/B runs; (c), 214 MB,
    and (d) moved within the noise.) The room a grown buffer leaves in its chunk is not
    reused, so such a buffer grows to at least twice its size: however its shapes grow,
    the room left behind stays below what the buffer holds. Smaller buffers (all of a
    batch-1 step's) are plain arrays, so small models keep a small footprint."""

    def __init__(self, dropout_seed: np.ndarray | None = None) -> None:
        """dropout_seed: a training step's dropout seed, int32 (3,), which the step writes
        before the layers run; None (inference): the layers apply no dropout."""
        self.dropout_seed = dropout_seed
        self._buffers: dict[str, np.ndarray] = {}
        self._views: dict[tuple[str, tuple[int, ...]], np.ndarray] = {}
        self.generation = 0
        self._chunk = np.empty(0, F32)  # the arena's current chunk
        self._chunk_used = 0  # floats of it handed out

    def _allocate(self, n: int) -> np.ndarray:
        if n < ARENA_MIN:
            return np.empty(max(n, 1), F32)
        if self._chunk_used + n > self._chunk.size:
            self._chunk, self._chunk_used = zeros_hugepage(max(n, ARENA_CHUNK)), 0
        buf = self._chunk[self._chunk_used:self._chunk_used + n]
        self._chunk_used += -(-n // 16) * 16  # the next buffer starts on a cache line
        return buf

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """A float32 array of `shape` for `name`, its contents left from earlier use."""
        view = self._views.get((name, shape))
        if view is not None:
            return view
        n = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.size < n:
            grown = n if buf is None or n < ARENA_MIN else max(n, 2 * buf.size)  # see above
            buf = self._buffers[name] = self._allocate(grown)
            self.generation += 1
            self._views = {k: v for k, v in self._views.items() if k[0] != name}
        if len(self._views) >= 8192:  # many distinct shapes: start over, memory stays bounded
            self._views.clear()
        view = self._views[(name, shape)] = buf[:n].reshape(shape)
        return view


class Module:
    """A layer: its own parameters (name -> (shape, init std or constant)) and child layers."""

    def __init__(self) -> None:
        self.path = ""
        self._params: dict[str, tuple[tuple[int, ...], str, float]] = {}
        self._children: dict[str, Module] = {}

    def param(self, name: str, shape: tuple[int, ...], init: str, value: float) -> None:
        """Declare a parameter; init is "normal" (value = std) or "constant"."""
        self._params[name] = (tuple(shape), init, value)

    def child(self, name: str, module: Module) -> Module:
        """Add `module` under `name` (its parameters are named ``name.<param>``)."""
        self._children[name] = module
        return module

    def modules(self) -> Iterator[Module]:
        """This layer and every layer under it, parents first."""
        yield self
        for module in self._children.values():
            yield from module.modules()

    def own_specs(self) -> list[tuple[str, tuple[int, ...], str, float]]:
        """(name, shape, init, value) of this layer's own parameters (not its children's);
        ``param`` again with a name declared already replaces its init."""
        return [(name, *spec) for name, spec in self._params.items()]

    def named_specs(self, prefix: str = "") -> Iterator[tuple[str, tuple[int, ...], str, float]]:
        """(dotted name, shape, init, value) of every parameter, in a fixed order."""
        for name, (shape, init, value) in self._params.items():
            yield prefix + name, shape, init, value
        for name, module in self._children.items():
            yield from module.named_specs(f"{prefix}{name}.")

    def bind(self, store: FlatParameters, prefix: str = "") -> None:
        """Point this layer's parameter and gradient attributes at views of `store`."""
        self.path = prefix.rstrip(".")
        for name in self._params:
            setattr(self, name, store.values[prefix + name])
            setattr(self, "d" + name, store.grads[prefix + name])
        for name, module in self._children.items():
            module.bind(store, f"{prefix}{name}.")

    def parameters(self) -> int:
        """Number of parameters in this layer and its children."""
        return sum(math.prod(shape) for _, shape, _, _ in self.named_specs())

    def key(self, name: str) -> str:
        """A workspace name for this layer's `name` buffer (unique across layers)."""
        return f"{self.path}.{name}"


class FlatParameters:
    """One float32 buffer of parameters, one of gradients, and named views into both.

    data, grad: (P,); values[name], grads[name]: views with the parameter's shape."""

    def __init__(self, specs: list[tuple[str, tuple[int, ...], str, float]]) -> None:
        self.specs = specs
        total = sum(math.prod(shape) for _, shape, _, _ in specs)
        self.data = zeros_hugepage(total)
        self.grad = zeros_hugepage(total)
        self.values = self._views(self.data)
        self.grads = self._views(self.grad)

    def _views(self, buffer: np.ndarray) -> dict[str, np.ndarray]:
        """Each parameter's view, by name, into a flat buffer laid out as data."""
        views, offset = {}, 0
        for name, shape, _, _ in self.specs:
            n = math.prod(shape)
            views[name] = buffer[offset:offset + n].reshape(shape)
            offset += n
        return views

    def with_grad(self) -> FlatParameters:
        """The same parameters (data and values shared) with a gradient buffer of their
        own: what a model bound to it (Module.bind) writes its gradients into."""
        other = copy.copy(self)
        other.grad = zeros_hugepage(self.grad.size)
        other.grads = other._views(other.grad)
        return other

    def initialize(self, rng: np.random.Generator) -> None:
        """Draw every parameter from its init rule, in table order."""
        for name, shape, init, value in self.specs:
            if init == "normal":
                self.values[name][...] = rng.normal(0.0, value, shape)
            else:
                self.values[name][...] = value


def _rows(x: np.ndarray) -> np.ndarray:
    """(B, T, C) -> (B*T, C) view."""
    return x.reshape(-1, x.shape[-1])


def dropout_seed(seed: int, step: int, first_row: int = 0) -> np.ndarray:
    """The dropout seed of a training step, int32 (3,): 32 bits of the model's `seed` (its
    halves mixed) and of the `step`'s number (the masks of step n are those of step n
    whenever it runs, so a resumed run draws the same ones), and the index of the batch's
    first row in the step's whole batch (a data-parallel process's rows, see K.dropout)."""
    seed, step = int(seed), int(step)
    return np.array([(seed ^ (seed >> 32)) & 0xFFFFFFFF, step & 0xFFFFFFFF, first_row],
                    np.uint32).view(np.intc)


def _dropout(ws: Workspace, x: np.ndarray, p: float, site: int, name: str) -> np.ndarray:
    """x with dropout p (the mask of `site` and ws's step seed) in ws's buffer `name`; x
    itself when p = 0 or ws has no seed (inference). On a gradient: dropout's backward."""
    if p == 0.0 or ws.dropout_seed is None:
        return x
    out = ws.get(name, x.shape)
    K.dropout(out, x, p, ws.dropout_seed, site)
    return out


class Embeddings(Module):
    """x = dropout(token[ids] + position[0:T]) (dropout p, dropout site `site`).
    token: (V, D) and position: (T_max, D), N(0, 0.02)."""

    def __init__(self, vocab_size: int, embedding_dim: int, max_seq_len: int,
                 dropout: float = 0.0, site: int = 0) -> None:
        super().__init__()
        self.dropout, self.site = dropout, site
        self.param("token", (vocab_size, embedding_dim), "normal", 0.02)
        self.param("position", (max_seq_len, embedding_dim), "normal", 0.02)

    def forward(self, ws: Workspace, ids: np.ndarray) -> np.ndarray:
        """ids: (B, T) int32 -> (B, T, D)."""
        B, T = ids.shape
        out = ws.get(self.key("out"), (B, T, self.token.shape[1]))
        K.embedding_forward(out, ids, self.token, self.position)
        return _dropout(ws, out, self.dropout, self.site, self.key("drop"))

    def backward(self, ws: Workspace, ids: np.ndarray, dout: np.ndarray,
                 accumulate: bool | tuple[bool, bool] = True) -> None:
        """Scatter-add dout (B, T, D) into the token and position gradients (overwrite
        them when not `accumulate`; a pair says it for (token, position) apart)."""
        dout = _dropout(ws, dout, self.dropout, self.site, self.key("ddrop"))
        K.embedding_backward(self.dtoken, self.dposition, dout, ids, accumulate)


class SelfAttention(Module):
    """Causal multi-head attention, RustGPT's (no output projection); with `projection`,
    GPT-2's: its output a then goes through a Wo + bo (bo with `bias`; q, k and v never
    have one). wq, wk, wv, wo: (D, D), N(0, 2/D); bo: (D,) 0."""

    def __init__(self, embedding_dim: int, num_heads: int, projection: bool = False,
                 bias: bool = True) -> None:
        super().__init__()
        D = embedding_dim
        self.num_heads = num_heads
        self.projection = projection
        self.wo = self.bo = self.dwo = self.dbo = None  # bound when declared
        for name in ("wq", "wk", "wv") + (("wo",) if projection else ()):
            self.param(name, (D, D), "normal", math.sqrt(2.0 / D))
        if projection and bias:
            self.param("bo", (D,), "constant", 0.0)

    def forward(self, ws: Workspace, x: np.ndarray) -> np.ndarray:
        """x: (B, T, D) -> (B, T, D); q, k, v, the probabilities (and the attention's output
        before the projection, a) stay in ws for backward."""
        B, T, D = x.shape
        x2 = _rows(x)
        q, k, v = (ws.get(self.key(n), (B, T, D)) for n in ("q", "k", "v"))
        # q = x Wq, k = x Wk, v = x Wv: one parallel region, x packed once
        K.sgemm_many((_rows(q), _rows(k), _rows(v)), (x2, x2, x2), (self.wq, self.wk, self.wv))
        att = ws.get(self.key("att"), (B, self.num_heads, T, T))
        a = ws.get(self.key("a" if self.projection else "out"), (B, T, D))
        K.attention_forward(a, att, q, k, v, self.num_heads, self._scratch(ws, T, D))
        return self._project(ws, a, "out")

    def _scratch(self, ws: Workspace, T: int, D: int) -> np.ndarray:
        """The attention kernels' scratch (areas, S), one for every layer."""
        return ws.get("attention.scratch", K.attention_scratch_shape(T, D, self.num_heads))

    def _project(self, ws: Workspace, a: np.ndarray, name: str) -> np.ndarray:
        """a (B, T, D) through the output projection into ws's `name` buffer; a itself
        when there is none."""
        if not self.projection:
            return a
        out = ws.get(self.key(name), a.shape)
        K.sgemm(_rows(out), _rows(a), self.wo, bias=self.bo)  # a Wo + bo
        return out

    def step(self, ws: Workspace, x: np.ndarray, kcache: np.ndarray, vcache: np.ndarray,
             n: np.ndarray) -> np.ndarray:
        """Attention of one new position per batch row, row b's at n[b] (n: (B,) int32):
        x (B, 1, D) -> (B, 1, D). Row b's k and v go to row n[b] of its kcache, vcache
        (B, T_max, D) rows, and its query attends to rows 0..n[b]."""
        B, _, D = x.shape
        x2 = x[:, 0]
        q, k, v = (ws.get(self.key(f"step.{name}"), (B, D)) for name in ("q", "k", "v"))
        a = ws.get(self.key("step.a"), (B, 1, D))
        K.sgemm_many((q, k, v), (x2, x2, x2), (self.wq, self.wk, self.wv))
        rows = np.arange(B)
        kcache[rows, n] = k
        vcache[rows, n] = v
        scores = ws.get("attention.step_scores", (B, self.num_heads, kcache.shape[1]))
        K.attention_step(a[:, 0], q, kcache, vcache, n + 1, self.num_heads, scores)
        return self._project(ws, a, "step.out")

    def backward(self, ws: Workspace, x: np.ndarray, dout: np.ndarray,
                 accumulate: bool = True, residual: bool = False) -> np.ndarray:
        """dx (B, T, D) for dout; with residual, dout + dx, written over dout (a block's
        residual connection, without a pass of its own)."""
        B, T, D = x.shape
        q, k, v = (ws.get(self.key(n), (B, T, D)) for n in ("q", "k", "v"))
        att = ws.get(self.key("att"), (B, self.num_heads, T, T))
        da = dout
        if self.projection:
            a, da = ws.get(self.key("a"), (B, T, D)), ws.get(self.key("da"), (B, T, D))
            dout2 = _rows(dout)
            K.sgemm(self.dwo, _rows(a), dout2, trans_a=True, accumulate=accumulate)  # a^T dout
            if self.bo is not None:
                K.colsum(self.dbo, dout2, accumulate)
            K.sgemm(_rows(da), dout2, self.wo, trans_b=True)  # da = dout Wo^T
        dq, dk, dv = (ws.get(self.key(n), (B, T, D)) for n in ("dq", "dk", "dv"))
        ds = ws.get("attention.ds", att.shape)  # scratch, one for every layer
        K.attention_backward(dq, dk, dv, da, att, q, k, v, self.num_heads, ds,
                             self._scratch(ws, T, D))
        x2 = _rows(x)
        grads = (_rows(dq), _rows(dk), _rows(dv))
        # dWq += x^T dq, dWk += x^T dk, dWv += x^T dv
        K.sgemm_many((self.dwq, self.dwk, self.dwv), (x2, x2, x2), grads, trans_a=True,
                     accumulate=accumulate)
        # dx (+)= dq Wq^T + dk Wk^T + dv Wv^T, onto dout (read for the last time above)
        dx = dout if residual else ws.get(self.key("dx"), (B, T, D))
        K.sgemm_many((_rows(dx),) * 3, grads, (self.wq, self.wk, self.wv), trans_b=True,
                     accumulate=(residual, True, True))
        return dx


class FeedForward(Module):
    """act(x W1 + b1) W2 + b2, act relu (RustGPT's) or gelu (exact), the biases with `bias`.
    w1: (D, H) N(0, 2/D); w2: (H, D) N(0, 2/H); b1: (H,), b2: (D,) 0."""

    def __init__(self, embedding_dim: int, hidden_dim: int, activation: str = "relu",
                 bias: bool = True) -> None:
        super().__init__()
        D, H = embedding_dim, hidden_dim
        self.activation = activation
        self.b1 = self.b2 = self.db1 = self.db2 = None  # bound when declared
        self.param("w1", (D, H), "normal", math.sqrt(2.0 / D))
        if bias:
            self.param("b1", (H,), "constant", 0.0)
        self.param("w2", (H, D), "normal", math.sqrt(2.0 / H))
        if bias:
            self.param("b2", (D,), "constant", 0.0)

    def forward(self, ws: Workspace, x: np.ndarray) -> np.ndarray:
        """x: (B, T, D) -> (B, T, D); the hidden activation h (B*T, H) (and for gelu its
        input u, the same shape) stays in ws."""
        x2 = _rows(x)
        N, H = x2.shape[0], self.w1.shape[1]
        h = ws.get(self.key("h"), (N, H))
        u = ws.get(self.key("u"), (N, H)) if self.activation == "gelu" else None
        # h = act(u), u = x W1 + b1
        K.sgemm(h, x2, self.w1, bias=self.b1, activation=self.activation, pre=u)
        out = ws.get(self.key("out"), x.shape)
        K.sgemm(_rows(out), h, self.w2, bias=self.b2)
        return out

    def backward(self, ws: Workspace, x: np.ndarray, dout: np.ndarray,
                 accumulate: bool = True) -> np.ndarray:
        """dx (B, T, D) for dout (B, T, D) at input x; adds into dw1, db1, dw2, db2
        (overwrites them when not `accumulate`)."""
        x2, dout2 = _rows(x), _rows(dout)
        N, H = x2.shape[0], self.w1.shape[1]
        h = ws.get(self.key("h"), (N, H))
        dh = ws.get(self.key("dh"), (N, H))
        K.sgemm(self.dw2, h, dout2, trans_a=True, accumulate=accumulate)  # dW2 += h^T dout
        if self.b2 is not None:
            K.colsum(self.db2, dout2, accumulate)
        K.sgemm(dh, dout2, self.w2, trans_b=True)  # dh = dout W2^T
        if self.activation == "gelu":
            K.gelu_backward(dh, dh, ws.get(self.key("u"), (N, H)))  # du = dh gelu'(u)
        else:
            K.relu_backward(dh, dh, h)
        K.sgemm(self.dw1, x2, dh, trans_a=True, accumulate=accumulate)
        if self.b1 is not None:
            K.colsum(self.db1, dh, accumulate)
        dx = ws.get(self.key("dx"), x.shape)
        K.sgemm(_rows(dx), dh, self.w1, trans_b=True)
        return dx


class LayerNorm(Module):
    """(x - mean) / sqrt(var + 1e-5) * gamma + beta over the last axis, beta with `bias`.
    gamma 1, beta 0."""

    eps = 1e-5

    def __init__(self, dim: int, bias: bool = True) -> None:
        super().__init__()
        self.beta = self.dbeta = None  # bound when declared
        self.param("gamma", (dim,), "constant", 1.0)
        if bias:
            self.param("beta", (dim,), "constant", 0.0)

    def forward(self, ws: Workspace, x: np.ndarray) -> np.ndarray:
        """x: (B, T, D) -> (B, T, D); mean and rstd (B*T,) stay in ws."""
        x2 = _rows(x)
        N = x2.shape[0]
        out = ws.get(self.key("out"), x.shape)
        mean, rstd = ws.get(self.key("mean"), (N,)), ws.get(self.key("rstd"), (N,))
        K.layernorm_forward(_rows(out), mean, rstd, x2, self.gamma, self.beta, self.eps)
        return out

    def backward(self, ws: Workspace, x: np.ndarray, dout: np.ndarray,
                 accumulate: bool = True) -> np.ndarray:
        """dx (B, T, D) for dout at input x, from the mean and rstd the forward saved; adds
        into dgamma, dbeta (overwrites them when not `accumulate`)."""
        x2 = _rows(x)
        N = x2.shape[0]
        mean, rstd = ws.get(self.key("mean"), (N,)), ws.get(self.key("rstd"), (N,))
        dx = ws.get(self.key("dx"), x.shape)
        K.layernorm_backward(_rows(dx), self.dgamma, self.dbeta, _rows(dout), x2,
                             self.gamma, mean, rstd, accumulate)
        return dx


class TransformerBlock(Module):
    """Post-norm, as RustGPT: x = LN1(x + attn(x)); x = LN2(x + ffn(x)). Or pre-norm, as
    GPT-2: x = x + attn(LN1(x)); x = x + ffn(LN2(x)). The sub-layers' options as theirs;
    with dropout p, each sub-layer's output goes through dropout before its residual add
    (dropout sites `site` and site + 1)."""

    def __init__(self, embedding_dim: int, hidden_dim: int, num_heads: int,
                 norm: str = "post", activation: str = "relu", projection: bool = False,
                 bias: bool = True, dropout: float = 0.0, site: int = 0) -> None:
        super().__init__()
        D = embedding_dim
        self.norm = norm
        self.dropout, self.site = dropout, site
        attn = SelfAttention(D, num_heads, projection, bias)
        ffn = FeedForward(D, hidden_dim, activation, bias)
        ln1, ln2 = LayerNorm(D, bias), LayerNorm(D, bias)
        # in the order the forward reads them (the deferred update goes in buffer order)
        order = ((("ln1", ln1), ("attn", attn), ("ln2", ln2), ("ffn", ffn)) if norm == "pre"
                 else (("attn", attn), ("ln1", ln1), ("ffn", ffn), ("ln2", ln2)))
        for name, module in order:
            self.child(name, module)
        self.attn, self.ln1, self.ffn, self.ln2 = attn, ln1, ffn, ln2

    def forward(self, ws: Workspace, x: np.ndarray) -> np.ndarray:
        """x: (B, T, D) -> (B, T, D)."""
        return self._forward(ws, x, self.attn.forward)

    def step(self, ws: Workspace, x: np.ndarray, kcache: np.ndarray, vcache: np.ndarray,
             n: np.ndarray) -> np.ndarray:
        """The block at one new position per batch row (n: (B,) int32), x (B, 1, D) ->
        (B, 1, D), attending through the cache (SelfAttention.step)."""
        return self._forward(ws, x, lambda ws, h: self.attn.step(ws, h, kcache, vcache, n))

    def _drop(self, ws: Workspace, y: np.ndarray, which: int, name: str) -> np.ndarray:
        """Dropout on sub-layer `which`'s output (0 attention, 1 feed-forward) or, on its
        gradient, dropout's backward."""
        return _dropout(ws, y, self.dropout, self.site + which, self.key(name))

    def _forward(self, ws: Workspace, x: np.ndarray, attend) -> np.ndarray:
        """The block around attend(ws, h) -> attention output (of the input, or of LN1(x))."""
        r1, r2 = ws.get(self.key("r1"), x.shape), ws.get(self.key("r2"), x.shape)
        if self.norm == "pre":  # r1 = x + attn(LN1(x)); r2 = r1 + ffn(LN2(r1))
            K.add(r1, x, self._drop(ws, attend(ws, self.ln1.forward(ws, x)), 0, "drop1"))
            K.add(r2, r1, self._drop(ws, self.ffn.forward(ws, self.ln2.forward(ws, r1)), 1,
                                     "drop2"))
            return r2
        K.add(r1, x, self._drop(ws, attend(ws, x), 0, "drop1"))
        x1 = self.ln1.forward(ws, r1)
        K.add(r2, x1, self._drop(ws, self.ffn.forward(ws, x1), 1, "drop2"))
        return self.ln2.forward(ws, r2)

    def backward(self, ws: Workspace, x: np.ndarray, dout: np.ndarray,
                 accumulate: bool = True) -> np.ndarray:
        """dx (B, T, D) for dout at the block's input x, through both sub-layers and their
        norms; the parameters' gradients as the sub-layers' backward."""
        r1 = ws.get(self.key("r1"), x.shape)
        if self.norm == "pre":
            h1, h2 = ws.get(self.ln1.key("out"), x.shape), ws.get(self.ln2.key("out"), x.shape)
            df = self._drop(ws, dout, 1, "ddrop2")
            dr1 = self.ln2.backward(ws, r1, self.ffn.backward(ws, h2, df, accumulate),
                                    accumulate)
            K.add(dr1, dr1, dout)  # r2 = r1 + ffn(LN2(r1))
            da = self._drop(ws, dr1, 0, "ddrop1")
            dx = self.ln1.backward(ws, x, self.attn.backward(ws, h1, da, accumulate),
                                   accumulate)
            K.add(dx, dx, dr1)  # r1 = x + attn(LN1(x))
            return dx
        r2 = ws.get(self.key("r2"), x.shape)
        x1 = ws.get(self.ln1.key("out"), x.shape)
        dr2 = self.ln2.backward(ws, r2, dout, accumulate)
        dx1 = self.ffn.backward(ws, x1, self._drop(ws, dr2, 1, "ddrop2"), accumulate)
        # the residual: a separate pass, as adding onto dr2 in place would make the small
        # steps' two streams wait (the weight gradients read dr2)
        K.add(dx1, dx1, dr2)
        dr1 = self.ln1.backward(ws, r1, dx1, accumulate)
        da = self._drop(ws, dr1, 0, "ddrop1")
        if da is dr1:  # no dropout: attention adds its dx onto dr1, the residual's gradient
            return self.attn.backward(ws, x, dr1, accumulate, residual=True)
        dx = self.attn.backward(ws, x, da, accumulate)
        K.add(dx, dx, dr1)  # r1 = x + dropout(attn(x))
        return dx


class OutputProjection(Module):
    """logits = x W + b, or with `tied` (the model's Embeddings) x token^T + b: no weight of
    its own, the token embedding's gradient gets both uses. w: (D, V) N(0, 2/D); b: (V,) 0,
    with `bias`."""

    def __init__(self, embedding_dim: int, vocab_size: int, bias: bool = True,
                 tied: Embeddings | None = None) -> None:
        super().__init__()
        self.tied = tied
        self.vocab_size = vocab_size
        self.w = self.b = self.dw = self.db = None  # bound when declared
        if tied is None:
            self.param("w", (embedding_dim, vocab_size), "normal",
                       math.sqrt(2.0 / embedding_dim))
        if bias:
            self.param("b", (vocab_size,), "constant", 0.0)

    def forward(self, ws: Workspace, x: np.ndarray) -> np.ndarray:
        """x: (B, T, D) -> logits (B, T, V)."""
        B, T, _ = x.shape
        logits = ws.get(self.key("logits"), (B, T, self.vocab_size))
        if self.tied is None:
            K.sgemm(_rows(logits), _rows(x), self.w, bias=self.b)
        else:
            K.sgemm(_rows(logits), _rows(x), self.tied.token, trans_b=True, bias=self.b)
        return logits

    def backward(self, ws: Workspace, x: np.ndarray, dlogits: np.ndarray,
                 accumulate: bool = True) -> np.ndarray:
        """dx (B, T, D) for dlogits (B, T, V) at input x; adds into dw (tied: the token
        embedding's gradient) and db (overwrites them when not `accumulate`)."""
        x2, dl2 = _rows(x), _rows(dlogits)
        dx = ws.get(self.key("dx"), x.shape)
        if self.tied is None:
            K.sgemm(self.dw, x2, dl2, trans_a=True, accumulate=accumulate)  # dW += x^T dl
        else:
            K.sgemm(self.tied.dtoken, dl2, x2, trans_a=True, accumulate=accumulate)  # dl^T x
        if self.b is not None:
            K.colsum(self.db, dl2, accumulate)
        if self.tied is None:
            K.sgemm(_rows(dx), dl2, self.w, trans_b=True)  # dx = dl W^T
        else:
            K.sgemm(_rows(dx), dl2, self.tied.token)  # dx = dl token
        return dx
