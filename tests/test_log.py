"""setup_logging: text and JSON lines, level filtering, one handler, bad input, file output."""

import json
import logging

import pytest

from rustgpt.errors import ConfigError, ValidationError
from rustgpt.log import setup_logging


def test_json_lines_hold_fields_and_extras(tmp_path):
    path = tmp_path / "run.log"
    setup_logging("INFO", "json", path)
    logging.getLogger("rustgpt.training").info(
        "pretraining epoch %d: loss %.4f", 3, 2.5, extra={"epoch": 3, "loss": 2.5, "lr": 5e-4})
    logging.getLogger("rustgpt.metrics").warning("step 4: loss is nan")
    first, second = [json.loads(line) for line in path.read_text().splitlines()]
    assert first["level"] == "INFO" and first["logger"] == "rustgpt.training"
    assert first["message"] == "pretraining epoch 3: loss 2.5000"
    assert (first["epoch"], first["loss"], first["lr"]) == (3, 2.5, 5e-4)
    assert first["time"]
    assert second["level"] == "WARNING" and second["logger"] == "rustgpt.metrics"


def test_text_line_to_stderr(capsys):
    setup_logging("INFO", "text")
    logging.getLogger("rustgpt.cli").info("hello %s", "world")
    line = capsys.readouterr().err.strip()
    assert line.endswith(" INFO rustgpt.cli: hello world")
    assert line[:4].isdigit()  # asctime first


def test_level_filtering(tmp_path):
    path = tmp_path / "run.log"
    logger = setup_logging("warning", file=path)
    logger.info("dropped")
    logger.warning("kept")
    lines = path.read_text().splitlines()
    assert len(lines) == 1 and lines[0].endswith("WARNING rustgpt: kept")


def test_second_call_replaces_the_handler(tmp_path):
    setup_logging("INFO", "text", tmp_path / "a.log")
    logger = setup_logging("DEBUG", "json", tmp_path / "b.log")
    assert len(logger.handlers) == 1
    assert logger.level == logging.DEBUG and not logger.propagate
    logger.debug("only in b")
    assert (tmp_path / "a.log").read_text() == ""
    assert json.loads((tmp_path / "b.log").read_text())["message"] == "only in b"


def test_bad_level_or_format_raise():
    with pytest.raises(ValidationError, match=r"log level 'LOUD': expected one of DEBUG, INFO"):
        setup_logging("LOUD")
    with pytest.raises(ValidationError, match=r"log format 'xml': expected one of text, json"):
        setup_logging("INFO", "xml")


def test_unopenable_file_raises_config_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="log file .*run.log: cannot open") as info:
        setup_logging(file=blocker / "run.log")
    assert isinstance(info.value.__cause__, OSError)
