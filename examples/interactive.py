"""An interactive shell around a trained model.

    python examples/interactive.py [CHECKPOINT]      (default ./checkpoints)

Commands: prompt <text>, metrics, config, save <path>, load <path>, help, exit.
"""

import shlex
import sys
from pathlib import Path

import rustgpt
from rustgpt.checkpoint import Checkpoint, CheckpointManager
from rustgpt.config import render_toml

HELP = """commands:
  prompt <text>   answer <text> with the model (greedy)
  metrics         summary of the training metrics next to the checkpoint
  config          the configuration the model was trained with
  save <path>     write the model to a .safetensors file
  load <path>     load a checkpoint file or directory
  help            this text
  exit            quit (Ctrl-D too)"""


class Shell:
    def __init__(self, path: str) -> None:
        self.checkpoint: Checkpoint | None = None
        self.model = None
        self.source: Path | None = None
        self.load(path)

    def load(self, path: str) -> None:
        resolved = CheckpointManager.resolve(path)
        self.checkpoint = Checkpoint.load(resolved)
        self.model = self.checkpoint.build_model()
        self.source = resolved
        print(f"loaded {resolved} ({self.model.total_parameters():,} parameters)")

    def run_command(self, line: str) -> bool:
        """Run one command line; False means quit."""
        command, _, rest = line.strip().partition(" ")
        if command in ("exit", "quit"):
            return False
        if command == "help" or not command:
            print(HELP)
        elif command == "prompt":
            print(self.model.generate(rest) if rest.strip() else "usage: prompt <text>")
        elif command == "metrics":
            metrics_file = self.source.parent / "metrics.json"
            if metrics_file.exists():
                for key, value in rustgpt.Metrics.from_json(metrics_file).summary().items():
                    print(f"{key}: {value}")
            else:
                print(f"no metrics.json beside {self.source}")
        elif command == "config":
            print(render_toml(self.checkpoint.config), end="")
        elif command == "save":
            target = shlex.split(rest)[0] if rest.strip() else ""
            if not target:
                print("usage: save <path>")
            else:
                print(f"saved {self.checkpoint.save(target)}")
        elif command == "load":
            self.load(rest.strip() or "checkpoints")
        else:
            print(f"unknown command {command!r}; type help")
        return True


def main() -> None:
    try:
        shell = Shell(sys.argv[1] if len(sys.argv) > 1 else "checkpoints")
    except rustgpt.LlmError as err:
        sys.exit(f"error: {err}")
    print("type help for commands")
    while True:
        try:
            line = input("rustgpt> ")
        except EOFError:
            print()
            return
        try:
            if not shell.run_command(line):
                return
        except rustgpt.LlmError as err:
            print(f"error: {err}")


if __name__ == "__main__":
    main()
