"""The PyTorch port computes what rustgpt computes (as llm.c's test_gpt2.c): logits, loss,
every gradient, and a few Adam steps with clipping, on a small random model of every
architecture option and on the default and gpt architectures loaded from a checkpoint
file; its nanoGPT loop on a text has rustgpt's schedule, split, decay rule and val loss, in
float32 and under autocast. Skipped without torch."""

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from rustgpt.checkpoint import Checkpoint  # noqa: E402
from rustgpt.config import Config, ModelConfig, TrainingConfig  # noqa: E402
from rustgpt.data import BUNDLED_CHAT, BUNDLED_PRETRAINING, Dataset, make_batch  # noqa: E402
from rustgpt.model import LLM  # noqa: E402
from rustgpt.optim import Adam  # noqa: E402
from rustgpt.tokenizer import Vocab  # noqa: E402
from rustgpt.training import Phase, TextPhase, Trainer, evaluate_text  # noqa: E402

from bench import torch_port  # noqa: E402
from bench.torch_port import AsRustgpt, cosine_lr, from_rustgpt, get_batch, text_splits  # noqa: E402
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


# ---- nanoGPT's loop on a text ----------------------------------------------------------------

@pytest.mark.parametrize("lr, warmup, sequences, epochs, batch_size", [
    (1e-3, 100, 2000, 1, 1),  # 2,000 steps of examples
    (0.5, 3, 7, 3, 2),  # 12 steps, in epochs of 4 batches
    (1e-2, 0, 9, 1, 1),  # no warmup
    (1e-3, 6, 4, 1, 1),  # warmup longer than the run
    (1e-3, 100, None, None, 12),  # the own-text recipe's text phase: 2,000 iterations
])
def test_cosine_lr_is_the_trainers_schedule(lr, warmup, sequences, epochs, batch_size):
    tokens = np.zeros(100, np.uint16)
    phase = (Phase("pretraining", [np.zeros(2, np.intc)] * sequences, epochs, lr) if sequences
             else TextPhase("text", tokens, tokens, 2000, lr, 64, 250, 20))
    trainer = Trainer(small_model(), TrainingConfig(schedule="cosine", warmup_steps=warmup,
                                                    batch_size=batch_size), [phase])
    steps = range(trainer.total_steps)
    assert [cosine_lr(step, lr, warmup, len(steps)) for step in steps] == \
        [trainer.lr_at(phase, step) for step in steps]


@pytest.mark.parametrize("arch", ["rustgpt", "gpt"])
def test_weight_decay_only_on_two_dimensional_parameters(arch):
    """AdamW's groups: decay 0.1 on every parameter of two dimensions, none on the others
    (biases, layer norms); with zero gradients a step only decays, so exactly the 2-D
    parameters shrink, by lr * weight_decay."""
    port = from_rustgpt(small_model(**({"arch": "gpt"} if arch == "gpt" else {})))
    lr, weight_decay = 0.5, 0.1
    optimizer = port.make_optimizer(lr, weight_decay=weight_decay, betas=(0.9, 0.99))
    assert isinstance(optimizer, torch.optim.AdamW)
    named = dict(port.named_parameters())
    groups = {group["weight_decay"]: {id(p) for p in group["params"]}
              for group in optimizer.param_groups}
    assert groups[weight_decay] == {id(p) for p in named.values() if p.dim() == 2}
    assert groups.get(0.0, set()) == {id(p) for p in named.values() if p.dim() != 2}
    assert all(group["betas"] == (0.9, 0.99) for group in optimizer.param_groups)
    before = {name: p.detach().clone() for name, p in named.items()}
    for p in named.values():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in named.items():
        scale = 1 - lr * weight_decay if p.dim() == 2 else 1.0
        torch.testing.assert_close(p.detach(), before[name] * scale, msg=name)


def write_text(path, repeats=40):
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\n" * repeats
    path.write_text(text, encoding="utf-8")
    return text


def test_text_splits_val_is_the_last_tenth(tmp_path):
    """rustgpt's char tokenizer (the sorted characters and <unk>) over the whole text; val is
    the last 10% of the tokens, train the rest."""
    text = write_text(tmp_path / "play.txt")
    tokenizer, train, val = text_splits(tmp_path / "play.txt", 8, 0.1, tmp_path / "cache")
    assert tokenizer.size == len(set(text)) + 1
    ids = tokenizer.encode(text)
    assert len(val) == len(ids) - int(len(ids) * 0.9)
    assert torch.cat([train, val]).tolist() == ids


def test_get_batch_draws_windows_of_seq_len_plus_one_tokens_in_range():
    """Every window is T + 1 consecutive tokens of the data (targets = inputs shifted by
    one); starts cover [0, n - T - 1], so the last token is reached and none beyond."""
    data = torch.arange(50) * 3  # (n,): each value tells its position
    generator = torch.Generator().manual_seed(0)
    inputs, targets = get_batch(data, 2000, 8, generator)
    assert inputs.shape == targets.shape == (2000, 8)
    windows = torch.cat([inputs, targets[:, -1:]], dim=1) // 3  # positions (B, T + 1)
    assert torch.equal(windows, windows[:, :1] + torch.arange(9))
    assert windows.min() == 0 and windows.max() == 49
    assert torch.equal(targets, data[windows[:, 1:]])
    again = get_batch(data, 2000, 8, torch.Generator().manual_seed(0))[0]
    assert torch.equal(again, inputs)  # seeded


def test_as_rustgpt_evaluates_a_split_as_rustgpt_does(rng):
    """evaluate_text over the port (AsRustgpt) gives rustgpt's loss, accuracy and bits per
    byte for the same weights."""
    model = small_model(arch="gpt")
    tokens = rng.integers(0, model.tokenizer.size, 40).astype(np.uint16)
    expected = evaluate_text(model, tokens, batch_size=3)
    got = evaluate_text(AsRustgpt(from_rustgpt(model), model.tokenizer), tokens, batch_size=3)
    assert got["tokens"] == expected["tokens"] == 39
    assert got["accuracy"] == expected["accuracy"]
    for key in ("loss", "bits_per_byte"):
        assert got[key] == pytest.approx(expected[key], rel=1e-5), key


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_own_text_trains_and_reports(precision, tmp_path, capsys, monkeypatch):
    """`python -m bench.torch_port own-text` on a tiny model: estimates after every
    eval_interval steps and after the last; the loss falls from ln(V), where the init puts
    it; the val split evaluated whole; one JSON line. With --precision bf16 the steps and
    estimates run under autocast, the final evaluation in float32 either way."""
    seen = set()  # (in the final evaluation, under autocast) of each forward
    final = [False]
    forward, evaluate = torch_port.TorchGPT.forward, AsRustgpt.loss

    def noted_forward(self, ids):
        seen.add((final[0], torch.is_autocast_enabled("cpu")))
        return forward(self, ids)

    def final_loss(self, inputs, targets):
        final[0] = True
        return evaluate(self, inputs, targets)

    monkeypatch.setattr(torch_port.TorchGPT, "forward", noted_forward)
    monkeypatch.setattr(AsRustgpt, "loss", final_loss)
    write_text(tmp_path / "play.txt")
    torch_port.main(["own-text", "--text", str(tmp_path / "play.txt"), "--cache-dir",
                     str(tmp_path / "cache"), "--num-layers", "1", "--num-heads", "2",
                     "--embedding-dim", "16", "--hidden-dim", "32", "--max-seq-len", "8",
                     "--batch-size", "4", "--max-iters", "30", "--warmup-steps", "5",
                     "--pretraining-lr", "1e-2", "--eval-interval", "12", "--eval-iters", "2",
                     "--threads", str(torch.get_num_threads()), "--precision", precision])
    result = json.loads(capsys.readouterr().out)
    assert [step for step, _, _ in result["estimates"]] == [12, 24, 30]
    assert result["estimates"][-1][1] < math.log(result["vocab_size"]) - 0.5
    assert result["val"]["tokens"] == result["val_tokens"] - 1
    assert 0 < result["step_seconds"] < result["loop_seconds"]
    assert seen == {(False, precision == "bf16"), (True, False)}
