"""LLM: whole-model gradient vs finite differences, batching with padding, KV-cache decoding,
determinism, parameter count and state; the gradient, decoding and plan replay for every
architecture option."""

import os
import subprocess
import sys

import numpy as np
import pytest

from rustgpt import _kernels as K
from rustgpt.config import ModelConfig
from rustgpt.data import make_batch
from rustgpt.errors import ShapeMismatch, TokenError, TrainingError, ValidationError
from rustgpt.layers import dropout_seed
from rustgpt.model import LLM
from rustgpt.optim import Adam
from rustgpt.step import TrainStep
from rustgpt.tokenizer import Vocab
from tests import reference as ref

SIZES = dict(embedding_dim=8, hidden_dim=12, num_layers=2, num_heads=2, max_seq_len=9)
TINY = ModelConfig(**SIZES)
arch_options = pytest.mark.parametrize("options", ref.ARCHS.values(), ids=ref.ARCHS.keys())


def tiny_vocab(n=13):
    return Vocab([f"w{i}" for i in range(n - 2)] + ["</s>", "<unk>"])


@pytest.fixture
def model():
    return LLM(TINY, tiny_vocab(), seed=3)


def params64(model):
    return {name: v.astype(np.float64) for name, v in model.params.values.items()}


def tiny_model(options, rng=None, seed=3):
    """A TINY model with the architecture options; with rng, every parameter redrawn
    N(0, 0.3^2) (gains included), so that no option's part is near zero (gpt's init is)."""
    m = LLM(ModelConfig(**SIZES, **options), tiny_vocab(), seed=seed)
    if rng is not None:
        m.params.data[...] = rng.standard_normal(m.params.data.size) * 0.3
    return m


@arch_options
def test_gradient_matches_finite_differences(rng, options):
    model = tiny_model(options, rng)
    seqs = [rng.integers(0, 13, n).astype(np.intc) for n in (7, 4)]  # second row is padded
    inputs, targets = make_batch(seqs)
    model.params.grad.fill(np.nan)  # every gradient must be written over, none added to
    loss = model.loss_and_backward(inputs, targets)
    p = params64(model)
    f = lambda: ref.model_loss(p, inputs, targets, TINY.num_layers, TINY.num_heads,
                               **ref.options(model.config))
    assert loss == pytest.approx(f(), rel=1e-5)
    for name in p:
        ref.assert_close(model.params.grads[name], ref.numerical_gradient(f, p[name]),
                         2e-3, 2e-4, name)


def test_one_head_is_the_single_head_formula(rng):
    cfg = ModelConfig(embedding_dim=8, hidden_dim=12, num_layers=1, num_heads=1, max_seq_len=9)
    m = LLM(cfg, tiny_vocab(), seed=1)
    ids = rng.integers(0, 13, (1, 6))
    p = params64(m)
    x = p["embeddings.token"][ids] + p["embeddings.position"][:6]
    q, k, v = (x @ p[f"blocks.0.attn.w{n}"] for n in "qkv")
    scores = q[0] @ k[0].T / np.sqrt(8) + np.triu(np.full((6, 6), -np.inf), 1)
    att = np.exp(scores - scores.max(1, keepdims=True))
    a = (att / att.sum(1, keepdims=True)) @ v[0]
    x1 = ref.layernorm_forward(x[0] + a, p["blocks.0.ln1.gamma"], p["blocks.0.ln1.beta"])[0]
    h = np.maximum(x1 @ p["blocks.0.ffn.w1"] + p["blocks.0.ffn.b1"], 0)
    x2 = ref.layernorm_forward(x1 + h @ p["blocks.0.ffn.w2"] + p["blocks.0.ffn.b2"],
                               p["blocks.0.ln2.gamma"], p["blocks.0.ln2.beta"])[0]
    ref.assert_close(m.forward(ids)[0], x2 @ p["output.w"] + p["output.b"], 1e-4, 1e-4, "logits")


def test_padded_batch_equals_sequences_one_at_a_time(model, rng):
    seqs = [rng.integers(0, 13, n).astype(np.intc) for n in (9, 3, 6)]
    inputs, targets = make_batch(seqs)
    batch_loss = model.loss_and_backward(inputs, targets)
    batch_grad = model.params.grad.copy()
    total, grad = 0.0, np.zeros_like(batch_grad, np.float64)
    for s in seqs:
        i, t = make_batch([s])
        n = len(s) - 1
        total += model.loss_and_backward(i, t) * n
        grad += model.params.grad * n
    count = sum(len(s) - 1 for s in seqs)
    assert batch_loss == pytest.approx(total / count, rel=1e-5)
    ref.assert_close(batch_grad, grad / count, 1e-4, 1e-6, "grad")


@arch_options
def test_kv_cache_steps_match_full_forward(rng, options):
    model = tiny_model(options, rng)
    B, T = 3, 9
    ids = rng.integers(0, 13, (B, T))
    full = model.forward(ids)  # (B, T, V)
    cache = model.new_cache(B)
    logits = model.prefill(cache, ids[:, :4])
    ref.assert_close(logits, full[:, 3], 1e-5, 1e-5, "prefill")
    for t in range(4, T):
        logits = model.step(cache, ids[:, t])
        ref.assert_close(logits, full[:, t], 1e-5, 1e-5, f"step {t}")
    with pytest.raises(ValidationError, match="max_seq_len is 9"):
        model.step(cache, ids[:, 0])


@arch_options
def test_kv_cache_rows_of_different_lengths_step_together(rng, options):
    """A server's batch: rows prefilled apart (cache.rows) to different lengths, then
    stepped together, each at its own position. Every row's logits equal the full forward
    over its own sequence, and those of the same row decoded alone, bit for bit; a row
    that leaves is replaced by the last (move_row) and decodes on unchanged."""
    model = tiny_model(options, rng)
    B, T = 4, 9
    ids = rng.integers(0, 13, (B, T))
    prompt = [1, 5, 3, 2]  # row b's prompt is ids[b, :prompt[b]]
    full = model.forward(ids)
    cache, alone = model.new_cache(B), [model.new_cache(1) for _ in range(B)]
    for b, n in enumerate(prompt):
        np.testing.assert_array_equal(model.prefill(cache.rows(b, b + 1), ids[b:b + 1, :n]),
                                      model.prefill(alone[b], ids[b:b + 1, :n]))
    assert list(cache.lengths) == prompt
    for _ in range(3):
        t = cache.lengths.copy()
        logits = model.step(cache, ids[np.arange(B), t]).copy()
        for b in range(B):
            ref.assert_close(logits[b], full[b, t[b]], 1e-5, 1e-5, f"row {b} at {t[b]}")
            np.testing.assert_array_equal(logits[b], model.step(alone[b], ids[b, t[b]])[0])
    cache.move_row(3, 1)  # row 1 leaves; the last row takes its place
    rows = cache.rows(0, 3)
    t = rows.lengths.copy()
    assert list(t) == [4, 5, 6]
    logits = model.step(rows, ids[[0, 3, 2], t])
    for b, row in enumerate((0, 3, 2)):
        ref.assert_close(logits[b], full[row, t[b]], 1e-5, 1e-5, f"moved row {row}")
    assert list(cache.lengths[:3]) == [5, 6, 7]
    with pytest.raises(ValidationError, match="rows of lengths 5 to 7 have no common length"):
        rows.length


def test_same_seed_same_loss_curve(rng):
    seqs = [rng.integers(0, 13, 8).astype(np.intc) for _ in range(4)]

    def curve():
        m = LLM(TINY, tiny_vocab(), seed=7)
        opt = Adam(m.params)
        return [m.train_step(*make_batch([s]), opt, 1e-2)[0] for s in seqs * 3]

    assert curve() == curve()


def test_training_does_not_depend_on_the_thread_count(rng, set_threads):
    """The same steps on 1, 2 and 3 threads give bit-identical losses, norms, parameters
    and moments: every kernel's arithmetic, the gradient norm's included, is fixed whatever
    the threads (so a run may change its thread count, or resume with another)."""
    config = ModelConfig(embedding_dim=64, hidden_dim=128, num_layers=2, num_heads=2,
                         max_seq_len=40)  # 106k parameters: the norm spans several chunks
    batches = [make_batch([rng.integers(0, 13, n).astype(np.intc) for n in (40, 23, 31)])
               for _ in range(3)]

    def train(threads):
        set_threads(threads)
        m = LLM(config, tiny_vocab(), seed=5)
        opt = Adam(m.params)
        curve = [m.train_step(x, y, opt, 1e-2, max_grad_norm=0.5) for x, y in batches * 2]
        return curve, m.params.data, opt.m, opt.v

    one = train(1)
    assert one[0][0][1] > 0.5  # clipping was active
    for threads in (2, 3):
        other = train(threads)
        assert other[0] == one[0]
        for a, b in zip(other[1:], one[1:]):
            assert np.array_equal(a, b)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("options", [{}, {"arch": "gpt", "dropout": 0.1}],
                         ids=["rustgpt", "gpt-dropout"])
def test_deferred_updates_give_the_same_training(rng, set_threads, threads, options):
    """train_step(defer=True) leaves each update to the next step's forward (a replayed
    one runs it beside the forward, a recorded one first): the same losses, norms,
    parameters and moments as updating at once, bit for bit, across new shapes, clipping
    and lr changes."""
    config = ModelConfig(embedding_dim=64, hidden_dim=128, num_layers=2, num_heads=2,
                         max_seq_len=40, **options)
    # new shapes record plans between replays; (30, 30, 30) is past SMALL_STEP_TOKENS
    lengths = [(17,), (17,), (9,), (17,), (9,), (30,), (30, 30, 30), (17,), (30, 30, 30), (17,)]
    batches = [make_batch([rng.integers(0, 13, n).astype(np.intc) for n in ns])
               for ns in lengths]

    def train(defer):
        set_threads(threads)
        m = LLM(config, tiny_vocab(), seed=5)
        opt = Adam(m.params, weight_decay=0.01)
        curve = [m.train_step(x, y, opt, 1e-2 / (i + 1), 0.5, defer=defer)
                 for i, (x, y) in enumerate(batches * 2)]
        pending = opt.pending is not None
        state = m.state_dict()  # applies a pending update first
        return pending, curve, state, opt.state_dict()

    now, later = train(False), train(True)
    assert not now[0] and later[0]
    assert later[1] == now[1]
    assert max(norm for _, norm in now[1]) > 0.5  # clipping was active
    for name in now[2]:
        np.testing.assert_array_equal(later[2][name], now[2][name])
    np.testing.assert_array_equal(later[3]["m"], now[3]["m"])
    np.testing.assert_array_equal(later[3]["v"], now[3]["v"])
    assert later[3]["t"] == now[3]["t"] == 2 * len(batches)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("options", [{}, {"arch": "gpt"}, {"arch": "gpt", "dropout": 0.1}],
                         ids=["rustgpt", "gpt", "gpt-dropout"])
def test_backward_as_two_streams_equals_in_order(rng, set_threads, threads, options,
                                                 monkeypatch):
    """Small steps replay their backward as two streams (SMALL_STEP_TOKENS): the same
    losses and gradients as replaying it in order, bit for bit (gpt: the tied token
    gradient written by the output projection and added to by the embeddings)."""
    config = ModelConfig(embedding_dim=64, hidden_dim=128, num_layers=2, num_heads=2,
                         max_seq_len=40, **options)
    batches = [make_batch([rng.integers(0, 13, n).astype(np.intc) for n in ns])
               for ns in ((17,), (5, 9), (40,))]
    results = []
    set_threads(threads)
    for limit in (0, 64):
        monkeypatch.setattr("rustgpt.step.SMALL_STEP_TOKENS", limit)
        m = LLM(config, tiny_vocab(), seed=4)
        step = TrainStep(m, Adam(m.params))
        out, replays = [], 0
        for x, y in batches * 3:  # the first of each shape records, the rest replay
            recorded = step.plans_recorded
            loss, sum_squares = step.loss_and_backward(x, y, norm=True)
            # a replay's sum of squares, taken on the way, is sum_squares' bits
            replayed = step.plans_recorded == recorded
            assert sum_squares == (K.sum_squares(m.params.grad) if replayed else None)
            replays += replayed
            out.extend([loss, m.params.grad.copy()])
        assert replays >= 3
        results.append(out)
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_small_steps_given_one_thread_run_every_call():
    """Asked for 2 threads but granted 1 (OMP_THREAD_LIMIT, or a nested call), the two
    streams and the update beside the forward run in order on that thread: nothing hangs
    and no call is skipped (the same weights as steps that use neither)."""
    code = (
        "import numpy as np\n"
        "import rustgpt.model as M\n"
        "import rustgpt.step as S\n"
        "from rustgpt import _kernels as K\n"
        "from rustgpt.config import ModelConfig\n"
        "from rustgpt.optim import Adam\n"
        "from rustgpt.tokenizer import Vocab\n"
        "K.set_num_threads(2)\n"
        "def train(small):\n"
        "    S.SMALL_STEP_TOKENS = small\n"
        "    m = M.LLM(ModelConfig(embedding_dim=8, hidden_dim=12, num_layers=2, num_heads=2,"
        " max_seq_len=9), Vocab([f'w{i}' for i in range(11)] + ['</s>', '<unk>']), seed=3)\n"
        "    opt, ids = Adam(m.params), np.arange(1, 7, dtype=np.intc)[None]\n"
        "    for _ in range(4):\n"
        "        m.train_step(ids, ids, opt, 1e-2, defer=True)\n"
        "    m.settle()\n"
        "    return m.params.data\n"
        "print(np.array_equal(train(64), train(0)))\n"
    )
    env = {**os.environ, "OMP_THREAD_LIMIT": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True"]


def test_reading_a_model_applies_its_pending_update(rng):
    """Every way of reading the parameters sees the deferred update applied."""
    x, y = make_batch([rng.integers(0, 13, 6).astype(np.intc)])
    ref_model = LLM(TINY, tiny_vocab(), seed=2)
    ref_opt = Adam(ref_model.params)
    for _ in range(2):
        ref_model.train_step(x, y, ref_opt, 1e-2)
    expected = ref_model.forward(x)
    reads = {
        "forward": lambda m: m.forward(x),
        "loss": lambda m: m.loss(x, y),
        "prefill": lambda m: m.prefill(m.new_cache(), x).copy(),
        "state_dict": lambda m: m.state_dict(),
        "named_parameters": lambda m: dict(m.named_parameters()),
    }
    for name, read in reads.items():
        m = LLM(TINY, tiny_vocab(), seed=2)
        opt = Adam(m.params)
        for _ in range(2):
            m.train_step(x, y, opt, 1e-2, defer=True)
        assert opt.pending is not None and not opt.pending.applied, name
        read(m)
        assert opt.pending is None, name
        np.testing.assert_array_equal(m.params.data, ref_model.params.data, err_msg=name)
    np.testing.assert_array_equal(m.forward(x), expected)


def test_loading_weights_over_a_pending_update_keeps_the_loaded_ones(model, rng):
    x, y = make_batch([rng.integers(0, 13, 6).astype(np.intc)])
    saved = model.state_dict()
    opt = Adam(model.params)
    for _ in range(2):
        model.train_step(x, y, opt, 1e-2, defer=True)
    model.load_state_dict(saved)
    assert opt.pending is None
    model.forward(x)
    for name, value in saved.items():
        np.testing.assert_array_equal(model.params.values[name], value, err_msg=name)


def test_training_lowers_the_loss(model, rng):
    seqs = [rng.integers(0, 13, 9).astype(np.intc) for _ in range(3)]
    opt = Adam(model.params)
    first = [model.train_step(*make_batch([s]), opt, 1e-2)[0] for s in seqs]
    for _ in range(60):
        last = [model.train_step(*make_batch([s]), opt, 1e-2)[0] for s in seqs]
    assert np.mean(last) < np.mean(first) / 5


def test_clipping_scales_the_gradient(model, rng):
    inputs, targets = make_batch([rng.integers(0, 13, 9).astype(np.intc)])
    opt = Adam(model.params)
    loss, norm = model.train_step(inputs, targets, opt, 1e-3, max_grad_norm=1e-3)
    assert norm > 1e-3
    # after one step m = (1 - beta1) * clipped gradient, clipped = grad * max_norm / norm
    ref.assert_close(opt.m, 0.1 * model.params.grad * (1e-3 / norm), 1e-5, 1e-12, "m")


def test_default_architecture_parameter_count():
    # RustGPT's architecture with its 530-word vocabulary (+ <unk>): about 493k parameters
    m = LLM(ModelConfig(), Vocab([f"w{i}" for i in range(529)] + ["</s>", "<unk>"]))
    D, H, V, T, L = 128, 256, 531, 80, 3
    per_block = 3 * D * D + D * H + H + H * D + D + 4 * D
    assert m.total_parameters() == V * D + T * D + L * per_block + D * V + V == 493_459
    assert "total parameters 493,459" in m.network_description()


# ---- dropout ----------------------------------------------------------------------------

DROPOUT = {"rustgpt": {"dropout": 0.3}, "gpt": {"arch": "gpt", "dropout": 0.3}}


@pytest.mark.parametrize("options", DROPOUT.values(), ids=DROPOUT.keys())
def test_dropout_gradient_matches_finite_differences(rng, options):
    """A training step with dropout is the reference's loss under the same masks (the
    model's seed and the step's), and its gradient that loss's."""
    model = tiny_model(options, rng)
    inputs, targets = make_batch([rng.integers(0, 13, n).astype(np.intc) for n in (7, 4)])
    loss = model.loss_and_backward(inputs, targets, dropout_step=5)
    p, seed = params64(model), dropout_seed(model.seed, 5)
    f = lambda: ref.model_loss(p, inputs, targets, TINY.num_layers, TINY.num_heads,
                               **ref.options(model.config), drop=0.3, seed=seed)
    assert loss == pytest.approx(f(), rel=1e-5)
    assert loss != pytest.approx(ref.model_loss(p, inputs, targets, TINY.num_layers,
                                                TINY.num_heads, **ref.options(model.config)))
    for name in p:
        ref.assert_close(model.params.grads[name], ref.numerical_gradient(f, p[name]),
                         2e-3, 2e-4, name)


def test_dropout_only_in_training_steps(rng):
    """forward, loss and KV-cache decoding never drop: the same logits as without
    dropout; a training step does, with each step's own masks, replayed or recorded."""
    options = DROPOUT["gpt"]
    m, plain = tiny_model(options, seed=5), tiny_model({"arch": "gpt"}, seed=5)
    ids = rng.integers(0, 13, (2, 9)).astype(np.intc)
    np.testing.assert_array_equal(m.forward(ids), plain.forward(ids))
    assert m.loss(ids, ids) == plain.loss(ids, ids)
    cache, plain_cache = m.new_cache(2), plain.new_cache(2)
    np.testing.assert_array_equal(m.prefill(cache, ids[:, :4]),
                                  plain.prefill(plain_cache, ids[:, :4]))
    np.testing.assert_array_equal(m.step(cache, ids[:, 4]), plain.step(plain_cache, ids[:, 4]))
    train = TrainStep(m, Adam(m.params))
    losses = [train.loss_and_backward(ids, ids, step)[0] for step in (1, 2, 3, 2)]
    assert len(set(losses)) == 3 and losses[1] == losses[3]  # a step's masks are its own
    assert train.plans_recorded == 1  # the later steps replayed the plan with their seeds
    for step in (2, 3):  # = a fresh model running that step layer by layer
        fresh = tiny_model(options, seed=5)
        assert fresh.loss_and_backward(ids, ids, step) == losses[step - 1]
        train.loss_and_backward(ids, ids, step)
        np.testing.assert_array_equal(m.params.grad, fresh.params.grad)
    with pytest.raises(ValidationError, match="dropout_step = -1, expected an integer >= 0"):
        m.loss_and_backward(ids, ids, -1)


def test_dropout_masks_follow_the_optimizer_step(rng):
    """train_step draws the masks of the optimizer's step: a run continued from another's
    weights and optimizer state (as --resume does) trains as if never stopped."""
    options = DROPOUT["gpt"]
    x, y = make_batch([rng.integers(0, 13, 9).astype(np.intc) for _ in range(2)])

    def train(model, optimizer, steps):
        return [model.train_step(x, y, optimizer, 1e-2, defer=True) for _ in range(steps)]

    whole = tiny_model(options, seed=5)
    whole_opt = Adam(whole.params)
    curve = train(whole, whole_opt, 4)
    first = tiny_model(options, seed=5)
    first_opt = Adam(first.params)
    head = train(first, first_opt, 2)
    resumed = tiny_model(options, seed=5)
    resumed.load_state_dict(first.state_dict())
    resumed_opt = Adam(resumed.params)
    resumed_opt.load_state_dict(first_opt.state_dict())
    assert head + train(resumed, resumed_opt, 2) == curve
    resumed.settle(), whole.settle()
    np.testing.assert_array_equal(resumed.params.data, whole.params.data)


def test_gpt_architecture_parameters_and_init():
    """--arch gpt: nanoGPT's parameters (no biases, no output weight: the token embedding
    serves, a final norm) and its init: weights N(0, 0.02), the residual projections
    N(0, 0.02 / sqrt(2 L)), norm gains 1."""
    D, H, V, T, L = 64, 256, 300, 32, 4
    m = LLM(ModelConfig(embedding_dim=D, hidden_dim=H, num_layers=L, num_heads=4,
                        max_seq_len=T, arch="gpt"), tiny_vocab(V), seed=1)
    names = [name for name, *_ in m.params.specs]
    assert names[:2] == ["embeddings.token", "embeddings.position"]
    assert names[2:10] == [f"blocks.0.{n}" for n in ("ln1.gamma", "attn.wq", "attn.wk",
                                                     "attn.wv", "attn.wo", "ln2.gamma",
                                                     "ffn.w1", "ffn.w2")]
    assert names[-1] == "ln_f.gamma" and not any(n.startswith("output") for n in names)
    assert m.total_parameters() == V * D + T * D + L * (4 * D * D + 2 * D * H + 2 * D) + D
    for name, value in m.params.values.items():
        if name.endswith("gamma"):
            assert (value == 1).all(), name
        else:
            std = 0.02 / np.sqrt(2 * L) if name.endswith(("wo", "w2")) else 0.02
            assert abs(value.std() / std - 1) < 0.1 and abs(value.mean()) < std / 10, name
    assert "arch gpt (pre-norm, gelu, attention projection, tied embeddings, no biases)" in \
        m.network_description()


def test_default_architecture_keeps_its_names_and_init():
    """RustGPT's parameter table is unchanged by the options: names, shapes and init."""
    from rustgpt.model import parameter_specs

    specs = parameter_specs(ModelConfig(), 531)
    assert [(n, s) for n, s, _, _ in specs[:6]] == [
        ("embeddings.token", (531, 128)), ("embeddings.position", (80, 128)),
        ("blocks.0.attn.wq", (128, 128)), ("blocks.0.attn.wk", (128, 128)),
        ("blocks.0.attn.wv", (128, 128)), ("blocks.0.ln1.gamma", (128,))]
    assert [n for n, *_ in specs[-4:]] == ["blocks.2.ln2.gamma", "blocks.2.ln2.beta",
                                           "output.w", "output.b"]
    assert {(n.split(".")[-1], init, round(v, 4)) for n, _, init, v in specs} == {
        ("token", "normal", 0.02), ("position", "normal", 0.02), ("wq", "normal", 0.125),
        ("wk", "normal", 0.125), ("wv", "normal", 0.125), ("gamma", "constant", 1.0),
        ("beta", "constant", 0.0), ("w1", "normal", 0.125), ("b1", "constant", 0.0),
        ("w2", "normal", 0.0884), ("b2", "constant", 0.0), ("w", "normal", 0.125),
        ("b", "constant", 0.0)}


def test_state_dict_round_trip(model, rng):
    other = LLM(TINY, tiny_vocab(), seed=99)
    other.load_state_dict(model.state_dict())
    ids = rng.integers(0, 13, (1, 5))
    np.testing.assert_array_equal(other.forward(ids), model.forward(ids))
    state = model.state_dict()
    state["output.b"] = np.zeros(5)
    with pytest.raises(ShapeMismatch, match=r"output.b has shape \(5,\), expected \(13,\)"):
        other.load_state_dict(state)
    del state["output.b"]
    with pytest.raises(ValidationError, match="missing"):
        other.load_state_dict(state)


def test_bad_inputs(model):
    with pytest.raises(TokenError, match=r"token id 13, expected ids in \[0, 13\)"):
        model.forward([[1, 13]])
    with pytest.raises(TokenError, match="token id -1"):
        model.forward([-1])
    with pytest.raises(ValidationError, match="length 10, max_seq_len is only 9"):
        model.forward(np.zeros((1, 10), int))
    with pytest.raises(ValidationError, match="expected integer token ids"):
        model.forward([[0.5]])
    with pytest.raises(ShapeMismatch):
        model.loss_and_backward([[1, 2]], [[1, 2, 3]])
    with pytest.raises(ValidationError, match="all padding"):
        model.loss_and_backward([[1, 2]], [[-1, -1]])
    with pytest.raises(TokenError, match="targets holds token id 13"):
        model.loss_and_backward([[1, 2]], np.array([[-1, 13]], np.intc))
    for big in (2**32 + 1, -(2**32) - 1):  # int64 ids that narrowing to int32 would hide
        with pytest.raises(TokenError, match=f"inputs holds token id {big}"):
            model.loss_and_backward([[1, big]], [[1, 2]])
        with pytest.raises(TokenError, match=f"targets holds token id {big}"):
            model.loss_and_backward([[1, 2]], [[-1, big]])
        with pytest.raises(TokenError, match=f"targets holds token id {big}"):
            model.loss([[1, 2]], [[-1, big]])
    with pytest.raises(ShapeMismatch):
        model.loss([[1, 2]], [[1, 2, 3]])
    with pytest.raises(ValidationError, match="inputs is not a rectangular"):
        model.train_step([[1, 2], [3]], [[1, 2], [3, 4]], Adam(model.params), 1e-3)
    with pytest.raises(ValidationError, match="targets is not a rectangular"):
        model.loss_and_backward([[1, 2], [3, 4]], [[1, 2], [3]])
    with pytest.raises(ValidationError, match="targets has dtype float64"):
        model.loss_and_backward([[1, 2]], [[1.5, 2.0]])


def test_nan_stops_training_before_the_update(model, rng):
    inputs, targets = make_batch([rng.integers(0, 13, 5).astype(np.intc)])
    model.params.values["output.b"][0] = np.nan
    before = model.params.data.copy()
    with pytest.raises(TrainingError, match="diverged"):
        model.train_step(inputs, targets, Adam(model.params), 1e-3)
    np.testing.assert_array_equal(model.params.data, before)


def test_nan_after_a_deferred_update_leaves_that_update_applied(rng):
    """A deferred update is applied by the next step's forward even when that step
    diverges: the parameters are those before the failing step, as without defer."""
    inputs, targets = make_batch([rng.integers(0, 13, 5).astype(np.intc)])
    results = []
    for defer in (False, True):
        m = LLM(TINY, tiny_vocab(), seed=3)
        opt = Adam(m.params)
        m.train_step(inputs, targets, opt, 1e-3, defer=defer)
        m.params.values["output.b"][0] = np.nan
        with pytest.raises(TrainingError, match="diverged"):
            m.train_step(inputs, targets, opt, 1e-3, defer=defer)
        assert opt.pending is None and opt.t == 1
        results.append(m.params.data.copy())
    np.testing.assert_array_equal(*results)


@arch_options
def test_replayed_step_equals_a_recorded_one(rng, options):
    """The second step of a shape replays the first one's kernel plan on new ids: same
    loss and gradient, bit for bit, as a fresh model running that step layer by layer."""
    first, second = (rng.integers(0, 13, (2, 6)).astype(np.intc) for _ in range(2))
    targets = rng.integers(0, 13, (2, 6)).astype(np.intc)
    replaying, fresh = tiny_model(options, seed=5), tiny_model(options, seed=5)
    step = TrainStep(replaying, Adam(replaying.params))
    step.loss_and_backward(first, targets)
    loss = step.loss_and_backward(second, targets)[0]
    assert step.plans_recorded == 1 and len(step._plans) == 1
    assert loss == fresh.loss_and_backward(second, targets)
    np.testing.assert_array_equal(replaying.params.grad, fresh.params.grad)


def test_steps_that_record_a_plan_are_not_timed(model, rng, set_threads):
    """StepThreads times only replayed steps: a recording runs layer by layer in Python."""
    ids = rng.integers(0, 13, (1, 5)).astype(np.intc)
    step = TrainStep(model, Adam(model.params))
    set_threads(2)  # StepThreads times nothing on one thread
    step.run([(ids, ids)], 1e-3)
    assert step.plans_recorded == 1 and step.threads._steps == 0
    step.run([(ids, ids)], 1e-3)
    assert step.plans_recorded == 1 and step.threads._steps == 1


def test_replay_after_new_weights_and_bad_targets(model, rng):
    ids = rng.integers(0, 13, (1, 5)).astype(np.intc)
    step = TrainStep(model, Adam(model.params))
    step.loss_and_backward(ids, ids)
    other = LLM(TINY, tiny_vocab(), seed=9)
    model.load_state_dict(other.state_dict())  # in place: the plan sees the new weights
    assert step.loss_and_backward(ids, ids)[0] == other.loss_and_backward(ids, ids)
    assert step.plans_recorded == 1
    np.testing.assert_array_equal(model.params.grad, other.params.grad)
    with pytest.raises(TokenError, match="targets holds token id 13"):
        step.loss_and_backward(ids, np.array([[0, 1, 2, 3, 13]]))


def test_plans_are_dropped_when_the_workspace_grows(model, rng):
    step = TrainStep(model, Adam(model.params))
    for T in (2, 3, 9, 4):  # T = 9 needs bigger buffers than the plans of 2 and 3 hold
        step.loss_and_backward(*(rng.integers(0, 13, (1, T)) for _ in range(2)))
    assert sorted(key[1] for key in step._plans) == [4, 9]


# ---- sizes the machine cannot hold, and seeds -------------------------------------------------

def test_seed_must_be_a_non_negative_integer():
    for bad in (-1, 1.5, True, "1", None):
        with pytest.raises(ValidationError, match=f"LLM: seed = {bad!r}, expected an integer"):
            LLM(TINY, tiny_vocab(), seed=bad)
    assert LLM(TINY, tiny_vocab(), seed=np.int64(2 ** 40)).total_parameters() > 0


@pytest.fixture
def memory(monkeypatch):
    """Set the memory rustgpt.resources reports as available (bytes)."""
    from rustgpt import resources

    def set_available(nbytes):
        monkeypatch.setattr(resources, "available_memory", lambda: nbytes)
    return set_available


def test_models_too_big_for_the_memory_are_refused_before_allocating(memory):
    import time

    from rustgpt.errors import ArchitectureError

    memory(2 * 2**30)
    start = time.perf_counter()
    # 1.16e9 parameters: 18 GB with gradients and moments (it allocated 4.6 GB before)
    with pytest.raises(ArchitectureError, match=r"^\[model\] embedding_dim = 128, hidden_dim "
                       r"= 256, num_layers = 10000, max_seq_len = 80 with a vocabulary of 13: "
                       r"1,155,853,581 parameters, their gradients and Adam moments need "
                       r"about 17.2 GB of memory, 2.0 GB is available$"):
        LLM(ModelConfig(num_layers=10_000), tiny_vocab())
    assert time.perf_counter() - start < 1.0
    memory(None)  # unknown: nothing is refused
    assert LLM(TINY, tiny_vocab()).total_parameters() > 0


@pytest.mark.parametrize("sizes", [{"embedding_dim": 100_000}, {"max_seq_len": 10**9},
                                   {"num_layers": 10**7}])
def test_sizes_no_machine_holds_are_refused(sizes):
    """With the machine's own memory: these ended in an OSError traceback from mmap."""
    from rustgpt.errors import ArchitectureError

    with pytest.raises(ArchitectureError, match="of memory, .* is available$"):
        LLM(ModelConfig(**sizes), tiny_vocab())


def test_failed_allocations_become_one_line_errors(monkeypatch):
    import errno

    from rustgpt import model as M
    from rustgpt.errors import ArchitectureError

    for failure in (MemoryError(), OSError(errno.ENOMEM, "Cannot allocate memory")):
        def fail(*args, failure=failure):
            raise failure
        with monkeypatch.context() as m:
            m.setattr(M, "FlatParameters", fail)
            with pytest.raises(ArchitectureError, match=r"parameters: out of memory"):
                LLM(TINY, tiny_vocab())
        model = LLM(TINY, tiny_vocab())
        with monkeypatch.context() as m:
            m.setattr(M, "KVCache", fail)
            with pytest.raises(ValidationError, match=r"^LLM: a KV cache of 3 x 9 positions: "
                                                      r"out of memory"):
                model.new_cache(3)
        with monkeypatch.context() as m:
            m.setattr(M.Embeddings, "forward", fail)
            with pytest.raises(ValidationError, match=r"^LLM: the activations of a batch of "
                                                      r"1 x 2 tokens: out of memory"):
                model.loss_and_backward([[1, 2]], [[2, 3]])

    def io_error(*args):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(M, "FlatParameters", io_error)
    with pytest.raises(OSError, match="Input/output error"):  # other OS errors are not memory
        LLM(TINY, tiny_vocab())


@pytest.mark.parametrize("B,T,config", [
    (1, 1, TINY), (3, 7, TINY), (2, 9, TINY),
    (5, 33, ModelConfig(embedding_dim=12, hidden_dim=7, num_layers=3, num_heads=4,
                        max_seq_len=33)),
    *((3, 7, ModelConfig(**SIZES, **options)) for options in ref.ARCHS.values()),
    (3, 7, ModelConfig(**SIZES, dropout=0.1)), (3, 7, ModelConfig(**SIZES, arch="gpt",
                                                                   dropout=0.1)),
    (5, 33, ModelConfig(embedding_dim=12, hidden_dim=7, num_layers=3, num_heads=4,
                        max_seq_len=33, arch="gpt")),
])
def test_activation_estimate_covers_the_workspace(rng, B, T, config):
    from rustgpt.model import activation_bytes

    model = LLM(config, tiny_vocab(29))
    step = TrainStep(model, Adam(model.params))
    ids = rng.integers(0, 29, (B, T))
    step.loss_and_backward(ids, ids)
    held = 4 * sum(buf.size for buf in step.workspace._buffers.values())
    estimate = activation_bytes(config, 29, B, T)
    assert held <= estimate <= 1.25 * held, (held, estimate)


def test_batches_too_big_for_the_memory_are_refused(model, memory, rng):
    from rustgpt.model import activation_bytes

    ids = rng.integers(0, 13, (4, 9))
    need = activation_bytes(TINY, 13, 4, 9)
    memory(need - 1)
    for run in (model.forward, lambda x: model.loss(x, x), lambda x: model.train_step(
            x, x, Adam(model.params), 1e-3)):
        with pytest.raises(ValidationError, match=r"^LLM: the activations of a batch of 4 x 9 "
                                                  r"tokens need about .* of memory"):
            run(ids)
    memory(need)
    step = TrainStep(model, Adam(model.params))
    step.loss_and_backward(ids, ids)
    memory(need // 2)  # the workspace holds the larger step's activations already
    step.loss_and_backward(ids[:2], ids[:2])


def test_long_context_trains_and_decodes(rng):
    """max_seq_len 4,096 at head size 128, past the 2,036 positions the attention kernels'
    stack scratch once allowed. A training step's loss is the float64 model's; with targets
    in the first 48 positions only, its gradient is the 48-token step's (causal: the later
    positions add nothing); its recorded plan replays it (the attention scratch is part of
    it), also as an Adam step; the activation estimate covers its workspace; and decoding
    through the KV cache gives the full forward's logits."""
    from rustgpt.model import IGNORE_INDEX, activation_bytes

    config = ModelConfig(embedding_dim=128, hidden_dim=32, num_layers=1, num_heads=1,
                         max_seq_len=4096)
    V, T = 29, 4096
    model = LLM(config, tiny_vocab(V), seed=2)
    step = TrainStep(model, Adam(model.params))
    ids = rng.integers(0, V, (1, T + 1))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    loss = step.loss_and_backward(inputs, targets)[0]
    grad = model.params.grad.copy()
    assert loss == pytest.approx(ref.model_loss(params64(model), inputs, targets, 1, 1),
                                 rel=1e-5)
    held = 4 * sum(buf.size for buf in step.workspace._buffers.values())
    assert held <= activation_bytes(config, V, 1, T) <= 1.25 * held

    early = np.full_like(targets, IGNORE_INDEX)
    early[:, :48] = targets[:, :48]
    step.loss_and_backward(inputs, early)
    long_grad = model.params.grad.copy()
    step.loss_and_backward(inputs[:, :48], targets[:, :48])
    ref.assert_close(long_grad, model.params.grad, 1e-5, 1e-7, "grad, targets in 0..47")

    assert step.loss_and_backward(inputs, targets)[0] == loss  # a replay
    assert step.plans_recorded == 3
    np.testing.assert_array_equal(model.params.grad, grad)
    before = model.params.data.copy()
    assert step.run([(inputs, targets)], 1e-3)[0] == loss
    assert not np.array_equal(model.params.data, before)

    full = model.forward(inputs)[0]  # (T, V)
    cache = model.new_cache()
    ref.assert_close(model.prefill(cache, inputs[:, :T - 4])[0], full[T - 5], 1e-5, 1e-5,
                     "prefill")
    for t in range(T - 4, T):
        ref.assert_close(model.step(cache, inputs[:, t])[0], full[t], 1e-4, 1e-5, f"step {t}")
