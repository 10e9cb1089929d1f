"""rustgpt-cli end to end: Click's CliRunner for each command, and real subprocesses for
train -> generate -> info -> eval, start-up cost, and stop by signal then exact resume."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

from rustgpt.cli import main

TINY = """[model]
embedding_dim = 16
hidden_dim = 32
num_layers = 1
max_seq_len = 40
[training]
pretraining_epochs = 2
instruction_epochs = 2
batch_size = 8
[checkpoint]
every_epochs = 1
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained through the CLI once for the module."""
    root = tmp_path_factory.mktemp("cli")
    (root / "tiny.toml").write_text(TINY)
    result = CliRunner().invoke(main, ["--config", str(root / "tiny.toml"), "train",
                                       "--output", str(root / "ckpt")])
    assert result.exit_code == 0, result.output
    return root


def run(*args, env=None):
    return CliRunner().invoke(main, list(args), env=env)


def test_train_writes_checkpoints_metrics_and_summary(trained):
    files = {p.name for p in (trained / "ckpt").iterdir()}
    assert {"best.safetensors", "metrics.csv", "metrics.json"} <= files
    assert any(f.startswith("ckpt-") for f in files)
    steps = json.loads((trained / "ckpt" / "metrics.json").read_text())["steps"]
    assert len(steps) > 0 and all(s["loss"] is not None for s in steps)


def test_generate_info_eval(trained):
    ckpt = str(trained / "ckpt")
    out = run("generate", "How do mountains form?", "--checkpoint", ckpt, "--max-tokens", "5")
    assert out.exit_code == 0 and out.output.strip()
    sampled = run("generate", "Hello", "--checkpoint", ckpt, "--temperature", "0.8",
                  "--top-p", "0.9", "--seed", "3", "--stream", "--max-tokens", "5")
    assert sampled.exit_code == 0
    beam = run("generate", "Hello", "--checkpoint", ckpt, "--beam-width", "3")
    assert beam.exit_code == 0
    info = run("info", "--checkpoint", ckpt)
    assert info.exit_code == 0 and "total parameters" in info.output and "step:" in info.output
    data = trained / "eval.json"
    data.write_text(json.dumps(["User: Hello Assistant: Hello there </s>"]))
    ev = run("eval", str(data), "--checkpoint", ckpt)
    assert ev.exit_code == 0 and "perplexity:" in ev.output and "accuracy:" in ev.output


def test_chat_loop(trained):
    result = CliRunner().invoke(main, ["chat", "--checkpoint", str(trained / "ckpt"),
                                       "--max-tokens", "3"], input="Hello\n\nexit\n")
    assert result.exit_code == 0 and result.output.count("Model:") == 1


def test_errors_are_one_line(tmp_path):
    missing = run("generate", "hi", "--checkpoint", str(tmp_path / "none"))
    assert missing.exit_code == 1
    assert "run `rustgpt-cli train` first" in missing.output and "Traceback" not in missing.output
    bad = tmp_path / "bad.json"
    bad.write_text("[1]")
    result = run("train", "--pretraining-data", str(bad), "--output", str(tmp_path / "o"))
    assert result.exit_code == 1 and "bad.json: item 0 is a number" in result.output
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    unwritable = run("train", "--output", str(blocker / "out"), "--pretraining-epochs", "1")
    assert unwritable.exit_code == 1 and "cannot write checkpoints here" in unwritable.output
    env_bad = run("config", "show", env={"LLM_MODEL_NUM_HEADS": "3"})
    assert env_bad.exit_code == 1 and "num_heads = 3 must divide" in env_bad.output
    assert len(env_bad.output.strip().splitlines()) == 1


def test_generation_option_errors(trained):
    result = run("generate", "hi", "--checkpoint", str(trained / "ckpt"), "--top-p", "2")
    assert result.exit_code == 1 and "top_p = 2.0, expected in (0, 1]" in result.output


def test_config_show_and_init(tmp_path):
    shown = run("config", "show", env={"LLM_TRAINING_BATCH_SIZE": "4"})
    assert shown.exit_code == 0
    assert "batch_size = 4" in shown.output and "env LLM_TRAINING_BATCH_SIZE" in shown.output
    target = tmp_path / "r.toml"
    assert run("config", "init", str(target)).exit_code == 0
    again = run("config", "init", str(target))
    assert again.exit_code == 1 and "--force" in again.output
    assert run("--config", str(target), "config", "show").exit_code == 0


def test_plot_without_or_with_matplotlib(trained, tmp_path):
    result = run("plot", "--metrics", str(trained / "ckpt"), "--output", str(tmp_path / "p.png"))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert result.exit_code == 1 and "pip install 'rustgpt[plot]'" in result.output
    else:
        assert result.exit_code == 0 and (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_json_logs(trained, tmp_path):
    result = CliRunner().invoke(main, ["--log-format", "json", "--config",
                                       str(trained / "tiny.toml"), "train", "--output",
                                       str(tmp_path / "o"), "--pretraining-epochs", "1",
                                       "--instruction-epochs", "0"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stderr.splitlines()]  # every line parses
    assert any(line["message"].startswith("pretraining epoch 1/1") and "loss" in line
               for line in lines)


# ---- real processes ---------------------------------------------------------------------------

def cli(*args, cwd, **kwargs):
    return subprocess.run([sys.executable, "-m", "rustgpt.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300, **kwargs)


def test_subprocess_train_generate_info_eval(tmp_path):
    (tmp_path / "tiny.toml").write_text(TINY)
    train = cli("--config", "tiny.toml", "train", cwd=tmp_path)
    assert train.returncode == 0, train.stderr
    assert "checkpoints in checkpoints/" in train.stdout
    gen = cli("generate", "How do mountains form?", cwd=tmp_path)
    assert gen.returncode == 0 and gen.stdout.strip(), gen.stderr
    assert cli("info", cwd=tmp_path).returncode == 0
    (tmp_path / "d.csv").write_text("User: Hello Assistant: Hi </s>\n")
    assert cli("eval", "d.csv", cwd=tmp_path).returncode == 0


def test_help_does_not_import_numpy():
    code = ("import sys, runpy; sys.argv = ['rustgpt-cli', '--help']\n"
            "try:\n    runpy.run_module('rustgpt.cli', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "assert 'numpy' not in sys.modules and 'rustgpt._kernels' not in sys.modules, "
            "sorted(m for m in sys.modules if 'numpy' in m or 'rustgpt' in m)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_and_resume_matches_an_uninterrupted_run(tmp_path, sig, code):
    config = TINY.replace("pretraining_epochs = 2", "pretraining_epochs = 30").replace(
        "batch_size = 8", "batch_size = 1\nshuffle = true")
    (tmp_path / "c.toml").write_text(config)
    reference = cli("--config", "c.toml", "train", "--output", "full", cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr

    proc = subprocess.Popen([sys.executable, "-m", "rustgpt.cli", "--config", "c.toml", "train",
                             "--output", "cut"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list((tmp_path / "cut").glob("ckpt-*")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "--resume" in err
    # the metrics were written with the stop's checkpoint, up to its step
    stopped_at = int(sorted((tmp_path / "cut").glob("ckpt-*"))[-1].stem.split("-")[1])
    steps = json.loads((tmp_path / "cut" / "metrics.json").read_text())["steps"]
    assert steps[-1]["step"] == stopped_at

    resumed = cli("--config", "c.toml", "train", "--output", "cut", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    final = sorted((tmp_path / "full").glob("ckpt-*"))[-1].name
    a, b = load_file(tmp_path / "full" / final), load_file(tmp_path / "cut" / final)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


# ---- a run's directory: other runs, resume, init-from, lock ----------------------------------

def tiny_run(tmp_path, *args, env=None):
    """Train the TINY config into tmp_path/run (options after the command, as users type):
    on the bundled data, 15 steps an epoch of pretraining and 12 of instruction tuning."""
    (tmp_path / "tiny.toml").write_text(TINY)
    return run("train", "--config", str(tmp_path / "tiny.toml"), "--output",
               str(tmp_path / "run"), *args, env=env)


def test_a_new_run_refuses_another_runs_directory_and_overwrite_clears_only_its_files(tmp_path):
    first = tiny_run(tmp_path)
    assert first.exit_code == 0, first.output
    (tmp_path / "run" / "notes.txt").write_text("mine")
    again = tiny_run(tmp_path, "--embedding-dim", "8")
    assert again.exit_code == 1 and len(again.output.strip().splitlines()) == 1
    assert "--resume" in again.output and "--overwrite" in again.output
    assert "ckpt-" in again.output
    replaced = tiny_run(tmp_path, "--embedding-dim", "8", "--overwrite",
                        "--pretraining-epochs", "1", "--instruction-epochs", "1")
    assert replaced.exit_code == 0, replaced.output
    files = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert "notes.txt" in files and (tmp_path / "run" / "notes.txt").read_text() == "mine"
    ckpts = [f for f in files if f.startswith("ckpt-")]
    assert ckpts == ["ckpt-00000015.safetensors", "ckpt-00000027.safetensors"]  # the new run's
    best = load_file(tmp_path / "run" / "best.safetensors")
    assert best["embeddings.token"].shape[1] == 8


def test_resume_applies_new_epochs_and_refuses_new_sizes(tmp_path):
    assert tiny_run(tmp_path).exit_code == 0  # 2 x 15 + 2 x 12 = 54 steps
    refused = tiny_run(tmp_path, "--resume", "--embedding-dim", "8", "--batch-size", "2")
    assert refused.exit_code == 1 and len(refused.output.strip().splitlines()) == 1
    assert "[model] embedding_dim (16 -> 8)" in refused.output
    assert "[training] batch_size (8 -> 2)" in refused.output
    more = tiny_run(tmp_path, "--resume", "--instruction-epochs", "4")
    assert more.exit_code == 0, more.output
    assert "trained 24 steps (to step 78)" in more.output  # the instruction phase went on
    steps = json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"]
    assert [s["step"] for s in steps] == list(range(1, 79))
    done = tiny_run(tmp_path, "--resume", "--instruction-epochs", "4")
    assert done.exit_code == 0 and "nothing to train" in done.output


def test_init_from_starts_a_fresh_run_from_the_weights(tmp_path):
    assert tiny_run(tmp_path).exit_code == 0
    source = tmp_path / "run" / "best.safetensors"
    tuned = run("train", "--config", str(tmp_path / "tiny.toml"), "--output",
                str(tmp_path / "tuned"), "--init-from", str(source), "--pretraining-epochs", "0",
                "--instruction-epochs", "1", "--instruction-lr", "1e-9")
    assert tuned.exit_code == 0, tuned.output
    assert "trained 12 steps (to step 12)" in tuned.output  # a new schedule from step 1
    a, b = load_file(source), load_file(tmp_path / "tuned" / "ckpt-00000012.safetensors")
    for name in a:
        if not name.startswith("optim."):
            np.testing.assert_allclose(a[name], b[name], atol=1e-6, err_msg=name)
    assert np.abs(b["optim.m.output.w"]).max() > 0  # a fresh optimizer's moments
    assert load_file(source)["optim.m.output.w"].shape == b["optim.m.output.w"].shape
    wider = run("train", "--output", str(tmp_path / "w"), "--init-from", str(source),
                "--embedding-dim", "32")
    assert wider.exit_code == 1 and "[model] embedding_dim (16 -> 32)" in wider.output
    both = tiny_run(tmp_path, "--resume", "--init-from", str(source))
    assert both.exit_code == 1 and "pass one of them" in both.output


def test_a_second_run_into_a_locked_directory_names_the_holder(tmp_path):
    import os

    from rustgpt.fileio import DirectoryLock

    (tmp_path / "run").mkdir()
    with DirectoryLock(tmp_path / "run"):
        busy = tiny_run(tmp_path)
    assert busy.exit_code == 1 and f"PID {os.getpid()}" in busy.output
    assert not list((tmp_path / "run").glob("ckpt-*"))
    (tmp_path / "run" / ".metrics.json.abc123.tmp").write_text("left by a kill -9")
    assert tiny_run(tmp_path).exit_code == 0  # the lock was released with its holder
    assert not list((tmp_path / "run").glob("*.tmp"))  # stale temporaries removed


def test_divergence_writes_the_metrics_and_logs_the_failure(tmp_path):
    log_file = tmp_path / "run.log"
    result = tiny_run(tmp_path, "--pretraining-lr", "1e30",
                      env={"LLM_LOGGING_FILE": str(log_file)})
    assert result.exit_code == 1 and "training diverged" in result.output
    steps = json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"]
    assert steps and all(s["accuracy"] is not None for s in steps)
    assert "ERROR" in log_file.read_text() and "training diverged" in log_file.read_text()


def test_failures_reach_the_log_file_and_json_logs_stay_json(tmp_path):
    log_file = tmp_path / "gen.log"
    missing = run("generate", "hi", "--checkpoint", str(tmp_path / "none"),
                  env={"LLM_LOGGING_FILE": str(log_file)})
    assert missing.exit_code == 1 and missing.output.startswith("error: ")
    assert "ERROR" in log_file.read_text() and "no trained model" in log_file.read_text()
    as_json = run("generate", "hi", "--checkpoint", str(tmp_path / "none"), "--log-format",
                  "json")
    assert as_json.exit_code == 1
    line = json.loads(as_json.stderr.strip())
    assert line["level"] == "ERROR" and "no trained model" in line["message"]


def test_progress_bar_only_when_asked_or_on_a_terminal(tmp_path):
    quiet = tiny_run(tmp_path, "--pretraining-epochs", "1", "--instruction-epochs", "0")
    assert quiet.exit_code == 0 and "step/s" not in quiet.stderr and "it/s" not in quiet.stderr
    shown = tiny_run(tmp_path, "--pretraining-epochs", "1", "--instruction-epochs", "0",
                     "--overwrite", "--progress")
    assert shown.exit_code == 0 and "15/15" in shown.stderr


def test_plot_defaults_to_the_configured_directory(trained, tmp_path):
    pytest.importorskip("matplotlib")
    result = run("plot", "--output", str(tmp_path / "p.png"),
                 env={"LLM_CHECKPOINT_DIRECTORY": str(trained / "ckpt")})
    assert result.exit_code == 0, result.output
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_tensorboard_option_writes_event_files(tmp_path):
    pytest.importorskip("tensorboardX")
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    result = tiny_run(tmp_path, "--pretraining-epochs", "1", "--instruction-epochs", "1",
                      "--tensorboard", str(tmp_path / "tb"))
    assert result.exit_code == 0, result.output
    events = event_accumulator.EventAccumulator(str(tmp_path / "tb"), size_guidance={
        event_accumulator.TENSORS: 0})
    events.Reload()
    assert {"train/loss", "train/accuracy", "train/lr"} <= set(events.Tags()["scalars"])
    assert len(events.Scalars("train/loss")) == 27  # every step of 15 + 12
    assert events.Tensors("sample/text_summary")  # a generated sample at the checkpoints


def test_a_thread_count_beyond_the_bound_is_one_line(tmp_path):
    result = tiny_run(tmp_path, "--threads", "100000")
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "[training] threads = 100000, expected between 0 and" in result.output


def test_train_the_gpt_architecture(tmp_path):
    """--arch gpt trains (an option given as well wins over the arch's), the checkpoint
    carries the architecture for generate and info, and --resume cannot change it."""
    result = tiny_run(tmp_path, "--arch", "gpt", "--bias", "--num-heads", "4", "--dropout",
                      "0.1", "--pretraining-epochs", "1", "--instruction-epochs", "1")
    assert result.exit_code == 0, result.output
    ckpt = str(tmp_path / "run")
    info = run("info", "--checkpoint", ckpt)
    assert ("arch gpt (pre-norm, gelu, attention projection, tied embeddings, dropout 0.1)"
            in info.output)
    assert run("generate", "Hello", "--checkpoint", ckpt, "--max-tokens", "3").exit_code == 0
    refused = tiny_run(tmp_path, "--resume", "--arch", "rustgpt", "--no-bias")
    assert refused.exit_code == 1 and len(refused.output.strip().splitlines()) == 1
    assert "[model] arch ('gpt' -> 'rustgpt'), [model] bias (True -> False)" in refused.output
    bad = tiny_run(tmp_path, "--arch", "llama")
    assert bad.exit_code == 2 and "'llama' is not one of 'rustgpt', 'gpt'" in bad.output


def test_eval_on_a_text_corpus_reports_bits_per_byte(tmp_path):
    from rustgpt.checkpoint import Checkpoint
    from rustgpt.config import Config, ModelConfig
    from rustgpt.model import LLM
    from rustgpt.tokenizer import train_tokenizer

    text = "".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(60))
    (tmp_path / "corpus.txt").write_text(text)
    config = Config(model=ModelConfig(embedding_dim=16, hidden_dim=32, num_layers=1,
                                      max_seq_len=32, arch="gpt"))
    model = LLM(config.model, train_tokenizer("char", [text]), seed=0)
    Checkpoint.from_model(model, config).save(tmp_path / "char.safetensors")
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    result = run("eval", "--checkpoint", str(tmp_path / "char.safetensors"), "--text",
                 str(tmp_path / "corpus.txt"), "--split", "val", "--json", env=env)
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    assert set(scores) >= {"loss", "perplexity", "bits_per_byte", "tokens", "split"}
    assert scores["tokens"] == len(text) - int(len(text) * 0.9) - 1  # the last 10%, less one
    assert scores["bits_per_byte"] == pytest.approx(scores["loss"] / np.log(2))  # ASCII chars
    assert list((tmp_path / "cache" / "rustgpt").glob("tokens-*.bin"))  # for the next run
    both = run("eval", "x.json", "--checkpoint", str(tmp_path / "char.safetensors"), "--text",
               str(tmp_path / "corpus.txt"), env=env)
    assert both.exit_code == 1 and "one of them" in both.output


@pytest.fixture(scope="module")
def char_checkpoint(tmp_path_factory):
    """A small GPT-block model with a char tokenizer (trained on text: no template, no
    end-of-text token), saved as a checkpoint."""
    from rustgpt.checkpoint import Checkpoint
    from rustgpt.config import Config, ModelConfig
    from rustgpt.model import LLM
    from rustgpt.tokenizer import train_tokenizer

    play = "ROMEO:\nBut soft, what light through yonder window breaks?\nJULIET:\nAy me!\n"
    config = Config(model=ModelConfig(arch="gpt", embedding_dim=32, hidden_dim=64,
                                      num_layers=2, num_heads=4, max_seq_len=32))
    model = LLM(config.model, train_tokenizer("char", [play]), seed=1)
    path = tmp_path_factory.mktemp("char") / "char.safetensors"
    Checkpoint.from_model(model, config).save(path)
    return str(path)


def test_generate_continues_raw_text_on_a_text_model(char_checkpoint):
    """The issue's command: PROMPT and its continuation, 200 characters past max_seq_len;
    the same seed gives the same text, streamed or not, under either option name."""
    args = ["generate", "--checkpoint", char_checkpoint, "ROMEO:", "--max-new-tokens", "200",
            "--temperature", "0.8", "--top-k", "40", "--seed", "1"]
    first = run(*args)
    assert first.exit_code == 0, first.output
    text = first.stdout[:-1]  # less echo's newline
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 200
    assert run(*args).stdout == first.stdout
    assert run(*args, "--stream").stdout == first.stdout
    alias = [a if a != "--max-new-tokens" else "--max-tokens" for a in args]
    assert run(*alias).stdout == first.stdout
    assert run(*args[:-1], "2").stdout != first.stdout
    default = run("generate", "--checkpoint", char_checkpoint, "ROMEO:")
    assert default.exit_code == 0 and len(default.stdout) == len("ROMEO:") + 256 + 1
    beam = run("generate", "--checkpoint", char_checkpoint, "ROMEO:", "--beam-width", "2",
               "--max-new-tokens", "40")
    assert beam.exit_code == 0 and len(beam.stdout) == len("ROMEO:") + 40 + 1


def test_chat_on_a_text_model_continues_each_line(char_checkpoint):
    result = CliRunner().invoke(main, ["chat", "--checkpoint", char_checkpoint,
                                       "--max-new-tokens", "5"], input="ROMEO:\nexit\n")
    assert result.exit_code == 0, result.output
    answer = result.stdout.split("Model: ", 1)[1]
    assert answer.startswith("ROMEO:") and answer[len("ROMEO:") + 5:] == "\nYou: "


def test_max_new_tokens_is_max_tokens_on_a_chat_model(trained):
    ckpt = str(trained / "ckpt")
    new = run("generate", "How do mountains form?", "--checkpoint", ckpt, "--max-new-tokens", "4")
    old = run("generate", "How do mountains form?", "--checkpoint", ckpt, "--max-tokens", "4")
    assert new.exit_code == 0 and new.stdout == old.stdout
    assert "--max-new-tokens, --max-tokens" in run("generate", "--help").output
