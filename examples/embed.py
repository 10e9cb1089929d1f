"""Using rustgpt from another application: train a small model in-process on your own
examples, save it, load it back and answer questions.

    python examples/embed.py

rustgpt logs through the standard logging module (logger "rustgpt") and adds no handler
of its own, so the application's logging setup decides what is shown: here, the training
progress at INFO on stderr. Every failure is a rustgpt.LlmError with a one-line message.
"""

import logging
import sys
import tempfile
from pathlib import Path

import rustgpt
from rustgpt.config import Config, ModelConfig, TrainingConfig
from rustgpt.data import Dataset
from rustgpt.training import Trainer, rustgpt_phases

FACTS = [
    "The library opens at nine in the morning </s>",
    "The library closes at six in the evening </s>",
    "Books can be borrowed for three weeks </s>",
]
CHAT = [
    "User: When does the library open? Assistant: The library opens at nine in the morning </s>",
    "User: When does the library close? Assistant: The library closes at six in the evening </s>",
    "User: How long can I borrow a book? Assistant: Books can be borrowed for three weeks </s>",
]
QUESTIONS = ["When does the library open?", "How long can I borrow a book?", ""]


def train() -> tuple[rustgpt.LLM, Config]:
    config = Config(model=ModelConfig(embedding_dim=64, hidden_dim=128, num_layers=2),
                    training=TrainingConfig(pretraining_epochs=60, instruction_epochs=120,
                                            pretraining_lr=2e-3, instruction_lr=1e-3))
    pretraining, chat = Dataset(FACTS), Dataset(CHAT)
    vocab = rustgpt.Vocab.from_texts(FACTS + CHAT)
    model = rustgpt.LLM(config.model, vocab, seed=0)
    phases = rustgpt_phases(config.training, vocab, config.model.max_seq_len, pretraining, chat)
    Trainer(model, config.training, phases).run()
    return model, config


def answer(model: rustgpt.LLM, question: str) -> str:
    """What a request handler would do: a bad question is the caller's error, not a crash."""
    try:
        return model.generate(question, max_tokens=20)
    except rustgpt.LlmError as err:  # here: the empty question
        return f"error: {err}"


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        model, config = train()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "library.safetensors"
            rustgpt.Checkpoint.from_model(model, config).save(path)
            answering = rustgpt.load(path)  # what a web service would do once at start-up
    except rustgpt.LlmError as err:
        sys.exit(f"error: {err}")
    for question in QUESTIONS:
        print(f"{question!r} -> {answer(answering, question)}")


if __name__ == "__main__":
    main()
