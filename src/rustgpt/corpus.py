"""Text corpora: finding the text (files, directories, globs, JSON lines) and reading it in
pieces, for tokenizer training as for the rest; tokenizing it once, streaming, into a cached
token file (a raw uint16/uint32 memmap and a JSON sidecar), the train/val split, random
training windows, and the bytes a token range stands for.

A tokenizer here is any object with ``size`` (int), ``encode(text) -> list[int]``,
``decode(ids) -> str`` and ``to_dict() -> dict`` (JSON-able); an integer ``eos_id``, when it
has one, separates documents.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import numbers
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from rustgpt.data import json_kind
from rustgpt.errors import DataLoadError, SerializationError, ValidationError, VocabularyError
from rustgpt.fileio import reading, write_atomic
from rustgpt.resources import size_text

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md")  # what a directory contributes, with .jsonl
JSONL_SUFFIX = ".jsonl"
# Text is read, decoded and encoded CHUNK_BYTES at a time: small enough that a piece's buffers
# (its bytes, its text, the tokenizer's list of ids) do not fragment the heap as 1 MiB did.
CHUNK_BYTES = 1 << 16
DECODE_TOKENS = 1 << 16  # tokens decoded at a time by count_bytes
FORMAT = 1  # of the token file and its sidecar; part of the cache key
_MAGIC = "*?["  # characters that make a path a glob
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Source:
    """One file of a corpus: `name` is its path relative to the directory or glob that found
    it (a file given by name: its base name), so a moved corpus keeps its cache key."""

    path: Path
    name: str
    jsonl: bool


def find_sources(specs: Sequence[str | os.PathLike]) -> list[Source]:
    """The files that `specs` name, in order: a file (``.jsonl`` is read as JSON lines, any
    other suffix as text); a directory (its .txt, .md and .jsonl files, recursively, sorted by
    path, names starting with "." skipped); a glob (its matching files, sorted; ``**`` spans
    directories). A file found twice is kept once, where it is first found.
    Raises DataLoadError for a spec that matches nothing and a directory without text files."""
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    if not specs:
        raise DataLoadError("no text given: expected a file, a directory, a glob or a .jsonl "
                            "file")
    sources: list[Source] = []
    seen: set[Path] = set()
    for spec in specs:
        for source in _find(str(spec)):
            real = source.path.resolve()
            if real not in seen:
                seen.add(real)
                sources.append(source)
    return sources


def _find(spec: str) -> list[Source]:
    path = Path(spec)
    if path.is_dir():
        found = [p for p in path.rglob("*") if p.is_file()
                 and p.suffix.lower() in (*TEXT_SUFFIXES, JSONL_SUFFIX)
                 and not any(part.startswith(".") for part in p.relative_to(path).parts)]
        if not found:
            raise DataLoadError(f"{spec}: a directory with no text files (.txt, .md or "
                                f".jsonl)")
        return [_source(p, path) for p in sorted(found, key=lambda p: p.relative_to(path).parts)]
    if path.exists():
        return [_source(path, path.parent)]
    if not any(c in spec for c in _MAGIC):
        raise DataLoadError(f"{spec}: no such file or directory")
    root = path
    while any(c in str(root) for c in _MAGIC):
        root = root.parent
    found = [p for p in map(Path, glob.glob(spec, recursive=True)) if p.is_file()]
    if not found:
        raise DataLoadError(f"{spec}: no file matches this pattern")
    return [_source(p, root) for p in sorted(found, key=lambda p: p.relative_to(root).parts)]


def _source(path: Path, root: Path) -> Source:
    return Source(path, path.relative_to(root).as_posix(), path.suffix.lower() == JSONL_SUFFIX)


def documents(sources: Sequence[Source], errors: str = "strict",
              progress: Callable[[int], None] | None = None
              ) -> Iterator[tuple[Source, Iterator[str]]]:
    """The corpus's documents in order (a text file, or the ``text`` of one JSON line), each
    with its source, as pieces of about CHUNK_BYTES of text, cut before a whitespace character
    that follows a non-whitespace one: no word, and no token of a GPT-2-style pre-split,
    straddles a cut.
    Files are read a chunk at a time and never whole; a BOM is skipped; `progress(n)`, when
    given, is called after each read of n bytes (BOM included: they add up to the files' sizes).
    `errors` = "strict" raises DataLoadError naming file, line and byte offset for bytes that are
    not UTF-8 and a NUL byte (binary or UTF-16 text); "replace" reads any bytes, those that are
    not UTF-8 as U+FFFD, with one warning per file naming the first. Either way a JSON line that
    is not an object with a string ``text`` raises DataLoadError; an unknown `errors`,
    ValidationError."""
    if errors not in ("strict", "replace"):
        raise ValidationError(f"errors = {errors!r}, expected 'strict' or 'replace'")
    progress = progress or (lambda n: None)
    for source in sources:
        decode = _decoder(source.path, errors)
        if source.jsonl:
            for text in _jsonl_texts(source.path, decode, progress):
                yield source, _text_pieces(text)
        else:
            yield source, _file_pieces(source.path, decode, progress)


def pieces(sources: Sequence[Source], errors: str = "strict",
           progress: Callable[[int], None] | None = None) -> Iterator[str]:
    """Every piece of every document of `sources`, in order (see documents, which takes
    `errors` and `progress`): the corpus as one stream of text, as a tokenizer is trained on it.
    Raises what documents raises, and DataLoadError, once all is read, when there was no text."""
    empty = True
    for _, document in documents(sources, errors, progress):
        for piece in document:
            empty = False
            yield piece
    if empty:
        raise DataLoadError(f"{_corpus_name([str(s.path) for s in sources])}: empty corpus, "
                            f"expected some text")


def read_errors(kind: str) -> str:
    """How a tokenizer of `kind` takes text that is not UTF-8 (`documents`' errors): byte-
    level bpe any bytes (those that are not UTF-8 as U+FFFD, with a warning), word and char
    only UTF-8 (a DataLoadError names the file and byte)."""
    return "replace" if kind == "bpe" else "strict"


def cache_dir(setting: str = "") -> Path:
    """Where token files are cached: `setting` ([data] token_cache) if given, else
    $XDG_CACHE_HOME/rustgpt, else ~/.cache/rustgpt."""
    if setting:
        return Path(setting)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rustgpt"


def _cut(buf: bytes | str, start: int, stop: int) -> int:
    """Where the piece of `buf` from `start` ends, at most at `stop`: before the last newline,
    else the last space, that follows a non-whitespace character; else at `stop`, moved back
    (in bytes) to the start of a character."""
    newline, space = (b"\n", b" ") if isinstance(buf, bytes) else ("\n", " ")
    for sep in (newline, space):
        end = stop
        while (i := buf.rfind(sep, start + 1, end)) > 0:
            if not buf[i - 1:i].isspace():
                return i
            end = i
    if isinstance(buf, bytes):
        for _ in range(3):  # a UTF-8 character has at most 3 continuation bytes (10xxxxxx)
            if buf[stop] & 0xC0 == 0x80:
                stop -= 1
    return stop


def _text_pieces(text: str) -> Iterator[str]:
    start = 0
    while len(text) - start > CHUNK_BYTES:
        end = _cut(text, start, start + CHUNK_BYTES)
        yield text[start:end]
        start = end
    if start < len(text):
        yield text[start:]


def _file_pieces(path: Path, decode, progress) -> Iterator[str]:
    with reading(path, DataLoadError) as f:
        buf = f.read(CHUNK_BYTES)
        progress(len(buf))
        offset = len(_BOM) if buf.startswith(_BOM) else 0  # of buf[0] in the file
        buf = buf[offset:]
        line = 1  # of buf[0]
        while buf:
            chunk = f.read(CHUNK_BYTES)
            progress(len(chunk))
            buf += chunk
            while len(buf) > CHUNK_BYTES or (buf and not chunk):
                end = _cut(buf, 0, CHUNK_BYTES) if len(buf) > CHUNK_BYTES else len(buf)
                yield decode(buf[:end], offset, line)
                line += buf.count(b"\n", 0, end)
                offset += end
                buf = buf[end:]


def _decoder(path: Path, errors: str) -> Callable[[bytes, int, int], str]:
    """decode(raw, offset, line): bytes `raw` of `path`, found at byte `offset`, line `line`, as
    text, by `errors` (see documents); it warns once, at the first byte that is not UTF-8."""
    warned = False

    def decode(raw: bytes, offset: int, line: int) -> str:
        nonlocal warned
        if errors == "strict" and (i := raw.find(b"\0")) >= 0:
            line += raw.count(b"\n", 0, i)
            raise DataLoadError(f"{path}: line {line}: a NUL byte at offset {offset + i}, "
                                f"expected UTF-8 text (a binary file, or UTF-16?)")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as err:
            line += raw.count(b"\n", 0, err.start)
            found = (f"{path}: line {line}: not UTF-8 (byte 0x{raw[err.start]:02x} at offset "
                     f"{offset + err.start})")
            if errors == "strict":
                raise DataLoadError(found) from err
            if not warned:
                warned = True
                log.warning("%s; read as U+FFFD, as is every such byte of the file", found)
            return raw.decode("utf-8", "replace")

    return decode


def _jsonl_texts(path: Path, decode, progress) -> Iterator[str]:
    expected = "expected an object with a string 'text'"
    with reading(path, DataLoadError) as f:
        offset = 0
        for number, raw in enumerate(f, 1):  # one line in memory at a time
            progress(len(raw))
            line = decode(raw, offset, number)
            offset += len(raw)
            if number == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataLoadError(f"{path}: line {number}: malformed JSON ({err.msg} at "
                                    f"column {err.colno}), {expected}") from None
            if not isinstance(item, dict):
                raise DataLoadError(f"{path}: line {number}: {json_kind(item)}, {expected}")
            if "text" not in item:
                raise DataLoadError(f"{path}: line {number}: no 'text', {expected}")
            if not isinstance(item["text"], str):
                raise DataLoadError(f"{path}: line {number}: 'text' is "
                                    f"{json_kind(item['text'])}, {expected}")
            yield item["text"]


def _nbytes(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))  # a JSON "\ud800" is a lone surrogate


def _eos(tokenizer) -> int | None:
    eos = getattr(tokenizer, "eos_id", None)
    return eos if isinstance(eos, (int, np.integer)) else None


def _corpus_name(names: list[str]) -> str:
    return names[0] + (f" (+{len(names) - 1} files)" if len(names) > 1 else "")


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with reading(path, DataLoadError) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class TokenFile:
    """A corpus tokenized once: `tokens`, a read-only memmap (n,) of `path` (raw uint16 while
    the vocabulary fits, else uint32), and `meta`, the JSON sidecar beside it: format, key,
    tokens, dtype, text_bytes, sources (name, kind, size, sha256), the tokenizer's to_dict().

    The token stream is the concatenation of ``tokenizer.encode`` over each document's pieces
    (see `documents`), each document followed by ``eos_id`` when the tokenizer has one, else,
    unless it already ends in a newline, by ``encode("\\n")``; empty documents are skipped.
    """

    def __init__(self, path: Path, meta: dict) -> None:
        self.path = path
        self.meta = meta
        self.tokens = np.memmap(path, dtype=meta["dtype"], mode="r", shape=(meta["tokens"],))

    @classmethod
    def build(cls, specs: Sequence[str | os.PathLike], tokenizer,
              cache_dir: str | os.PathLike) -> TokenFile:
        """The token file of the corpus `specs` (see find_sources) under `tokenizer`, from
        `cache_dir` when an earlier build made it, else built there: tokenized in one
        streaming pass into a temporary file (memory holds one chunk of text and its tokens),
        fsynced and renamed to ``tokens-<key>.bin``, then its sidecar ``tokens-<key>.json``.
        The key hashes FORMAT, the tokenizer's to_dict() and each file's name, kind and
        sha256, in order. Raises DataLoadError (see find_sources and documents; an empty
        corpus), VocabularyError for an id outside [0, tokenizer.size), SerializationError
        when the cache cannot be written."""
        sources = find_sources(specs)
        recipe = {
            "format": FORMAT,
            "sources": [{"name": s.name, "kind": "jsonl" if s.jsonl else "text",
                         "sha256": _digest(s.path), "size": s.path.stat().st_size}
                        for s in sources],
            "tokenizer": tokenizer.to_dict(),
        }
        key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
        path = Path(cache_dir) / f"tokens-{key[:16]}.bin"
        cached = cls._cached(path, key)
        if cached is not None:
            log.info("%s: reusing %s (%s tokens)", cached.name, path, f"{len(cached):,}")
            return cached
        counts = _write_tokens(path, sources, tokenizer,
                               sum(s["size"] for s in recipe["sources"]))
        meta = {"format": FORMAT, "key": key, **counts, **recipe}
        write_atomic(path.with_suffix(".json"), json.dumps(meta, indent=1).encode())
        return cls(path, meta)

    @classmethod
    def _cached(cls, path: Path, key: str) -> TokenFile | None:
        """The token file at `path` if its sidecar holds `key` and its size agrees."""
        try:
            meta = json.loads(path.with_suffix(".json").read_bytes())
            itemsize = np.dtype(meta["dtype"]).itemsize
            if meta["key"] != key or path.stat().st_size != meta["tokens"] * itemsize:
                return None
            return cls(path, meta)
        except (OSError, ValueError, KeyError, TypeError):
            return None  # missing or damaged: built again

    @property
    def name(self) -> str:
        """The corpus for messages: its first file, and how many more."""
        return _corpus_name([s["name"] for s in self.meta["sources"]])

    @property
    def key(self) -> str:
        """sha256 of the corpus and the tokenizer: equal keys, equal tokens."""
        return self.meta["key"]

    def __len__(self) -> int:
        return len(self.tokens)

    def __repr__(self) -> str:
        return f"TokenFile({str(self.path)!r}, tokens={len(self)}, dtype={self.tokens.dtype})"

    def split(self, seq_len: int, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
        """(train, val): views of the tokens; train is the first int(n * (1 - val_fraction))
        (nanoGPT's split), val the rest. Raises ValidationError for val_fraction outside
        [0, 1), DataLoadError when train, or val if val_fraction > 0, is shorter than one
        window of seq_len + 1 tokens."""
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, numbers.Real) \
                or not 0 <= val_fraction < 1:
            raise ValidationError(f"val_fraction = {val_fraction!r}, expected a number in "
                                  f"[0, 1)")
        n = len(self)
        n_train = int(n * (1 - val_fraction))
        for split, count, fraction in (("train", n_train, "a smaller"),
                                       ("val", n - n_train, "a larger")):
            if count < seq_len + 1 and (split == "train" or val_fraction > 0):
                raise DataLoadError(
                    f"{self.name}: the {split} split has {count:,} of the corpus's {n:,} tokens "
                    f"(val_fraction {val_fraction:g}), fewer than one window of max_seq_len + 1 "
                    f"= {seq_len + 1}; expected a longer corpus, {fraction} val_fraction or a "
                    f"smaller max_seq_len")
        return self.tokens[:n_train], self.tokens[n_train:]


def _write_tokens(path: Path, sources: Sequence[Source], tokenizer, total: int) -> dict:
    """Tokenize `sources` (`total` bytes of files) into `path` (see TokenFile); returns
    tokens, dtype, text_bytes."""
    size = tokenizer.size
    dtype = np.dtype(np.uint16 if size <= 1 << 16 else np.uint32)
    eos = _eos(tokenizer)
    separator = np.asarray([eos] if eos is not None else tokenizer.encode("\n"), dtype)
    log.info("tokenizing %d file%s (%s) into %s", len(sources), "s"[:len(sources) != 1],
             size_text(total), path)
    n_tokens = text_bytes = 0
    started = reported = time.monotonic()
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as out:
            for source, document in documents(sources,
                                              read_errors(getattr(tokenizer, "kind", ""))):
                last = ""
                for piece in document:
                    ids = np.asarray(tokenizer.encode(piece), dtype=np.int64)
                    if ids.size and (ids.min() < 0 or ids.max() >= size):
                        bad = ids[(ids < 0) | (ids >= size)][0]
                        raise VocabularyError(f"{source.path}: the tokenizer gave id {bad}, "
                                              f"outside its vocabulary [0, {size})")
                    out.write(ids.astype(dtype))
                    n_tokens += ids.size
                    text_bytes += _nbytes(piece)
                    last = piece
                    if time.monotonic() - reported > 10:
                        reported = time.monotonic()
                        log.info("tokenized %s of %s", size_text(text_bytes), size_text(total))
                if last and (eos is not None or not last.endswith("\n")):
                    out.write(separator)
                    n_tokens += separator.size
            if n_tokens == 0:
                raise DataLoadError(f"{_corpus_name([str(s.path) for s in sources])}: empty "
                                    f"corpus ({text_bytes:,} bytes of text, 0 tokens)")
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        tmp = None
    except OSError as err:
        raise SerializationError(f"{path}: cannot write ({err.strerror or err})") from err
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    log.info("%s tokens (%s) of %s of text in %.1f s", f"{n_tokens:,}", dtype.name,
             size_text(text_bytes), time.monotonic() - started)
    return {"tokens": n_tokens, "dtype": dtype.name, "text_bytes": text_bytes}


def random_windows(tokens: np.ndarray, batch_size: int, seq_len: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A batch of `batch_size` (B) windows of `seq_len` (T) + 1 consecutive tokens at random
    offsets: (inputs, targets), each int32 (B, T), targets = inputs shifted by one.
    Draws exactly one ``rng.integers(0, len(tokens) - T, size=B)`` (the windows' first
    positions) and nothing else, so a run resumed with the same RNG state draws the same
    batches. Raises ValidationError when `tokens` is shorter than T + 1."""
    B, T = batch_size, seq_len
    n = len(tokens)
    if n < T + 1:
        raise ValidationError(f"random_windows: {n:,} tokens, fewer than one window of "
                              f"seq_len + 1 = {T + 1}")
    starts = rng.integers(0, n - T, size=B)  # (B,) in [0, n - T - 1]: the window fits
    # (B, T + 1), gathered in one indexing of the array (a memmap's slices are objects each)
    windows = np.asarray(tokens)[starts[:, None] + np.arange(T + 1)].astype(np.int32)
    return np.ascontiguousarray(windows[:, :-1]), np.ascontiguousarray(windows[:, 1:])


def count_bytes(tokens: np.ndarray, tokenizer) -> int:
    """UTF-8 bytes of the text `tokens` stand for (the denominator of bits per byte):
    ``tokenizer.decode`` over DECODE_TOKENS tokens at a time, the tokenizer's eos_id (a
    document separator, not text) left out."""
    eos = _eos(tokenizer)

    def decode(ids: np.ndarray) -> str:
        return tokenizer.decode((ids if eos is None else ids[ids != eos]).tolist())

    n = len(tokens)
    total = start = 0
    while start < n:
        stop = min(start + DECODE_TOKENS, n)
        text = decode(np.asarray(tokens[start:stop]))
        # a byte-level tokenizer decodes a character split between two calls as U+FFFD on
        # both sides: end this call up to 3 tokens earlier (every token is still counted once)
        for _ in range(3):
            if not text.endswith("\ufffd") or stop == n or stop - 1 == start:
                break
            stop -= 1
            text = decode(np.asarray(tokens[start:stop]))
        total += _nbytes(text)
        start = stop
    return total
