"""rustgpt-cli: train, generate, chat, info, eval, plot, config and tokenizer, over the library.

Heavy modules (numpy, the C extension) are imported inside the commands, so ``--help`` and
``config show`` start fast. Every LlmError reaches the user as one line on stderr, exit 1.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import click

from rustgpt import __version__
from rustgpt.errors import LlmError

log = logging.getLogger("rustgpt.cli")

# click option -> (config section, key); one name per setting: --embedding-dim = [model] embedding_dim
MODEL_OPTIONS = ("embedding_dim", "hidden_dim", "num_layers", "num_heads", "max_seq_len", "arch",
                 "norm", "activation", "attention_projection", "tie_embeddings", "bias",
                 "dropout")
TRAIN_OPTIONS = ("pretraining_epochs", "instruction_epochs", "pretraining_lr", "instruction_lr",
                 "batch_size", "seed", "threads", "schedule", "warmup_steps", "shuffle",
                 "weight_decay", "beta1", "beta2", "eps", "max_grad_norm")


class State:
    """What the group options leave for the commands (a command's own copies of those
    options, given after its name, override them)."""

    def __init__(self, config_file: str | None, log_level: str | None, log_format: str | None):
        self.config_file = config_file
        self.log_level = log_level
        self.log_format = log_format

    def config(self, **overrides):
        """The merged config (defaults < file < env < these overrides), logging set up, and
        the source of each setting given above its default."""
        from rustgpt.config import load_config
        from rustgpt.log import setup_logging

        overrides.setdefault("logging", {}).update(level=self.log_level, format=self.log_format)
        config, sources = load_config(self.config_file, overrides=overrides)
        setup_logging(config.logging.level, config.logging.format, config.logging.file or None)
        return config, sources


def _stderr_log_format() -> str | None:
    """"text" or "json" when rustgpt's log handler writes to stderr; None when it writes to
    a file or logging is not set up yet."""
    for handler in logging.getLogger("rustgpt").handlers:
        if type(handler) is logging.StreamHandler and handler.stream is sys.stderr:
            return "json" if "Json" in type(handler.formatter).__name__ else "text"
    return None


def tell(message: str, level: int = logging.INFO, prefix: str = "") -> None:
    """`message` for the person at the terminal (stderr) and for the log, one line in each.
    When the log is JSON on stderr the log record is the message (every line of a JSON log
    parses); when it is text on stderr the printed line alone says it."""
    where = _stderr_log_format()
    if where != "text":
        log.log(level, message)
    if where != "json":
        click.echo(prefix + message, err=True)


def _fail(message: str) -> None:
    tell(message, logging.ERROR, "error: ")
    sys.exit(1)


class Group(click.Group):
    """Turns LlmError into one line on stderr (and an ERROR log record), exit 1."""

    def invoke(self, ctx):
        """Run the command; an LlmError becomes one line on stderr and exit 1."""
        try:
            return super().invoke(ctx)
        except LlmError as err:
            log.debug("traceback of the error below", exc_info=True)
            _fail(str(err))
        except KeyboardInterrupt:
            tell("interrupted", logging.ERROR, "error: ")
            sys.exit(130)


# the group's options; commands take them too, after their name (`train --config x.toml`)
_GROUP_OPTIONS = {
    "config_file": ("--config", dict(type=click.Path(dir_okay=False),
                                     help="TOML (or YAML) config file; see `rustgpt-cli config init`.")),
    "log_level": ("--log-level", dict(type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"],
                                                        case_sensitive=False),
                                      help="Log verbosity (default INFO; DEBUG also logs tracebacks).")),
    "log_format": ("--log-format", dict(type=click.Choice(["text", "json"]),
                                        help="Log lines as text or as JSON objects.")),
}


def _set_group_option(ctx, param, value):
    if value is not None:
        state = ctx.find_object(State)
        setattr(state, param.name, value.upper() if param.name == "log_level" else value)


def group_options(f):
    """The group's --config, --log-level and --log-format, accepted after a command's name
    too; given there, they win over the group's."""
    for name, (flag, kwargs) in reversed(_GROUP_OPTIONS.items()):
        f = click.option(flag, name, expose_value=False, callback=_set_group_option,
                         **kwargs)(f)
    return f


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(_GROUP_OPTIONS["config_file"][0], "config_file", **_GROUP_OPTIONS["config_file"][1])
@click.option(_GROUP_OPTIONS["log_level"][0], "log_level", **_GROUP_OPTIONS["log_level"][1])
@click.option(_GROUP_OPTIONS["log_format"][0], "log_format", **_GROUP_OPTIONS["log_format"][1])
@click.version_option(__version__, prog_name="rustgpt")
@click.pass_context
def main(ctx, config_file, log_level, log_format):
    """rustgpt: a small GPT-style language model trained from scratch on your CPU.

    \b
    Quick start:
      rustgpt-cli train                               # bundled data, RustGPT's schedule
      rustgpt-cli generate "How do mountains form?"   # answer from ./checkpoints

    Settings come from defaults < --config FILE < LLM_<SECTION>_<KEY> environment
    variables < command-line options; `rustgpt-cli config show` prints the result.
    --config, --log-level and --log-format may also follow a command's name.
    """
    ctx.obj = State(config_file, log_level.upper() if log_level else None, log_format)


# ---- train -------------------------------------------------------------------------------

@main.command()
@click.option("--pretraining-data", type=click.Path(dir_okay=False),
              help="Pretraining examples (.json array of strings or .csv). Default: bundled.")
@click.option("--chat-training-data", type=click.Path(dir_okay=False),
              help="Instruction-tuning examples, 'User: ... Assistant: ... </s>'. Default: bundled.")
@click.option("--output", type=click.Path(file_okay=False),
              help="Checkpoint and metrics directory (default ./checkpoints).")
@click.option("--resume", is_flag=False, flag_value="latest", default=None, metavar="[CKPT]",
              help="Continue a run: from CKPT, or from the latest checkpoint in --output. "
                   "Epochs, learning rates, schedule, Adam settings, clipping, cadence, threads "
                   "and logging may change; model sizes, data, batch size, seed and shuffling "
                   "may not.")
@click.option("--init-from", type=click.Path(exists=True), metavar="CKPT",
              help="Start a new run from the weights of CKPT (file, or a run directory's best) "
                   "with a fresh optimizer and schedule: fine-tuning on other data.")
@click.option("--overwrite", is_flag=True,
              help="Delete the checkpoints and metrics another run left in --output (those "
                   "files only) and start afresh.")
@click.option("--pretraining-epochs", type=int, help="Epochs of pretraining (default 100).")
@click.option("--instruction-epochs", type=int, help="Epochs of instruction tuning (default 100).")
@click.option("--pretraining-lr", type=float, help="Pretraining learning rate (default 5e-4).")
@click.option("--instruction-lr", type=float, help="Instruction-tuning learning rate (default 1e-4).")
@click.option("--batch-size", type=int, help="Examples per step (default 1).")
@click.option("--schedule", type=click.Choice(["constant", "cosine"]),
              help="Learning-rate schedule (default constant).")
@click.option("--warmup-steps", type=int, help="Warmup steps of the cosine schedule.")
@click.option("--weight-decay", type=float,
              help="AdamW's decoupled weight decay, on the weight matrices and embeddings only "
                   "(not biases or layer norms), as nanoGPT (default 0: Adam, as RustGPT).")
@click.option("--beta1", type=float, help="Adam beta1, in [0, 1) (default 0.9).")
@click.option("--beta2", type=float, help="Adam beta2, in [0, 1) (default 0.999).")
@click.option("--eps", type=float, help="Adam epsilon (default 1e-8).")
@click.option("--max-grad-norm", type=float,
              help="Clip gradients to this global L2 norm (default 5.0).")
@click.option("--shuffle/--no-shuffle", default=None, help="Shuffle examples each epoch.")
@click.option("--seed", type=int, help="Seed of the initial weights and shuffling (default 42).")
@click.option("--threads", type=int, help="Kernel threads (default: physical cores).")
@click.option("--embedding-dim", type=int, help="Model width D (default 128).")
@click.option("--hidden-dim", type=int, help="Feed-forward width H (default 256).")
@click.option("--num-layers", type=int, help="Transformer blocks (default 3).")
@click.option("--num-heads", type=int, help="Attention heads (default 1).")
@click.option("--max-seq-len", type=int, help="Context length in tokens (default 80).")
@click.option("--arch", type=click.Choice(["rustgpt", "gpt"]),
              help="Architecture: rustgpt (default: RustGPT's post-norm relu block and init) or "
                   "gpt (nanoGPT's GPT-2 block: pre-norm, gelu, attention projection, tied "
                   "embeddings, no biases; its init). It sets the defaults of the five options "
                   "below; any of them given as well wins.")
@click.option("--norm", type=click.Choice(["post", "pre"]),
              help="Layer norm after each residual add (post) or before each sub-layer, with a "
                   "final one (pre).")
@click.option("--activation", type=click.Choice(["relu", "gelu"]),
              help="Feed-forward activation (gelu: the exact erf form).")
@click.option("--attention-projection/--no-attention-projection", default=None,
              help="An output projection (D x D) after attention.")
@click.option("--tie-embeddings/--no-tie-embeddings", default=None,
              help="Output layer = the token embedding transposed (no weight of its own).")
@click.option("--bias/--no-bias", default=None,
              help="Biases in the feed-forward, attention-output and output layers and the "
                   "layer norms.")
@click.option("--dropout", type=float,
              help="Training only: drop this fraction of the embeddings' and each sub-layer's "
                   "outputs, in [0, 1) (default 0: off).")
@click.option("--tensorboard", type=click.Path(file_okay=False),
              help="Also write TensorBoard event files to this directory "
                   "(pip install 'rustgpt[tensorboard]').")
@click.option("--progress/--no-progress", default=None,
              help="Show a progress bar (default: only when stderr is a terminal).")
@group_options
@click.pass_obj
def train(state: State, pretraining_data, chat_training_data, output, resume, init_from,
          overwrite, tensorboard, progress, **options):
    """Train a model: pretraining, then instruction tuning (RustGPT's two phases).

    Writes checkpoints (ckpt-<step>.safetensors, best.safetensors) and metrics
    (metrics.csv, metrics.json) to --output, which the run locks while it trains. A new
    run refuses a directory holding another run's files: continue that run with --resume,
    or replace it with --overwrite. Ctrl-C or SIGTERM saves a final checkpoint and exits
    (130 / 143); `--resume` continues exactly where it stopped.
    """
    if resume is not None and init_from is not None:
        _fail("--resume continues a run and --init-from starts a new one: pass one of them")
    overrides = {
        "model": {k: options[k] for k in MODEL_OPTIONS},
        "training": {k: options[k] for k in TRAIN_OPTIONS},
        "data": {"pretraining_data": pretraining_data, "chat_training_data": chat_training_data},
        "checkpoint": {"directory": output},
        "logging": {"tensorboard": tensorboard},
    }
    config, sources = state.config(**overrides)
    sys.exit(run_training(config, resume, sources=sources, init_from=init_from,
                          overwrite=overwrite, progress=progress))


def run_training(config, resume: str | None = None, *, sources: dict | None = None,
                 init_from: str | None = None, overwrite: bool = False,
                 progress: bool | None = None) -> int:
    """Train as `config` says; returns the exit code: 0 done, 130 / 143 stopped by SIGINT /
    SIGTERM.

    `resume` ("latest" or a checkpoint path) continues a run, taking from `config` only the
    settings that may change (those named in `sources`, as load_config returns them);
    `init_from` starts from a checkpoint's weights; `overwrite` lets a new run replace the
    files of another in the output directory; `progress` shows a bar (None: when stderr is
    a terminal)."""
    from rustgpt.checkpoint import CheckpointManager
    from rustgpt.errors import SerializationError
    from rustgpt.fileio import DirectoryLock

    out = Path(config.checkpoint.directory)
    manager = CheckpointManager(out, config.checkpoint.keep_best, config.checkpoint.max_to_keep)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SerializationError(f"{out}: cannot write checkpoints here "
                                 f"({err.strerror or err})") from err
    with DirectoryLock(out):
        manager.remove_stale()  # temporary files of writers killed mid-save
        return _train_locked(config, manager, resume, sources or {}, init_from, overwrite,
                             sys.stderr.isatty() if progress is None else progress)


def _train_locked(config, manager, resume, sources, init_from, overwrite, show_progress) -> int:
    import time

    import rustgpt
    from rustgpt.checkpoint import Checkpoint, CheckpointCallback, CheckpointManager
    from rustgpt.data import BUNDLED_CHAT, BUNDLED_PRETRAINING, Dataset
    from rustgpt.errors import SerializationError, TrainingError
    from rustgpt.metrics import JSON_NAME, Metrics, MetricsCallback
    from rustgpt.model import LLM
    from rustgpt.tokenizer import Vocab
    from rustgpt.training import ProgressBar, Trainer, rustgpt_phases

    out = manager.directory
    checkpoint = start = None  # the checkpoint resumed from / whose weights start the run
    previous = []  # another run's files, deleted (--overwrite) once this run can start
    if resume is not None:
        path = manager.latest() if resume == "latest" else CheckpointManager.resolve(resume)
        if path is None:
            raise SerializationError(f"{out}: no checkpoint to resume from")
        checkpoint = Checkpoint.load(path)
        config = resumed_config(checkpoint.config, config, sources, path)
        log.info("resuming from %s at step %d", path, checkpoint.step)
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
            config = initialized_config(start.config, config, sources, path)
            log.info("starting from the weights of %s", path)
    if config.training.threads:
        rustgpt.set_num_threads(config.training.threads)
    limit = config.data.max_file_mb * 2**20
    pre = Dataset.load(config.data.pretraining_data or BUNDLED_PRETRAINING, limit)
    chat = Dataset.load(config.data.chat_training_data or BUNDLED_CHAT, limit)
    saved = checkpoint or start
    tokenizer = saved.tokenizer if saved else Vocab.from_texts(pre.examples + chat.examples)
    model = LLM(config.model, tokenizer, seed=config.training.seed)
    if start is not None:
        model.load_state_dict(start.weights)
    # an unwritable or full output fails now, not after an hour of training
    manager.prepare(checkpoint_bytes=3 * 4 * model.total_parameters())  # weights, m, v
    if previous:
        manager.clear()
        log.info("removed %d files of the previous run in %s", len(previous), out)
    metrics_file = out / JSON_NAME
    metrics = Metrics.from_json(metrics_file) if checkpoint and metrics_file.exists() else None
    # metrics are written when checkpoints are: a resumed run's metrics match its checkpoint
    every = config.checkpoint.every_epochs
    recorder = MetricsCallback(out, metrics, every)
    saver = CheckpointCallback(manager, config, every)
    callbacks = [recorder, saver]
    if config.logging.tensorboard:
        from rustgpt import generation
        from rustgpt.tensorboard import TensorBoardCallback

        prompt = _sample_prompt(chat)
        callbacks.append(TensorBoardCallback(
            config.logging.tensorboard, every,
            sample=lambda: prompt + " " + generation.generate(model, prompt, raw=True,
                                                              max_tokens=40),
            purge_step=checkpoint.step + 1 if checkpoint else None))
    if show_progress:
        callbacks.append(ProgressBar())
    trainer = Trainer(model, config.training,
                      rustgpt_phases(config.training, tokenizer, config.model.max_seq_len, pre, chat,
                                     config.data.long_examples),
                      callbacks)
    if checkpoint:
        checkpoint.restore(trainer)
        saved_training = checkpoint.config.training  # the epochs the run had
        trainer.reopen_phases([saved_training.pretraining_epochs,
                               saved_training.instruction_epochs])
    log.info("model: %s parameters, vocabulary %d, %s", f"{model.total_parameters():,}",
             tokenizer.size, rustgpt.kernels_info())
    first_step = trainer.position.step
    seen = install_stop_handlers(trainer)
    began = time.perf_counter()
    try:
        if show_progress:
            from tqdm.contrib.logging import logging_redirect_tqdm

            with logging_redirect_tqdm([logging.getLogger("rustgpt")]):  # lines above the bar
                done = trainer.run()
        else:
            done = trainer.run()
    except TrainingError:
        recorder.write()  # the numbers up to a divergence are the ones that matter now
        raise
    finally:
        for callback in callbacks:
            close = getattr(callback, "close", None)
            if close is not None:
                close()
    elapsed = time.perf_counter() - began
    steps = trainer.position.step - first_step
    if not done:
        recorder.write()
        path = saver.save(trainer)
        tell(f"stopped at step {trainer.position.step}; saved {path}. Continue with "
             f"`rustgpt-cli train --output {out} --resume`", logging.WARNING)
        return 128 + seen.get("signal", signal.SIGINT)
    if steps == 0:
        click.echo(f"nothing to train: the run in {out}/ had done all its epochs (step "
                   f"{first_step:,}); raise --pretraining-epochs or --instruction-epochs to "
                   f"train on")
        return 0
    best = manager.best()
    click.echo(f"trained {steps:,} steps (to step {trainer.position.step:,}) in {elapsed:.1f} s; "
               f"final epoch loss {trainer.epoch_loss:.4f}; checkpoints in {out}/ "
               f"(best: {best.name if best else '-'})")
    return 0


# settings a resumed run takes from the command line; the rest are the checkpoint's
_FIXED_ON_RESUME = {"model": None, "data": ("pretraining_data", "chat_training_data",
                                            "long_examples"),
                    "training": ("batch_size", "seed", "shuffle")}


def _changes(saved, given, sources: dict, fixed: dict) -> tuple[dict, list[str]]:
    """`saved`'s settings as a dict with the ones `sources` names taken from `given`, and
    the refused changes ("[section] key (saved -> given)") of the settings in `fixed`
    (section -> keys, None for all of them)."""
    from rustgpt.config import to_dict

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


def resumed_config(saved, given, sources: dict, path):
    """The config a resumed run continues with: the checkpoint's, with the settings given
    now (`sources`) that may change. Raises ConfigError naming each one that may not."""
    from rustgpt.config import from_dict
    from rustgpt.errors import ConfigError

    values, refused = _changes(saved, given, sources, _FIXED_ON_RESUME)
    if refused:
        raise ConfigError(f"{path}: --resume cannot change {', '.join(refused)}; the "
                          f"checkpoint fixes them (a new run with --init-from {path} starts "
                          f"from its weights)")
    return from_dict(values, f"{path}: config")


def initialized_config(saved, given, sources: dict, path):
    """The config of a run started from a checkpoint's weights: the given one, with the
    checkpoint's model sizes. Raises ConfigError naming a model size given otherwise."""
    import attrs

    from rustgpt.errors import ConfigError

    _, refused = _changes(saved, given, sources, {"model": None})
    refused = [r for r in refused if r.startswith("[model]")]
    if refused:
        raise ConfigError(f"{path}: --init-from cannot change {', '.join(refused)}; the "
                          f"weights fix the model's sizes")
    return attrs.evolve(given, model=saved.model)


def _sample_prompt(chat) -> str:
    """A prompt from the data for samples written during training: the first chat
    example's text up to its answer."""
    first = chat.examples[0]
    cut = first.find("Assistant:")
    return first[:cut + len("Assistant:")] if cut >= 0 else " ".join(first.split()[:5])


# ---- generate / chat -------------------------------------------------------------------------

def _load_checkpoint(checkpoint: str):
    """The Checkpoint at a file or directory path; a missing path says to train first."""
    from rustgpt.checkpoint import Checkpoint, CheckpointManager
    from rustgpt.errors import SerializationError

    path = Path(checkpoint)
    if not path.exists():
        raise SerializationError(f"no trained model at {path}: run `rustgpt-cli train` first "
                                 f"(or pass --checkpoint FILE|DIR)")
    return Checkpoint.load(CheckpointManager.resolve(path))


def _generation_options(f):
    options = [
        click.option("--checkpoint", default=None, type=click.Path(),
                     help="Checkpoint file, or a directory (its best). Default ./checkpoints."),
        click.option("--max-new-tokens", "--max-tokens", "max_tokens", type=int,
                     help="New tokens at most (default: 80 for a chat-tuned model, 256 for a "
                          "model trained on text). --max-tokens is the same option."),
        click.option("--temperature", type=float, help="0 = greedy (default); > 0 samples."),
        click.option("--top-k", type=int, help="Sample among the k likeliest tokens (0 = off)."),
        click.option("--top-p", type=float, help="Nucleus sampling mass in (0, 1]."),
        click.option("--min-p", type=float, help="Drop tokens below min-p x the top probability."),
        click.option("--repetition-penalty", type=float, help="> 1 discourages repeats."),
        click.option("--beam-width", type=int, help="Beam search with this many beams."),
        click.option("--seed", type=int, help="Sampling seed (default: random)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _decoding(state: State, checkpoint, options):
    config, _ = state.config(generation=options)
    ckpt = _load_checkpoint(checkpoint or config.checkpoint.directory)
    g = config.generation
    kwargs = dict(max_tokens=g.max_tokens, temperature=g.temperature, top_k=g.top_k,
                  top_p=g.top_p, min_p=g.min_p, repetition_penalty=g.repetition_penalty,
                  seed=g.seed)
    return ckpt.build_model(), kwargs, g.beam_width


@main.command()
@click.argument("prompt")
@_generation_options
@click.option("--raw", is_flag=True,
              help="Chat-tuned models: send PROMPT as is, without the 'User: ' prefix (a model "
                   "trained on text always continues PROMPT as is).")
@click.option("--stream", is_flag=True, help="Print tokens as they are generated.")
@group_options
@click.pass_obj
def generate(state: State, prompt, checkpoint, raw, stream, **options):
    """Answer PROMPT with a chat-tuned model, or continue PROMPT with a model trained on text.

    A chat-tuned model (RustGPT's, with a word vocabulary) answers 'User: PROMPT' and
    stops at </s>; the answer is printed. A model trained on text (char or bpe tokenizer)
    continues PROMPT as raw text (a bpe model stops at its end-of-text token); PROMPT and
    its continuation are printed. Greedy by default, as RustGPT. Past the model's
    max_seq_len, it reads the last max_seq_len tokens.
    """
    from rustgpt import generation

    model, kwargs, beam_width = _decoding(state, checkpoint, options)
    raw = raw or None  # not given: as the model's kind says
    head = "" if generation.chat_tuned(model) else prompt  # a continuation follows its prompt
    if stream and beam_width == 1:
        pieces = generation.stream(model, prompt, raw=raw, **kwargs)
        click.echo(head + next(pieces, ""), nl=False)  # once the options and prompt passed
        for piece in pieces:
            click.echo(piece, nl=False)
        click.echo()
    else:
        click.echo(head + generation.generate(model, prompt, raw=raw, beam_width=beam_width,
                                              **kwargs))


@main.command()
@_generation_options
@group_options
@click.pass_obj
def chat(state: State, checkpoint, **options):
    """Talk with a trained model (RustGPT's interactive mode); 'exit' or Ctrl-D quits.

    A chat-tuned model answers each line; a model trained on text continues each line as
    raw text and prints the line with its continuation. Each line stands alone: earlier
    lines are not part of the next one's context.
    """
    from rustgpt import generation

    model, kwargs, beam_width = _decoding(state, checkpoint, options)
    echo = not generation.chat_tuned(model)  # a continuation reads after its line
    click.echo("rustgpt chat: type a message; 'exit' or Ctrl-D to quit.")
    while True:
        try:
            line = input("You: ")
        except EOFError:
            click.echo()
            return
        if line.strip().lower() in ("exit", "quit"):
            return
        if not line.strip():
            continue
        try:
            answer = generation.generate(model, line, beam_width=beam_width, **kwargs)
        except LlmError as err:
            click.echo(f"error: {err}", err=True)
            continue
        click.echo(f"Model: {line if echo else ''}{answer}")


# ---- info / eval / plot --------------------------------------------------------------------

@main.command()
@click.option("--checkpoint", default=None, type=click.Path(),
              help="Checkpoint file or directory (default: [checkpoint] directory, ./checkpoints).")
@group_options
@click.pass_obj
def info(state: State, checkpoint):
    """Architecture, parameter count, tokenizer and training state of a checkpoint."""
    config, _ = state.config()
    ckpt = _load_checkpoint(checkpoint or config.checkpoint.directory)
    model = ckpt.build_model()
    click.echo(model.network_description())
    tokenizer = model.tokenizer
    if tokenizer.kind == "word":  # RustGPT's vocabulary counts its words
        stats = tokenizer.statistics(top=10)
        click.echo(f"vocabulary: {stats['size']} words, {stats['total_words']:,} counted, "
                   f"special {' '.join(stats['special_tokens'])}")
        click.echo("most frequent: " + ", ".join(f"{w} ({n})" for w, n in stats["most_frequent"]))
    else:
        click.echo(f"tokenizer: {tokenizer.kind}, {tokenizer.size:,} tokens")
    for key, value in ckpt.info().items():
        click.echo(f"{key}: {value}")


@main.command(name="eval")
@click.argument("data", required=False, type=click.Path(dir_okay=False))
@click.option("--checkpoint", default=None, type=click.Path(),
              help="Checkpoint file or directory (default: [checkpoint] directory, ./checkpoints).")
@click.option("--text", "texts", multiple=True, metavar="PATH",
              help="Evaluate on a text corpus instead of DATA: a .txt/.md file, a directory, "
                   "a glob or a .jsonl with a 'text' field (repeatable).")
@click.option("--split", type=click.Choice(["val", "train", "all"]), default="val",
              show_default=True, help="With --text: the corpus's validation split (its last "
                                      "[data] val_fraction of tokens), the rest, or all.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@group_options
@click.pass_obj
def evaluate(state: State, data, checkpoint, texts, split, batch_size, as_json):
    """Loss, perplexity and next-token accuracy of a checkpoint on DATA (.json or .csv
    examples) or on a text corpus (--text; also bits per byte, which compare models with
    different tokenizers)."""
    import json

    from rustgpt.errors import ConfigError

    config, _ = state.config()
    if (data is None) == (not texts):
        raise ConfigError("eval: give DATA (examples) or --text PATH (a corpus), one of them")
    ckpt = _load_checkpoint(checkpoint or config.checkpoint.directory)
    model = ckpt.build_model()
    if texts:
        from rustgpt.corpus import TokenFile
        from rustgpt.training import evaluate_text

        corpus = TokenFile.build(texts, model.tokenizer, _token_cache(config))
        if split == "all":
            tokens = corpus.tokens
        else:
            train, val = corpus.split(model.config.max_seq_len, config.data.val_fraction)
            tokens = val if split == "val" else train
        result = {"split": split, **evaluate_text(model, tokens, batch_size)}
    else:
        from rustgpt.data import Dataset
        from rustgpt.training import evaluate as evaluate_model

        dataset = Dataset.load(data, config.data.max_file_mb * 2**20)
        result = evaluate_model(model, dataset.encode(model.tokenizer, model.config.max_seq_len),
                                batch_size)
    if as_json:
        click.echo(json.dumps(result))
        return
    for key, value in result.items():
        click.echo(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")


def _token_cache(config) -> Path:
    """Where token files of text corpora are cached: [data] token_cache, else
    $XDG_CACHE_HOME/rustgpt, else ~/.cache/rustgpt."""
    import os

    if config.data.token_cache:
        return Path(config.data.token_cache)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rustgpt"


@main.command()
@click.option("--metrics", "metrics_path", default=None, type=click.Path(exists=True),
              help="metrics.json, or the training output directory holding it (default: "
                   "[checkpoint] directory, ./checkpoints).")
@click.option("--output", default="training.png", show_default=True, type=click.Path(dir_okay=False),
              help="PNG file to write.")
@group_options
@click.pass_obj
def plot(state: State, metrics_path, output):
    """Plot a training run: loss per phase, learning rate and gradient norm (needs matplotlib)."""
    config, _ = state.config()
    from rustgpt.metrics import JSON_NAME, Metrics, plot as plot_metrics

    path = Path(metrics_path or config.checkpoint.directory)
    metrics = Metrics.from_json(path / JSON_NAME if path.is_dir() else path)
    click.echo(f"wrote {plot_metrics(metrics, output)}")


# ---- config ---------------------------------------------------------------------------------

@main.group(name="config")
def config_group():
    """Show or create configuration."""


@config_group.command()
@group_options
@click.pass_obj
def show(state: State):
    """Print the merged configuration, each value with where it came from."""
    from rustgpt.config import render_toml

    config, sources = state.config()
    click.echo(render_toml(config, sources), nl=False)


@config_group.command()
@click.argument("path", default="rustgpt.toml", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Overwrite PATH if it exists.")
def init(path, force):
    """Write a commented config file with every setting at its default (rustgpt.toml)."""
    from rustgpt.config import render_toml

    target = Path(path)
    if target.exists() and not force:
        _fail(f"{target} exists; pass --force to overwrite it")
    try:
        target.write_text(render_toml())
    except OSError as err:
        _fail(f"{target}: cannot write ({err.strerror or err})")
    click.echo(f"wrote {target}")


# ---- tokenizer ------------------------------------------------------------------------------

@main.group(name="tokenizer")
def tokenizer_group():
    """Train a tokenizer on text; encode, decode or describe one.

    \b
    TOKENIZER is a tokenizer file (a Hugging Face tokenizer.json, or a file that
    `tokenizer train` wrote) or a kind: word, char or bpe, built from the bundled data as
    `rustgpt-cli train` builds its vocabulary when given no data.
    """


def _load_tokenizer(spec: str):
    """load_tokenizer(spec), a kind built from the bundled examples."""
    from rustgpt.tokenizer import KINDS, load_tokenizer

    if spec not in KINDS:
        return load_tokenizer(spec)
    from rustgpt.data import BUNDLED_CHAT, BUNDLED_PRETRAINING, Dataset

    return load_tokenizer(spec, Dataset.load(BUNDLED_PRETRAINING).examples
                          + Dataset.load(BUNDLED_CHAT).examples)


def _pieces(sources, kind: str, progress=None):
    """corpus.pieces(sources) as a `kind` tokenizer takes the text: byte-level bpe any bytes
    (those that are not UTF-8 as U+FFFD, with a warning), word and char only UTF-8."""
    from rustgpt.corpus import pieces

    return pieces(sources, "replace" if kind == "bpe" else "strict", progress)


@tokenizer_group.command(name="train")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--kind", type=click.Choice(["word", "char", "bpe"]), default="bpe",
              show_default=True,
              help="bpe: byte-level BPE, written as a Hugging Face tokenizer.json; char: the "
                   "text's characters; word: RustGPT's words and punctuation.")
@click.option("--vocab-size", type=int, help="bpe: tokens at most, >= 257 (default 1024).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Tokenizer file to write.")
@click.option("--progress/--no-progress", default=None,
              help="Show a bar of the bytes read (default: only when stderr is a terminal).")
@group_options
@click.pass_obj
def tokenizer_train(state: State, paths, kind, vocab_size, output, progress):
    """Train a tokenizer on PATHS: text files, directories (their .txt, .md and .jsonl
    files), globs, or .jsonl files (JSON lines with a string "text").

    The text is read once, streaming. bpe takes any bytes (those that are not UTF-8 as
    U+FFFD); word and char refuse a file that is not UTF-8, naming the byte.
    """
    import contextlib
    import time

    from rustgpt.corpus import find_sources
    from rustgpt.tokenizer import BPE_VOCAB_SIZE, train_tokenizer

    state.config()
    if vocab_size is not None and kind != "bpe":
        _fail(f"--vocab-size sets the size of a bpe vocabulary; a {kind} tokenizer's follows "
              f"from its text")
    sources = find_sources(paths)
    total = sum(s.path.stat().st_size for s in sources)
    began = time.perf_counter()
    with contextlib.ExitStack() as stack:
        update = None
        if sys.stderr.isatty() if progress is None else progress:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            update = stack.enter_context(tqdm(total=total, unit="B", unit_scale=True,
                                              desc=f"{kind} tokenizer")).update
            stack.enter_context(logging_redirect_tqdm([logging.getLogger("rustgpt")]))
        tokenizer = train_tokenizer(kind, _pieces(sources, kind, update),
                                    vocab_size or BPE_VOCAB_SIZE)
    tokenizer.save(output)
    click.echo(f"wrote {output}: {kind} tokenizer, {tokenizer.size:,} tokens, from "
               f"{len(sources):,} file{'s' if len(sources) > 1 else ''} ({total / 1e6:,.1f} MB) "
               f"in {time.perf_counter() - began:.1f} s")


@tokenizer_group.command(name="encode")
@click.argument("spec", metavar="TOKENIZER")
@click.argument("text")
@group_options
@click.pass_obj
def tokenizer_encode(state: State, spec, text):
    """Print the token ids of TEXT, separated by spaces."""
    state.config()
    click.echo(" ".join(map(str, _load_tokenizer(spec).encode(text))))


@tokenizer_group.command(name="decode", context_settings={"ignore_unknown_options": True})
@click.argument("spec", metavar="TOKENIZER")
@click.argument("ids", nargs=-1, required=True)
@group_options
@click.pass_obj
def tokenizer_decode(state: State, spec, ids):
    """Print the text of the token IDS: integers, separated by spaces or commas (the output
    of `tokenizer encode`, quoted, will do)."""
    from rustgpt.errors import TokenError

    state.config()
    numbers = []
    for word in " ".join(ids).replace(",", " ").split():
        try:
            numbers.append(int(word))
        except ValueError:
            raise TokenError(f"id {len(numbers)} = {word!r}, expected an integer token "
                             f"id") from None
    click.echo(_load_tokenizer(spec).decode(numbers))


@tokenizer_group.command(name="info")
@click.argument("spec", metavar="TOKENIZER")
@click.option("--text", "texts", multiple=True, type=click.Path(),
              help="Text to count tokens per byte on: a file, a directory, a glob or a .jsonl "
                   "file, as `tokenizer train` takes; repeatable.")
@group_options
@click.pass_obj
def tokenizer_info(state: State, spec, texts):
    """Kind, vocabulary size and special ids of TOKENIZER; tokens per byte on --text."""
    from rustgpt.corpus import find_sources
    from rustgpt.tokenizer import tokens_per_byte

    state.config()
    tokenizer = _load_tokenizer(spec)
    click.echo(f"kind: {tokenizer.kind}")
    click.echo(f"vocabulary: {tokenizer.size:,} tokens")
    for name in ("eos_id", "unk_id"):
        i = getattr(tokenizer, name)
        click.echo(f"{name}: " + ("none" if i is None else f"{i} {tokenizer.decode([i])!r}"))
    if texts:
        ratio = tokens_per_byte(tokenizer, _pieces(find_sources(texts), tokenizer.kind))
        click.echo(f"tokens per byte: {ratio:.4f} ({1 / ratio:.2f} bytes per token) on "
                   f"{', '.join(texts)}")


def install_stop_handlers(trainer) -> dict:
    """SIGINT / SIGTERM ask the trainer to stop after its step; returns the signal seen."""
    seen: dict = {}

    def handler(signum, frame):
        seen["signal"] = signum
        trainer.request_stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
    return seen


if __name__ == "__main__":
    main()
