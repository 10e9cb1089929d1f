"""The examples run as a user runs them, in subprocesses: interactive.py driven through stdin
against a tiny checkpoint trained here, and embed.py to its answers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import rustgpt
from rustgpt.cli import main as cli

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PRETRAINING = ["The sun is a star </s>", "Mountains form when plates collide </s>",
               "Water boils at one hundred degrees </s>"]
CHAT = ["User: What is the sun? Assistant: The sun is a star </s>",
        "User: How do mountains form? Assistant: Mountains form when plates collide </s>"]
PROMPT = "How do mountains form?"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny model (D 8, one block, 2 + 2 epochs of a few examples) trained through the CLI:
    checkpoints and metrics.json, as a training run leaves them."""
    root = tmp_path_factory.mktemp("examples")
    (root / "pretraining.json").write_text(json.dumps(PRETRAINING))
    (root / "chat.json").write_text(json.dumps(CHAT))
    result = CliRunner().invoke(cli, [
        "train", "--output", str(root / "run"),
        "--pretraining-data", str(root / "pretraining.json"),
        "--chat-training-data", str(root / "chat.json"),
        "--embedding-dim", "8", "--hidden-dim", "16", "--num-layers", "1", "--max-seq-len", "24",
        "--pretraining-epochs", "2", "--instruction-epochs", "2"],
        env={"LLM_LOGGING_LEVEL": "WARNING"})
    assert result.exit_code == 0, result.output
    return root / "run"


def run(script: str, *args: str, stdin: str = "", cwd: Path, **env: str):
    """`python examples/<script> args` with `stdin`; LLM_* variables only from `env`. One
    kernel thread: these models are too small to gain from more, and a busy machine makes
    spinning OpenMP threads slow."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LLM_")}
    return subprocess.run([sys.executable, str(EXAMPLES / script), *args], input=stdin,
                          capture_output=True, text=True, cwd=cwd, timeout=120,
                          env={**clean, "OMP_NUM_THREADS": "1", **env})


def test_interactive_help(tmp_path):
    result = run("interactive.py", "--help", cwd=tmp_path)
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.startswith("Usage: interactive.py [OPTIONS] [CHECKPOINT]")
    for text in ("--config FILE", "--log-level", "LLM_<SECTION>_<KEY>"):
        assert text in result.stdout
    assert "no such checkpoint" not in result.stdout


@pytest.mark.parametrize("args, env, message", [
    (["missing.safetensors"], {}, "error: missing.safetensors: no such checkpoint"),
    ([], {}, "error: checkpoints: no such checkpoint"),  # [checkpoint] directory's default
    ([], {"LLM_CHECKPOINT_DIRECTORY": "elsewhere"}, "error: elsewhere: no such checkpoint"),
    (["--config", "absent.toml"], {}, "error: absent.toml: "),
    ([], {"LLM_GENERATION_TOP_P": "3"},
     "error: env LLM_GENERATION_TOP_P: [generation] top_p = 3.0, expected in (0, 1]"),
])
def test_interactive_start_errors_are_one_line_and_exit_1(tmp_path, args, env, message):
    result = run("interactive.py", *args, cwd=tmp_path, **env)
    assert result.returncode == 1
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1, result.stderr
    assert result.stdout == ""


def test_interactive_session(run_dir, tmp_path):
    saved = tmp_path / "a b" / "my model.safetensors"
    saved.parent.mkdir()
    commands = [f"prompt {PROMPT}", "metrics", "config", f'save "{saved}"', f"load '{saved}'",
                "metrics", f"prompt {PROMPT}", f'save "{saved.parent}/x', f'load "{saved}',
                "save my model.safetensors", "prompt", "bogus", "help", "exit", "help"]
    result = run("interactive.py", str(run_dir), stdin="\n".join(commands) + "\n", cwd=tmp_path,
                 LLM_GENERATION_MAX_TOKENS="3", LLM_LOGGING_LEVEL="DEBUG")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    # answers follow [generation] max_tokens from LLM_GENERATION_MAX_TOKENS
    expected = rustgpt.load(run_dir).generate(PROMPT, max_tokens=3)
    assert out.count(f"rustgpt> {expected}\n") == 2
    assert f"loaded {run_dir / 'best.safetensors'} (" in out
    assert "rustgpt> steps: " in out and "loss_trend: " in out  # metrics.json beside it
    assert "embedding_dim = 8" in out and "num_layers = 1" in out  # the model's config
    assert f"saved {saved}\n" in out and saved.exists()
    assert f"loaded {saved} (" in out and f"no metrics.json beside {saved}" in out
    assert "unknown command 'bogus'; type help" in out
    assert out.count("load [<path>]") == 1  # help once: exit ended the session
    # logging set up from LLM_LOGGING_LEVEL; every error one line, the shell went on
    log_line, *errors = result.stderr.splitlines()
    assert "DEBUG rustgpt.interactive: settings not at their defaults:" in log_line
    assert "'generation.max_tokens': 'env LLM_GENERATION_MAX_TOKENS'" in log_line
    assert errors == [
        f'error: save: cannot read "{saved.parent}/x (No closing quotation)',
        f'error: load: cannot read "{saved} (No closing quotation)',
        "error: save: expected one path, found 2 (quote a path that holds spaces)",
        "error: generate: prompt '' is empty, expected some text",
    ]


def test_interactive_layers_file_env_and_options(run_dir, tmp_path):
    config = tmp_path / "shell.toml"
    config.write_text(f'[checkpoint]\ndirectory = "{run_dir}"\n[generation]\nmax_tokens = 5\n'
                      f'[logging]\nformat = "json"\nlevel = "WARNING"\n')
    result = run("interactive.py", "--config", str(config), "--log-level", "debug",
                 stdin=f"load\nprompt {PROMPT}\n", cwd=tmp_path, LLM_GENERATION_MAX_TOKENS="2")
    assert result.returncode == 0, result.stderr  # Ctrl-D (end of input) quits
    assert result.stdout.count(f"loaded {run_dir / 'best.safetensors'} (") == 2
    assert f"rustgpt> {rustgpt.load(run_dir).generate(PROMPT, max_tokens=2)}\n" in result.stdout
    (record,) = [json.loads(line) for line in result.stderr.splitlines()]
    assert record["level"] == "DEBUG" and record["logger"] == "rustgpt.interactive"
    for source in (f"'checkpoint.directory': 'file {config}'",
                   "'generation.max_tokens': 'env LLM_GENERATION_MAX_TOKENS'",
                   "'logging.level': 'command line'", f"'logging.format': 'file {config}'"):
        assert source in record["message"]


def test_embed(tmp_path):
    result = run("embed.py", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "'When does the library open?' -> Assistant: The library opens at nine in the morning",
        "'How long can I borrow a book?' -> Assistant: Books can be borrowed for three weeks",
        "'' -> error: generate: prompt '' is empty, expected some text",
    ]
    assert "INFO rustgpt.training: instruction epoch" in result.stderr  # the app's logging
