"""Training metrics: per-step loss, accuracy, gradient norm, lr and throughput; summaries,
warnings on exploding gradients or a non-finite loss, and atomic CSV / JSON export.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from pathlib import Path

from rustgpt.errors import SerializationError, ValidationError
from rustgpt.fileio import write_atomic
from rustgpt.training import Callback, Trainer

log = logging.getLogger(__name__)

# train_loss and val_loss: a text run's estimates, at the steps that end with an evaluation;
# allreduce_s: the seconds a data-parallel step spent summing over the processes
FIELDS = ("step", "phase", "loss", "grad_norm", "lr", "tokens_per_s", "accuracy",
          "train_loss", "val_loss", "allreduce_s")
CSV_NAME, JSON_NAME = "metrics.csv", "metrics.json"  # MetricsCallback's files in a run's directory
_SPIKE_RATIO = 10.0  # a norm this many times the running average is a spike ...
_SPIKE_AFTER = 10    # ... once this many norms make the average meaningful


class Metrics:
    """Per-step training metrics: one row (a dict of FIELDS) per step, kept in memory.

    Each ``record_*`` takes an optional ``step``: without one, a loss opens the next step and
    the other values attach to the latest step. Exploding gradient norms and NaN/inf losses
    are logged as warnings on ``rustgpt.metrics``; the trainer decides whether to stop.
    """

    def __init__(self, explode_threshold: float = 100.0) -> None:
        if not explode_threshold > 0:
            raise ValidationError(f"Metrics: explode_threshold = {explode_threshold}, expected > 0")
        self.explode_threshold = explode_threshold
        self._rows: dict[int, dict] = {}
        self._last_step = 0
        self._norm_sum = 0.0  # finite gradient norms so far, for the running average
        self._norm_count = 0

    def __len__(self) -> int:
        return len(self._rows)

    def _row(self, step: int | None, new: bool = False) -> dict:
        if step is None:
            step = self._last_step + 1 if new or not self._rows else self._last_step
        self._last_step = step = int(step)
        if step not in self._rows:
            self._rows[step] = dict.fromkeys(FIELDS) | {"step": step}
        return self._rows[step]

    # ---- recording --------------------------------------------------------------------------

    def record_loss(self, loss: float, step: int | None = None, phase: str | None = None) -> None:
        """Record the training loss (mean cross-entropy, nats per token)."""
        row = self._row(step, new=True)
        row["loss"] = loss = float(loss)
        if phase is not None:
            row["phase"] = str(phase)
        if not math.isfinite(loss):
            log.warning("step %d: loss is %s", row["step"], loss)

    def record_accuracy(self, acc: float, step: int | None = None) -> None:
        """Record next-token accuracy; raises ValidationError outside [0, 1]."""
        acc = float(acc)
        if not 0.0 <= acc <= 1.0:
            raise ValidationError(f"record_accuracy: accuracy {acc} is outside [0, 1]")
        self._row(step)["accuracy"] = acc

    def record_gradient_norm(self, norm: float, step: int | None = None) -> None:
        """Record the global gradient L2 norm (before clipping)."""
        row = self._row(step)
        row["grad_norm"] = norm = float(norm)
        if not math.isfinite(norm):
            log.warning("step %d: gradient norm is %s", row["step"], norm)
            return
        avg = self._norm_sum / self._norm_count if self._norm_count else math.nan
        if norm > self.explode_threshold:
            log.warning("step %d: gradient norm %.4g exceeds %.4g (exploding gradients)",
                        row["step"], norm, self.explode_threshold)
        elif self._norm_count >= _SPIKE_AFTER and norm > _SPIKE_RATIO * avg:
            log.warning("step %d: gradient norm %.4g is over %gx the running average %.4g",
                        row["step"], norm, _SPIKE_RATIO, avg)
        self._norm_sum += norm
        self._norm_count += 1

    def record_learning_rate(self, lr: float, step: int | None = None) -> None:
        """Record the learning rate used for the step."""
        self._row(step)["lr"] = float(lr)

    def record_tokens_per_s(self, tps: float, step: int | None = None) -> None:
        """Record throughput in target tokens per second."""
        self._row(step)["tokens_per_s"] = float(tps)

    def record_evaluation(self, train_loss: float, val_loss: float,
                          step: int | None = None) -> None:
        """Record the estimated train and val losses (no dropout, no gradients) after a
        step."""
        row = self._row(step)
        row["train_loss"], row["val_loss"] = float(train_loss), float(val_loss)

    def record_step(self, record: dict) -> None:
        """Record the known fields of a trainer step record (phase, step, loss, grad_norm, lr,
        tokens_per_s, accuracy, allreduce_s); other keys are ignored."""
        step = record.get("step", self._last_step + 1)
        if record.get("phase") is not None:
            self._row(step)["phase"] = str(record["phase"])
        if record.get("allreduce_s") is not None:
            self._row(step)["allreduce_s"] = float(record["allreduce_s"])
        for key, record_value in (("loss", self.record_loss),
                                  ("grad_norm", self.record_gradient_norm),
                                  ("lr", self.record_learning_rate),
                                  ("tokens_per_s", self.record_tokens_per_s),
                                  ("accuracy", self.record_accuracy)):
            if record.get(key) is not None:
                record_value(record[key], step=step)

    # ---- summaries --------------------------------------------------------------------------

    def rows(self) -> list[dict]:
        """A copy of the per-step rows, in recording order."""
        return [dict(row) for row in self._rows.values()]

    def _series(self, key: str) -> list[float]:
        return [row[key] for row in self._rows.values() if row[key] is not None]

    def avg_loss(self, last_n: int | None = None) -> float | None:
        """Mean loss over the last `last_n` recorded losses (all if None); None if none."""
        return _mean(_tail(self._series("loss"), last_n))

    def latest_loss(self) -> float | None:
        """The last recorded loss; None if none."""
        losses = self._series("loss")
        return losses[-1] if losses else None

    def loss_trend(self, window: int = 50, tolerance: float = 0.01) -> str:
        """Direction of the last `window` losses: "decreasing", "increasing" or "flat", from the
        relative change of the second half's mean vs the first half's, against `tolerance`.
        "flat" with fewer than 4 losses."""
        losses = _tail(self._series("loss"), window)
        half = len(losses) // 2
        if half < 2:
            return "flat"
        before, after = _mean(losses[:half]), _mean(losses[-half:])
        change = (after - before) / (abs(before) or 1.0)
        if change < -tolerance:
            return "decreasing"
        if change > tolerance:
            return "increasing"
        return "flat"

    def avg_gradient_norm(self, last_n: int | None = None) -> float | None:
        """Mean gradient norm over the last `last_n` recorded norms (all if None); None if none."""
        return _mean(_tail(self._series("grad_norm"), last_n))

    def summary(self) -> dict:
        """Steps recorded, latest and mean loss, latest and best val loss (text runs), loss
        trend, mean gradient norm and throughput, latest accuracy (None where nothing was
        recorded)."""
        accuracy, val = self._series("accuracy"), self._series("val_loss")
        return {"steps": len(self._rows), "latest_loss": self.latest_loss(),
                "latest_val_loss": val[-1] if val else None,
                "best_val_loss": min(val) if val else None,
                "avg_loss": self.avg_loss(), "loss_trend": self.loss_trend(),
                "avg_gradient_norm": self.avg_gradient_norm(),
                "avg_tokens_per_s": _mean(self._series("tokens_per_s")),
                "latest_accuracy": accuracy[-1] if accuracy else None}

    # ---- files ------------------------------------------------------------------------------

    def to_csv(self, path: str | os.PathLike | None = None) -> str | None:
        """One row per step, columns FIELDS, an empty cell where a value is missing: written
        to `path` (atomically; SerializationError if it cannot be), or returned as text when
        no path is given."""
        out = io.StringIO(newline="")
        writer = csv.writer(out)  # writes None as an empty cell
        writer.writerow(FIELDS)
        writer.writerows([row[k] for k in FIELDS] for row in self._rows.values())
        return _write_or_return(out.getvalue(), path)

    def to_json(self, path: str | os.PathLike | None = None) -> str | None:
        """{"steps": [row, ...], "summary": {...}}, missing values as null: written to `path`
        (atomically; SerializationError if it cannot be), or returned as text when no path
        is given."""
        data = {"steps": list(self._rows.values()), "summary": self.summary()}
        return _write_or_return(json.dumps(data), path)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> Metrics:
        """Read back a file written by to_json (no warnings are logged again).
        Raises SerializationError if it cannot be read or is not a metrics file."""
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except OSError as err:
            raise SerializationError(f"{path}: cannot read ({err.strerror or err})") from err
        except ValueError as err:
            raise SerializationError(f"{path}: not valid JSON ({err})") from err
        metrics = cls()
        try:
            for row in data["steps"]:
                metrics._row(int(row["step"])).update({k: row.get(k) for k in FIELDS[1:]})
        except (KeyError, TypeError, ValueError) as err:
            raise SerializationError(
                f'{path}: expected {{"steps": [rows with a "step"]}} ({err!r})') from err
        norms = [n for n in metrics._series("grad_norm") if math.isfinite(n)]
        metrics._norm_sum, metrics._norm_count = math.fsum(norms), len(norms)
        return metrics


class MetricsCallback(Callback):
    """Feeds a Metrics from the trainer's step records and writes ``metrics.csv`` and
    ``metrics.json`` into `out_dir` every `every_epochs` epochs, at each phase's end and at
    train end (as CheckpointCallback saves, given the same `every_epochs`).

    Each write rewrites both files whole, every step so far: writing them at every epoch
    end of a long run would cost more than the training (the default schedule's 200 epochs,
    21,200 steps: 23 s of writes against 11 s of steps). Pass
    ``Metrics.from_json(out_dir / "metrics.json")`` as `metrics` to continue a resumed run."""

    def __init__(self, out_dir: str | os.PathLike, metrics: Metrics | None = None,
                 every_epochs: int = 1) -> None:
        if not every_epochs >= 1:
            raise ValidationError(f"MetricsCallback: every_epochs = {every_epochs}, expected >= 1")
        self.out_dir = Path(out_dir)
        self.metrics = metrics if metrics is not None else Metrics()
        self.every_epochs = every_epochs

    def on_step(self, trainer: Trainer, record: dict) -> None:
        """Record the step."""
        self.metrics.record_step(record)

    def on_epoch_end(self, trainer: Trainer, record: dict) -> None:
        """Record an evaluation's losses, if the epoch ended with one; write the files when
        the epoch is due (see the class docstring)."""
        if record.get("val_loss") is not None:
            self.metrics.record_evaluation(record["train_loss"], record["val_loss"],
                                           record["step"])
        if trainer.epochs_due(self.every_epochs):
            self.write()

    def on_train_end(self, trainer: Trainer) -> None:
        """Write the files."""
        self.write()

    def write(self) -> None:
        """Write both files, creating `out_dir`; raises SerializationError on failure."""
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise SerializationError(
                f"{self.out_dir}: cannot create directory ({err.strerror or err})") from err
        self.metrics.to_csv(self.out_dir / CSV_NAME)
        self.metrics.to_json(self.out_dir / JSON_NAME)


def _write_or_return(text: str, path: str | os.PathLike | None) -> str | None:
    if path is None:
        return text
    write_atomic(path, text.encode("utf-8"))
    return None


def _tail(values: list[float], last_n: int | None) -> list[float]:
    if last_n is None:
        return values
    if last_n < 1:
        raise ValidationError(f"last_n = {last_n}, expected >= 1")
    return values[-last_n:]


def _mean(values: list[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def plot(metrics: Metrics, path: str | os.PathLike) -> Path:
    """Draw loss per phase, learning rate and gradient norm against step into a PNG.
    Needs matplotlib (``pip install 'rustgpt[plot]'``); without it a ValidationError says so."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValidationError("plotting needs matplotlib: pip install 'rustgpt[plot]'") from None
    rows = metrics.rows()
    fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    for phase in dict.fromkeys(r["phase"] for r in rows):
        mine = [r for r in rows if r["phase"] == phase and r["loss"] is not None]
        axes[0].plot([r["step"] for r in mine], [r["loss"] for r in mine], label=phase or "loss")
    axes[0].set_ylabel("loss")
    axes[0].legend()
    for ax, key, label in ((axes[1], "lr", "learning rate"), (axes[2], "grad_norm", "gradient norm")):
        mine = [r for r in rows if r[key] is not None]
        ax.plot([r["step"] for r in mine], [r[key] for r in mine])
        ax.set_ylabel(label)
    axes[2].set_xlabel("step")
    fig.tight_layout()
    path = Path(path)
    try:
        fig.savefig(path, format="png")
    except OSError as err:
        raise SerializationError(f"{path}: cannot write ({err.strerror or err})") from err
    finally:
        plt.close(fig)
    return path
