"""Checkpoints: one ``.safetensors`` file holding weights, optimizer moments and, as JSON in
the header metadata, config, vocabulary and training state. Written atomically (temporary
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
from rustgpt.errors import LlmError, SerializationError
from rustgpt.fileio import read_bytes, write_atomic
from rustgpt.model import LLM, parameter_specs
from rustgpt.tokenizer import Vocab
from rustgpt.training import Callback

if TYPE_CHECKING:
    from rustgpt.training import Trainer

FORMAT_VERSION = 1
_NAME = re.compile(r"^ckpt-(\d{8,})\.safetensors$")
BEST_NAME = "best.safetensors"


@attrs.define
class Checkpoint:
    """Everything needed to rebuild a model and resume its training exactly.

    weights: name -> float32 array (``blocks.0.attn.wq`` ...); optimizer: {"m", "v"} flat
    (P,) arrays and "t"; trainer: the Trainer's JSON-able state (position, RNG, losses)."""

    weights: dict[str, np.ndarray]
    config: Config
    vocab: Vocab
    optimizer: dict | None = None
    trainer: dict | None = None
    loss: float = math.nan
    timestamp: float = attrs.field(factory=time.time)
    package_version: str = __version__
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_model(cls, model: LLM, config: Config, loss: float = math.nan) -> Checkpoint:
        return cls(model.state_dict(), config, model.vocab, loss=loss)

    @classmethod
    def from_trainer(cls, trainer: Trainer, config: Config) -> Checkpoint:
        state = trainer.state_dict()
        optimizer = state.pop("optimizer")
        loss = trainer.epoch_loss if math.isfinite(trainer.epoch_loss) else trainer.last_loss
        return cls(trainer.model.state_dict(), config, trainer.model.vocab, optimizer=optimizer,
                   trainer=state, loss=loss)

    @property
    def step(self) -> int:
        return int(self.trainer["position"]["step"]) if self.trainer else 0

    @property
    def phase(self) -> int:
        return int(self.trainer["position"]["phase"]) if self.trainer else 0

    def build_model(self) -> LLM:
        """A ready LLM with these weights."""
        model = LLM(self.config.model, self.vocab)
        model.load_state_dict(self.weights)
        return model

    def restore(self, trainer: Trainer) -> None:
        """Put the weights, optimizer and position into `trainer` (built on the same config)."""
        if self.optimizer is None or self.trainer is None:
            raise SerializationError("checkpoint holds no training state to resume from "
                                     "(it was saved from a model, not a trainer)")
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
                 "optimizer_t": None if self.optimizer is None else int(self.optimizer["t"])}
        return {"format": "rustgpt", "format_version": str(self.format_version),
                "package_version": self.package_version,
                "config": json.dumps(to_dict(self.config)),
                "vocab": json.dumps(self.vocab.to_dict()),
                "state": json.dumps(state, allow_nan=True)}

    def to_bytes(self) -> bytes:
        from safetensors.numpy import save

        return save(self._tensors(), metadata=self._metadata())

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically: a crash mid-save leaves any previous file at `path` intact."""
        path = Path(path)
        write_atomic(path, self.to_bytes())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Checkpoint:
        """Read and validate a checkpoint file; raises SerializationError saying what is wrong."""
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
        if version != FORMAT_VERSION:
            raise SerializationError(f"{path}: checkpoint format version {version}, this rustgpt "
                                     f"({__version__}) reads version {FORMAT_VERSION}")
        try:
            config = from_dict(json.loads(meta["config"]), f"{path}: config")
            vocab = Vocab.from_dict(json.loads(meta["vocab"]))
            state = json.loads(meta["state"])
        except (KeyError, json.JSONDecodeError) as err:
            raise SerializationError(f"{path}: damaged metadata ({err!r})") from err
        except LlmError as err:
            raise SerializationError(f"{path}: stored config or vocabulary is invalid: {err}") from err
        weights, moments = {}, {"m": {}, "v": {}}
        for name, arr in tensors.items():
            if name.startswith("optim."):
                _, key, pname = name.split(".", 2)
                moments.setdefault(key, {})[pname] = arr
            else:
                weights[name] = arr
        expected = _expected_shapes(config, vocab)
        _check_shapes(path, "weights", weights, expected)
        optimizer = None
        if state.get("optimizer_t") is not None:
            for key in ("m", "v"):
                _check_shapes(path, f"optimizer {key}", moments[key], expected)
            optimizer = {key: np.concatenate([moments[key][n].reshape(-1) for n in expected])
                         for key in ("m", "v")}
            optimizer["t"] = int(state["optimizer_t"])
        return cls({n: weights[n] for n in expected}, config, vocab, optimizer, state["trainer"],
                   float(state["loss"]) if state.get("loss") is not None else math.nan,
                   float(state.get("timestamp", 0.0)), meta.get("package_version", "?"), version)

    def info(self) -> dict:
        """A summary for `rustgpt-cli info`."""
        position = (self.trainer or {}).get("position", {})
        return {"format_version": self.format_version, "package_version": self.package_version,
                "saved": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.timestamp)),
                "parameters": int(sum(w.size for w in self.weights.values())),
                "loss": self.loss, "step": position.get("step", 0),
                "phase": position.get("phase"), "epoch": position.get("epoch"),
                "has_optimizer_state": self.optimizer is not None}


def _read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from safetensors import SafetensorError
    from safetensors.numpy import load

    raw = read_bytes(path, SerializationError)
    try:
        tensors = load(raw)
        header_len = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + header_len])
    except (SafetensorError, ValueError, UnicodeDecodeError) as err:
        raise SerializationError(f"{path}: not a readable safetensors file "
                                 f"({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
                                 f"truncated or corrupted?") from err
    meta = header.get("__metadata__") or {}
    bad = [n for n, a in tensors.items() if a.dtype != np.float32]
    if bad:
        raise SerializationError(f"{path}: tensor {bad[0]} has dtype {tensors[bad[0]].dtype}, "
                                 f"expected float32")
    return tensors, meta


def _expected_shapes(config: Config, vocab: Vocab) -> dict[str, tuple[int, ...]]:
    return {name: shape for name, shape, _, _ in parameter_specs(config.model, vocab.size)}


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
        """Before training starts: create the directory, prove it writable, check it has room
        for the checkpoints this manager keeps (each about `checkpoint_bytes`, plus one being
        written), and remove the temporary files of writers that were killed mid-save."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            for stale in self.directory.glob(".*.safetensors.*.tmp"):
                stale.unlink(missing_ok=True)
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

    def checkpoints(self) -> list[Path]:
        """Step checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir()
                 if (m := _NAME.match(p.name))]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def best(self) -> Path | None:
        """best.safetensors if kept, else the latest checkpoint."""
        best = self.directory / BEST_NAME
        return best if best.is_file() else self.latest()

    def save(self, checkpoint: Checkpoint) -> Path:
        """Write ``ckpt-<step>``, update best, prune the oldest beyond max_to_keep."""
        self.prepare()
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


def load(path: str | os.PathLike = "checkpoints") -> LLM:
    """A ready model from a checkpoint file or directory (its best checkpoint)."""
    return Checkpoint.load(CheckpointManager.resolve(path)).build_model()


class CheckpointCallback(Callback):
    """Saves through a CheckpointManager every `every_epochs` epochs and at each phase's end."""

    def __init__(self, manager: CheckpointManager, config: Config, every_epochs: int) -> None:
        self.manager = manager
        self.config = config
        self.every_epochs = every_epochs
        self.saved: Path | None = None

    def on_epoch_end(self, trainer: Trainer, record: dict) -> None:
        if trainer.epochs_due(self.every_epochs):
            self.save(trainer)

    def save(self, trainer: Trainer) -> Path:
        self.saved = self.manager.save(Checkpoint.from_trainer(trainer, self.config))
        return self.saved
