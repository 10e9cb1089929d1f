"""An interactive shell around a trained model, set up as an application should set up
rustgpt: settings from defaults < --config FILE < LLM_* environment variables < options,
logging from the [logging] settings, answers from the [generation] settings.

    python examples/interactive.py [--config FILE] [--log-level LEVEL] [CHECKPOINT]

Commands: prompt <text>, metrics, config, save <path>, load [<path>], help, exit.
"""

import logging
import shlex
import sys

import click

import rustgpt
from rustgpt.checkpoint import Checkpoint, CheckpointManager
from rustgpt.config import Config, load_config, render_toml, to_dict
from rustgpt.generation import generate
from rustgpt.log import setup_logging

log = logging.getLogger("rustgpt.interactive")  # under "rustgpt": setup_logging's handler

HELP = """commands:
  prompt <text>   answer <text> with the model ([generation] settings; greedy by default)
  metrics         summary of the training metrics next to the checkpoint
  config          the configuration the model was trained with
  save <path>     write the model to a .safetensors file (quote a path with spaces)
  load [<path>]   load a checkpoint file or directory (default: [checkpoint] directory)
  help            this text
  exit            quit (Ctrl-D too)"""


def path_argument(command: str, rest: str) -> str:
    """The one path after `command`, parsed as a shell would ("a b", 'a b', a\\ b)."""
    try:
        words = shlex.split(rest)
    except ValueError as err:  # an unbalanced quote or a trailing backslash
        raise rustgpt.ValidationError(f"{command}: cannot read {rest.strip()} ({err})") from None
    if len(words) != 1:
        raise rustgpt.ValidationError(f"{command}: expected one path, found {len(words)} "
                                      f"(quote a path that holds spaces)")
    return words[0]


class Shell:
    def __init__(self, config: Config, checkpoint: str) -> None:
        self.config = config
        self.generation = to_dict(config)["generation"]  # generate()'s keyword arguments
        self.load(checkpoint)

    def load(self, path: str) -> None:
        resolved = CheckpointManager.resolve(path)
        checkpoint = Checkpoint.load(resolved)
        self.model = checkpoint.build_model()
        self.checkpoint, self.source = checkpoint, resolved
        print(f"loaded {resolved} ({self.model.total_parameters():,} parameters)")

    def run_command(self, line: str) -> bool:
        """Run one command line; False means quit. LlmErrors are left to the caller."""
        command, _, rest = line.strip().partition(" ")
        if command in ("exit", "quit"):
            return False
        if command in ("help", ""):
            print(HELP)
        elif command == "prompt":
            print(generate(self.model, rest, **self.generation))
        elif command == "metrics":
            metrics_file = self.source.parent / "metrics.json"
            if not metrics_file.exists():
                print(f"no metrics.json beside {self.source}")
                return True
            for key, value in rustgpt.Metrics.from_json(metrics_file).summary().items():
                print(f"{key}: {value}")
        elif command == "config":
            print(render_toml(self.checkpoint.config), end="")
        elif command == "save":
            print(f"saved {self.checkpoint.save(path_argument('save', rest))}")
        elif command == "load":
            self.load(path_argument("load", rest) if rest.strip() else
                      self.config.checkpoint.directory)
        else:
            print(f"unknown command {command!r}; type help")
        return True


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("checkpoint", required=False)
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="TOML (or YAML) config file.")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"],
                                               case_sensitive=False),
              help="Log verbosity (default: [logging] level).")
def main(checkpoint, config_file, log_level):
    """An interactive shell around a trained model: CHECKPOINT is a checkpoint file or a
    training run's directory (default: the [checkpoint] directory, ./checkpoints).

    Settings come from defaults < --config FILE < LLM_<SECTION>_<KEY> environment
    variables < options. Type help in the shell for its commands."""
    try:
        config, sources = load_config(config_file, overrides={"logging": {"level": log_level}})
        setup_logging(config.logging.level, config.logging.format, config.logging.file or None)
        log.debug("settings not at their defaults: %s", sources or "none")
        shell = Shell(config, checkpoint or config.checkpoint.directory)
    except rustgpt.LlmError as err:
        sys.exit(f"error: {err}")
    print("type help for commands")
    while True:
        try:
            if not shell.run_command(input("rustgpt> ")):
                return
        except (EOFError, KeyboardInterrupt):  # Ctrl-D, Ctrl-C: quit quietly
            print()
            return
        except rustgpt.LlmError as err:  # one line, and the shell goes on
            print(f"error: {err}", file=sys.stderr)


if __name__ == "__main__":
    main()
