"""Trainer: RustGPT's two phases (pretraining, then instruction tuning), with batching,
learning-rate schedule, clipping, seeded shuffling and callbacks.

The trainer's position (phase, epoch, example order, batch index, RNG state) is part of its
state, so a run resumed from a checkpoint continues exactly as the uninterrupted run would.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Sequence

import attrs
import numpy as np

from rustgpt.data import Dataset, make_batch
from rustgpt.errors import ValidationError
from rustgpt.optim import Adam

if TYPE_CHECKING:
    from rustgpt.config import TrainingConfig
    from rustgpt.model import LLM

log = logging.getLogger(__name__)


@attrs.define
class Phase:
    """One training phase: encoded sequences (each int32 (n,)), epochs and peak lr."""

    name: str
    sequences: list[np.ndarray]
    epochs: int
    lr: float


@attrs.define
class Position:
    """Where training is: phase index, epoch, next batch in the epoch, global step, and the
    current epoch's example order (None before the epoch starts)."""

    phase: int = 0
    epoch: int = 0
    batch: int = 0
    step: int = 0
    order: list[int] | None = None


def rustgpt_phases(config: TrainingConfig, vocab, max_seq_len: int, pretraining: Dataset,
                   chat: Dataset, long_examples: str = "truncate") -> list[Phase]:
    """RustGPT's schedule: pretraining on plain sentences, then instruction tuning on chat."""
    return [
        Phase("pretraining", pretraining.encode(vocab, max_seq_len, long_examples),
              config.pretraining_epochs, config.pretraining_lr),
        Phase("instruction", chat.encode(vocab, max_seq_len, long_examples),
              config.instruction_epochs, config.instruction_lr),
    ]


class Callback:
    """Hooks the trainer calls; override what you need. ``record`` is a dict of metrics:
    per step phase, epoch (counted from 1), step, loss, accuracy (the share of targets
    predicted right), grad_norm, lr, tokens and tokens_per_s; per epoch phase, epoch,
    step, loss (the epoch's mean) and tokens_per_s.

    In ``on_step`` the step's Adam update may still be pending (it runs beside the next
    step's forward): the model's methods and ``trainer.state_dict()`` apply it first, but
    code reading ``model.params`` directly should call ``trainer.model.settle()``. The
    other hooks see it applied."""

    def on_step(self, trainer: Trainer, record: dict) -> None:
        """After each training step, with the step's record."""

    def on_epoch_end(self, trainer: Trainer, record: dict) -> None:
        """After each epoch, with the epoch's record (``trainer.epochs_due`` tells whether a
        periodic save is due)."""

    def on_phase_end(self, trainer: Trainer, phase: Phase) -> None:
        """After the last epoch of `phase`."""

    def on_train_end(self, trainer: Trainer) -> None:
        """When every phase is done (not when the run is stopped early)."""


class ProgressBar(Callback):
    """A tqdm bar over all steps with the running loss and tokens/s."""

    def __init__(self) -> None:
        self.bar = None
        self.loss = None

    def on_step(self, trainer: Trainer, record: dict) -> None:
        """Advance the bar; every 50 steps show the smoothed loss and tokens/s."""
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=trainer.total_steps, initial=trainer.position.step - 1,
                            unit="step", dynamic_ncols=True, mininterval=0.25)
        loss = record["loss"]
        self.loss = loss if self.loss is None else 0.98 * self.loss + 0.02 * loss
        self.bar.update(1)
        if record["step"] % 50 == 0:
            self.bar.set_postfix_str(f"{record['phase']} loss {self.loss:.3f} "
                                     f"{record['tokens_per_s']:,.0f} tok/s", refresh=False)

    def close(self) -> None:
        """Close the bar (the CLI calls it however training ends)."""
        if self.bar is not None:
            self.bar.close()


class Trainer:
    """Runs `phases` over `model` with the settings of a TrainingConfig.

    ``run()`` trains to the end or until ``request_stop()``; ``state_dict()`` /
    ``load_state_dict()`` carry the optimizer, the position and the shuffling RNG."""

    def __init__(self, model: LLM, config: TrainingConfig, phases: Sequence[Phase],
                 callbacks: Sequence[Callback] = ()) -> None:
        self.model = model
        self.config = config
        self.phases = list(phases)
        self.callbacks = list(callbacks)
        self.optimizer = Adam(model.params, config.beta1, config.beta2, config.eps,
                              config.weight_decay)
        self.rng = np.random.default_rng(config.seed)
        model.step_threads.enabled = config.adaptive_threads
        self.position = Position()
        self.last_loss = math.nan  # of the latest step
        self.epoch_loss = math.nan  # mean over the latest finished epoch
        self._stop = False
        self._epoch_losses: list[float] = []
        self._epoch_tokens = 0
        self._epoch_start = time.perf_counter()

    # ---- schedule ---------------------------------------------------------------------------

    def batches_per_epoch(self, phase: Phase) -> int:
        """Steps in one epoch of `phase` (its last batch may be short)."""
        return math.ceil(len(phase.sequences) / self.config.batch_size)

    def lr_at(self, phase: Phase, step_in_phase: int) -> float:
        """Constant (RustGPT), or linear warmup then cosine decay to 10% over the phase."""
        if self.config.schedule == "constant":
            return phase.lr
        warmup = self.config.warmup_steps
        if step_in_phase < warmup:
            return phase.lr * (step_in_phase + 1) / warmup
        total = max(phase.epochs * self.batches_per_epoch(phase) - warmup, 1)
        progress = min((step_in_phase - warmup) / total, 1.0)
        return phase.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))

    # ---- the loop ------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop after the current step (safe to call from a signal handler)."""
        self._stop = True

    @property
    def finished(self) -> bool:
        """Whether every phase is done."""
        return self.position.phase >= len(self.phases)

    @property
    def total_steps(self) -> int:
        """Steps of the whole schedule, every phase's epochs."""
        return sum(p.epochs * self.batches_per_epoch(p) for p in self.phases)

    def epochs_due(self, every: int) -> bool:
        """At an epoch end (``on_epoch_end``): whether the epochs done in this phase are a
        multiple of `every`, or all of its epochs. For callbacks that save every `every`
        epochs and at each phase's end."""
        done = self.position.epoch
        return done % every == 0 or done == self.phases[self.position.phase].epochs

    def reopen_phases(self, epochs_before: Sequence[int]) -> None:
        """After ``load_state_dict``, when the phases' epochs differ from those the run was
        saved with (`epochs_before`, per phase): if the phase that ended last now has more
        epochs and the next has not begun, training goes back to it, so ``run()`` trains
        the new epochs. (A phase lowered below its epochs done ends at once.) Earlier
        phases cannot grow: a warning says their new epochs are not trained."""
        pos = self.position
        last = pos.phase - 1
        if last >= 0 and pos.epoch == pos.batch == 0 and \
                self.phases[last].epochs > epochs_before[last]:
            pos.phase, pos.epoch, pos.order = last, epochs_before[last], None
        for phase, before in zip(self.phases[:pos.phase], epochs_before):
            if phase.epochs > before:
                log.warning("%s phase is over (after %d epochs): its %d epochs now are not "
                            "trained", phase.name, before, phase.epochs)

    def run(self) -> bool:
        """Train from the current position. Returns True when every phase is done, False
        when stopped early by request_stop()."""
        pos, cfg = self.position, self.config
        self._stop = False
        while not self.finished:
            phase = self.phases[pos.phase]
            per_epoch = self.batches_per_epoch(phase)
            while pos.epoch < phase.epochs:
                if pos.order is None:
                    n = len(phase.sequences)
                    pos.order = (self.rng.permutation(n) if cfg.shuffle else np.arange(n)).tolist()
                    self._epoch_losses, self._epoch_tokens, self._epoch_start = [], 0, time.perf_counter()
                while pos.batch < per_epoch:
                    if self._stop:
                        self.model.settle()
                        return False
                    self._train_batch(phase, per_epoch)
                self._end_epoch(phase)
            for cb in self.callbacks:
                cb.on_phase_end(self, phase)
            pos.phase, pos.epoch = pos.phase + 1, 0
        for cb in self.callbacks:
            cb.on_train_end(self)
        return True

    def _train_batch(self, phase: Phase, per_epoch: int) -> None:
        pos, bs = self.position, self.config.batch_size
        rows = pos.order[pos.batch * bs:(pos.batch + 1) * bs]
        inputs, targets = make_batch([phase.sequences[i] for i in rows])
        lr = self.lr_at(phase, pos.epoch * per_epoch + pos.batch)
        start = time.perf_counter()
        # the update runs beside the next step's forward (LLM.train_step): on_step
        # callbacks that read model.params directly call model.settle() first
        loss, norm = self.model.train_step(inputs, targets, self.optimizer, lr,
                                           self.config.max_grad_norm, defer=True)
        elapsed = time.perf_counter() - start
        tokens = int(np.count_nonzero(targets >= 0))
        pos.batch += 1
        pos.step += 1
        self.last_loss = loss
        self._epoch_losses.append(loss)
        self._epoch_tokens += tokens
        record = {"phase": phase.name, "epoch": pos.epoch + 1, "step": pos.step, "loss": loss,
                  "accuracy": self.model.last_correct / tokens, "grad_norm": norm, "lr": lr,
                  "tokens": tokens, "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0}
        for cb in self.callbacks:
            cb.on_step(self, record)

    def _end_epoch(self, phase: Phase) -> None:
        self.model.settle()
        pos = self.position
        elapsed = time.perf_counter() - self._epoch_start
        record = {"phase": phase.name, "epoch": pos.epoch + 1, "step": pos.step,
                  "loss": float(np.mean(self._epoch_losses)) if self._epoch_losses else math.nan,
                  "tokens_per_s": self._epoch_tokens / elapsed if elapsed > 0 else 0.0}
        self.epoch_loss = record["loss"]
        # every 10th epoch and a phase's last at INFO, the rest at DEBUG
        level = logging.INFO if (pos.epoch + 1) % 10 == 0 or pos.epoch + 1 == phase.epochs \
            else logging.DEBUG
        log.log(level, "%s epoch %d/%d: loss %.4f", phase.name, pos.epoch + 1, phase.epochs,
                record["loss"], extra={k: v for k, v in record.items() if k != "phase"})
        pos.epoch, pos.batch, pos.order = pos.epoch + 1, 0, None
        for cb in self.callbacks:
            cb.on_epoch_end(self, record)

    # ---- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Optimizer moments and step, position, RNG state, last loss (JSON-able but m, v)."""
        return {"optimizer": self.optimizer.state_dict(), "position": attrs.asdict(self.position),
                "rng": self.rng.bit_generator.state, "last_loss": self.last_loss,
                "epoch_loss": self.epoch_loss,
                "epoch_losses": list(self._epoch_losses)}

    def load_state_dict(self, state: dict) -> None:
        """Restore a state_dict (the model's weights are restored apart, by the caller)."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.position = Position(**state["position"])
        self.rng.bit_generator.state = state["rng"]
        self.last_loss = state["last_loss"]
        self.epoch_loss = state["epoch_loss"]
        self._epoch_losses = list(state.get("epoch_losses", []))
        self._epoch_tokens, self._epoch_start = 0, time.perf_counter()


def evaluate_text(model: LLM, tokens: np.ndarray, batch_size: int = 16) -> dict:
    """Next-token loss (nats), perplexity, accuracy and bits per byte of `model` over a run
    of `tokens` (a split of a corpus.TokenFile): consecutive windows of max_seq_len + 1
    tokens overlapping by one, so every token after the first is predicted once, from the
    tokens before it in its window. Bits per byte divide by the UTF-8 bytes of the
    predicted tokens (corpus.count_bytes), so models with different tokenizers compare.
    Raises ValidationError for fewer than two tokens."""
    from rustgpt.corpus import count_bytes

    n, T = len(tokens), model.config.max_seq_len
    if n < 2:
        raise ValidationError(f"evaluate_text: {n} tokens, expected at least 2")
    starts = range(0, n - 1, T)
    total, count, correct = 0.0, 0, 0
    for first in range(0, len(starts), batch_size):
        windows = [np.asarray(tokens[s:s + T + 1], np.intc)
                   for s in starts[first:first + batch_size]]
        loss, k, right = model.loss(*make_batch(windows))
        total, count, correct = total + loss, count + k, correct + right
    mean = total / count
    nbytes = max(count_bytes(tokens[1:], model.tokenizer), 1)
    return {"tokens": count, "loss": mean, "perplexity": math.exp(min(mean, 700.0)),
            "bits_per_byte": total / math.log(2) / nbytes, "accuracy": correct / count}


def evaluate(model: LLM, sequences: Sequence[np.ndarray], batch_size: int = 16) -> dict:
    """Mean next-token loss, perplexity and accuracy of `model` over encoded `sequences`."""
    total, count, correct = 0.0, 0, 0
    for start in range(0, len(sequences), batch_size):
        loss, n, right = model.loss(*make_batch(sequences[start:start + batch_size]))
        total, count, correct = total + loss, count + n, correct + right
    mean = total / count
    return {"examples": len(sequences), "tokens": count, "loss": mean,
            "perplexity": math.exp(min(mean, 700.0)), "accuracy": correct / count}
