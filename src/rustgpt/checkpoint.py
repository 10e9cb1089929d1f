"""Checkpoints: one ``.safetensors`` file holding weights, optimizer moments and, as JSON in
the header metadata, config, tokenizer and training state. Written atomically (temporary
file, fsync, rename); read without executing anything; every defect is a SerializationError.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import numpy as np

from rustgpt import __version__
from rustgpt.config import Config, from_dict, to_dict
from rustgpt.data import json_kind
from rustgpt.errors import LlmError, SerializationError, ValidationError
from rustgpt.fileio import read_bytes, write_atomic
from rustgpt.metrics import CSV_NAME, JSON_NAME
from rustgpt.model import LLM, parameter_specs
from rustgpt.tokenizer import Tokenizer, tokenizer_from_dict
from rustgpt.training import Callback

if TYPE_CHECKING:
    from rustgpt.training import Trainer

FORMAT_VERSION = 2  # 2: the tokenizer of any kind ("tokenizer"); 1: a word list ("vocab")
READS = (1, 2)  # the format versions load() reads
_NAME = re.compile(r"^ckpt-(\d{8,})\.safetensors$")
BEST_NAME = "best.safetensors"
RUN_FILES = (CSV_NAME, JSON_NAME)  # written beside the checkpoints
# fileio.write_atomic's temporary files of checkpoints and metrics
STALE_PATTERNS = (".*.safetensors.*.tmp", ".metrics.*.tmp")


@attrs.define
class Checkpoint:
    """Everything needed to rebuild a model and resume its training exactly.

    weights: name -> float32 array (``blocks.0.attn.wq`` ...); optimizer: {"m", "v"} flat
    (P,) arrays and "t"; trainer: the Trainer's JSON-able state (position, RNG, losses);
    model_step: the step (or epoch) a checkpoint without trainer state is from, which
    names its file in a CheckpointManager."""

    weights: dict[str, np.ndarray]
    config: Config
    tokenizer: Tokenizer
    optimizer: dict | None = None
    trainer: dict | None = None
    loss: float = math.nan
    timestamp: float = attrs.field(factory=time.time)
    package_version: str = __version__
    format_version: int = FORMAT_VERSION
    model_step: int = 0

    @classmethod
    def from_model(cls, model: LLM, config: Config, loss: float = math.nan,
                   step: int = 0) -> Checkpoint:
        """The weights of `model` alone (no optimizer or position: it can be loaded and
        fine-tuned, not resumed), trained with `config` to `loss` after `step` steps (or
        epochs: the number names the file ``ckpt-<step>`` in a CheckpointManager)."""
        if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
            raise ValidationError(f"Checkpoint.from_model: step = {step!r}, expected an "
                                  f"integer >= 0")
        return cls(model.state_dict(), config, model.tokenizer, loss=loss, model_step=step)

    @classmethod
    def from_trainer(cls, trainer: Trainer, config: Config) -> Checkpoint:
        """Everything a resume needs: the weights, the optimizer's moments, the trainer's
        position, RNG and losses (the pending update applied first)."""
        state = trainer.state_dict()
        optimizer = state.pop("optimizer")
        # what "best" compares: the val loss of a text run, else the epoch's mean loss
        loss = next((x for x in (trainer.val_loss, trainer.epoch_loss) if math.isfinite(x)),
                    trainer.last_loss)
        return cls(trainer.model.state_dict(), config, trainer.model.tokenizer, optimizer=optimizer,
                   trainer=state, loss=loss)

    @property
    def step(self) -> int:
        """The training step of the weights (``model_step`` without trainer state)."""
        return int(self.trainer["position"]["step"]) if self.trainer else self.model_step

    @property
    def phase(self) -> int:
        """The training phase's index (0 without trainer state)."""
        return int(self.trainer["position"]["phase"]) if self.trainer else 0

    def build_model(self) -> LLM:
        """A ready LLM with these weights."""
        model = LLM(self.config.model, self.tokenizer)
        model.load_state_dict(self.weights)
        return model

    def restore(self, trainer: Trainer) -> None:
        """Put the weights, optimizer and position into `trainer` (built on the same config).
        Raises SerializationError when there is no training state, or its position lies
        outside the trainer's phases and data."""
        if self.optimizer is None or self.trainer is None:
            raise SerializationError("checkpoint holds no training state to resume from "
                                     "(it was saved from a model, not a trainer)")
        missing = [k for k in ("rng", "last_loss", "epoch_loss") if k not in self.trainer]
        if missing:
            raise SerializationError(f"checkpoint training state lacks {missing}, expected "
                                     f"the state of a Trainer")
        position = self.trainer["position"]
        phase, order = position["phase"], position["order"]
        if phase > len(trainer.phases):
            raise SerializationError(f"checkpoint position: phase {phase}, the trainer has "
                                     f"{len(trainer.phases)} phases")
        n = len(getattr(trainer.phases[phase], "sequences", ())) \
            if phase < len(trainer.phases) else 0
        if order is not None and any(i >= n for i in order):
            raise SerializationError(f"checkpoint position: the epoch's order holds example "
                                     f"{max(order)}, the phase has {n} examples")
        trainer.model.load_state_dict(self.weights)
        trainer.load_state_dict({**self.trainer, "optimizer": self.optimizer})

    # ---- file format ------------------------------------------------------------------------

    def _tensors(self) -> dict[str, np.ndarray]:
        tensors = {name: np.ascontiguousarray(w, np.float32) for name, w in self.weights.items()}
        if self.optimizer is not None:
            offset = 0
            for name, w in self.weights.items():  # the flat moments cut like the weights
                n = w.size
                for key in ("m", "v"):
                    flat = self.optimizer[key]
                    tensors[f"optim.{key}.{name}"] = np.ascontiguousarray(
                        flat[offset:offset + n].reshape(w.shape), np.float32)
                offset += n
        return tensors

    def _metadata(self) -> dict[str, str]:
        state = {"trainer": self.trainer, "loss": self.loss, "timestamp": self.timestamp,
                 "optimizer_t": None if self.optimizer is None else int(self.optimizer["t"]),
                 "step": self.model_step}
        return {"format": "rustgpt", "format_version": str(self.format_version),
                "package_version": self.package_version,
                "config": json.dumps(to_dict(self.config)),
                "tokenizer": json.dumps(self.tokenizer.to_dict()),
                "state": json.dumps(state, allow_nan=True)}

    def to_bytes(self) -> bytes:
        """The safetensors file's bytes (what save writes)."""
        from safetensors.numpy import save

        return save(self._tensors(), metadata=self._metadata())

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically: a crash mid-save leaves any previous file at `path` intact."""
        path = Path(path)
        write_atomic(path, self.to_bytes())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, allow_non_finite: bool = False) -> Checkpoint:
        """Read and validate a checkpoint file; raises SerializationError saying what is wrong,
        also for NaN or infinite values in a tensor unless `allow_non_finite` (to inspect a
        diverged run's weights)."""
        path = Path(path)
        tensors, meta = _read_safetensors(path)
        try:
            version = int(meta.get("format_version", ""))
        except ValueError:
            raise SerializationError(f"{path}: not a rustgpt checkpoint (its metadata has no "
                                     f"format_version; written by another program?)") from None
        if meta.get("format") != "rustgpt":
            raise SerializationError(f"{path}: not a rustgpt checkpoint (format "
                                     f"{meta.get('format')!r})")
        if version not in READS:
            raise SerializationError(f"{path}: checkpoint format version {version}, this rustgpt "
                                     f"({__version__}) reads versions {READS[0]} to {READS[-1]}")
        try:
            config = from_dict(json.loads(meta["config"]), f"{path}: config")
            tokenizer = tokenizer_from_dict(json.loads(meta["vocab" if version == 1 else
                                                           "tokenizer"]))
            state = json.loads(meta["state"])
        except (KeyError, json.JSONDecodeError, RecursionError) as err:
            raise SerializationError(f"{path}: damaged metadata ({err!r})") from err
        except LlmError as err:
            raise SerializationError(f"{path}: stored config or tokenizer is invalid: {err}") from err
        _check_state(path, state)
        weights, moments = {}, {"m": {}, "v": {}}
        for name, arr in tensors.items():
            parts = name.split(".", 2)
            if len(parts) == 3 and parts[0] == "optim" and parts[1] in moments:
                moments[parts[1]][parts[2]] = arr
            else:
                weights[name] = arr
        if config.model.num_layers > len(weights):  # before a table of that many blocks
            raise SerializationError(f"{path}: weights disagree with the stored config: "
                                     f"num_layers = {config.model.num_layers}, the file holds "
                                     f"{len(weights)} weight tensors")
        expected = _expected_shapes(config, tokenizer)
        _check_shapes(path, "weights", weights, expected)
        optimizer = None
        if state.get("optimizer_t") is not None:
            for key in ("m", "v"):
                _check_shapes(path, f"optimizer {key}", moments[key], expected)
            optimizer = {key: np.concatenate([moments[key][n].reshape(-1) for n in expected])
                         for key in ("m", "v")}
            optimizer["t"] = int(state["optimizer_t"])
        if not allow_non_finite:
            for name, arr in tensors.items():
                bad = arr.size - int(np.count_nonzero(np.isfinite(arr)))
                if bad:
                    raise SerializationError(
                        f"{path}: tensor {name} holds {bad:,} NaN or infinite values of "
                        f"{arr.size:,}, expected finite numbers (allow_non_finite=True loads "
                        f"it anyway)")
        return cls({n: weights[n] for n in expected}, config, tokenizer, optimizer, state["trainer"],
                   float(state["loss"]) if state.get("loss") is not None else math.nan,
                   float(state.get("timestamp", 0.0)), meta.get("package_version", "?"), version,
                   state.get("step", 0))

    def info(self) -> dict:
        """A summary for `rustgpt-cli info`. A run on text corpora counts evaluations
        (one every eval_interval steps) where RustGPT's schedule counts phases and epochs,
        and its loss is the val loss estimate."""
        trainer = self.trainer or {}
        position = trainer.get("position", {})
        text = bool(trainer.get("corpus"))
        val = text and _is_number(trainer.get("val_loss")) and math.isfinite(trainer["val_loss"])
        where = ({"evaluations": position.get("epoch")} if text else
                 {"phase": position.get("phase"), "epoch": position.get("epoch")})
        return {"format_version": self.format_version, "package_version": self.package_version,
                "saved": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.timestamp)),
                "parameters": int(sum(w.size for w in self.weights.values())),
                "val_loss" if val else "loss": self.loss, "step": self.step,
                **where, "has_optimizer_state": self.optimizer is not None}


def _read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from safetensors import SafetensorError
    from safetensors.numpy import load

    raw = read_bytes(path, SerializationError)
    try:
        tensors = load(raw)
        header_len = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + header_len])
    except (SafetensorError, ValueError, UnicodeDecodeError, RecursionError) as err:
        raise SerializationError(f"{path}: not a readable safetensors file "
                                 f"({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
                                 f"truncated or corrupted?") from err
    meta = header.get("__metadata__") or {}
    bad = [n for n, a in tensors.items() if a.dtype != np.float32]
    if bad:
        raise SerializationError(f"{path}: tensor {bad[0]} has dtype {tensors[bad[0]].dtype}, "
                                 f"expected float32")
    return tensors, meta


def _expected_shapes(config: Config, tokenizer: Tokenizer) -> dict[str, tuple[int, ...]]:
    return {name: shape for name, shape, _, _ in parameter_specs(config.model, tokenizer.size)}


def _check_shapes(path: Path, what: str, arrays: dict, expected: dict) -> None:
    missing = [n for n in expected if n not in arrays]
    extra = [n for n in arrays if n not in expected]
    if missing or extra:
        raise SerializationError(f"{path}: {what} disagree with the stored config: missing "
                                 f"{missing[:3]}, unexpected {extra[:3]}")
    for name, shape in expected.items():
        if arrays[name].shape != shape:
            raise SerializationError(f"{path}: {what} {name} has shape {arrays[name].shape}, "
                                     f"the stored config and vocabulary imply {shape}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_state(path: Path, state) -> None:
    """The `state` metadata holds what load and Trainer.load_state_dict read, of the types
    they read: {"trainer": null or {"position": {phase, epoch, batch, step: int >= 0, order:
    null or [int >= 0]}, and for a resume "rng": a numpy PCG64 state, "last_loss",
    "epoch_loss": number, "epoch_losses": [number]}, "loss": number or null, "optimizer_t":
    int in [0, 2**31) or null, "timestamp": number (optional)}. restore() checks that the fields a
    resume needs are there."""
    def check(ok: bool, where: str, value, expected: str) -> None:
        if not ok:
            container = isinstance(value, (dict, list))
            found = json_kind(value) if container else json.dumps(value)[:40]
            raise SerializationError(f"{path}: metadata state{where} is {found}, expected "
                                     f"{expected}")

    def field(parent: dict, where: str, key: str):
        if key not in parent:
            raise SerializationError(f"{path}: metadata state{where} has no {key!r}")
        return parent[key]

    check(isinstance(state, dict), "", state, "an object")
    check(state.get("loss") is None or _is_number(state["loss"]), ".loss", state.get("loss"),
          "a number or null")
    check(_is_number(state.get("timestamp", 0.0)), ".timestamp", state.get("timestamp"),
          "a number")
    check(_is_int(state.get("step", 0)), ".step", state.get("step"), "an integer >= 0")
    t = state.get("optimizer_t")
    check(t is None or _is_int(t) and t < 2**31, ".optimizer_t", t,
          "an integer in [0, 2**31) or null")  # the Adam kernel's step is a C int
    trainer = field(state, "", "trainer")
    if trainer is None:
        return
    check(isinstance(trainer, dict), ".trainer", trainer, "an object or null")
    position = field(trainer, ".trainer", "position")
    check(isinstance(position, dict), ".trainer.position", position, "an object")
    unknown = sorted(set(position) - {"phase", "epoch", "batch", "step", "order"})
    if unknown:
        raise SerializationError(f"{path}: metadata state.trainer.position has unknown "
                                 f"fields {unknown[:3]}")
    for key in ("phase", "epoch", "batch", "step"):
        value = field(position, ".trainer.position", key)
        check(_is_int(value), f".trainer.position.{key}", value, "an integer >= 0")
    order = field(position, ".trainer.position", "order")
    check(order is None or isinstance(order, list) and all(_is_int(i) for i in order),
          ".trainer.position.order", order, "an array of integers >= 0 or null")
    for key in ("last_loss", "epoch_loss"):
        value = trainer.get(key, 0.0)
        check(_is_number(value), f".trainer.{key}", value, "a number")
    losses = trainer.get("epoch_losses", [])
    check(isinstance(losses, list) and all(_is_number(x) for x in losses),
          ".trainer.epoch_losses", losses, "an array of numbers")
    if "rng" not in trainer:
        return
    rng = trainer["rng"]
    check(isinstance(rng, dict), ".trainer.rng", rng, "an object")
    try:
        np.random.PCG64().state = rng  # the Trainer's generator (default_rng)
    except (TypeError, ValueError, KeyError, OverflowError) as err:
        raise SerializationError(f"{path}: metadata state.trainer.rng is not a numpy PCG64 "
                                 f"state ({err})") from err


class CheckpointManager:
    """Checkpoints of one run in `directory`: ``ckpt-<step>.safetensors`` (the newest
    ``max_to_keep`` kept) and ``best.safetensors``, the lowest loss of the latest phase
    (losses of different phases are on different data, so a later phase always wins)."""

    def __init__(self, directory: str | os.PathLike, keep_best: bool = True,
                 max_to_keep: int = 5) -> None:
        self.directory = Path(directory)
        self.keep_best = keep_best
        self.max_to_keep = max_to_keep

    def prepare(self, checkpoint_bytes: int = 0) -> None:
        """Before training starts: create the directory, prove it writable, and check it has
        room for the checkpoints this manager keeps (each about `checkpoint_bytes`, plus one
        being written)."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=self.directory, prefix=".probe-")
            probe.close()
            free = shutil.disk_usage(self.directory).free
        except OSError as err:
            raise SerializationError(f"{self.directory}: cannot write checkpoints here "
                                     f"({err.strerror or err})") from err
        need = checkpoint_bytes * (self.max_to_keep + 1 + self.keep_best)
        if need > free:
            raise SerializationError(f"{self.directory}: {free / 2**20:,.0f} MB free, the "
                                     f"checkpoints need about {need / 2**20:,.0f} MB "
                                     f"({self.max_to_keep} kept + best + one being written)")

    def run_files(self) -> list[Path]:
        """The files a run leaves here: step checkpoints, best, metrics."""
        if not self.directory.is_dir():
            return []
        others = [self.directory / name for name in (BEST_NAME, *RUN_FILES)]
        return self.checkpoints() + [p for p in others if p.is_file()]

    def clear(self) -> None:
        """Delete run_files() (and only those)."""
        try:
            for path in self.run_files():
                path.unlink(missing_ok=True)
        except OSError as err:
            raise SerializationError(f"{self.directory}: cannot delete the previous run's "
                                     f"files ({err.strerror or err})") from err

    def remove_stale(self) -> None:
        """Remove the temporary files of writers killed mid-save. Only while holding the
        directory's lock (fileio.DirectoryLock): a live writer's file is not stale."""
        for pattern in STALE_PATTERNS:
            for stale in self.directory.glob(pattern):
                stale.unlink(missing_ok=True)

    def checkpoints(self) -> list[Path]:
        """Step checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir()
                 if (m := _NAME.match(p.name))]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        """The step checkpoint of the highest step; None if there is none."""
        found = self.checkpoints()
        return found[-1] if found else None

    def best(self) -> Path | None:
        """best.safetensors if kept, else the latest checkpoint."""
        best = self.directory / BEST_NAME
        return best if best.is_file() else self.latest()

    def save(self, checkpoint: Checkpoint) -> Path:
        """Write ``ckpt-<step>`` (``checkpoint.step``: a step number names one file, so a
        second save at a step replaces the first), update best, prune the oldest beyond
        max_to_keep."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise SerializationError(f"{self.directory}: cannot write checkpoints here "
                                     f"({err.strerror or err})") from err
        data = checkpoint.to_bytes()
        path = self.directory / f"ckpt-{checkpoint.step:08d}.safetensors"
        write_atomic(path, data)
        if self.keep_best and self._is_better(checkpoint):
            write_atomic(self.directory / BEST_NAME, data)
        for old in self.checkpoints()[:-self.max_to_keep]:
            old.unlink(missing_ok=True)
        return path

    def _is_better(self, checkpoint: Checkpoint) -> bool:
        if not math.isfinite(checkpoint.loss):
            return False
        best = self.directory / BEST_NAME
        if not best.is_file():
            return True
        try:
            current = Checkpoint.load(best)
        except SerializationError:
            return True  # a damaged best is replaced
        return (checkpoint.phase, -checkpoint.loss) > (current.phase, -current.loss)

    @staticmethod
    def resolve(path: str | os.PathLike) -> Path:
        """A checkpoint file: `path` itself, or for a directory its best checkpoint."""
        path = Path(path)
        if path.is_dir():
            found = CheckpointManager(path).best()
            if found is None:
                raise SerializationError(f"{path}: no checkpoint in this directory; train one "
                                         f"first with `rustgpt-cli train --output {path}`")
            return found
        if not path.exists():
            raise SerializationError(f"{path}: no such checkpoint")
        return path


def load(path: str | os.PathLike = "checkpoints", allow_non_finite: bool = False) -> LLM:
    """A ready model from a checkpoint file or directory (its best checkpoint); NaN or
    infinite weights are refused unless `allow_non_finite` (see Checkpoint.load)."""
    return Checkpoint.load(CheckpointManager.resolve(path), allow_non_finite).build_model()


class CheckpointCallback(Callback):
    """Saves through a CheckpointManager every `every_epochs` epochs and at each phase's end."""

    def __init__(self, manager: CheckpointManager, config: Config, every_epochs: int) -> None:
        self.manager = manager
        self.config = config
        self.every_epochs = every_epochs
        self.saved: Path | None = None

    def on_epoch_end(self, trainer: Trainer, record: dict) -> None:
        """Save when the epoch is due (``Trainer.epochs_due``)."""
        if trainer.epochs_due(self.every_epochs):
            self.save(trainer)

    def save(self, trainer: Trainer) -> Path:
        """Save the trainer's state now; returns the checkpoint's path."""
        self.saved = self.manager.save(Checkpoint.from_trainer(trainer, self.config))
        return self.saved
