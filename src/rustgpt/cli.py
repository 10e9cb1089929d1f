"""rustgpt-cli: train, generate, chat, info, eval, plot, config and tokenizer, over the library.

Heavy modules (numpy, the C extension) are imported inside the commands, so ``--help`` and
``config show`` start fast. Every LlmError reaches the user as one line on stderr, exit 1.
"""

from __future__ import annotations

import functools
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
                 "weight_decay", "beta1", "beta2", "eps", "max_grad_norm", "max_iters",
                 "grad_accum", "eval_interval", "eval_iters", "precision")
DATA_OPTIONS = ("pretraining_data", "chat_training_data", "tokenizer", "vocab_size",
                "val_fraction")


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
    from rustgpt.comm import current

    comm = current()
    if comm is not None and comm.size > 1:  # the others would wait for this process
        tell(f"rank {comm.rank}: {message}", logging.ERROR, "error: ")
        comm.abort(1)
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
@click.option("--text", "texts", multiple=True, metavar="PATH",
              help="Train on text instead of examples (repeatable): a .txt/.md file, a "
                   "directory, a glob, or .jsonl with a \"text\" field.")
@click.option("--tokenizer", metavar="char|bpe|FILE",
              help="With --text: char (default), bpe (trained on the corpus) or a "
                   "tokenizer file (a Hugging Face tokenizer.json).")
@click.option("--vocab-size", type=int,
              help="With --text --tokenizer bpe: the vocabulary to train (default 1024).")
@click.option("--val-fraction", type=float,
              help="With --text: the last share of the tokens kept for validation (default 0.1).")
@click.option("--max-iters", type=int, help="With --text: training steps (default 5000).")
@click.option("--grad-accum", type=int,
              help="With --text: batches of --batch-size windows per step (default 1).")
@click.option("--eval-interval", type=int,
              help="With --text: estimate train and val loss and save a checkpoint every N "
                   "steps (default 250).")
@click.option("--eval-iters", type=int,
              help="With --text: batches per loss estimate (default 20).")
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
@click.option("--precision", type=click.Choice(["fp32", "bf16", "auto"]),
              help="Matmuls in fp32 (default), bf16 (float32 sums and master weights) or "
                   "auto (bf16 where the CPU has AMX or AVX512-BF16).")
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
def train(state: State, texts, output, resume, init_from, overwrite, tensorboard, progress,
          **options):
    """Train a model: by default RustGPT's two phases (pretraining, then instruction
    tuning) on example files; with --text, on text corpora for --max-iters steps of random
    windows, estimating train and val loss every --eval-interval steps (the best checkpoint
    is the one of the lowest val loss).

    Writes checkpoints (ckpt-<step>.safetensors, best.safetensors) and metrics
    (metrics.csv, metrics.json) to --output, which the run locks while it trains. A new
    run refuses a directory holding another run's files: continue that run with --resume,
    or replace it with --overwrite. Ctrl-C or SIGTERM saves a final checkpoint and exits
    (130 / 143); `--resume` continues exactly where it stopped.
    """
    overrides = {
        "model": {k: options[k] for k in MODEL_OPTIONS},
        "training": {k: options[k] for k in TRAIN_OPTIONS},
        "data": {**{k: options[k] for k in DATA_OPTIONS}, "text": texts or None},
        "checkpoint": {"directory": output},
        "logging": {"tensorboard": tensorboard},
    }
    from rustgpt.comm import world

    comm = world()  # the processes of an MPI launch (mpiexec -n N), else this one
    config, sources = state.config(**overrides)
    if not comm.is_main:
        _quiet_rank(comm.rank)
    sys.exit(run_training(config, resume, sources=sources, init_from=init_from,
                          overwrite=overwrite, progress=progress, comm=comm))


def _quiet_rank(rank: int) -> None:
    """A data-parallel run's other processes log warnings and errors only, with their
    rank (rank 0 logs the run)."""
    logger = logging.getLogger("rustgpt")
    logger.setLevel(max(logger.level, logging.WARNING))

    def with_rank(record: logging.LogRecord) -> bool:
        record.msg = f"rank {rank}: {record.msg}"
        return True

    for handler in logger.handlers:
        handler.addFilter(with_rank)


def run_training(config, resume: str | None = None, *, sources: dict | None = None,
                 init_from: str | None = None, overwrite: bool = False,
                 progress: bool | None = None, comm=None) -> int:
    """Train as `config` says (rustgpt.run.build_run), holding the output directory's
    lock; returns the exit code: 0 done, 130 / 143 stopped by SIGINT / SIGTERM. With
    `comm`, this is one process of a data-parallel run (rustgpt.comm); rank 0 alone holds
    the lock and writes.

    `resume` ("latest" or a checkpoint path) continues a run, taking from `config` only the
    settings that may change (those named in `sources`, as load_config returns them);
    `init_from` starts from a checkpoint's weights; `overwrite` lets a new run replace the
    files of another in the output directory; `progress` shows a bar (None: when stderr is
    a terminal)."""
    from rustgpt.checkpoint import CheckpointManager
    from rustgpt.comm import SingleProcess
    from rustgpt.errors import SerializationError
    from rustgpt.fileio import DirectoryLock

    if resume is not None and init_from is not None:
        _fail("--resume continues a run and --init-from starts a new one: pass one of them")
    comm = comm or SingleProcess()
    show = (sys.stderr.isatty() if progress is None else progress) and comm.is_main
    if not comm.is_main:
        return _train_locked(config, resume, sources or {}, init_from, overwrite, show, comm)
    out = Path(config.checkpoint.directory)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SerializationError(f"{out}: cannot write checkpoints here "
                                 f"({err.strerror or err})") from err
    with DirectoryLock(out):
        CheckpointManager(out).remove_stale()  # temporary files of writers killed mid-save
        return _train_locked(config, resume, sources or {}, init_from, overwrite, show, comm)


def _train_locked(config, resume, sources, init_from, overwrite, show_progress, comm) -> int:
    import time

    import rustgpt
    from rustgpt.errors import TrainingError
    from rustgpt.run import build_run
    from rustgpt.training import ProgressBar

    run = build_run(config, resume=resume, init_from=init_from, sources=sources,
                    overwrite=overwrite, comm=comm)
    config, trainer, out = run.config, run.trainer, run.manager.directory
    if config.logging.tensorboard and comm.is_main:
        from rustgpt.tensorboard import TensorBoardCallback

        trainer.callbacks.append(TensorBoardCallback(
            config.logging.tensorboard, config.checkpoint.every_epochs,
            sample=_sampler(run), purge_step=run.resumed.step + 1 if run.resumed else None))
    if show_progress:
        trainer.callbacks.append(ProgressBar())
    log.info("kernels: %s", rustgpt.kernels_info())
    if comm.size > 1:  # which process is which rank: a launcher reports a failure by PID
        import os
        import socket

        where = comm.gather(f"PID {os.getpid()} on {socket.gethostname()}")
        log.info("%d processes: %s", comm.size,
                 ", ".join(f"rank {rank} = {w}" for rank, w in enumerate(where)))
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
        if comm.is_main:
            run.recorder.write()  # the numbers up to a divergence are the ones that matter now
        raise
    finally:
        for callback in trainer.callbacks:
            close = getattr(callback, "close", None)
            if close is not None:
                close()
    elapsed = time.perf_counter() - began
    steps = trainer.position.step - first_step
    if not comm.is_main:
        return 0
    if not done:
        if not comm.is_main:
            return 128 + seen.get("signal", signal.SIGINT)
        run.recorder.write()
        path = run.saver.save(trainer)
        tell(f"stopped at step {trainer.position.step}; saved {path}. Continue with "
             f"`rustgpt-cli train --output {out} --resume`", logging.WARNING)
        return 128 + seen.get("signal", signal.SIGINT)
    if steps == 0:
        more = "--max-iters" if config.data.text else "--pretraining-epochs or --instruction-epochs"
        click.echo(f"nothing to train: the run in {out}/ had done all its steps (step "
                   f"{first_step:,}); raise {more} to train on")
        return 0
    best = run.manager.best()
    loss = (f"val loss {trainer.val_loss:.4f}" if config.data.text else
            f"final epoch loss {trainer.epoch_loss:.4f}")
    click.echo(f"trained {steps:,} steps (to step {trainer.position.step:,}) in {elapsed:.1f} s; "
               f"{loss}; checkpoints in {out}/ (best: {best.name if best else '-'})")
    return 0


def _sampler(run):
    """A function returning a sample of the model's writing for TensorBoard: a chat model's
    answer to the first chat example's question, a text model's continuation of the
    validation split's first tokens."""
    from rustgpt import generation

    model = run.model
    if run.corpus is not None:
        prompt = model.tokenizer.decode(run.trainer.phases[0].val[:16].tolist())
        return lambda: prompt + generation.generate(model, prompt, max_tokens=64)
    first = run.trainer.phases[-1].sequences[0].tolist()
    text = model.tokenizer.decode(first)
    cut = text.find("Assistant:")
    prompt = text[:cut + len("Assistant:")] if cut >= 0 else " ".join(text.split()[:5])
    return lambda: prompt + " " + generation.generate(model, prompt, raw=True, max_tokens=40)


# ---- generate / chat -------------------------------------------------------------------------

def _load_model(checkpoint: str):
    """The model of the checkpoint at `checkpoint` (serve's engine process loads it so: a
    module-level function can be pickled)."""
    return _load_checkpoint(checkpoint).build_model()


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
        click.option("--precision", type=click.Choice(["fp32", "bf16", "auto"]),
                     help="Matmuls in fp32 (default), bf16 (a bf16 copy of the weights) or "
                          "auto (bf16 where the CPU has AMX or AVX512-BF16)."),
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
                  seed=g.seed, precision=g.precision)
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
        from rustgpt.corpus import TokenFile, cache_dir
        from rustgpt.training import evaluate_text

        corpus = TokenFile.build(texts, model.tokenizer, cache_dir(config.data.token_cache))
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

    from rustgpt.corpus import find_sources, pieces, read_errors
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
        tokenizer = train_tokenizer(kind, pieces(sources, read_errors(kind), update),
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
    from rustgpt.corpus import find_sources, pieces, read_errors
    from rustgpt.tokenizer import tokens_per_byte

    state.config()
    tokenizer = _load_tokenizer(spec)
    click.echo(f"kind: {tokenizer.kind}")
    click.echo(f"vocabulary: {tokenizer.size:,} tokens")
    for name in ("eos_id", "unk_id"):
        i = getattr(tokenizer, name)
        click.echo(f"{name}: " + ("none" if i is None else f"{i} {tokenizer.decode([i])!r}"))
    if texts:
        ratio = tokens_per_byte(tokenizer, pieces(find_sources(texts), read_errors(tokenizer.kind)))
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


# ---- serve ----------------------------------------------------------------------------------

SERVE_PACKAGES = ("starlette", "uvicorn", "prometheus_client")  # the serve extra's


@main.command()
@click.option("--checkpoint", default=None, type=click.Path(),
              help="Checkpoint file, or a directory (its best). Default ./checkpoints.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (elsewhere than loopback, set an API key).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key", envvar="RUSTGPT_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on every route but /health and the "
                   "chat page (default: $RUSTGPT_API_KEY, else no key).")
@click.option("--max-batch", default=16, show_default=True, type=click.IntRange(1, 1024),
              help="Requests decoded together, one token each per step.")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(0),
              help="Requests waiting beyond --max-batch; more are answered 429.")
@click.option("--threads", type=click.IntRange(1),
              help="Kernel threads of the decoding engine (default: one less than "
                   "OMP_NUM_THREADS, or than the physical cores, at least 1: a core is left "
                   "to the HTTP side).")
@click.option("--drain-timeout", default=30.0, show_default=True, type=click.FloatRange(0),
              help="Seconds in-flight requests may take to finish after SIGTERM.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "auto"]),
              help="Matmuls in fp32 (default, [generation] precision), bf16 (from a bf16 copy "
                   "of the weights) or auto (bf16 where the CPU has AMX or AVX512-BF16).")
@group_options
@click.pass_obj
def serve(state: State, checkpoint, host, port, api_key, max_batch, max_queue, threads,
          drain_timeout, precision):
    """Serve a checkpoint over HTTP: OpenAI's /v1/chat/completions and /v1/completions
    (streaming or not, continuous batching), /v1/models, /health, /metrics, and a chat
    page at /. Parameters a request leaves out take the [generation] settings.

    SIGTERM stops taking requests, lets the in-flight ones finish (--drain-timeout) and
    exits 0. Needs the serve extra: pip install 'rustgpt[serve]'.
    """
    config, _ = state.config(generation={"precision": precision} if precision else {})
    try:
        from rustgpt.serve.server import run_server
    except ImportError as err:
        missing = (err.name or "").split(".")[0]
        if missing not in SERVE_PACKAGES:
            raise
        _fail(f"serve needs {missing}, from the serve extra: pip install 'rustgpt[serve]'")
    from rustgpt._kernels import get_num_threads
    from rustgpt.checkpoint import CheckpointManager
    from rustgpt.resources import max_threads, threads_bound_text

    if threads is not None and threads > max_threads():
        _fail(f"--threads {threads}: expected at most {threads_bound_text()}")
    if threads is None:  # the kernels' default (OMP_NUM_THREADS, else the cores) less one
        threads = max(1, get_num_threads() - 1)
    if config.generation.beam_width > 1:
        tell(f"serve: [generation] beam_width = {config.generation.beam_width} is not used: "
             f"the server samples each request (no beam search)", logging.WARNING,
             "warning: ")
    path = CheckpointManager.resolve(checkpoint or config.checkpoint.directory)
    run_server(functools.partial(_load_model, str(path)), host=host, port=port,
               api_key=api_key, generation=config.generation, max_batch=max_batch,
               max_queue=max_queue, threads=threads, drain_timeout=drain_timeout)


if __name__ == "__main__":
    main()
