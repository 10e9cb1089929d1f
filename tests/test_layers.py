"""Each layer's forward vs the float64 reference, and its backward vs central finite
differences in float64 (loss = sum(w * out) for a fixed random w)."""

import os

import numpy as np
import pytest

from rustgpt import layers as L
from tests import reference as ref

B, T, D, H, V, NH = 2, 5, 8, 12, 11, 2


def bind(layer, rng):
    store = L.FlatParameters(list(layer.named_specs()))
    layer.bind(store)
    store.data[...] = rng.standard_normal(store.data.size) * 0.5  # not the init: exercise all
    return store


def params64(store):
    return {name: value.astype(np.float64) for name, value in store.values.items()}


def check_layer(layer, reference, x, rng, tol=2e-3, ws=None):
    """Forward vs reference(p, x); dx and every parameter gradient vs finite differences.
    ws: the workspace (a training one for dropout)."""
    store = bind(layer, rng)
    ws = ws or L.Workspace()
    out = layer.forward(ws, x)
    p64, x64 = params64(store), x.astype(np.float64)
    ref.assert_close(out, reference(p64, x64), 1e-4, 1e-4, "forward")
    w = rng.standard_normal(out.shape)
    loss = lambda: float((w * reference(p64, x64)).sum())
    dx = layer.backward(ws, x, w.astype(np.float32))
    ref.assert_close(dx, ref.numerical_gradient(loss, x64), tol, tol, "dx")
    for name in p64:
        ref.assert_close(store.grads[name], ref.numerical_gradient(loss, p64[name]), tol, tol, name)
    check_accumulate(store, lambda **kw: layer.backward(ws, x, w.astype(np.float32), **kw))


def check_accumulate(store, backward):
    """backward() adds into the parameter gradients; backward(accumulate=False) writes
    over them, whatever they held."""
    once = store.grad.copy()
    backward()
    ref.assert_close(store.grad, 2 * once.astype(np.float64), 1e-6, 1e-6, "accumulated")
    store.grad.fill(np.nan)
    backward(accumulate=False)
    np.testing.assert_array_equal(store.grad, once)


@pytest.mark.parametrize("num_heads", [1, NH])
@pytest.mark.parametrize("projection,bias", [(False, False), (True, False), (True, True)])
def test_self_attention(rng, num_heads, projection, bias):
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    layer = L.SelfAttention(D, num_heads, projection, bias)
    assert sorted(n for n, *_ in layer.named_specs()) == sorted(
        ["wq", "wk", "wv"] + ["wo"] * projection + ["bo"] * (projection and bias))
    check_layer(layer, lambda p, x: ref.self_attention(p, x, num_heads), x, rng)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("bias", [True, False])
def test_feed_forward(rng, activation, bias):
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    layer = L.FeedForward(D, H, activation, bias)
    assert [n for n, *_ in layer.named_specs()] == (["w1", "b1", "w2", "b2"] if bias
                                                     else ["w1", "w2"])
    check_layer(layer, lambda p, x: ref.feed_forward(p, x, activation), x, rng)


@pytest.mark.parametrize("projection", [False, True])
def test_attention_backward_with_residual_adds_dx_onto_dout(rng, projection):
    """backward(residual=True), as a block calls it, returns dout + dx in dout's own buffer,
    and the parameter gradients are those of a plain backward."""
    layer = L.SelfAttention(D, NH, projection, bias=True)
    store, ws = bind(layer, rng), L.Workspace()
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    layer.forward(ws, x)
    dout = rng.standard_normal((B, T, D)).astype(np.float32)
    dx = layer.backward(ws, x, dout.copy(), accumulate=False).copy()
    grads = store.grad.copy()
    buf = dout.copy()
    got = layer.backward(ws, x, buf, accumulate=False, residual=True)
    assert got is buf
    ref.assert_close(got, dout.astype(np.float64) + dx, 1e-6, 1e-6, "dout + dx")
    np.testing.assert_array_equal(store.grad, grads)


@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm(rng, bias):
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    check_layer(L.LayerNorm(D, bias), ref.layer_norm, x, rng)


# RustGPT's block, each option toggled alone, and GPT-2's (as --arch gpt)
BLOCKS = {"rustgpt": {}, "pre-norm": {"norm": "pre"}, "gelu": {"activation": "gelu"},
          "projection": {"projection": True}, "no-bias": {"bias": False},
          "gpt": {"norm": "pre", "activation": "gelu", "projection": True, "bias": False}}


@pytest.mark.parametrize("options", BLOCKS.values(), ids=BLOCKS.keys())
def test_transformer_block(rng, options):
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    norm, activation = options.get("norm", "post"), options.get("activation", "relu")
    check_layer(L.TransformerBlock(D, H, NH, **options),
                lambda p, x: ref.transformer_block(p, x, NH, norm, activation), x, rng)


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_transformer_block_with_dropout(rng, norm):
    """In a training workspace (a dropout seed) each sub-layer's output goes through its
    dropout mask (sites 4, 5); the gradient through the same masks."""
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    seed = np.array([11, 2, 0], np.intc)
    check_layer(L.TransformerBlock(D, H, NH, norm=norm, dropout=0.25, site=4),
                lambda p, x: ref.transformer_block(p, x, NH, norm, drop=0.25, seed=seed,
                                                   site=4),
                x, rng, ws=L.Workspace(dropout_seed=seed))


@pytest.mark.parametrize("bias", [True, False])
def test_output_projection(rng, bias):
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    check_layer(L.OutputProjection(D, V, bias), lambda p, x: x @ p["w"] + p.get("b", 0.0), x,
                rng)


@pytest.mark.parametrize("bias", [True, False])
def test_tied_output_projection(rng, bias):
    """Tied to the embeddings: logits = x token^T (+ b); its backward writes (or adds) the
    token embedding's gradient, which the embeddings' backward then adds to."""
    root = L.Module()
    embeddings = root.child("embeddings", L.Embeddings(V, D, T))
    output = root.child("output", L.OutputProjection(D, V, bias, tied=embeddings))
    assert [n for n, *_ in root.named_specs()] == (["embeddings.token", "embeddings.position"]
                                                   + ["output.b"] * bias)
    store, ws = bind(root, rng), L.Workspace()
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    ids = rng.integers(0, V, (B, T)).astype(np.intc)
    p64, x64 = params64(store), x.astype(np.float64)
    logits = lambda: x64 @ p64["embeddings.token"].T + p64.get("output.b", 0.0)
    w = rng.standard_normal((B, T, V))
    # loss = sum(embeddings) + sum(w * logits): both uses of the token embedding
    reference = lambda: ((p64["embeddings.token"][ids] + p64["embeddings.position"][:T]).sum()
                         + (w * logits()).sum())
    ref.assert_close(output.forward(ws, x), logits(), 1e-5, 1e-5, "logits")
    dx = output.backward(ws, x, w.astype(np.float32), accumulate=False)
    embeddings.forward(ws, ids)
    embeddings.backward(ws, ids, np.ones((B, T, D), np.float32), accumulate=(True, False))
    ref.assert_close(dx, w @ p64["embeddings.token"], 1e-5, 1e-5, "dx")
    for name in p64:
        ref.assert_close(store.grads[name], ref.numerical_gradient(reference, p64[name]), 1e-4,
                         1e-4, name)


def test_embeddings(rng):
    layer = L.Embeddings(V, D, T + 2)
    store = bind(layer, rng)
    ids = rng.integers(0, V, (B, T)).astype(np.intc)
    ids[0, :2] = 3  # a repeated id accumulates
    ws = L.Workspace()
    out = layer.forward(ws, ids)
    p64 = params64(store)
    reference = lambda: p64["token"][ids] + p64["position"][:T]
    ref.assert_close(out, reference(), 1e-6, 1e-6, "forward")
    w = rng.standard_normal(out.shape)
    layer.backward(ws, ids, w.astype(np.float32))
    loss = lambda: float((w * reference()).sum())
    for name in p64:
        ref.assert_close(store.grads[name], ref.numerical_gradient(loss, p64[name]), 1e-4, 1e-4, name)
    check_accumulate(store, lambda **kw: layer.backward(ws, ids, w.astype(np.float32), **kw))


def test_parameter_views_share_the_flat_buffer(rng):
    layer = L.FeedForward(D, H)
    store = bind(layer, rng)
    assert layer.parameters() == D * H + H + H * D + D == store.data.size
    layer.w1[0, 0] = 42.0
    assert 42.0 in store.data
    assert np.shares_memory(layer.dw2, store.grad)


def test_workspace_reuses_memory():
    ws = L.Workspace()
    a = ws.get("x", (4, 8))
    b = ws.get("x", (2, 8))
    assert np.shares_memory(a, b) and b.flags.c_contiguous and b.shape == (2, 8)


def test_workspace_cuts_big_buffers_from_a_huge_page_arena():
    """Buffers of ARENA_MIN floats or more share chunks that start on a huge page, each on
    a cache line of its own and none overlapping; smaller ones are arrays of their own."""
    ws = L.Workspace()
    n = L.ARENA_MIN
    big = [ws.get(f"big{i}", (n + 3 * i,)) for i in range(4)]
    small = ws.get("small", (n - 1,))
    chunk = big[0].base
    assert chunk is not None and chunk.size == L.ARENA_CHUNK
    if chunk.size * 4 >= L.HUGE_PAGE and hasattr(L.mmap, "MADV_HUGEPAGE"):
        assert chunk.ctypes.data % L.HUGE_PAGE == 0
    for i, a in enumerate(big):
        assert a.base is chunk and a.ctypes.data % 64 == 0 and a.flags.c_contiguous
        a[:] = i
    assert [a[0] for a in big] == [0, 1, 2, 3] and [a[-1] for a in big] == [0, 1, 2, 3]
    assert not np.shares_memory(small, chunk)
    huge = ws.get("huge", (L.ARENA_CHUNK + 1,))  # more than a chunk: a chunk of its own
    assert huge.base is not chunk and not np.shares_memory(huge, chunk)
    grown = ws.get("big0", (n + 100,))  # grows: a new buffer, the others untouched
    assert not np.shares_memory(grown, big[0]) and ws.generation == 7
    assert all((a == i).all() for i, a in enumerate(big[1:], 1))


def test_workspace_arena_buffers_grow_by_doubling():
    """A big buffer grown one row at a time is replaced only a few times, and the arena it
    leaves behind stays below what the buffer holds: no quadratic growth of memory."""
    ws = L.Workspace()
    rows = [ws.get("logits", (T, 8, 763)) for T in range(11, 200)]
    assert rows[-1].shape == (199, 8, 763) and ws.generation <= 6
    held = ws._buffers["logits"].size
    chunks = {id(r.base): r.base for r in rows}.values()  # every chunk they came from
    assert sum(c.size for c in chunks) <= 2 * held + L.ARENA_CHUNK  # without doubling,
    # 189 buffers: 121M floats, 14 times that


@pytest.mark.parametrize("n", [1, 1000, 553_083, (2 << 20) // 4 + 1])
def test_zeros_hugepage(n):
    x = L.zeros_hugepage(n)
    assert x.shape == (n,) and x.dtype == np.float32 and x.flags.c_contiguous
    assert x.flags.writeable and not x.any()
    if n * 4 >= L.HUGE_PAGE:  # big buffers start on a huge page
        assert x.ctypes.data % L.HUGE_PAGE == 0
    x[:] = 1.5
    assert x.sum(dtype=np.float64) == 1.5 * n


def _mapping_of(address: int) -> dict[str, str]:
    """The /proc/self/smaps entry (header 'range' and its fields) holding `address`."""
    entry: dict[str, str] = {}
    with open("/proc/self/smaps") as f:
        for line in f:
            head, _, rest = line.partition(" ")
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(h, 16) for h in head.split("-"))
                if entry:
                    return entry
                if lo <= address < hi:
                    entry["range"] = line.strip()
            elif entry:
                entry[head.rstrip(":")] = rest.strip()
    return entry


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps")
                    or "[never]" in open("/sys/kernel/mm/transparent_hugepage/enabled").read(),
                    reason="needs Linux with transparent huge pages enabled")
def test_zeros_hugepage_is_eligible_for_huge_pages():
    """A private anonymous mapping the kernel may back with huge pages (a shared one, mmap's
    default, is shmem and would get none)."""
    x = L.zeros_hugepage(1 << 20)
    mapping = _mapping_of(x.ctypes.data)
    assert mapping["range"].split()[1].endswith("p"), mapping["range"]  # rw-p, not rw-s
    assert mapping.get("THPeligible") == "1", mapping
