"""Training on text (train --text): the issue's commands at a small scale, evaluations in
the logs and metrics, the best checkpoint by val loss, exact resume (with dropout and
gradient accumulation), and bad input as one line."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from rustgpt.checkpoint import Checkpoint
from rustgpt.cli import main
from rustgpt.config import load_config
from rustgpt.run import build_run
from rustgpt.training import Callback

WORDS = ("the king said to the queen that the night was long and the stars were cold "
         "ROMEO: what light through yonder window breaks JULIET: it is the east").split()
MODEL = ["--arch", "gpt", "--num-layers", "1", "--num-heads", "2", "--embedding-dim", "16",
         "--hidden-dim", "32", "--max-seq-len", "16", "--batch-size", "4"]


@pytest.fixture
def corpus(tmp_path, rng, monkeypatch):
    """About 20 KB of text, and a token cache of the test's own."""
    monkeypatch.setenv("LLM_DATA_TOKEN_CACHE", str(tmp_path / "cache"))
    lines = [" ".join(rng.choice(WORDS, 12)) for _ in range(300)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def cli(*args, stdout=False):
    """(exit code, output: stdout and stderr, or with `stdout` stdout alone)."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stdout if stdout else result.output


def test_train_eval_generate_on_text(corpus, tmp_path):
    out = tmp_path / "run"
    code, text = cli("train", "--text", corpus, "--tokenizer", "char", *MODEL,
                     "--max-iters", 30, "--pretraining-lr", 1e-2, "--schedule", "cosine",
                     "--warmup-steps", 5, "--weight-decay", 0.1, "--beta2", 0.99,
                     "--max-grad-norm", 1.0, "--eval-interval", 10, "--eval-iters", 2,
                     "--threads", 1, "--output", out)
    assert code == 0, text
    assert "trained 30 steps" in text and "val loss" in text
    assert "text step 20/30: train loss" in text  # each evaluation is logged
    rows = json.loads((out / "metrics.json").read_text())["steps"]
    assert [r["step"] for r in rows] == list(range(1, 31))
    evaluated = {r["step"]: r["val_loss"] for r in rows if r["val_loss"] is not None}
    assert list(evaluated) == [10, 20, 30]
    assert all(r["train_loss"] is not None for r in rows if r["step"] in evaluated)
    best = Checkpoint.load(out / "best.safetensors")
    assert best.loss == min(evaluated.values()) and best.tokenizer.kind == "char"

    code, text = cli("eval", "--checkpoint", out, "--text", corpus, "--split", "val", "--json",
                     stdout=True)
    assert code == 0, text
    result = json.loads(text)
    assert {"loss", "perplexity", "bits_per_byte", "tokens"} <= set(result)

    code, text = cli("generate", "--checkpoint", out, "ROMEO:", "--max-new-tokens", 40,
                     "--temperature", 0.8, "--top-k", 5, "--seed", 1, stdout=True)
    assert code == 0, text
    assert text.startswith("ROMEO:") and len(text.rstrip("\n")) > len("ROMEO:")

    code, text = cli("info", "--checkpoint", out / "ckpt-00000030.safetensors", stdout=True)
    assert code == 0, text  # a text run counts evaluations, not phases and epochs
    assert f"val_loss: {evaluated[30]}" in text and "evaluations: 3" in text
    assert "epoch:" not in text and "phase:" not in text


def test_train_with_a_bpe_tokenizer_file(corpus, tmp_path):
    tok = tmp_path / "tok.json"
    code, text = cli("tokenizer", "train", corpus, "--kind", "bpe", "--vocab-size", 300,
                     "-o", tok)
    assert code == 0, text
    code, text = cli("train", "--text", corpus, "--tokenizer", tok, *MODEL, "--max-iters", 6,
                     "--eval-interval", 3, "--eval-iters", 1, "--output", tmp_path / "run-bpe")
    assert code == 0, text
    saved = Checkpoint.load(tmp_path / "run-bpe" / "best.safetensors")
    assert saved.tokenizer.kind == "bpe" and saved.tokenizer.size == 300


class StopAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_step(self, trainer, record):
        if record["step"] == self.step:
            trainer.request_stop()


def test_a_resumed_text_run_continues_exactly(corpus, tmp_path):
    """Stopped mid-interval and resumed = run straight through: the same losses, val
    losses and weights, with dropout and two batches per step."""
    def config(out):
        return load_config(overrides={
            "model": {"arch": "gpt", "num_layers": 1, "num_heads": 2, "embedding_dim": 16,
                      "hidden_dim": 32, "max_seq_len": 16, "dropout": 0.1},
            "training": {"batch_size": 3, "max_iters": 14, "eval_interval": 5,
                         "eval_iters": 2, "grad_accum": 2, "schedule": "cosine",
                         "warmup_steps": 2, "pretraining_lr": 1e-2},
            "data": {"text": [str(corpus)]},
            "checkpoint": {"directory": str(out)}})[0]

    straight = build_run(config(tmp_path / "a"))
    assert straight.trainer.run()
    stopped = build_run(config(tmp_path / "b"), callbacks=[StopAt(7)])
    assert not stopped.trainer.run()
    stopped.recorder.write()
    stopped.saver.save(stopped.trainer)
    resumed = build_run(config(tmp_path / "b"), resume="latest")
    assert resumed.trainer.position.step == 7
    assert resumed.trainer.run()
    a, b = straight.recorder.metrics.rows(), resumed.recorder.metrics.rows()
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["val_loss"] for r in a] == [r["val_loss"] for r in b]
    wa, wb = straight.model.state_dict(), resumed.model.state_dict()
    for name in wa:
        np.testing.assert_array_equal(wa[name], wb[name])


def test_resume_refuses_another_corpus(corpus, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--text", corpus, *MODEL, "--max-iters", 4, "--eval-interval", 2,
            "--eval-iters", 1, "--output", out]
    assert cli(*args)[0] == 0
    corpus.write_text(corpus.read_text() + "more text\n")  # same path, other content
    code, text = cli(*args[:-2], "--max-iters", 6, "--output", out, "--resume",
                     "--log-level", "WARNING")
    assert code == 1
    assert "the training text differs from the saved run's" in text
    assert len(text.strip().splitlines()) == 1


@pytest.mark.parametrize("make, args, message", [
    (lambda d: (d / "empty.txt").write_text(""), ["empty.txt"], "empty corpus"),
    (lambda d: (d / "short.txt").write_text("tiny text\n"), ["short.txt"],
     "fewer than one window of max_seq_len + 1"),
    (lambda d: (d / "docs").mkdir(), ["docs"], "a directory with no text files"),
    (lambda d: (d / "bin.txt").write_bytes(b"ab\xff\xfecd" * 100), ["bin.txt"],
     "bin.txt: line 1: not UTF-8 (byte 0xff at offset 2)"),
    (lambda d: (d / "ok.txt").write_text("some text " * 200), ["ok.txt", "--tokenizer", "word"],
     "[data] tokenizer = 'word' is for example files"),
    (lambda d: (d / "tok.json").write_text('{"model": 3}'),
     ["ok.txt", "--tokenizer", "tok.json"], "tok.json"),
])
def test_bad_text_input_is_one_line(tmp_path, monkeypatch, make, args, message):
    monkeypatch.setenv("LLM_DATA_TOKEN_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ok.txt").write_text("some text " * 200)
    make(tmp_path)
    code, text = cli("train", "--text", *args, *MODEL, "--max-iters", 2, "--output", "run",
                     "--log-level", "WARNING")
    assert code == 1, text
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], text
