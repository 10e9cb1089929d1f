"""Dataset: training examples loaded from JSON or CSV, validated, and cut into padded batches.

JSON is an array of strings; CSV is one example per row (no header, columns joined with
","), as RustGPT reads them. Every problem is a ``DataLoadError`` naming file and item.
Files are read in pieces: memory holds the examples, not the file's bytes and text as well.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
from contextlib import contextmanager
from json.decoder import scanstring
from pathlib import Path
from typing import Iterator, Sequence, TextIO

import numpy as np

from rustgpt.errors import DataLoadError
from rustgpt.fileio import read_bytes, reading
from rustgpt.model import IGNORE_INDEX
from rustgpt.resources import allocating

log = logging.getLogger(__name__)

BUNDLED = Path(__file__).parent / "bundled"
BUNDLED_PRETRAINING = BUNDLED / "pretraining.json"  # the default data, shipped in the package
BUNDLED_CHAT = BUNDLED / "chat.json"
MAX_FILE_BYTES = 256 * 1024 * 1024  # larger files are refused, not read into memory
CHUNK_CHARS = 1 << 20  # characters read at a time


def _read_text(path: Path, max_bytes: int) -> str:
    raw = read_bytes(path, DataLoadError, max_bytes)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise DataLoadError(f"{path}: line {line}: not UTF-8 (byte 0x{raw[err.start]:02x} at "
                            f"offset {err.start})") from err


@contextmanager
def _loading(path: Path, max_bytes: int) -> Iterator[TextIO]:
    """`path` open as UTF-8 text (a BOM skipped, line ends kept) for the block. Raises
    DataLoadError: for the file (fileio.reading), for bytes that are not UTF-8 (naming the
    line and offset of the first), and when memory runs out."""
    try:
        with allocating(f"{path}: loading", DataLoadError), \
                reading(path, DataLoadError, max_bytes) as f, \
                io.TextIOWrapper(f, encoding="utf-8-sig", newline="") as text:
            yield text
    except UnicodeDecodeError:
        _read_text(path, max_bytes)  # raises, naming the line and offset a piece cannot
        raise


_SPACE = re.compile(r"[ \t\n\r]*")
# items without escapes or control characters (their text is their value), each followed by
# its comma: the common case, taken a run at a time by the regular expression engine
_PLAIN_RUN = re.compile(r'(?:[ \t\n\r]*"[^"\\\x00-\x1f]*"[ \t\n\r]*,)+')
_PLAIN = re.compile(r'"([^"\\\x00-\x1f]*)"')


class _Scanner:
    """A text read in pieces of CHUNK_CHARS: ``buf[pos:]`` is what is not consumed yet."""

    def __init__(self, text: TextIO) -> None:
        self.text, self.buf, self.pos = text, "", 0

    def more(self, size: int = 0) -> bool:
        """Append up to `size` (or CHUNK_CHARS) characters to what is left; False at the end
        of the text."""
        piece = self.text.read(size or CHUNK_CHARS)
        self.buf, self.pos = self.buf[self.pos:] + piece, 0
        return bool(piece)

    def peek(self) -> str:
        """The next character that is not JSON whitespace, not consumed ('' at the end)."""
        while True:
            self.pos = _SPACE.match(self.buf, self.pos).end()
            if self.pos < len(self.buf) or not self.more():
                return self.buf[self.pos:self.pos + 1]

    def string(self) -> str | None:
        """The JSON string that starts at pos (a '"'), consumed; None if malformed."""
        size = CHUNK_CHARS
        while True:
            try:
                value, self.pos = scanstring(self.buf, self.pos + 1)  # json.loads' own
                return value
            except json.JSONDecodeError:  # unterminated in this piece, or malformed
                if not self.more(size):
                    return None
                size *= 2  # a long string: growing pieces keep its rescans linear


def _json_strings(text: TextIO) -> list[str] | None:
    """The strings of a JSON array of strings, read from `text` in pieces; None when the
    text is anything else (the caller then parses it whole to say what)."""
    scan = _Scanner(text)
    if scan.peek() != "[":
        return None
    scan.pos += 1
    items = []
    if scan.peek() == "]":
        scan.pos += 1
    else:
        while True:
            run = _PLAIN_RUN.match(scan.buf, scan.pos)
            if run:
                items.extend(_PLAIN.findall(scan.buf, run.start(), run.end()))
                scan.pos = run.end()
            if scan.peek() != '"' or (item := scan.string()) is None:
                return None
            items.append(item)
            after = scan.peek()
            scan.pos += 1
            if after == "]":
                break
            if after != ",":
                return None
    return items if scan.peek() == "" else None


class Dataset:
    """A list of training examples (strings), e.g. ``"User: hi Assistant: hello </s>"``."""

    def __init__(self, examples: Sequence[str], source: str = "<memory>") -> None:
        if len(examples) == 0:
            raise DataLoadError(f"{source}: no examples, expected at least one")
        for i, example in enumerate(examples):
            if not isinstance(example, str):
                raise DataLoadError(f"{source}: item {i} is {json_kind(example)}, expected a "
                                    f"string")
            if not example.strip():
                raise DataLoadError(f"{source}: item {i} is an empty string")
        self.examples = list(examples)
        self.source = source

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> str:
        return self.examples[i]

    @classmethod
    def load(cls, path: str | os.PathLike, max_bytes: int = MAX_FILE_BYTES) -> Dataset:
        """Load a .json or .csv file (chosen by extension)."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix == ".json":
            return cls.load_json(path, max_bytes)
        if suffix == ".csv":
            return cls.load_csv(path, max_bytes)
        raise DataLoadError(f"{path}: unknown data format {suffix or '(no extension)'!r}, "
                            f"expected .json or .csv")

    @classmethod
    def load_json(cls, path: str | os.PathLike, max_bytes: int = MAX_FILE_BYTES) -> Dataset:
        """A JSON array of strings. Read string by string; a file that is anything else
        (malformed, other items, not UTF-8) is then parsed whole for a message naming the
        line and column or the item."""
        path = Path(path)
        with _loading(path, max_bytes) as text:
            examples = _json_strings(text)
        if examples is None:
            text = _read_text(path, max_bytes)
            try:
                examples = json.loads(text)
            except json.JSONDecodeError as err:
                raise DataLoadError(f"{path}: line {err.lineno} column {err.colno}: malformed "
                                    f"JSON ({err.msg})") from err
            except RecursionError as err:
                raise DataLoadError(f"{path}: JSON nested too deeply to parse, expected an "
                                    f"array of strings") from err
            if not isinstance(examples, list):
                raise DataLoadError(f"{path}: top level is {json_kind(examples)}, expected an "
                                    f"array of strings")
        return cls(examples, str(path))

    @classmethod
    def load_csv(cls, path: str | os.PathLike, max_bytes: int = MAX_FILE_BYTES) -> Dataset:
        """One example per row, no header; a row's columns are joined with ","."""
        path = Path(path)
        examples, width = [], None
        try:
            with _loading(path, max_bytes) as text:
                for row in csv.reader(text):
                    if not row:
                        continue
                    if width is None:
                        width = len(row)
                    elif len(row) != width:
                        raise DataLoadError(f"{path}: line {len(examples) + 1}: {len(row)} "
                                            f"columns, expected {width} like the first row")
                    examples.append(",".join(row))
        except csv.Error as err:
            raise DataLoadError(f"{path}: malformed CSV ({err})") from err
        return cls(examples, str(path))

    def statistics(self, vocab=None) -> dict:
        """Example count and length in words (min / mean / max); tokens too with a vocab."""
        words = np.array([len(e.split()) for e in self.examples])
        stats = {"source": self.source, "examples": len(self.examples),
                 "words": int(words.sum()), "min_words": int(words.min()),
                 "mean_words": float(words.mean()), "max_words": int(words.max())}
        if vocab is not None:
            tokens = np.array([len(vocab.encode(e)) for e in self.examples])
            stats.update(tokens=int(tokens.sum()), max_tokens=int(tokens.max()))
        return stats

    def encode(self, vocab, max_seq_len: int, long_examples: str = "truncate") -> list[np.ndarray]:
        """Token ids of each example, int32 (n,), at most max_seq_len + 1 tokens (the inputs
        then fill the context). A longer example is cut to its start ("truncate") or into
        consecutive windows overlapping by one token, so every target is kept ("split"); either
        way with a warning. Examples of fewer than two tokens are skipped with a warning."""
        if long_examples not in ("truncate", "split"):
            raise DataLoadError(f"long_examples = {long_examples!r}, expected 'truncate' or 'split'")
        window = max_seq_len + 1
        sequences, long, dropped = [], 0, 0
        for example in self.examples:
            ids = np.asarray(vocab.encode(example), np.intc)
            if len(ids) < 2:
                dropped += 1
                continue
            if len(ids) <= window:
                sequences.append(ids)
                continue
            long += 1
            if long_examples == "truncate":
                sequences.append(ids[:window])
            else:
                starts = range(0, len(ids) - 1, max_seq_len)
                sequences.extend(ids[s:s + window] for s in starts if len(ids) - s >= 2)
        if long:
            log.warning("%s: %d examples longer than max_seq_len + 1 = %d tokens were %s",
                        self.source, long, window,
                        "truncated" if long_examples == "truncate" else "split into windows",
                        extra={"long_examples": long})
        if dropped:
            log.warning("%s: %d examples of fewer than 2 tokens were skipped", self.source,
                        dropped, extra={"skipped": dropped})
        if not sequences:
            raise DataLoadError(f"{self.source}: no example has two or more tokens to train on")
        return sequences


def make_batch(sequences: Sequence[np.ndarray], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and targets (B, T) for next-token prediction, padded on the right.

    T = longest sequence - 1; padded inputs are `pad_id`, padded targets IGNORE_INDEX."""
    T = max(len(s) for s in sequences) - 1
    inputs = np.full((len(sequences), T), pad_id, np.intc)
    targets = np.full((len(sequences), T), IGNORE_INDEX, np.intc)
    for row, seq in enumerate(sequences):
        inputs[row, :len(seq) - 1] = seq[:-1]
        targets[row, :len(seq) - 1] = seq[1:]
    return inputs, targets


def json_kind(value) -> str:
    """What a decoded JSON value is, for messages: "an object", "a number", ..."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             type(None): "null", int: "a number", float: "a number"}
    return names.get(type(value), type(value).__name__)
