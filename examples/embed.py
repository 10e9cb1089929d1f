"""Using rustgpt from another application: train a small model in-process on your own
examples, save it, load it back and answer questions.

    python examples/embed.py
"""

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


def main() -> None:
    config = Config(model=ModelConfig(embedding_dim=64, hidden_dim=128, num_layers=2),
                    training=TrainingConfig(pretraining_epochs=60, instruction_epochs=120,
                                            pretraining_lr=2e-3, instruction_lr=1e-3))
    pretraining, chat = Dataset(FACTS), Dataset(CHAT)
    vocab = rustgpt.Vocab.from_texts(FACTS + CHAT)
    model = rustgpt.LLM(config.model, vocab, seed=0)
    phases = rustgpt_phases(config.training, vocab, config.model.max_seq_len, pretraining, chat)
    Trainer(model, config.training, phases).run()

    with tempfile.TemporaryDirectory() as tmp:
        path = rustgpt.Checkpoint.from_model(model, config).save(Path(tmp) / "library.safetensors")
        answering = rustgpt.load(path)  # what a web handler would do once at start-up
        for question in ("When does the library open?", "How long can I borrow a book?"):
            print(f"{question} -> {answering.generate(question)}")


if __name__ == "__main__":
    main()
