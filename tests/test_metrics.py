"""Metrics: recording, summaries and trend, warnings, CSV / JSON export, MetricsCallback."""

import csv
import json
import logging
import math

import pytest

from rustgpt.errors import SerializationError, ValidationError
from rustgpt.metrics import FIELDS, Metrics, MetricsCallback


def trainer_record(step, loss, grad_norm=1.0, phase="pretraining"):
    return {"phase": phase, "epoch": 0, "step": step, "loss": loss, "grad_norm": grad_norm,
            "lr": 5e-4, "tokens": 20, "tokens_per_s": 15000.0}


def test_record_and_summaries():
    m = Metrics()
    for i, loss in enumerate([4.0, 3.0, 2.0, 1.0]):
        m.record_loss(loss, phase="pretraining")
        m.record_gradient_norm(i + 1.0)
    m.record_accuracy(0.25)
    assert len(m) == 4
    assert m.latest_loss() == 1.0
    assert m.avg_loss() == 2.5
    assert m.avg_loss(last_n=2) == 1.5
    assert m.avg_gradient_norm() == 2.5
    assert m.avg_gradient_norm(last_n=1) == 4.0
    rows = m.rows()
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # a loss opens a step, the rest attach
    assert rows[3] == {"step": 4, "phase": "pretraining", "loss": 1.0, "grad_norm": 4.0,
                       "lr": None, "tokens_per_s": None, "accuracy": 0.25,
                       "train_loss": None, "val_loss": None, "allreduce_s": None}
    s = m.summary()
    assert s == {"steps": 4, "latest_loss": 1.0, "avg_loss": 2.5, "loss_trend": "decreasing",
                 "avg_gradient_norm": 2.5, "avg_tokens_per_s": None, "latest_accuracy": 0.25,
                 "latest_val_loss": None, "best_val_loss": None}
    m.record_evaluation(1.5, 2.5, step=2)
    m.record_evaluation(1.25, 2.75, step=4)
    assert (m.rows()[1]["val_loss"], m.rows()[3]["train_loss"]) == (2.5, 1.25)
    assert (m.summary()["latest_val_loss"], m.summary()["best_val_loss"]) == (2.75, 2.5)


def test_record_step_takes_trainer_fields():
    m = Metrics()
    m.record_step(trainer_record(12, 3.2, grad_norm=1.5))
    assert m.rows() == [{"step": 12, "phase": "pretraining", "loss": 3.2, "grad_norm": 1.5,
                         "lr": 5e-4, "tokens_per_s": 15000.0, "accuracy": None,
                         "train_loss": None, "val_loss": None, "allreduce_s": None}]


def test_empty_summaries():
    m = Metrics()
    assert m.latest_loss() is None and m.avg_loss() is None and m.avg_gradient_norm() is None
    assert m.loss_trend() == "flat"
    assert m.summary()["steps"] == 0


def test_bad_inputs_raise():
    with pytest.raises(ValidationError, match="accuracy 1.5 is outside"):
        Metrics().record_accuracy(1.5)
    with pytest.raises(ValidationError, match="last_n = 0"):
        Metrics().avg_loss(last_n=0)
    with pytest.raises(ValidationError, match="explode_threshold"):
        Metrics(explode_threshold=0)


@pytest.mark.parametrize("losses, trend", [
    ([5.0 - 0.1 * i for i in range(20)], "decreasing"),
    ([1.0 + 0.1 * i for i in range(20)], "increasing"),
    ([2.0, 2.01, 1.99, 2.0] * 5, "flat"),
    ([3.0, 1.0, 0.5], "flat"),  # fewer than 4 values
])
def test_loss_trend(losses, trend):
    m = Metrics()
    for loss in losses:
        m.record_loss(loss)
    assert m.loss_trend() == trend


def test_loss_trend_uses_last_window():
    m = Metrics()
    for loss in [5.0 - 0.1 * i for i in range(20)] + [1.0] * 8:
        m.record_loss(loss)
    assert m.loss_trend(window=50) == "decreasing"
    assert m.loss_trend(window=8) == "flat"


def test_warns_on_gradient_above_threshold(caplog):
    m = Metrics(explode_threshold=50.0)
    with caplog.at_level(logging.WARNING, logger="rustgpt.metrics"):
        m.record_gradient_norm(10.0, step=1)
        assert not caplog.records
        m.record_gradient_norm(60.0, step=2)
    assert [r.name for r in caplog.records] == ["rustgpt.metrics"]
    assert "step 2: gradient norm 60 exceeds 50" in caplog.text


def test_warns_on_gradient_spike_after_ten_steps(caplog):
    m = Metrics()
    with caplog.at_level(logging.WARNING, logger="rustgpt.metrics"):
        m.record_gradient_norm(1.0)
        m.record_gradient_norm(20.0)  # 20x, but too few steps for a running average
        assert not caplog.records
        for _ in range(10):
            m.record_step(trainer_record(None, 2.0, grad_norm=1.0))
        m.record_gradient_norm(50.0)  # below 100, but over 10x the running average
    assert len(caplog.records) == 1
    assert "gradient norm 50 is over 10x the running average" in caplog.text


@pytest.mark.parametrize("loss", [math.nan, math.inf])
def test_warns_on_non_finite_loss(caplog, loss):
    with caplog.at_level(logging.WARNING, logger="rustgpt.metrics"):
        Metrics().record_loss(loss, step=7)
    assert len(caplog.records) == 1
    assert f"step 7: loss is {loss}" in caplog.text


def filled_metrics():
    m = Metrics()
    m.record_step(trainer_record(1, 3.5, grad_norm=2.0))
    m.record_step(trainer_record(2, 3.25, grad_norm=1.75, phase="instruction"))
    m.record_accuracy(0.125)
    return m


def test_to_csv_parses_back(tmp_path):
    path = tmp_path / "metrics.csv"
    filled_metrics().to_csv(path)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(FIELDS)
    assert rows[0] == {"step": "1", "phase": "pretraining", "loss": "3.5", "grad_norm": "2.0",
                       "lr": "0.0005", "tokens_per_s": "15000.0", "accuracy": "",
                       "train_loss": "", "val_loss": "", "allreduce_s": ""}
    assert (rows[1]["phase"], float(rows[1]["loss"]), float(rows[1]["accuracy"])) == \
        ("instruction", 3.25, 0.125)
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]  # no temporary left


def test_to_json_parses_back_and_round_trips(tmp_path):
    m = filled_metrics()
    path = tmp_path / "metrics.json"
    m.to_json(path)
    data = json.loads(path.read_text())
    assert data["steps"] == m.rows()
    assert data["summary"] == m.summary()
    assert data["steps"][0]["accuracy"] is None
    back = Metrics.from_json(path)
    assert back.rows() == m.rows()
    assert back.summary() == m.summary()


@pytest.mark.parametrize("export", ["to_csv", "to_json"])
def test_export_without_a_path_returns_the_files_text(tmp_path, export):
    m = filled_metrics()
    text = getattr(m, export)()
    assert getattr(m, export)(tmp_path / "f") is None
    assert text == (tmp_path / "f").read_bytes().decode("utf-8")


@pytest.mark.parametrize("export", ["to_csv", "to_json"])
def test_export_to_unwritable_path_raises(tmp_path, export):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    path = blocker / "metrics.out"
    with pytest.raises(SerializationError, match="metrics.out: cannot write") as info:
        getattr(filled_metrics(), export)(path)
    assert isinstance(info.value.__cause__, OSError)


def test_from_json_bad_files_raise(tmp_path):
    with pytest.raises(SerializationError, match="missing.json: cannot read") as info:
        Metrics.from_json(tmp_path / "missing.json")
    assert isinstance(info.value.__cause__, OSError)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SerializationError, match="bad.json: not valid JSON"):
        Metrics.from_json(bad)
    bad.write_text('{"rows": []}')
    with pytest.raises(SerializationError, match='bad.json: expected {"steps"'):
        Metrics.from_json(bad)


class AtEpochEnd:
    """A trainer at an epoch end, as far as the callback looks: whether `every` is due."""

    def __init__(self, due_every):
        self.due_every = due_every

    def epochs_due(self, every):
        return every == self.due_every


def test_callback_writes_files_when_epochs_are_due_and_at_train_end(tmp_path):
    out = tmp_path / "run"
    cb = MetricsCallback(out, every_epochs=3)
    cb.on_step(None, trainer_record(1, 3.5))
    epoch_end = {"phase": "pretraining", "epoch": 0, "step": 2, "loss": 3.25,
                 "tokens_per_s": 15000.0}
    cb.on_epoch_end(AtEpochEnd(1), epoch_end)  # every 3 epochs: not due
    assert not out.exists()
    cb.on_step(None, trainer_record(2, 3.0))
    cb.on_epoch_end(AtEpochEnd(3), epoch_end)
    assert sorted(p.name for p in out.iterdir()) == ["metrics.csv", "metrics.json"]
    assert Metrics.from_json(out / "metrics.json").avg_loss() == 3.25
    cb.on_step(None, trainer_record(3, 2.5, phase="instruction"))
    cb.on_train_end(None)
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["phase"], r["loss"]) for r in rows] == \
        [("1", "pretraining", "3.5"), ("2", "pretraining", "3.0"), ("3", "instruction", "2.5")]
    assert json.loads((out / "metrics.json").read_text())["summary"]["steps"] == 3
    with pytest.raises(ValidationError, match="every_epochs = 0, expected >= 1"):
        MetricsCallback(out, every_epochs=0)
