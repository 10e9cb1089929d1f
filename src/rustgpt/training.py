"""Trainer: phases of training with a learning-rate schedule, evaluation and callbacks.

Two kinds of phase: RustGPT's epochs over examples (pretraining, then instruction tuning;
batching, seeded shuffling) and iterations over a token stream (a text corpus: random
windows, with train and validation losses estimated every ``eval_interval`` steps). Each
step is a rustgpt.step.TrainStep.

The trainer's position (phase, epoch, example order, batch index, RNG state) is part of its
state, so a run resumed from a checkpoint continues exactly as the uninterrupted run would.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Callable, Sequence

import attrs
import numpy as np

from rustgpt.comm import SingleProcess
from rustgpt.corpus import random_windows
from rustgpt.data import Dataset, make_batch
from rustgpt.errors import ConfigError, ValidationError
from rustgpt.optim import Adam
from rustgpt.step import TrainStep

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
class TextPhase:
    """Training on a token stream (a text corpus's splits, corpus.TokenFile.split):
    `iters` steps, each of `grad_accum` batches of random windows of `seq_len` + 1 tokens
    of `train` (corpus.random_windows, from the trainer's RNG), at peak rate `lr`. Its
    "epochs" are runs of `eval_interval` steps (the last may be shorter), each ended by
    estimates of the train and val losses over `eval_iters` batches of each split.
    `corpus` identifies the tokens (TokenFile.key): a run resumes on the same ones."""

    name: str
    train: np.ndarray
    val: np.ndarray
    iters: int
    lr: float
    seq_len: int
    eval_interval: int
    eval_iters: int
    grad_accum: int = 1
    corpus: str = ""

    @property
    def epochs(self) -> int:
        """Evaluations: one after every `eval_interval` steps and one at the end."""
        return -(-self.iters // self.eval_interval)


def estimate_loss(loss: Callable[..., tuple[float, int, int]], tokens: np.ndarray,
                  batches: int, batch_size: int, seq_len: int, rng: np.random.Generator,
                  comm: SingleProcess | None = None) -> float:
    """Mean next-token loss over `batches` batches of random windows of `tokens` (no
    dropout, no gradients): nanoGPT's estimate_loss. `loss(inputs, targets)` gives a
    batch's (summed loss, targets, predicted right): LLM.loss, or TrainStep.loss, which
    replays a recorded forward. With `comm`, each process takes its rows of each batch
    (rank_rows) and the sums are taken over the processes."""
    comm = comm or SingleProcess()
    rows = rank_rows(batch_size, comm)
    total, count = 0.0, 0
    for _ in range(batches):
        inputs, targets = random_windows(tokens, batch_size, seq_len, rng)
        loss_sum, n, _ = loss(inputs[rows], targets[rows])
        total, count = total + loss_sum, count + n
    total, count = comm.sum([total, count])
    return total / count


def rank_rows(batch_size: int, comm: SingleProcess) -> slice:
    """The rows of a global batch of `batch_size` that this process of `comm` trains on:
    consecutive, as even as they come (ranks before the remainder get one row more)."""
    return slice(comm.rank * batch_size // comm.size, (comm.rank + 1) * batch_size // comm.size)


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
        periodic save is due). A text phase's epoch ends with an evaluation: its record
        holds train_loss and val_loss too."""

    def on_phase_end(self, trainer: Trainer, phase: Phase) -> None:
        """After the last epoch of `phase`."""

    def on_train_end(self, trainer: Trainer) -> None:
        """When every phase is done (not when the run is stopped early)."""


class ProgressBar(Callback):
    """A tqdm bar over all steps with the running loss and tokens/s."""

    def __init__(self) -> None:
        self.bar = None
        self.loss = None
        self.val = ""  # the latest validation loss, once there is one

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
            self.bar.set_postfix_str(f"{record['phase']} loss {self.loss:.3f}{self.val} "
                                     f"{record['tokens_per_s']:,.0f} tok/s", refresh=False)

    def on_epoch_end(self, trainer: Trainer, record: dict) -> None:
        """Keep an evaluation's val loss for the bar."""
        if record.get("val_loss") is not None:
            self.val = f" val {record['val_loss']:.3f}"

    def close(self) -> None:
        """Close the bar (the CLI calls it however training ends)."""
        if self.bar is not None:
            self.bar.close()


class Trainer:
    """Runs `phases` over `model` with the settings of a TrainingConfig.

    ``run()`` trains to the end or until ``request_stop()``; ``state_dict()`` /
    ``load_state_dict()`` carry the optimizer, the position and the RNG (shuffling and
    windows). ``step`` is the TrainStep.

    With `comm` (rustgpt.comm) this is one process of a data-parallel run: every process
    draws the same global batches from the same RNG and trains on its rows of each
    (rank_rows); the step sums the gradients; evaluations are split and summed the same
    way; a stop requested in any process stops all of them after the same step. The
    results do not depend on the number of processes (to float rounding)."""

    def __init__(self, model: LLM, config: TrainingConfig, phases: Sequence[Phase | TextPhase],
                 callbacks: Sequence[Callback] = (), comm: SingleProcess | None = None) -> None:
        self.model = model
        self.config = config
        self.phases = list(phases)
        self.callbacks = list(callbacks)
        self.optimizer = Adam(model.params, config.beta1, config.beta2, config.eps,
                              config.weight_decay)
        self.comm = comm or SingleProcess()
        self.step = TrainStep(model, self.optimizer, config.max_grad_norm, comm=self.comm,
                              precision=config.precision)
        self.step.threads.enabled = config.adaptive_threads
        self.rng = np.random.default_rng(config.seed)
        self.position = Position()
        self.last_loss = math.nan  # of the latest step
        self.epoch_loss = math.nan  # mean over the latest finished epoch
        self.val_loss = math.nan  # of the latest evaluation (text phases)
        self._stop = False
        self._epoch_losses: list[float] = []
        self._epoch_tokens = 0
        self._epoch_start = time.perf_counter()

    # ---- schedule ---------------------------------------------------------------------------

    def batches_per_epoch(self, phase: Phase | TextPhase) -> int:
        """Steps in one full epoch of `phase` (an example phase's last batch may be short;
        a text phase's last epoch may have fewer steps, see steps_in_epoch)."""
        if isinstance(phase, TextPhase):
            return phase.eval_interval
        return math.ceil(len(phase.sequences) / self.config.batch_size)

    def steps_in_epoch(self, phase: Phase | TextPhase, epoch: int) -> int:
        """Steps in epoch `epoch` (from 0) of `phase`."""
        if isinstance(phase, TextPhase):
            return min(phase.eval_interval, phase.iters - epoch * phase.eval_interval)
        return self.batches_per_epoch(phase)

    def phase_steps(self, phase: Phase | TextPhase) -> int:
        """Steps of the whole phase."""
        if isinstance(phase, TextPhase):
            return phase.iters
        return phase.epochs * self.batches_per_epoch(phase)

    def lr_at(self, phase: Phase, step_in_phase: int) -> float:
        """Constant (RustGPT), or linear warmup then cosine decay to 10% over the phase."""
        if self.config.schedule == "constant":
            return phase.lr
        warmup = self.config.warmup_steps
        if step_in_phase < warmup:
            return phase.lr * (step_in_phase + 1) / warmup
        total = max(self.phase_steps(phase) - warmup, 1)
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
        """Steps of the whole schedule, every phase's."""
        return sum(self.phase_steps(p) for p in self.phases)

    def epochs_due(self, every: int) -> bool:
        """At an epoch end (``on_epoch_end``): whether the epochs done in this phase are a
        multiple of `every`, or all of its epochs; in a text phase, at every evaluation.
        For callbacks that save every `every` epochs and at each phase's end."""
        if isinstance(self.phases[self.position.phase], TextPhase):
            return True
        done = self.position.epoch
        return done % every == 0 or done == self.phases[self.position.phase].epochs

    def reopen_phases(self, epochs_before: Sequence[int]) -> None:
        """After ``load_state_dict``, when the phases' epochs (a text phase: its iters)
        differ from those the run was saved with (`epochs_before`, per phase): if the phase
        that ended last now has more and the next has not begun, training goes back to it,
        so ``run()`` trains the new ones. (A phase lowered below what it has done ends at
        once.) Earlier phases cannot grow: a warning says their new epochs are not
        trained."""
        pos = self.position
        last = pos.phase - 1
        if last >= 0 and pos.epoch == pos.batch == 0 and \
                _length(self.phases[last]) > epochs_before[last]:
            phase, done = self.phases[last], epochs_before[last]
            pos.phase, pos.order = last, None
            if isinstance(phase, TextPhase):  # back into the epoch that step `done` is in
                pos.epoch, pos.batch = divmod(done, phase.eval_interval)
            else:
                pos.epoch = done
        for phase, before in zip(self.phases[:pos.phase], epochs_before):
            if _length(phase) > before:
                log.warning("%s phase is over (after %d epochs): its %d epochs now are not "
                            "trained", phase.name, before, phase.epochs)

    def run(self) -> bool:
        """Train from the current position. Returns True when every phase is done, False
        when stopped early by request_stop()."""
        pos, cfg = self.position, self.config
        self._stop = False
        while not self.finished:
            phase = self.phases[pos.phase]
            text = isinstance(phase, TextPhase)
            while pos.epoch < phase.epochs:
                if pos.order is None and not text:
                    n = len(phase.sequences)
                    pos.order = (self.rng.permutation(n) if cfg.shuffle else np.arange(n)).tolist()
                while pos.batch < self.steps_in_epoch(phase, pos.epoch):
                    if self._stopping():
                        self.model.settle()
                        return False
                    self._train_batch(phase)
                self._end_epoch(phase)
            for cb in self.callbacks:
                cb.on_phase_end(self, phase)
            pos.phase, pos.epoch = pos.phase + 1, 0
        for cb in self.callbacks:
            cb.on_train_end(self)
        return True

    def _stopping(self) -> bool:
        """Whether to stop before the next step: requested here, or in any process."""
        if self.comm.size == 1:
            return self._stop
        return bool(self.comm.sum([self._stop])[0])

    def _batches(self, phase: Phase | TextPhase) -> list[tuple[np.ndarray, np.ndarray]]:
        """The (inputs, targets) micro-batches of the next step: this process's rows of
        the global batch."""
        pos, bs = self.position, self.config.batch_size
        mine = rank_rows(bs, self.comm)
        if isinstance(phase, TextPhase):
            return [tuple(a[mine] for a in random_windows(phase.train, bs, phase.seq_len,
                                                          self.rng))
                    for _ in range(phase.grad_accum)]
        rows = pos.order[pos.batch * bs:(pos.batch + 1) * bs][mine]
        return [make_batch([phase.sequences[i] for i in rows])]

    def _train_batch(self, phase: Phase | TextPhase) -> None:
        pos = self.position
        batches = self._batches(phase)
        lr = self.lr_at(phase, pos.epoch * self.batches_per_epoch(phase) + pos.batch)
        start = time.perf_counter()
        # the update runs beside the next step's forward (TrainStep): on_step callbacks
        # that read model.params directly call model.settle() first
        loss, norm = self.step.run(batches, lr, defer=True,
                                   first_row=rank_rows(self.config.batch_size, self.comm).start)
        elapsed = time.perf_counter() - start
        tokens = self.step.last_targets
        pos.batch += 1
        pos.step += 1
        self.last_loss = loss
        self._epoch_losses.append(loss)
        self._epoch_tokens += tokens
        record = {"phase": phase.name, "epoch": pos.epoch + 1, "step": pos.step, "loss": loss,
                  "accuracy": self.step.last_correct / tokens, "grad_norm": norm, "lr": lr,
                  "tokens": tokens, "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0}
        if self.comm.size > 1:
            record["allreduce_s"] = self.step.comm_seconds
        for cb in self.callbacks:
            cb.on_step(self, record)

    def _end_epoch(self, phase: Phase | TextPhase) -> None:
        self.model.settle()
        pos = self.position
        elapsed = time.perf_counter() - self._epoch_start
        record = {"phase": phase.name, "epoch": pos.epoch + 1, "step": pos.step,
                  "loss": float(np.mean(self._epoch_losses)) if self._epoch_losses else math.nan,
                  "tokens_per_s": self._epoch_tokens / elapsed if elapsed > 0 else 0.0}
        self.epoch_loss = record["loss"]
        extra = {k: v for k, v in record.items() if k != "phase"}
        if isinstance(phase, TextPhase):
            self._evaluate(phase, record)
            extra.update(train_loss=record["train_loss"], val_loss=record["val_loss"])
            log.info("%s step %d/%d: train loss %.4f, val loss %.4f", phase.name, pos.step,
                     self.total_steps, record["train_loss"], record["val_loss"], extra=extra)
        else:
            # every 10th epoch and a phase's last at INFO, the rest at DEBUG
            level = logging.INFO if (pos.epoch + 1) % 10 == 0 or pos.epoch + 1 == phase.epochs \
                else logging.DEBUG
            log.log(level, "%s epoch %d/%d: loss %.4f", phase.name, pos.epoch + 1,
                    phase.epochs, record["loss"], extra=extra)
        self._epoch_losses, self._epoch_tokens, self._epoch_start = [], 0, time.perf_counter()
        pos.epoch, pos.batch, pos.order = pos.epoch + 1, 0, None
        for cb in self.callbacks:
            cb.on_epoch_end(self, record)

    def _evaluate(self, phase: TextPhase, record: dict) -> None:
        """Estimate the train and val losses into `record` (train_loss, val_loss): the same
        windows at every evaluation (an RNG of the run's seed, apart from the training's),
        so successive estimates differ by what the model learned."""
        for split, tokens in (("train", phase.train), ("val", phase.val)):
            rng = np.random.default_rng([self.config.seed, 1 + (split == "val")])
            record[f"{split}_loss"] = (
                estimate_loss(self.step.loss, tokens, phase.eval_iters, self.config.batch_size,
                              phase.seq_len, rng, self.comm)
                if len(tokens) > phase.seq_len else math.nan)
        self.val_loss = record["val_loss"]

    # ---- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Optimizer moments and step, position, RNG state, losses, the text phases' corpus
        keys (JSON-able but m, v)."""
        return {"optimizer": self.optimizer.state_dict(), "position": attrs.asdict(self.position),
                "rng": self.rng.bit_generator.state, "last_loss": self.last_loss,
                "epoch_loss": self.epoch_loss, "val_loss": self.val_loss,
                "epoch_losses": list(self._epoch_losses),
                "corpus": [p.corpus for p in self.phases if isinstance(p, TextPhase)]}

    def load_state_dict(self, state: dict) -> None:
        """Restore a state_dict (the model's weights are restored apart, by the caller).
        Raises ConfigError when the text phases read other tokens than the saved run's
        (another corpus, or another tokenizer)."""
        saved = state.get("corpus", [])
        now = [p.corpus for p in self.phases if isinstance(p, TextPhase)]
        if saved != now:
            raise ConfigError(f"the training text differs from the saved run's (tokens "
                              f"{', '.join(k[:12] for k in saved) or 'none'}, now "
                              f"{', '.join(k[:12] for k in now) or 'none'}): a run resumes "
                              f"on the same corpus and tokenizer; start a new run from its "
                              f"weights with --init-from")
        self.optimizer.load_state_dict(state["optimizer"])
        self.position = Position(**state["position"])
        self.rng.bit_generator.state = state["rng"]
        self.last_loss = state["last_loss"]
        self.epoch_loss = state["epoch_loss"]
        self.val_loss = state.get("val_loss", math.nan)
        self._epoch_losses = list(state.get("epoch_losses", []))
        self._epoch_tokens, self._epoch_start = 0, time.perf_counter()


def _length(phase: Phase | TextPhase) -> int:
    """What a phase's length is counted in: epochs (examples) or iters (text)."""
    return phase.iters if isinstance(phase, TextPhase) else phase.epochs


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
