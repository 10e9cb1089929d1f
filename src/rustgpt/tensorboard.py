"""TensorBoard logging: a trainer callback that writes each step's metrics as scalars and a
generated sample as text into TensorBoard event files (needs the ``tensorboard`` extra)."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Callable

from rustgpt.errors import ConfigError, SerializationError, ValidationError
from rustgpt.training import Callback, Trainer

# step record key -> scalar tag; a key missing from a record (or not finite) is skipped
TAGS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
        "tokens_per_s": "train/tokens_per_s", "accuracy": "train/accuracy",
        "val_loss": "val/loss"}
SAMPLE_TAG = "sample"  # TensorBoard lists it as "sample/text_summary"


class TensorBoardCallback(Callback):
    """Writes TensorBoard event files into `logdir` with tensorboardX.

    Every step: the record's scalars under ``TAGS`` (``train/loss``, ``train/lr``,
    ``train/grad_norm``, ``train/tokens_per_s``, ``train/accuracy``, ``val/loss``), x = the
    global step. ``sample()``, if given, returns a text (say, the model's answer to a fixed
    prompt), written under ``sample`` at each evaluation: every `every_epochs` epochs and at
    each phase's end (``Trainer.epochs_due``), at a step whose record carries ``val_loss``,
    and at train end. `purge_step` (a resumed run's first step) hides the events an earlier,
    interrupted run wrote from that step on. ``on_train_end`` closes the writer; call
    ``close()`` when training ends otherwise.

    Raises ConfigError if tensorboardX is not installed, ValidationError if `every_epochs`
    < 1, SerializationError if `logdir` cannot be created or written."""

    def __init__(self, logdir: str | os.PathLike, every_epochs: int = 1,
                 sample: Callable[[], str] | None = None, flush_secs: int = 10,
                 purge_step: int | None = None) -> None:
        try:
            from tensorboardX import SummaryWriter
            from tensorboardX.proto.summary_pb2 import Summary
        except ImportError as err:
            raise ConfigError("--tensorboard needs tensorboardX: "
                              "pip install 'rustgpt[tensorboard]'") from err
        if not every_epochs >= 1:
            raise ValidationError(f"TensorBoardCallback: every_epochs = {every_epochs}, "
                                  f"expected >= 1")
        self.logdir = Path(logdir)
        self.every_epochs = every_epochs
        self.sample = sample
        self._summary = Summary
        self._sampled_at: int | None = None  # step of the latest sample, written once per step
        try:
            self.logdir.mkdir(parents=True, exist_ok=True)
            # file names carry whole seconds: the suffix keeps a writer opened in the same
            # second (a quick resume) from overwriting the last one, and sorts after it
            self.writer = SummaryWriter(str(self.logdir), flush_secs=flush_secs,
                                        purge_step=purge_step,
                                        filename_suffix=f".{time.time_ns()}")
        except OSError as err:
            raise SerializationError(f"{self.logdir}: cannot write TensorBoard events "
                                     f"({err.strerror or err})") from err

    def on_step(self, trainer: Trainer, record: dict) -> None:
        """Write the step's scalars (and a sample when the record carries val_loss)."""
        # one event holding every scalar of the step: a quarter of the cost of one per tag
        values = [self._summary.Value(tag=tag, simple_value=float(record[key]))
                  for key, tag in TAGS.items()
                  if record.get(key) is not None and math.isfinite(record[key])]
        if values:
            self.writer.file_writer.add_summary(self._summary(value=values), record["step"])
        if "val_loss" in record:
            self._write_sample(record["step"])

    def on_epoch_end(self, trainer: Trainer, record: dict) -> None:
        """Write a sample when the epoch is due."""
        if trainer.epochs_due(self.every_epochs):
            self._write_sample(record["step"])

    def on_train_end(self, trainer: Trainer) -> None:
        """Write a last sample and close the file."""
        self._write_sample(trainer.position.step)
        self.close()

    def close(self) -> None:
        """Flush and close the event file (a second call does nothing)."""
        self.writer.close()

    def _write_sample(self, step: int) -> None:
        if self.sample is not None and step != self._sampled_at:
            self.writer.add_text(SAMPLE_TAG, self.sample(), step)
            self._sampled_at = step
