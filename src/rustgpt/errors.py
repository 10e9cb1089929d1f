"""The error tree: every failure rustgpt reports is an ``LlmError`` subclass.

Messages are one line, location first, then what was found and what was expected.
I/O failures keep the ``OSError`` as their ``__cause__``.
"""

from __future__ import annotations


class LlmError(Exception):
    """Base of every error rustgpt raises."""


class ValidationError(LlmError, ValueError):
    """A value is outside what the receiving function accepts."""


class ShapeMismatch(ValidationError):
    """An array has the wrong shape; ``expected`` and ``actual`` are tuples."""

    def __init__(self, where: str, expected: tuple, actual: tuple) -> None:
        self.expected = tuple(expected)
        self.actual = tuple(actual)
        super().__init__(f"{where} has shape {self.actual}, expected {self.expected}")


class ConfigError(LlmError, ValueError):
    """A configuration file, environment variable or option is invalid."""


class ArchitectureError(ConfigError):
    """Model sizes that cannot form a model (e.g. heads not dividing the embedding)."""


class VocabularyError(LlmError):
    """A vocabulary is malformed or disagrees with the model."""


class TokenError(LlmError, ValueError):
    """A token or token id is not in the vocabulary."""


class DataLoadError(LlmError):
    """A data file is missing, unreadable or malformed."""


class TrainingError(LlmError):
    """Training cannot go on (e.g. the loss became NaN)."""


class SerializationError(LlmError):
    """A checkpoint cannot be written or read."""
