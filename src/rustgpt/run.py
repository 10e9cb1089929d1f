"""build_run: a training run assembled from a Config, for the CLI and the library alike.

A run is its data (example files for RustGPT's two phases, or text corpora tokenized into
a cached token file), its tokenizer, its model, a Trainer and the callbacks that write its
checkpoints and metrics (and TensorBoard files) into the output directory. A new run
starts from the config (or from a checkpoint's weights: ``init_from``); a resumed run from
a checkpoint, taking from the config only the settings that may change.

    run = build_run(config)           # the output directory: config.checkpoint.directory
    run.trainer.run()
    run.recorder.write()              # metrics.csv / metrics.json, also written as it saves

``build_run`` only reads the output directory's files and writes none of them, except with
``overwrite``, which clears another run's files once everything else has been checked.
Two runs must not write one directory at once: the CLI holds fileio.DirectoryLock.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import attrs
import numpy as np

from rustgpt.checkpoint import Checkpoint, CheckpointCallback, CheckpointManager
from rustgpt.config import Config, from_dict, to_dict
from rustgpt.errors import ConfigError, SerializationError
from rustgpt.metrics import JSON_NAME, Metrics, MetricsCallback
from rustgpt.model import LLM
from rustgpt.training import Callback, Phase, TextPhase, Trainer, rustgpt_phases

if TYPE_CHECKING:
    from rustgpt.corpus import TokenFile
    from rustgpt.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# settings a resumed run takes from the config given; the rest are the checkpoint's
FIXED_ON_RESUME = {"model": None,
                   "data": ("pretraining_data", "chat_training_data", "long_examples", "text",
                            "tokenizer", "vocab_size", "val_fraction"),
                   "training": ("batch_size", "seed", "shuffle", "grad_accum")}


@attrs.define
class Run:
    """A training run, ready to ``trainer.run()``: its config (a resumed run's: the
    checkpoint's with the changes allowed), model, trainer, checkpoint manager, the
    callbacks that record metrics (``recorder``) and save checkpoints (``saver``), the
    checkpoint it resumed from (or None) and its corpus (a text run's TokenFile, or
    None)."""

    config: Config
    model: LLM
    trainer: Trainer
    manager: CheckpointManager
    recorder: MetricsCallback
    saver: CheckpointCallback
    resumed: Checkpoint | None = None
    corpus: TokenFile | None = None


def build_run(config: Config, *, resume: str | Path | None = None,
              init_from: str | Path | None = None, sources: Mapping[str, str] | None = None,
              overwrite: bool = False, callbacks: Sequence[Callback] = (),
              reduce: Callable[[np.ndarray], None] | None = None) -> Run:
    """The run `config` describes, writing into config.checkpoint.directory.

    resume: "latest" (the directory's newest checkpoint) or a checkpoint path: continue
    that run, taking from `config` only the settings named in `sources` (as load_config
    returns them) that may change; ConfigError names the ones that may not. init_from: a
    new run starting from a checkpoint's weights and tokenizer. overwrite: a new run may
    replace the run files of another in the directory (refused otherwise). callbacks: more
    Trainer callbacks, after the metrics and checkpoint ones. reduce: the TrainStep's
    gradient reduction (rustgpt.step). Raises LlmError subclasses for bad data, config,
    checkpoints or a directory that cannot be written."""
    if resume is not None and init_from is not None:
        raise ConfigError("resume continues a run and init_from starts a new one: pass one "
                          "of them")
    out = Path(config.checkpoint.directory)
    manager = CheckpointManager(out, config.checkpoint.keep_best, config.checkpoint.max_to_keep)
    resumed = start = None  # the checkpoint resumed from / whose weights start the run
    previous = []  # another run's files, deleted (overwrite) once this run can start
    if resume is not None:
        path = manager.latest() if resume == "latest" else CheckpointManager.resolve(resume)
        if path is None:
            raise SerializationError(f"{out}: no checkpoint to resume from")
        resumed = Checkpoint.load(path)
        config = resumed_config(resumed.config, config, sources or {}, path)
        log.info("resuming from %s at step %d", path, resumed.step)
    else:
        previous = manager.run_files()
        if previous and not overwrite:
            raise SerializationError(
                f"{out}: holds another run's files ({', '.join(p.name for p in previous[:3])}"
                f"{', ...' if len(previous) > 3 else ''}); continue that run with --resume, or "
                f"pass --overwrite to delete its checkpoints and metrics and start afresh")
        if init_from is not None:
            path = CheckpointManager.resolve(init_from)
            start = Checkpoint.load(path)
            config = initialized_config(start.config, config, sources or {}, path)
            log.info("starting from the weights of %s", path)
    if config.training.threads:
        from rustgpt import set_num_threads

        set_num_threads(config.training.threads)
    saved = resumed or start
    corpus = None
    if config.data.text:
        tokenizer, corpus, phases = _text_run(config, saved.tokenizer if saved else None)
    else:
        tokenizer, phases = _example_run(config, saved.tokenizer if saved else None)
    model = LLM(config.model, tokenizer, seed=config.training.seed)
    if start is not None:
        model.load_state_dict(start.weights)
    # an unwritable or full output fails now, not after an hour of training
    manager.prepare(checkpoint_bytes=3 * 4 * model.total_parameters())  # weights, m, v
    if previous:
        manager.clear()
        log.info("removed %d files of the previous run in %s", len(previous), out)
    metrics_file = out / JSON_NAME
    metrics = Metrics.from_json(metrics_file) if resumed and metrics_file.exists() else None
    # metrics are written when checkpoints are: a resumed run's metrics match its checkpoint
    every = config.checkpoint.every_epochs
    recorder = MetricsCallback(out, metrics, every)
    saver = CheckpointCallback(manager, config, every)
    trainer = Trainer(model, config.training, phases, [recorder, saver, *callbacks], reduce)
    if resumed is not None:
        resumed.restore(trainer)
        before = resumed.config.training
        trainer.reopen_phases([before.max_iters] if config.data.text else
                              [before.pretraining_epochs, before.instruction_epochs])
    log.info("model: %s parameters, vocabulary %d (%s)", f"{model.total_parameters():,}",
             tokenizer.size, tokenizer.kind)
    return Run(config, model, trainer, manager, recorder, saver, resumed, corpus)


def _example_run(config: Config, tokenizer: Tokenizer | None) -> tuple[Tokenizer, list[Phase]]:
    """RustGPT's two phases over the example files (bundled when unset), and the word
    tokenizer built from them (or the checkpoint's)."""
    from rustgpt.data import BUNDLED_CHAT, BUNDLED_PRETRAINING, Dataset
    from rustgpt.tokenizer import Vocab

    limit = config.data.max_file_mb * 2**20
    pre = Dataset.load(config.data.pretraining_data or BUNDLED_PRETRAINING, limit)
    chat = Dataset.load(config.data.chat_training_data or BUNDLED_CHAT, limit)
    if tokenizer is None:
        tokenizer = Vocab.from_texts(pre.examples + chat.examples)
    return tokenizer, rustgpt_phases(config.training, tokenizer, config.model.max_seq_len,
                                     pre, chat, config.data.long_examples)


def _text_run(config: Config, tokenizer: Tokenizer | None
              ) -> tuple[Tokenizer, TokenFile, list[TextPhase]]:
    """The text phase over the corpora of [data] text, tokenized into a cached token file,
    and its tokenizer: the checkpoint's, else [data] tokenizer (a kind trained on the
    corpus, or a tokenizer file)."""
    from rustgpt.corpus import TokenFile, cache_dir, find_sources, pieces, read_errors
    from rustgpt.tokenizer import KINDS, load_tokenizer

    data, training = config.data, config.training
    if tokenizer is None:
        spec = data.tokenizer
        if spec == "word":
            raise ConfigError("[data] tokenizer = 'word' is for example files; a text corpus "
                              "takes char, bpe or a tokenizer file")
        texts = pieces(find_sources(data.text), read_errors(spec)) if spec in KINDS else None
        tokenizer = load_tokenizer(spec, texts, data.vocab_size)
    corpus = TokenFile.build(data.text, tokenizer, cache_dir(data.token_cache))
    T = config.model.max_seq_len
    train, val = corpus.split(T, data.val_fraction)
    log.info("%s: %s tokens, %s for training, %s for validation", corpus.name,
             f"{len(corpus):,}", f"{len(train):,}", f"{len(val):,}")
    phase = TextPhase("text", train, val, training.max_iters, training.pretraining_lr, T,
                      training.eval_interval, training.eval_iters, training.grad_accum,
                      corpus.key)
    return tokenizer, corpus, [phase]


def _changes(saved: Config, given: Config, sources: Mapping[str, str],
             fixed: Mapping) -> tuple[dict, list[str]]:
    """`saved`'s settings as a dict with the ones `sources` names taken from `given`, and
    the refused changes ("[section] key (saved -> given)") of the settings in `fixed`
    (section -> keys, None for all of them)."""
    values, new = to_dict(saved), to_dict(given)
    refused = []
    for key in sources:
        section, name = key.split(".", 1)
        if new[section][name] == values[section][name]:
            continue
        if section in fixed and (fixed[section] is None or name in fixed[section]):
            refused.append(f"[{section}] {name} ({values[section][name]!r} -> "
                           f"{new[section][name]!r})")
        else:
            values[section][name] = new[section][name]
    for section in ("logging", "generation"):
        values[section] = new[section]  # how this invocation logs, not the run's
    values["checkpoint"]["directory"] = new["checkpoint"]["directory"]
    return values, refused


def resumed_config(saved: Config, given: Config, sources: Mapping[str, str], path) -> Config:
    """The config a resumed run continues with: the checkpoint's, with the settings given
    now (`sources`) that may change. Raises ConfigError naming each one that may not."""
    values, refused = _changes(saved, given, sources, FIXED_ON_RESUME)
    if refused:
        raise ConfigError(f"{path}: --resume cannot change {', '.join(refused)}; the "
                          f"checkpoint fixes them (a new run with --init-from {path} starts "
                          f"from its weights)")
    return from_dict(values, f"{path}: config")


def initialized_config(saved: Config, given: Config, sources: Mapping[str, str],
                       path) -> Config:
    """The config of a run started from a checkpoint's weights: the given one, with the
    checkpoint's model sizes. Raises ConfigError naming a model size given otherwise."""
    _, refused = _changes(saved, given, sources, {"model": None})
    refused = [r for r in refused if r.startswith("[model]")]
    if refused:
        raise ConfigError(f"{path}: --init-from cannot change {', '.join(refused)}; the "
                          f"weights fix the model's sizes")
    return attrs.evolve(given, model=saved.model)
