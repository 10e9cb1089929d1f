"""TensorBoardCallback: event files read back with TensorBoard's own reader; sample text;
val loss; resumed runs; the missing extra and an unwritable log directory."""

import math
import sys

import pytest

pytest.importorskip("tensorboardX")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

from rustgpt.config import TrainingConfig  # noqa: E402
from rustgpt.errors import ConfigError, SerializationError  # noqa: E402
from rustgpt.tensorboard import TAGS, TensorBoardCallback  # noqa: E402

from tests.test_training import Recorder, make  # noqa: E402


def read(logdir):
    """(scalars {tag: [(step, value)]}, texts {tag: [(step, text)]}) of every event file."""
    acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={"scalars": 0,
                                                                         "tensors": 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
               for tag in acc.Tags()["scalars"]}
    texts = {tag: [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag)]
             for tag in acc.Tags()["tensors"]}
    return scalars, texts


def test_training_writes_every_step_and_a_sample_at_evaluations(tmp_path):
    rec = Recorder()
    answers = []

    def sample():
        answers.append(trainer.model.generate("where does the sun rise ?", max_tokens=4))
        return answers[-1]

    cfg = TrainingConfig(pretraining_epochs=3, instruction_epochs=2, batch_size=2)
    trainer = make(cfg, rec)
    trainer.callbacks.append(TensorBoardCallback(tmp_path / "tb", every_epochs=2, sample=sample))
    assert trainer.run()

    scalars, texts = read(tmp_path / "tb")
    expected = {tag for key, tag in TAGS.items() if key in rec.steps[0]}
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s"} <= expected
    assert set(scalars) == expected
    for key, tag in TAGS.items():
        if tag in expected:
            want = [(r["step"], r[key]) for r in rec.steps]
            assert [s for s, _ in scalars[tag]] == [s for s, _ in want], tag
            assert [v for _, v in scalars[tag]] == pytest.approx([v for _, v in want],
                                                                  rel=1e-6), tag
    # 2 steps an epoch: pretraining's epoch 2 and 3 (its last), instruction's 2 (its last);
    # train end falls on step 8 too and is not written twice
    assert texts == {"sample/text_summary": list(zip([4, 6, 8], answers))}


def test_val_loss_non_finite_values_and_a_resumed_run(tmp_path):
    samples = iter(["first", "second", "third"])
    cb = TensorBoardCallback(tmp_path, sample=lambda: next(samples))
    cb.on_step(None, {"step": 1, "loss": 2.0, "grad_norm": math.inf, "lr": math.nan})
    cb.on_step(None, {"step": 2, "loss": 1.5, "val_loss": 1.75})  # an evaluation: a sample
    cb.on_step(None, {"step": 3, "loss": 1.25})
    cb.close()
    cb.close()
    scalars, texts = read(tmp_path)
    assert scalars == {"train/loss": [(1, 2.0), (2, 1.5), (3, 1.25)], "val/loss": [(2, 1.75)]}
    assert texts == {"sample/text_summary": [(2, "first")]}

    # interrupted after step 3, resumed from step 2's checkpoint: steps 2.. are rewritten
    cb = TensorBoardCallback(tmp_path, purge_step=2)
    cb.on_step(None, {"step": 2, "loss": 1.0})
    cb.close()
    scalars, _ = read(tmp_path)
    assert scalars["train/loss"] == [(1, 2.0), (2, 1.0)] and scalars["val/loss"] == []


def test_missing_extra_names_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    with pytest.raises(ConfigError, match=r"pip install 'rustgpt\[tensorboard\]'$"):
        TensorBoardCallback(tmp_path / "tb")
    assert not (tmp_path / "tb").exists()


def test_unwritable_logdir_names_the_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SerializationError, match=r"file/tb: cannot write TensorBoard events"):
        TensorBoardCallback(tmp_path / "file" / "tb")
