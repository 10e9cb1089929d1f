"""Trainer: phases, schedule, shuffling, callbacks, stop and exact resume; learning."""

import math

import numpy as np
import pytest

from rustgpt.config import ModelConfig, TrainingConfig
from rustgpt.data import BUNDLED_CHAT, BUNDLED_PRETRAINING, Dataset
from rustgpt.model import LLM
from rustgpt.tokenizer import Vocab
from rustgpt.training import Callback, Phase, Trainer, rustgpt_phases

CFG = ModelConfig(embedding_dim=16, hidden_dim=32, num_layers=2, num_heads=2, max_seq_len=12)
TEXTS = ["the sun rises in the east </s>", "the sun sets in the west </s>",
         "User: where does the sun rise ? Assistant: in the east </s>",
         "User: where does the sun set ? Assistant: in the west </s>", "rain falls </s>"]


class Recorder(Callback):
    def __init__(self, stop_at=None):
        self.steps, self.epochs, self.phases, self.stop_at, self.ended = [], [], [], stop_at, False

    def on_step(self, trainer, record):
        self.steps.append(record)
        if self.stop_at is not None and record["step"] == self.stop_at:
            trainer.request_stop()

    def on_epoch_end(self, trainer, record):
        self.epochs.append(record)

    def on_phase_end(self, trainer, phase):
        self.phases.append(phase.name)

    def on_train_end(self, trainer):
        self.ended = True


def make(config, recorder, seed=0):
    vocab = Vocab.from_texts(TEXTS)
    model = LLM(CFG, vocab, seed=seed)
    phases = rustgpt_phases(config, vocab, CFG.max_seq_len, Dataset(TEXTS[:2] + TEXTS[4:]),
                            Dataset(TEXTS[2:4]))
    return Trainer(model, config, phases, [recorder])


def test_phases_epochs_batches_and_callbacks():
    rec = Recorder()
    cfg = TrainingConfig(pretraining_epochs=3, instruction_epochs=2, batch_size=2)
    trainer = make(cfg, rec)
    assert trainer.total_steps == 3 * 2 + 2 * 1
    assert trainer.run() is True and rec.ended
    assert len(rec.steps) == 8 and rec.phases == ["pretraining", "instruction"]
    assert [(e["phase"], e["epoch"]) for e in rec.epochs] == (
        [("pretraining", i) for i in (1, 2, 3)] + [("instruction", i) for i in (1, 2)])
    assert [r["epoch"] for r in rec.steps] == [1, 1, 2, 2, 3, 3, 1, 2]  # counted from 1
    assert all(0 <= r["accuracy"] <= 1 for r in rec.steps)
    assert {r["lr"] for r in rec.steps[:6]} == {5e-4} and rec.steps[-1]["lr"] == 1e-4
    assert all(r["tokens_per_s"] > 0 and math.isfinite(r["grad_norm"]) for r in rec.steps)


def test_epochs_due_every_n_epochs_and_at_each_phase_end():
    class Due(Recorder):
        def on_epoch_end(self, trainer, record):
            self.epochs.append([trainer.epochs_due(n) for n in (1, 2, 4)])

    rec = Due()
    make(TrainingConfig(pretraining_epochs=3, instruction_epochs=2, batch_size=2), rec).run()
    # pretraining's epochs 1, 2, 3 (its last), then instruction's 1, 2 (its last)
    assert rec.epochs == [[True, False, False], [True, True, False], [True, True, True],
                          [True, False, False], [True, True, True]]


def test_stop_and_resume_continue_exactly():
    cfg = TrainingConfig(pretraining_epochs=4, instruction_epochs=3, batch_size=2, shuffle=True,
                         schedule="cosine", warmup_steps=3, seed=9)
    full = Recorder()
    make(cfg, full).run()

    first = Recorder(stop_at=5)  # mid-epoch, mid-phase
    trainer = make(cfg, first)
    assert trainer.run() is False
    weights, state = trainer.model.state_dict(), trainer.state_dict()

    second = Recorder()
    resumed = make(cfg, second, seed=123)  # different init: everything must come from the state
    resumed.model.load_state_dict(weights)
    resumed.load_state_dict(state)
    assert resumed.run() is True
    losses = [r["loss"] for r in first.steps + second.steps]
    assert losses == [r["loss"] for r in full.steps]


def test_reopen_phases_trains_the_new_epochs_of_the_phase_that_ended(caplog):
    # pretraining (2 batches an epoch) was saved with 1 epoch, stopped as instruction began
    cfg = TrainingConfig(pretraining_epochs=1, instruction_epochs=1, batch_size=2)
    first = Recorder(stop_at=2)
    trainer = make(cfg, first)
    assert trainer.run() is False  # the stop comes as the instruction phase opens
    assert (trainer.position.phase, trainer.position.epoch, trainer.position.batch) == (1, 0, 0)
    state = trainer.state_dict()

    more = Recorder()
    grown = make(TrainingConfig(pretraining_epochs=3, instruction_epochs=1, batch_size=2), more)
    grown.load_state_dict(state)
    grown.reopen_phases([1, 1])
    assert (grown.position.phase, grown.position.epoch) == (0, 1)
    assert grown.run() is True
    assert [r["phase"] for r in more.steps] == ["pretraining"] * 4 + ["instruction"]

    late = make(TrainingConfig(pretraining_epochs=3, instruction_epochs=1, batch_size=2),
                Recorder())
    state["position"].update(epoch=0, batch=1)  # instruction has begun: too late
    late.load_state_dict(state)
    late.reopen_phases([1, 1])
    assert late.position.phase == 1 and "pretraining phase is over" in caplog.text


def test_shuffle_is_seeded_and_changes_order():
    orders = []
    for seed in (1, 1, 2):
        trainer = make(TrainingConfig(pretraining_epochs=1, instruction_epochs=0, shuffle=True,
                                      seed=seed), Recorder(stop_at=1))
        trainer.run()
        orders.append(trainer.position.order)
    assert orders[0] == orders[1] and sorted(orders[0]) == [0, 1, 2]


def test_cosine_schedule():
    cfg = TrainingConfig(schedule="cosine", warmup_steps=4)
    trainer = Trainer(LLM(CFG, Vocab.from_texts(TEXTS)), cfg, [])
    phase = Phase("p", [np.arange(3)] * 10, epochs=2, lr=1.0)  # 20 steps
    lrs = [trainer.lr_at(phase, s) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:])) and lrs[-1] > 0.1


@pytest.mark.parametrize("adaptive", [True, False])
def test_trainer_applies_adaptive_threads(adaptive):
    model = LLM(CFG, Vocab.from_texts(TEXTS))
    trainer = Trainer(model, TrainingConfig(adaptive_threads=adaptive), [])
    assert trainer.step.threads.enabled is adaptive


@pytest.fixture(scope="module")
def rustgpt_run():
    """The default schedule (RustGPT's: 100 + 100 epochs, batch 1) on the bundled data."""
    pre, chat = Dataset.load(BUNDLED_PRETRAINING), Dataset.load(BUNDLED_CHAT)
    vocab = Vocab.from_texts(pre.examples + chat.examples)
    model = LLM(ModelConfig(), vocab, seed=0)
    cfg = TrainingConfig()
    rec = Recorder()
    Trainer(model, cfg, rustgpt_phases(cfg, vocab, 80, pre, chat), [rec]).run()
    return model, chat, rec


def test_default_schedule_reproduces_training_answers(rustgpt_run):
    model, chat, _ = rustgpt_run
    for example in chat.examples[::9]:
        question, answer = example.removeprefix("User: ").split(" Assistant: ")
        expected = "Assistant: " + answer.removesuffix(" </s>")
        assert model.generate(question) == model.tokenizer.decode(model.tokenizer.encode(expected))


def test_default_schedule_lowers_the_loss_by_a_large_factor(rustgpt_run):
    model, _, rec = rustgpt_run
    pre = [e["loss"] for e in rec.epochs if e["phase"] == "pretraining"]
    chat = [e["loss"] for e in rec.epochs if e["phase"] == "instruction"]
    assert pre[0] > math.log(model.tokenizer.size) * 0.7  # starts near chance
    assert pre[-1] < pre[0] / 10 and chat[-1] < chat[0] / 5


def test_evaluate_text_predicts_every_token_once_and_counts_bytes():
    from rustgpt.tokenizer import train_tokenizer
    from rustgpt.training import evaluate_text

    text = "the sun rises in the east and sets in the west. " * 4
    tokenizer = train_tokenizer("char", [text])
    model = LLM(CFG, tokenizer, seed=2)  # max_seq_len 12: windows of 13 overlapping by one
    tokens = np.array(tokenizer.encode(text), np.uint16)
    result = evaluate_text(model, tokens, batch_size=3)
    # the reference: each window's logits from a full forward, log-softmax in float64
    nats, right = 0.0, 0
    for s in range(0, len(tokens) - 1, 12):
        window = tokens[s:s + 13].astype(np.intc)
        logits = model.forward(window[None, :-1])[0].astype(np.float64)
        logp = logits - logits.max(1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(1, keepdims=True))
        nats -= logp[np.arange(len(window) - 1), window[1:]].sum()
        right += int((logits.argmax(1) == window[1:]).sum())
    assert result["tokens"] == len(tokens) - 1
    assert result["loss"] == pytest.approx(nats / (len(tokens) - 1), rel=1e-5)
    assert result["accuracy"] == pytest.approx(right / (len(tokens) - 1))
    # ASCII and one character a token: a byte per predicted token
    assert result["bits_per_byte"] == pytest.approx(result["loss"] / math.log(2), rel=1e-9)


def test_trainer_builds_adamw_from_the_config():
    """[training]'s Adam settings reach the optimizer; its weight decay is on the matrices
    and embeddings only (rustgpt.optim.decay_ranges)."""
    cfg = TrainingConfig(pretraining_epochs=1, instruction_epochs=0, weight_decay=0.1,
                         beta1=0.8, beta2=0.99, eps=1e-6, max_grad_norm=1.0)
    rec = Recorder()
    trainer = make(cfg, rec)
    opt = trainer.optimizer
    assert (opt.weight_decay, opt.beta1, opt.beta2, opt.eps) == (0.1, 0.8, 0.99, 1e-6)
    assert opt.decay.shape[0] > 0
    assert trainer.run() is True
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rec.steps)


def test_optimizer_options_on_the_command_line_and_on_resume(tmp_path):
    """train's --weight-decay, --beta1, --beta2, --eps and --max-grad-norm set [training];
    --resume may change them (they are not fixed by the checkpoint)."""
    from click.testing import CliRunner

    from rustgpt.checkpoint import Checkpoint
    from rustgpt.cli import main

    (tmp_path / "tiny.toml").write_text("[model]\nembedding_dim = 16\nhidden_dim = 32\n"
                                        "num_layers = 1\nmax_seq_len = 40\n[training]\n"
                                        "pretraining_epochs = 1\ninstruction_epochs = 1\n"
                                        "batch_size = 16\n")

    def train(*args):
        result = CliRunner().invoke(main, ["train", "--config", str(tmp_path / "tiny.toml"),
                                           "--output", str(tmp_path / "run"), *args])
        assert result.exit_code == 0, result.output
        latest = max((tmp_path / "run").glob("ckpt-*.safetensors"))
        return Checkpoint.load(latest).config.training

    first = train("--weight-decay", "0.1", "--beta1", "0.85", "--beta2", "0.99", "--eps",
                  "1e-6", "--max-grad-norm", "1.0")
    assert (first.weight_decay, first.beta1, first.beta2, first.eps, first.max_grad_norm) == (
        0.1, 0.85, 0.99, 1e-6, 1.0)
    resumed = train("--resume", "--instruction-epochs", "2", "--weight-decay", "0.05",
                    "--beta2", "0.95", "--max-grad-norm", "2.5")
    assert (resumed.weight_decay, resumed.beta1, resumed.beta2, resumed.eps,
            resumed.max_grad_norm) == (0.05, 0.85, 0.95, 1e-6, 2.5)
    bad = CliRunner().invoke(main, ["train", "--output", str(tmp_path / "other"), "--beta2",
                                    "1.0"])
    assert bad.exit_code != 0 and "beta2" in bad.output
