"""rustgpt-cli: train, generate, chat, info, eval, plot and config, over the library.

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
MODEL_OPTIONS = ("embedding_dim", "hidden_dim", "num_layers", "num_heads", "max_seq_len")
TRAIN_OPTIONS = ("pretraining_epochs", "instruction_epochs", "pretraining_lr", "instruction_lr",
                 "batch_size", "seed", "threads", "schedule", "warmup_steps", "shuffle")


class State:
    """What the group options leave for the commands."""

    def __init__(self, config_file: str | None, log_level: str | None, log_format: str | None):
        self.config_file = config_file
        self.log_level = log_level
        self.log_format = log_format

    def config(self, **overrides):
        """The merged config (defaults < file < env < these overrides), logging set up."""
        from rustgpt.config import load_config
        from rustgpt.log import setup_logging

        overrides.setdefault("logging", {}).update(level=self.log_level, format=self.log_format)
        config, sources = load_config(self.config_file, overrides=overrides)
        setup_logging(config.logging.level, config.logging.format, config.logging.file or None)
        return config, sources


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


class Group(click.Group):
    """Turns LlmError (and a few OS-level failures) into one line on stderr, exit 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LlmError as err:
            if logging.getLogger("rustgpt").isEnabledFor(logging.DEBUG):
                log.exception("failed")
            _fail(str(err))
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="TOML (or YAML) config file; see `rustgpt-cli config init`.")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"],
                                               case_sensitive=False),
              help="Log verbosity (default INFO; DEBUG also shows tracebacks).")
@click.option("--log-format", type=click.Choice(["text", "json"]),
              help="Log lines as text or as JSON objects.")
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
              help="Continue a run: from CKPT, or from the latest checkpoint in --output.")
@click.option("--pretraining-epochs", type=int, help="Epochs of pretraining (default 100).")
@click.option("--instruction-epochs", type=int, help="Epochs of instruction tuning (default 100).")
@click.option("--pretraining-lr", type=float, help="Pretraining learning rate (default 5e-4).")
@click.option("--instruction-lr", type=float, help="Instruction-tuning learning rate (default 1e-4).")
@click.option("--batch-size", type=int, help="Examples per step (default 1).")
@click.option("--schedule", type=click.Choice(["constant", "cosine"]),
              help="Learning-rate schedule (default constant).")
@click.option("--warmup-steps", type=int, help="Warmup steps of the cosine schedule.")
@click.option("--shuffle/--no-shuffle", default=None, help="Shuffle examples each epoch.")
@click.option("--seed", type=int, help="Seed of the initial weights and shuffling (default 42).")
@click.option("--threads", type=int, help="Kernel threads (default: physical cores).")
@click.option("--embedding-dim", type=int, help="Model width D (default 128).")
@click.option("--hidden-dim", type=int, help="Feed-forward width H (default 256).")
@click.option("--num-layers", type=int, help="Transformer blocks (default 3).")
@click.option("--num-heads", type=int, help="Attention heads (default 1).")
@click.option("--max-seq-len", type=int, help="Context length in tokens (default 80).")
@click.pass_obj
def train(state: State, pretraining_data, chat_training_data, output, resume, **options):
    """Train a model: pretraining, then instruction tuning (RustGPT's two phases).

    Shows a progress bar, writes checkpoints (ckpt-<step>.safetensors, best.safetensors)
    and metrics (metrics.csv, metrics.json) to --output. Ctrl-C or SIGTERM saves a final
    checkpoint and exits (130 / 143); `--resume` continues exactly where it stopped.
    """
    overrides = {
        "model": {k: options[k] for k in MODEL_OPTIONS},
        "training": {k: options[k] for k in TRAIN_OPTIONS},
        "data": {"pretraining_data": pretraining_data, "chat_training_data": chat_training_data},
        "checkpoint": {"directory": output},
    }
    config, _ = state.config(**overrides)
    sys.exit(run_training(config, resume))


def run_training(config, resume: str | None) -> int:
    """Train as `config` says (resuming from a checkpoint when `resume` is a path or
    "latest"); returns the exit code: 0 done, 130 / 143 stopped by SIGINT / SIGTERM."""
    import time

    import attrs

    import rustgpt
    from rustgpt.checkpoint import Checkpoint, CheckpointCallback, CheckpointManager
    from rustgpt.data import BUNDLED_CHAT, BUNDLED_PRETRAINING, Dataset
    from rustgpt.errors import SerializationError
    from rustgpt.metrics import Metrics, MetricsCallback
    from rustgpt.model import LLM
    from rustgpt.tokenizer import Vocab
    from rustgpt.training import ProgressBar, Trainer, rustgpt_phases

    out = Path(config.checkpoint.directory)
    manager = CheckpointManager(out, config.checkpoint.keep_best, config.checkpoint.max_to_keep)
    checkpoint = None
    if resume is not None:
        path = manager.latest() if resume == "latest" else CheckpointManager.resolve(resume)
        if path is None:
            raise SerializationError(f"{out}: no checkpoint to resume from")
        checkpoint = Checkpoint.load(path)
        # the run continues with its own model, training and data settings
        config = attrs.evolve(checkpoint.config, checkpoint=config.checkpoint,
                              logging=config.logging)
        log.info("resuming from %s at step %d", path, checkpoint.step)
    if config.training.threads:
        rustgpt.set_num_threads(config.training.threads)
    limit = config.data.max_file_mb * 2**20
    pre = Dataset.load(config.data.pretraining_data or BUNDLED_PRETRAINING, limit)
    chat = Dataset.load(config.data.chat_training_data or BUNDLED_CHAT, limit)
    vocab = checkpoint.vocab if checkpoint else Vocab.from_texts(pre.examples + chat.examples)
    model = LLM(config.model, vocab, seed=config.training.seed)
    # an unwritable or full output fails now, not after an hour of training
    manager.prepare(checkpoint_bytes=3 * 4 * model.total_parameters())  # weights, m, v
    metrics_file = out / "metrics.json"
    metrics = Metrics.from_json(metrics_file) if checkpoint and metrics_file.exists() else None
    # metrics are written when checkpoints are: a resumed run's metrics match its checkpoint
    every = config.checkpoint.every_epochs
    recorder = MetricsCallback(out, metrics, every)
    saver = CheckpointCallback(manager, config, every)
    progress = ProgressBar()
    trainer = Trainer(model, config.training,
                      rustgpt_phases(config.training, vocab, config.model.max_seq_len, pre, chat,
                                     config.data.long_examples),
                      [recorder, saver, progress])
    if checkpoint:
        checkpoint.restore(trainer)
    log.info("model: %s parameters, vocabulary %d, %s", f"{model.total_parameters():,}",
             vocab.size, rustgpt.kernels_info())
    seen = install_stop_handlers(trainer)
    start = time.perf_counter()
    from tqdm.contrib.logging import logging_redirect_tqdm

    try:
        with logging_redirect_tqdm([logging.getLogger("rustgpt")]):  # log lines above the bar
            done = trainer.run()
    finally:
        progress.close()
    elapsed = time.perf_counter() - start
    if not done:
        recorder.write()
        path = saver.save(trainer)
        click.echo(f"stopped at step {trainer.position.step}; saved {path}. Continue with "
                   f"`rustgpt-cli train --output {out} --resume`", err=True)
        return 128 + seen.get("signal", signal.SIGINT)
    best = manager.best()
    click.echo(f"trained {trainer.position.step:,} steps in {elapsed:.1f} s; final epoch loss "
               f"{trainer.epoch_loss:.4f}; checkpoints in {out}/ (best: {best.name if best else '-'})")
    return 0


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
        click.option("--max-tokens", type=int, help="New tokens at most (default 80)."),
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
@click.option("--raw", is_flag=True, help="Send PROMPT as is, without the 'User: ' prefix.")
@click.option("--stream", is_flag=True, help="Print tokens as they are generated.")
@click.pass_obj
def generate(state: State, prompt, checkpoint, raw, stream, **options):
    """Answer PROMPT with a trained model (greedy by default, as RustGPT)."""
    from rustgpt import generation

    model, kwargs, beam_width = _decoding(state, checkpoint, options)
    if stream and beam_width == 1:
        for piece in generation.stream(model, prompt, raw=raw, **kwargs):
            click.echo(piece, nl=False)
        click.echo()
    else:
        click.echo(generation.generate(model, prompt, raw=raw, beam_width=beam_width, **kwargs))


@main.command()
@_generation_options
@click.pass_obj
def chat(state: State, checkpoint, **options):
    """Talk with a trained model (RustGPT's interactive mode); 'exit' or Ctrl-D quits."""
    from rustgpt import generation

    model, kwargs, beam_width = _decoding(state, checkpoint, options)
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
        click.echo(f"Model: {answer}")


# ---- info / eval / plot --------------------------------------------------------------------

@main.command()
@click.option("--checkpoint", default=None, type=click.Path(),
              help="Checkpoint file or directory (default: [checkpoint] directory, ./checkpoints).")
@click.pass_obj
def info(state: State, checkpoint):
    """Architecture, parameter count, vocabulary and training state of a checkpoint."""
    config, _ = state.config()
    ckpt = _load_checkpoint(checkpoint or config.checkpoint.directory)
    model = ckpt.build_model()
    click.echo(model.network_description())
    stats = model.vocab.statistics(top=10)
    click.echo(f"vocabulary: {stats['size']} tokens, {stats['total_words']:,} words counted, "
               f"special {' '.join(stats['special_tokens'])}")
    click.echo("most frequent: " + ", ".join(f"{w} ({n})" for w, n in stats["most_frequent"]))
    for key, value in ckpt.info().items():
        click.echo(f"{key}: {value}")


@main.command(name="eval")
@click.argument("data", type=click.Path(dir_okay=False))
@click.option("--checkpoint", default=None, type=click.Path(),
              help="Checkpoint file or directory (default: [checkpoint] directory, ./checkpoints).")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1))
@click.pass_obj
def evaluate(state: State, data, checkpoint, batch_size):
    """Loss, perplexity and next-token accuracy of a checkpoint on DATA (.json or .csv)."""
    config, _ = state.config()
    from rustgpt.data import Dataset
    from rustgpt.training import evaluate as evaluate_model

    ckpt = _load_checkpoint(checkpoint or config.checkpoint.directory)
    model = ckpt.build_model()
    dataset = Dataset.load(data, config.data.max_file_mb * 2**20)
    result = evaluate_model(model, dataset.encode(model.vocab, model.config.max_seq_len),
                            batch_size)
    for key, value in result.items():
        click.echo(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")


@main.command()
@click.option("--metrics", "metrics_path", default="checkpoints", type=click.Path(exists=True),
              help="metrics.json, or the training output directory holding it.")
@click.option("--output", default="training.png", show_default=True, type=click.Path(dir_okay=False),
              help="PNG file to write.")
@click.pass_obj
def plot(state: State, metrics_path, output):
    """Plot a training run: loss per phase, learning rate and gradient norm (needs matplotlib)."""
    state.config()
    from rustgpt.metrics import Metrics, plot as plot_metrics

    path = Path(metrics_path)
    metrics = Metrics.from_json(path / "metrics.json" if path.is_dir() else path)
    click.echo(f"wrote {plot_metrics(metrics, output)}")


# ---- config ---------------------------------------------------------------------------------

@main.group(name="config")
def config_group():
    """Show or create configuration."""


@config_group.command()
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
