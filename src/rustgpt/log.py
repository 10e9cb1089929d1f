"""Logging setup for applications: one handler on the "rustgpt" logger, text or JSON lines,
to stderr or a file. Library modules only log (``getLogger(__name__)``); they never configure.
"""

from __future__ import annotations

import logging
import os

from rustgpt.errors import ConfigError, ValidationError

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_HANDLER_NAME = "rustgpt.log.setup_logging"  # marks the handler setup_logging owns

# Silent until an application configures logging (no "No handlers could be found" fallback).
logging.getLogger("rustgpt").addHandler(logging.NullHandler())


def setup_logging(level: str = "INFO", fmt: str = "text",
                  file: str | os.PathLike | None = None) -> logging.Logger:
    """Send the "rustgpt" logger's records at `level` and above to stderr, or appended to
    `file`, as text or JSON lines; returns that logger.

    Replaces the logger's handlers (calling it again reconfigures) and stops propagation to
    the root logger, so records are not printed twice. JSON lines hold time, level, logger,
    message and any ``extra=`` fields at top level. Raises ValidationError for an unknown
    level or format, ConfigError (cause: the OSError) if the file cannot be opened."""
    name = level.upper() if isinstance(level, str) else level
    if name not in LEVELS:
        raise ValidationError(f"log level {level!r}: expected one of {', '.join(LEVELS)}")
    if fmt not in FORMATS:
        raise ValidationError(f"log format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if file is None:
        handler: logging.Handler = logging.StreamHandler()
    else:
        try:
            handler = logging.FileHandler(file, encoding="utf-8")
        except OSError as err:
            raise ConfigError(f"log file {file}: cannot open ({err.strerror or err})") from err
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(_json_formatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))

    logger = logging.getLogger("rustgpt")
    for old in list(logger.handlers):
        logger.removeHandler(old)
        if old.get_name() == _HANDLER_NAME:
            old.close()
    logger.addHandler(handler)
    logger.setLevel(name)
    logger.propagate = False
    return logger


def _json_formatter() -> logging.Formatter:
    try:
        from pythonjsonlogger.json import JsonFormatter
    except ImportError:  # python-json-logger < 3.1
        from pythonjsonlogger.jsonlogger import JsonFormatter
    return JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s",
                         rename_fields={"asctime": "time", "levelname": "level", "name": "logger"})
