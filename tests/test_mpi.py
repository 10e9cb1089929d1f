"""Data-parallel training through a real `mpiexec -n 2` (the mpi extra: mpi4py and the
MPICH wheel): the same losses and weights as one process at the same global batch, stop by
signal with a checkpoint and a resume on another number of processes, a killed rank ending
the job; and the pieces apart: launcher detection, no MPI in a plain run, the weights
check."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from rustgpt.comm import SingleProcess, launched_size
from rustgpt.errors import TrainingError
from rustgpt.run import WeightsCheck

MPIEXEC = shutil.which("mpiexec", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
needs_mpi = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec: pip install '.[mpi]'")
WORDS = "the king said to the queen that the night was long and the stars were cold".split()
MODEL = ["--arch", "gpt", "--num-layers", "1", "--num-heads", "2", "--embedding-dim", "16",
         "--hidden-dim", "32", "--max-seq-len", "16", "--log-level", "WARNING"]


@pytest.fixture
def corpus(tmp_path, rng):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choice(WORDS, 10)) for _ in range(300)) + "\n")
    return path


def env(tmp_path):
    return {**os.environ, "LLM_DATA_TOKEN_CACHE": str(tmp_path / "cache"),
            "OMP_NUM_THREADS": "1"}


def train(tmp_path, corpus, out, ranks, *extra, wait=True):
    """`rustgpt-cli train --text` on `ranks` processes (1: no launcher)."""
    cli = [sys.executable, "-m", "rustgpt.cli", "train", "--text", str(corpus), *MODEL,
           "--output", str(out), *map(str, extra)]
    command = cli if ranks == 1 else [MPIEXEC, "-n", str(ranks), *cli]
    if not wait:
        return subprocess.Popen(command, env=env(tmp_path), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, env=env(tmp_path), capture_output=True, text=True,
                          timeout=300)


@needs_mpi
def test_two_ranks_train_as_one_process(tmp_path, corpus):
    """20 steps on 2 ranks = 20 steps of one process at the same global batch: every
    step's loss within 1e-5 relative, the val losses alike, the final weights within 1e-5;
    rank 0 alone wrote the files and logged, and the metrics hold the all-reduce time."""
    args = ["--batch-size", 6, "--max-iters", 20, "--eval-interval", 10, "--eval-iters", 2,
            "--dropout", 0.1, "--grad-accum", 2]
    one = train(tmp_path, corpus, tmp_path / "one", 1, *args)
    two = train(tmp_path, corpus, tmp_path / "two", 2, *args)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("trained 20 steps") == 1 and "rank 1" not in two.stderr
    rows = [json.loads((tmp_path / d / "metrics.json").read_text())["steps"]
            for d in ("one", "two")]
    for a, b in zip(*rows):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert (a["val_loss"] is None) == (b["val_loss"] is None)
        if a["val_loss"] is not None:
            assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)
    assert all(r["allreduce_s"] is not None for r in rows[1])
    assert all(r["allreduce_s"] is None for r in rows[0])
    a, b = (load_file(tmp_path / d / "ckpt-00000020.safetensors") for d in ("one", "two"))
    for name in a:
        if not name.startswith("optim."):
            np.testing.assert_allclose(b[name], a[name], rtol=0, atol=1e-5, err_msg=name)


def endless_job(tmp_path, corpus, out):
    """A 2-rank job of (practically) endless steps, once it has written a checkpoint."""
    job = train(tmp_path, corpus, out, 2, "--batch-size", 4, "--max-iters", 100000,
                "--eval-interval", 50, "--eval-iters", 1, wait=False)
    deadline = time.monotonic() + 60
    while not list(out.glob("ckpt-*.safetensors")) and time.monotonic() < deadline:
        time.sleep(0.2)
    return job


@needs_mpi
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_to_mpiexec_saves_and_resume_takes_any_number_of_ranks(tmp_path, corpus,
                                                                        sig, code):
    out = tmp_path / "run"
    job = endless_job(tmp_path, corpus, out)
    job.send_signal(sig)
    stdout, stderr = job.communicate(timeout=60)
    assert job.returncode == code, stderr
    assert "stopped at step" in stderr and stderr.count("saved") == 1
    step = int(stderr.split("stopped at step ")[1].split(";")[0])
    resumed = train(tmp_path, corpus, out, 1, "--resume", "--max-iters", step + 3)
    assert resumed.returncode == 0, resumed.stderr
    assert f"trained 3 steps (to step {step + 3:,})" in resumed.stdout


@needs_mpi
def test_a_killed_rank_ends_the_job(tmp_path, corpus):
    """kill -9 of one rank: the job ends (well within 30 s) with a non-zero exit; the last
    checkpoint is intact."""
    out = tmp_path / "run"
    job = endless_job(tmp_path, corpus, out)
    ranks = [pid for pid, argv in processes() if argv[0] == sys.executable and str(out) in argv]
    assert len(ranks) == 2
    os.kill(max(ranks), signal.SIGKILL)
    killed = time.monotonic()
    job.communicate(timeout=60)
    assert job.returncode != 0 and time.monotonic() - killed < 30
    from rustgpt.checkpoint import Checkpoint, CheckpointManager

    Checkpoint.load(CheckpointManager(out).latest())


def processes():
    """(pid, argv) of the processes this user can see."""
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().decode().split("\0")
        except (OSError, ValueError):
            continue
        if entry.name.isdigit() and argv[0]:
            yield int(entry.name), argv


def test_a_plain_run_never_loads_mpi(tmp_path, corpus):
    code = ("import sys\n"
            "from rustgpt.cli import main\n"
            "try:\n"
            f"    main(['train', '--text', {str(corpus)!r}, '--max-iters', '2', "
            f"'--eval-interval', '2', '--eval-iters', '1', '--output', {str(tmp_path / 'r')!r}])\n"
            "except SystemExit as e:\n"
            "    assert e.code == 0, e.code\n"
            "print('mpi4py' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], env=env(tmp_path), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "False"


def test_launcher_detection():
    assert launched_size({}) == 1
    assert launched_size({"PMI_SIZE": "4"}) == 4
    assert launched_size({"OMPI_COMM_WORLD_SIZE": "3"}) == 3
    assert launched_size({"PMI_SIZE": "x"}) == 1


class Drifted(SingleProcess):
    size = 2

    def gather(self, obj):
        return [obj, "0" * 64]


def test_weights_that_drift_apart_are_an_error():
    from rustgpt.config import ModelConfig, TrainingConfig
    from rustgpt.model import LLM
    from rustgpt.tokenizer import CharTokenizer
    from rustgpt.training import Trainer

    model = LLM(ModelConfig(embedding_dim=8, hidden_dim=8, num_layers=1),
                CharTokenizer.from_texts(["abc"]))
    trainer = Trainer(model, TrainingConfig(), [])
    with pytest.raises(TrainingError, match=r"step 0: the weights of rank 1 differ from "
                                            r"rank 0's \(sha256 000000000000 vs"):
        WeightsCheck(Drifted(), 1).check(trainer)
    WeightsCheck(SingleProcess(), 1).check(trainer)  # one process agrees with itself
