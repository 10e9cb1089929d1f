"""The PyTorch port computes what rustgpt computes (as llm.c's test_gpt2.c): logits, loss,
every gradient, and a few Adam steps with clipping, on a small random model of every
architecture option and on the default and gpt architectures loaded from a checkpoint
file. Skipped without torch."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from rustgpt.checkpoint import Checkpoint  # noqa: E402
from rustgpt.config import Config, ModelConfig  # noqa: E402
from rustgpt.data import BUNDLED_CHAT, BUNDLED_PRETRAINING, Dataset, make_batch  # noqa: E402
from rustgpt.model import LLM  # noqa: E402
from rustgpt.optim import Adam  # noqa: E402
from rustgpt.tokenizer import Vocab  # noqa: E402

from bench.torch_port import from_rustgpt  # noqa: E402
from tests import reference as ref  # noqa: E402

SIZES = dict(embedding_dim=12, hidden_dim=33, num_layers=2, num_heads=3, max_seq_len=9)
SMALL = ModelConfig(**SIZES)
arch_options = pytest.mark.parametrize("options", ref.ARCHS.values(), ids=ref.ARCHS.keys())


def small_model(seed=3, **options):
    """A SMALL model; with options (ref.ARCHS'), its parameters redrawn N(0, 0.3^2) so that
    every part of the architecture matters (gpt's init is nearly zero)."""
    vocab = Vocab([f"w{i}" for i in range(17)] + ["</s>", "<unk>"])
    model = LLM(ModelConfig(**SIZES, **options), vocab, seed=seed)
    if options:
        model.params.data[...] = np.random.default_rng(seed).standard_normal(
            model.params.data.size) * 0.3
    return model


def small_batch(rng):
    return make_batch([rng.integers(0, 19, n).astype(np.intc) for n in (10, 7, 1 + 1)])


@pytest.fixture(scope="module")
def default_model():
    """RustGPT's default architecture on the bundled vocabulary, and chat examples."""
    pre, chat = Dataset.load(BUNDLED_PRETRAINING), Dataset.load(BUNDLED_CHAT)
    vocab = Vocab.from_texts(pre.examples + chat.examples)
    model = LLM(ModelConfig(), vocab, seed=7)
    return model, chat.encode(vocab, model.config.max_seq_len)[:4]


def port_grads(port):
    return {name: p.grad.numpy() for name, p in port.named_parameters()}


def assert_same_logits_and_loss(port, model, inputs, targets, atol):
    """Logits and mean loss agree, both models in inference (no dropout)."""
    with torch.no_grad():
        logits = port.eval()(inputs).numpy()
        loss = port.loss(inputs, targets).item()
    ref.assert_close(logits, model.forward(inputs), 1e-4, atol, "logits")
    summed, count, _ = model.loss(inputs, targets)
    assert loss == pytest.approx(summed / count, rel=1e-4)


@arch_options
def test_small_model_logits_and_loss(rng, options):
    model = small_model(**options)
    assert_same_logits_and_loss(from_rustgpt(model), model, *small_batch(rng), atol=1e-5)


@pytest.mark.parametrize("arch", ["rustgpt", "gpt"])
def test_architecture_from_a_checkpoint_file(arch, default_model, tmp_path):
    """The default size (RustGPT's, or gpt's block at that size, with dropout) saved to a
    checkpoint file: the port built from the file alone agrees."""
    model, sequences = default_model
    if arch == "gpt":
        model = LLM(ModelConfig(arch="gpt", dropout=0.1), model.tokenizer, seed=7)
    path = Checkpoint.from_model(model, Config(model=model.config)).save(
        tmp_path / "model.safetensors")
    assert_same_logits_and_loss(from_rustgpt(path), model, *make_batch(sequences), atol=1e-4)


@pytest.mark.parametrize("which", ["small", *(f"small-{a}" for a in ref.ARCHS if a != "rustgpt"),
                                   "default"])
def test_gradients_match(which, default_model, rng):
    if which.startswith("small"):
        options = ref.ARCHS[which[len("small-"):]] if "-" in which else {}
        model, (inputs, targets) = small_model(**options), small_batch(rng)
    else:
        model, (inputs, targets) = default_model[0], make_batch(default_model[1])
    port = from_rustgpt(model)
    port.loss(inputs, targets).backward()
    model.loss_and_backward(inputs, targets)
    expected = port_grads(port)
    assert list(expected) == list(model.params.grads)
    for name, grad in model.params.grads.items():
        scale = max(np.abs(expected[name]).max(), 1e-6)  # relative to the tensor's largest
        ref.assert_close(grad / scale, expected[name] / scale, 0, 2e-4, name)


@pytest.mark.parametrize("max_grad_norm", [5.0, 0.1], ids=["clip-5", "clip-active"])
@pytest.mark.parametrize("arch", ["rustgpt", "gpt"])
def test_training_steps_match(max_grad_norm, arch, rng):
    """Five Adam steps from the same weights: same losses, nearly the same weights."""
    model = small_model(**({"arch": "gpt"} if arch == "gpt" else {}))
    port = from_rustgpt(model)
    optimizer = Adam(model.params)
    inputs, targets = small_batch(rng)
    lr = 1e-3
    start = model.params.data.copy()
    for step in range(5):
        loss, norm = model.train_step(inputs, targets, optimizer, lr, max_grad_norm)
        t_loss, t_norm = port.train_step(inputs, targets, lr, max_grad_norm)
        assert t_loss == pytest.approx(loss, rel=1e-5), f"step {step}"
        assert t_norm == pytest.approx(norm, rel=1e-4), f"step {step}"
    moved = np.abs(model.params.data - start).max()
    assert moved > 4 * lr  # Adam moves each weight by about lr per step
    for name, value in port.state_dict().items():
        ref.assert_close(model.params.values[name], value.numpy(), 0, 1e-2 * lr, name)


@pytest.mark.parametrize("arch", ["rustgpt", "gpt"])
def test_adamw_steps_match(arch, rng):
    """nanoGPT's optimizer on both sides: AdamW with weight decay 0.1 on the parameters of
    two or more dimensions only (rustgpt's decay ranges, the port's two param groups),
    beta2 0.99, clipping to 1.0: same losses, nearly the same weights after ten steps."""
    model = small_model(**({"arch": "gpt"} if arch == "gpt" else {}))
    port = from_rustgpt(model)
    lr, weight_decay = 1e-2, 0.1
    optimizer = Adam(model.params, beta2=0.99, weight_decay=weight_decay)
    port.make_optimizer(lr, weight_decay=weight_decay, betas=(0.9, 0.99))
    inputs, targets = small_batch(rng)
    for step in range(10):
        loss, norm = model.train_step(inputs, targets, optimizer, lr, 1.0)
        t_loss, t_norm = port.train_step(inputs, targets, lr, 1.0)
        assert t_loss == pytest.approx(loss, rel=1e-4), f"step {step}"
        assert t_norm == pytest.approx(norm, rel=1e-3), f"step {step}"
    for name, value in port.state_dict().items():
        # a wrong decay rule would be off by ~ steps * lr * weight_decay * |w| = 1e-2 |w|
        ref.assert_close(model.params.values[name], value.numpy(), 0, 1e-2 * lr, name)


def test_generate_no_cache_is_rustgpts_greedy(default_model):
    from rustgpt.generation import generate

    model = default_model[0]
    port = from_rustgpt(model)
    prompt = "User: How do mountains form?"
    ids = model.tokenizer.encode(prompt)
    expected = generate(model, prompt, max_tokens=8, raw=True)
    new = port.generate_no_cache(ids, 8)
    eos = new.index(model.tokenizer.eos_id) if model.tokenizer.eos_id in new else len(new)
    assert model.tokenizer.decode(new[:eos]) == expected
