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

A data-parallel run (``comm``: rustgpt.comm) is built in every process: the processes
read the same data and checkpoint; rank 0 tokenizes a corpus first and shares its
tokenizer; all start from rank 0's weights; only rank 0 writes (its callbacks), and at
every checkpoint the processes compare their weights.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import attrs

from rustgpt.checkpoint import Checkpoint, CheckpointCallback, CheckpointManager
from rustgpt.comm import SingleProcess
from rustgpt.config import Config, from_dict, to_dict
from rustgpt.errors import ConfigError, SerializationError, TrainingError
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


class WeightsCheck(Callback):
    """Compares a digest of the weights across the processes of a data-parallel run
    whenever a checkpoint is due (before it is written): they must not drift apart."""

    def __init__(self, comm: SingleProcess, every_epochs: int) -> None:
        self.comm = comm
        self.every_epochs = every_epochs

    def on_epoch_end(self, trainer: Trainer, record: dict) -> None:
        """Raise TrainingError when another process holds other weights."""
        if trainer.epochs_due(self.every_epochs):
            self.check(trainer)

    def check(self, trainer: Trainer) -> None:
        """Compare now; raise TrainingError naming the processes that differ from rank 0."""
        trainer.model.settle()
        digest = hashlib.sha256(trainer.model.params.data.tobytes()).hexdigest()
        digests = self.comm.gather(digest)
        differ = [rank for rank, d in enumerate(digests) if d != digests[0]]
        if differ:
            raise TrainingError(f"step {trainer.position.step}: the weights of rank"
                                f"{'s' if len(differ) > 1 else ''} "
                                f"{', '.join(map(str, differ))} differ from rank 0's "
                                f"(sha256 {digests[differ[0]][:12]} vs {digests[0][:12]}): "
                                f"the processes drifted apart")


def build_run(config: Config, *, resume: str | Path | None = None,
              init_from: str | Path | None = None, sources: Mapping[str, str] | None = None,
              overwrite: bool = False, callbacks: Sequence[Callback] = (),
              comm: SingleProcess | None = None) -> Run:
    """The run `config` describes, writing into config.checkpoint.directory.

    resume: "latest" (the directory's newest checkpoint) or a checkpoint path: continue
    that run, taking from `config` only the settings named in `sources` (as load_config
    returns them) that may change; ConfigError names the ones that may not. init_from: a
    new run starting from a checkpoint's weights and tokenizer. overwrite: a new run may
    replace the run files of another in the directory (refused otherwise). callbacks: more
    Trainer callbacks, after the metrics and checkpoint ones. comm: the processes of a
    data-parallel run (see the module docstring). Raises LlmError subclasses for bad data,
    config, checkpoints or a directory that cannot be written."""
    comm = comm or SingleProcess()
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
        previous = manager.run_files() if comm.is_main else []
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
    if config.training.batch_size < comm.size:
        raise ConfigError(f"[training] batch_size = {config.training.batch_size} is the global "
                          f"batch, split across {comm.size} processes: expected at least "
                          f"{comm.size}, a row for each")
    _set_threads(config, comm)
    saved = resumed or start
    corpus = None
    if config.data.text:
        # rank 0 trains the tokenizer and writes the token file; the others take its
        # tokenizer and find the file in the cache (or, on another host, write their own)
        tokenizer = saved.tokenizer if saved else None
        if comm.is_main:
            tokenizer, corpus, phases = _text_run(config, tokenizer)
        shared = comm.share(tokenizer.to_dict() if comm.is_main else None)
        if not comm.is_main:
            from rustgpt.tokenizer import tokenizer_from_dict

            tokenizer, corpus, phases = _text_run(config, tokenizer_from_dict(shared))
    else:
        tokenizer, phases = _example_run(config, saved.tokenizer if saved else None)
    model = LLM(config.model, tokenizer, seed=config.training.seed)
    if start is not None:
        model.load_state_dict(start.weights)
    if comm.is_main:  # an unwritable or full output fails now, not after an hour of training
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
    # rank 0 writes; every process compares weights before a checkpoint is written
    writers = [recorder, saver] if comm.is_main else []
    checks = [WeightsCheck(comm, every)] if comm.size > 1 else []
    trainer = Trainer(model, config.training, phases, [*checks, *writers, *callbacks], comm)
    if resumed is not None:
        resumed.restore(trainer)
        before = resumed.config.training
        trainer.reopen_phases([before.max_iters] if config.data.text else
                              [before.pretraining_epochs, before.instruction_epochs])
    comm.broadcast(model.params.data)  # every process starts from rank 0's weights
    log.info("model: %s parameters, vocabulary %d (%s)", f"{model.total_parameters():,}",
             tokenizer.size, tokenizer.kind)
    return Run(config, model, trainer, manager, recorder, saver, resumed, corpus)


def _set_threads(config: Config, comm: SingleProcess) -> None:
    """Kernel threads: [training] threads if set; in a data-parallel run, else, the
    physical cores of this host shared among its processes (never more threads than
    cores)."""
    from rustgpt import _kernels as K

    threads = config.training.threads
    if not threads and comm.size > 1:
        threads = max(1, K.physical_cores() // comm.local_size)
    if threads:
        K.set_num_threads(threads)


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
