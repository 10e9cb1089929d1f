"""Tokenizers behind one small interface (`Tokenizer`): `word` (RustGPT's rules, `Vocab`),
`char` (a corpus's characters) and `bpe` (a Hugging Face tokenizer.json, trained here as
byte-level BPE); training one of a kind on texts; tokenizer files and dicts. Finding and
reading the text is corpus.py's."""

from __future__ import annotations

import abc
import json
import numbers
import os
import reprlib
import string
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

from rustgpt.errors import DataLoadError, TokenError, ValidationError, VocabularyError
from rustgpt.fileio import read_bytes, write_atomic

if TYPE_CHECKING:
    import tokenizers

KINDS = ("word", "char", "bpe")
EOS = "</s>"
UNK = "<unk>"
SPECIAL_TOKENS = (EOS, UNK)
_PUNCTUATION = frozenset(string.punctuation)
# decode() writes no space before a closing mark and none after an opening one
_CLOSING = frozenset(".,!?;:)]}%'")
_OPENING = frozenset("([{$'")

# what a char tokenizer's <unk> decodes to: one character, as it stood for one
CHAR_UNK_TEXT = "\ufffd"
BPE_EOS = "<|endoftext|>"
BPE_VOCAB_SIZE = 1024
MIN_BPE_VOCAB_SIZE = 257  # the 256 bytes and BPE_EOS
# a foreign tokenizer.json's end-of-text token: the first of these its vocabulary holds
_EOS_NAMES = (BPE_EOS, EOS, "<|end_of_text|>", "<eos>")


class Tokenizer(abc.ABC):
    """What every kind of tokenizer offers: text <-> integer ids in [0, size).

    ``kind`` is "word", "char" or "bpe"; ``eos_id`` is the end-of-text id and ``unk_id`` the
    id of unknown input, each None when the kind has none. ``stream_context`` is how many
    tokens before a new one its text can depend on: decoding a stream token by token
    decodes those again with it (generation.TextStream). ``to_dict()`` is JSON-able, holds
    "kind", and ``tokenizer_from_dict`` rebuilds the tokenizer from it (checkpoints store
    it); ``save(path)`` writes a file that ``load_tokenizer(path)`` reads back.
    """

    kind: str
    eos_id: int | None
    unk_id: int | None
    stream_context: int

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """Vocabulary size: every id is in [0, size)."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`. Raises ValidationError when `text` is not a string."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` (a sequence or 1-D array of integers). Raises TokenError for an id
        that is not an integer, or (char, bpe) is outside [0, size); `word` decodes those
        as <unk>, as RustGPT's tokenizer does."""

    @abc.abstractmethod
    def to_dict(self) -> dict:
        """A JSON-able description holding "kind"; tokenizer_from_dict is its inverse."""

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer to `path` (atomically) as JSON that load_tokenizer reads.
        Raises SerializationError."""
        write_atomic(path, (json.dumps(self.to_dict(), ensure_ascii=False) + "\n").encode())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


def _check_text(text: str) -> str:
    if not isinstance(text, str):
        raise ValidationError(f"text is a {type(text).__name__}, expected a string")
    return text


def _is_int(value) -> bool:
    """True for Python and numpy integers; bool is not a number here."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _checked(ids: Iterable[int], size: int | None = None) -> list[int]:
    """`ids` as a list of Python ints; TokenError naming the first id that is not an integer
    (1.5, True, 'x'), or is outside [0, size) when `size` is given, or for ids that are not a
    sequence (or a 1-D array) of them."""
    if getattr(ids, "ndim", 1) != 1 or isinstance(ids, (str, bytes)):
        raise TokenError(f"ids = {reprlib.repr(ids)}, expected a sequence of integer token ids")
    try:
        items = list(ids)
    except TypeError:
        raise TokenError(f"ids = {reprlib.repr(ids)}, expected a sequence of integer token "
                         f"ids") from None
    # the common case, Python ints in range, without the per-item checks below (decoding a
    # token at a time, a server's streams spend much of their Python time here)
    if all(type(i) is int for i in items) and (
            size is None or not items or (min(items) >= 0 and max(items) < size)):
        return items
    for position, i in enumerate(items):
        if not _is_int(i):
            raise TokenError(f"id {position} = {reprlib.repr(i)} is a {type(i).__name__}, "
                             f"expected an integer token id")
        if size is not None and not 0 <= i < size:
            raise TokenError(f"id {position} = {i} is outside the vocabulary [0, {size})")
    return [int(i) for i in items]


# ---- word: RustGPT's tokenizer ---------------------------------------------------------------

def _index(entries: list, what: str, ok, expected: str, show) -> dict[str, int]:
    """entry -> its position, for a tokenizer's table; VocabularyError naming an entry that
    fails `ok` (shown by `show`) or appears twice."""
    index: dict[str, int] = {}
    for i, entry in enumerate(entries):
        if not ok(entry):
            raise VocabularyError(f"{what}: entry {i} = {show(entry)}, expected {expected}")
        if entry in index:
            raise VocabularyError(f"{what}: {entry!r} appears twice (entries {index[entry]} "
                                  f"and {i})")
        index[entry] = i
    return index


def tokenize(text: str) -> list[str]:
    """Split `text` into RustGPT's tokens: words, single punctuation characters, ``</s>``.
    Raises ValidationError when `text` is not a string."""
    tokens: list[str] = []
    for word in _check_text(text).split():
        if word in SPECIAL_TOKENS:
            tokens.append(word)
            continue
        start = 0
        for i, ch in enumerate(word):
            if ch in _PUNCTUATION:
                if i > start:
                    tokens.append(word[start:i])
                tokens.append(ch)
                start = i + 1
        if start < len(word):
            tokens.append(word[start:])
    return tokens


class Vocab(Tokenizer):
    """The `word` tokenizer: RustGPT's word vocabulary, token strings <-> integer ids
    (whitespace split, each ASCII punctuation character its own token, ``</s>`` special,
    plus ``<unk>`` so unknown words are never silently lost).

    Build it with ``Vocab.from_texts`` (sorted set of the texts' tokens plus the special
    tokens, as RustGPT builds its vocabulary) or from an explicit word list.
    """

    kind = "word"
    stream_context = 1  # a word's space depends on the token before it

    def __init__(self, words: Sequence[str], counts: dict[str, int] | None = None) -> None:
        words = list(words)
        index = _index(words, "vocabulary", lambda w: isinstance(w, str) and bool(w) and not
                       any(c.isspace() for c in w), "a non-empty string without whitespace", repr)
        for special in SPECIAL_TOKENS:
            if special not in index:
                raise VocabularyError(f"vocabulary: special token {special!r} is missing")
        counts = dict(counts or {})
        for word, n in counts.items():
            if not _is_int(n) or n < 0:
                raise VocabularyError(f"vocabulary: count of {word!r} = {n!r}, expected a "
                                      f"non-negative integer")
        self.words = words
        self._index = index
        self.counts = counts
        self.eos_id = index[EOS]
        self.unk_id = index[UNK]

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> Vocab:
        """The sorted set of every token in `texts`, plus ``</s>`` and ``<unk>``."""
        counts = Counter(token for text in texts for token in tokenize(text))
        return cls(sorted(set(counts) | set(SPECIAL_TOKENS)), dict(counts))

    @property
    def size(self) -> int:
        """Words in the vocabulary, special tokens included."""
        return len(self.words)

    def __len__(self) -> int:
        return len(self.words)

    def contains(self, word: str) -> bool:
        """True when `word` (one token) is in the vocabulary."""
        return word in self._index

    __contains__ = contains

    def token_id(self, word: str) -> int | None:
        """The id of `word` (one token), None when it is not in the vocabulary."""
        return self._index.get(word)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; unknown words become ``<unk>``."""
        return [self._index.get(token, self.unk_id) for token in tokenize(text)]

    def encode_or_error(self, text: str) -> list[int]:
        """Token ids of `text`; raises TokenError naming the first unknown word."""
        ids = []
        for position, token in enumerate(tokenize(text)):
            if token not in self._index:
                raise TokenError(f"token {position} = {token!r} is not in the vocabulary "
                                 f"({self.size} words)")
            ids.append(self._index[token])
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`: tokens joined by spaces, punctuation attached; ids outside
        [0, size) become <unk>. Raises TokenError for an id that is not an integer."""
        n = self.size
        return self._join([self.words[i] if 0 <= i < n else UNK for i in _checked(ids)])

    def decode_or_error(self, ids: Iterable[int]) -> str:
        """Text of `ids`; raises TokenError for an id that is not an integer or is outside
        [0, size)."""
        return self._join([self.words[i] for i in _checked(ids, self.size)])

    @staticmethod
    def _join(tokens: list[str]) -> str:
        out: list[str] = []
        prev = ""
        for token in tokens:
            plain = token not in SPECIAL_TOKENS and prev not in SPECIAL_TOKENS
            glue = plain and (token in _CLOSING or prev in _OPENING)
            out.append(token if glue or not out else " " + token)
            prev = token
        return "".join(out)

    def statistics(self, top: int = 10) -> dict:
        """Size, special tokens present and their ids, total and distinct words counted at
        build time, the `top` most frequent as (word, count) pairs."""
        if not _is_int(top) or top < 0:
            raise ValidationError(f"statistics: top = {top!r}, expected an integer >= 0")
        return {
            "size": self.size,
            "special_tokens": [t for t in SPECIAL_TOKENS if t in self._index],
            "has_eos_token": EOS in self._index,
            "has_unk_token": UNK in self._index,
            "eos_id": self.eos_id,
            "unk_id": self.unk_id,
            "total_words": sum(self.counts.values()),
            "unique_words": len(self.counts),
            "most_frequent": Counter(self.counts).most_common(top),
        }

    def to_dict(self) -> dict:
        """{"kind": "word", "words": [...], "counts": {word: count}}; from_dict reads it."""
        return {"kind": self.kind, "words": self.words, "counts": self.counts}

    @classmethod
    def from_dict(cls, data: dict) -> Vocab:
        """Inverse of to_dict, also of the dicts without "kind" that checkpoints written
        before tokenizer kinds hold; raises VocabularyError on a malformed dict."""
        if not isinstance(data, dict) or not isinstance(data.get("words"), list):
            raise VocabularyError("vocabulary: expected an object with a 'words' list")
        if data.get("kind", cls.kind) != cls.kind:
            raise VocabularyError(f"vocabulary: kind = {data['kind']!r}, expected 'word'")
        counts = data.get("counts") or {}
        if not isinstance(counts, dict):
            raise VocabularyError("vocabulary: 'counts' must be an object")
        return cls(data["words"], counts)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.words == other.words


# ---- char: a corpus's characters -------------------------------------------------------------

class CharTokenizer(Tokenizer):
    """The `char` tokenizer: one id per character of the corpus (ids 0..n-1, the characters
    in the order given, sorted by from_texts) and ``<unk>`` (id n) for any other character,
    which decodes to U+FFFD. Lossless on text made of its characters; no end-of-text id."""

    kind = "char"
    eos_id = None
    stream_context = 0

    def __init__(self, chars: Sequence[str]) -> None:
        chars = list(chars)
        index = _index(chars, "char tokenizer", lambda c: isinstance(c, str) and len(c) == 1,
                       "one character", reprlib.repr)
        self.chars = chars
        self._index = index
        self._pieces = chars + [CHAR_UNK_TEXT]  # decode's table, by id
        self.unk_id = len(chars)

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> CharTokenizer:
        """The sorted set of the characters of `texts` (an iterable of strings, consumed
        once: chunks of a corpus, not one string of all of it)."""
        alphabet: set[str] = set()
        for text in texts:
            alphabet.update(_check_text(text))
        return cls(sorted(alphabet))

    @property
    def size(self) -> int:
        """The characters and <unk>."""
        return len(self._pieces)

    def encode(self, text: str) -> list[int]:
        """One id per character of `text`, <unk> for a character not in the vocabulary.
        Raises ValidationError when `text` is not a string."""
        index, unk = self._index, self.unk_id
        return [index.get(ch, unk) for ch in _check_text(text)]

    def decode(self, ids: Iterable[int]) -> str:
        """The characters of `ids`, <unk> as U+FFFD. Raises TokenError for an id that is not
        an integer or is outside [0, size)."""
        pieces = self._pieces
        return "".join([pieces[i] for i in _checked(ids, self.size)])

    def to_dict(self) -> dict:
        """{"kind": "char", "chars": [...]}; from_dict reads it."""
        return {"kind": self.kind, "chars": self.chars}

    @classmethod
    def from_dict(cls, data: dict) -> CharTokenizer:
        """Inverse of to_dict; raises VocabularyError on a malformed dict."""
        if not isinstance(data, dict) or not isinstance(data.get("chars"), list):
            raise VocabularyError("char tokenizer: expected an object with a 'chars' list")
        return cls(data["chars"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and self.chars == other.chars


# ---- bpe: a Hugging Face tokenizer.json ------------------------------------------------------

class BpeTokenizer(Tokenizer):
    """The `bpe` tokenizer: a Hugging Face ``tokenizers.Tokenizer``, either byte-level BPE
    trained here (from_texts: lossless on any text UTF-8 can encode) or any tokenizer.json
    a user brings (from_file; lossless as far as that file's normalizer allows).

    ``eos_id`` is the first of <|endoftext|>, </s>, <|end_of_text|>, <eos> in the
    vocabulary; ``unk_id`` the model's unknown token (None for byte-level BPE, which needs
    none). Encoding adds no special tokens; decoding keeps them.
    """

    kind = "bpe"
    stream_context = 4  # a tokenizer.json decoder's rules (a first token's space, ...)

    def __init__(self, tokenizer: tokenizers.Tokenizer) -> None:
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        if not vocab:
            raise VocabularyError("the vocabulary is empty, expected at least one token")
        unk = getattr(tokenizer.model, "unk_token", None)
        self._tokenizer = tokenizer
        self._size = max(vocab.values()) + 1  # ids need not be contiguous in a foreign file
        self.eos_id = next((vocab[name] for name in _EOS_NAMES if name in vocab), None)
        self.unk_id = vocab.get(unk) if unk else None

    @classmethod
    def from_texts(cls, texts: Iterable[str], vocab_size: int = BPE_VOCAB_SIZE) -> BpeTokenizer:
        """Byte-level BPE learnt from `texts` (an iterable of strings, consumed once: pieces
        of a corpus, as corpus.pieces gives them): GPT-2's pre-tokenizer and no
        normalizer, so every text round-trips; at most `vocab_size` tokens, the 256 bytes
        and <|endoftext|> among them. Raises ValidationError for vocab_size < 257."""
        if not _is_int(vocab_size) or vocab_size < MIN_BPE_VOCAB_SIZE:
            raise ValidationError(f"vocab_size = {vocab_size!r}, expected an integer >= "
                                  f"{MIN_BPE_VOCAB_SIZE} (the 256 bytes and {BPE_EOS})")
        from tokenizers import Tokenizer as HfTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tokenizer = HfTokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=int(vocab_size), special_tokens=[BPE_EOS],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tokenizer.train_from_iterator((_check_text(text) for text in texts), trainer)
        return cls(tokenizer)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> BpeTokenizer:
        """A Hugging Face tokenizer.json. Raises DataLoadError naming the file when it is
        missing, unreadable, not JSON, or not a tokenizer."""
        path = Path(path)
        return cls._from_json(path, *_read_json(path))

    @classmethod
    def _from_json(cls, path: Path, text: str, data) -> BpeTokenizer:
        """The tokenizer.json at `path`, read as `text` and parsed to `data`."""
        if not isinstance(data, dict) or "model" not in data:
            found = ("an object without 'model' or 'kind'" if isinstance(data, dict)
                     else f"a JSON {_JSON_NAMES.get(type(data), type(data).__name__)}")
            raise DataLoadError(f"{path}: {found}, expected a Hugging Face tokenizer.json (an "
                                f"object with 'model') or a rustgpt tokenizer file (with 'kind')")
        return cls._parse(text, str(path), DataLoadError)

    @classmethod
    def _parse(cls, text: str, where: str, error: type[Exception]) -> BpeTokenizer:
        """The tokenizer.json `text`; `error` naming `where` when Hugging Face refuses it."""
        from tokenizers import Tokenizer as HfTokenizer

        try:
            return cls(HfTokenizer.from_str(text))
        except VocabularyError as err:
            raise error(f"{where}: {err}") from err
        except Exception as err:  # tokenizers raises plain Exception
            raise error(f"{where}: not a Hugging Face tokenizer.json "
                        f"({' '.join(str(err).split())})") from err

    @property
    def size(self) -> int:
        """One more than the largest id of the vocabulary, added tokens included."""
        return self._size

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens added. Raises ValidationError when `text` is
        not a string or holds a lone surrogate."""
        try:
            return self._tokenizer.encode(_check_text(text), add_special_tokens=False).ids
        except TypeError:  # a lone surrogate, which Rust strings cannot hold
            at = next(i for i, ch in enumerate(text) if "\ud800" <= ch <= "\udfff")
            raise ValidationError(f"text: character {at} = {text[at]!r} is a lone surrogate, "
                                  f"expected text that UTF-8 can encode") from None

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, special tokens kept. Raises TokenError for an id that is not an
        integer or is outside [0, size)."""
        return self._tokenizer.decode(_checked(ids, self.size), skip_special_tokens=False)

    def to_dict(self) -> dict:
        """{"kind": "bpe", "tokenizer_json": the text of its tokenizer.json}; from_dict reads
        it."""
        return {"kind": self.kind, "tokenizer_json": self._tokenizer.to_str()}

    @classmethod
    def from_dict(cls, data: dict) -> BpeTokenizer:
        """Inverse of to_dict; raises VocabularyError on a malformed dict."""
        if not isinstance(data, dict) or not isinstance(data.get("tokenizer_json"), str):
            raise VocabularyError("bpe tokenizer: expected an object with 'tokenizer_json', "
                                  "the text of a tokenizer.json")
        return cls._parse(data["tokenizer_json"], "bpe tokenizer: tokenizer_json",
                          VocabularyError)

    def save(self, path: str | os.PathLike) -> None:
        """Write Hugging Face's tokenizer.json (``tokenizers.Tokenizer.from_file`` loads it)
        to `path`, atomically. Raises SerializationError."""
        write_atomic(path, self._tokenizer.to_str(pretty=True).encode())

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, BpeTokenizer)
                and self._tokenizer.to_str() == other._tokenizer.to_str())


# ---- dicts, files, kinds ---------------------------------------------------------------------

_CLASSES: dict[str, type] = {"word": Vocab, "char": CharTokenizer, "bpe": BpeTokenizer}
_JSON_NAMES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


def tokenizer_from_dict(data: dict) -> Tokenizer:
    """The tokenizer `data` (a to_dict() of any kind) describes; a dict without "kind" but
    with "words" is a word vocabulary, as checkpoints written before tokenizer kinds store
    it. Raises VocabularyError on a malformed dict."""
    if not isinstance(data, dict):
        raise VocabularyError(f"tokenizer: a {type(data).__name__}, expected an object with "
                              f"a 'kind' ({', '.join(KINDS)})")
    kind = data.get("kind", "word" if "words" in data else None)
    if kind not in KINDS:
        raise VocabularyError(f"tokenizer: kind = {kind!r}, expected one of {', '.join(KINDS)}")
    return _CLASSES[kind].from_dict(data)


def _read_json(path: Path) -> tuple[str, object]:
    """The text of the JSON file `path` and its value; DataLoadError naming the file when it
    is missing, unreadable, not UTF-8 or not JSON."""
    data = read_bytes(path, DataLoadError)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataLoadError(f"{path}: byte {err.start:,} is not UTF-8, expected a tokenizer "
                            f"file (JSON text)") from err
    try:
        return text, json.loads(text)
    except json.JSONDecodeError as err:
        raise DataLoadError(f"{path}: not JSON ({err.msg} at line {err.lineno} column "
                            f"{err.colno}), expected a tokenizer file") from err


def load_tokenizer(spec: str | os.PathLike, texts: Iterable[str] | None = None,
                   vocab_size: int = BPE_VOCAB_SIZE) -> Tokenizer:
    """The tokenizer `spec` names: a kind ("word", "char", "bpe") is built from `texts` (bpe
    with `vocab_size` tokens at most); anything else is the path of a tokenizer file: a
    Hugging Face tokenizer.json (bpe), or one that `save` wrote (any kind).

    Raises ValidationError for a kind without `texts`; DataLoadError naming the file when
    it is missing, unreadable, not JSON, or not a tokenizer (foreign or corrupt)."""
    if isinstance(spec, str) and spec in KINDS:
        if texts is None:
            raise ValidationError(f"tokenizer {spec!r}: a kind is built from text and none "
                                  f"was given; pass texts, or the path of a tokenizer file")
        return train_tokenizer(spec, texts, vocab_size)
    path = Path(spec)
    if not path.exists():
        raise DataLoadError(f"{path}: no such file, expected a tokenizer file or a kind "
                            f"({', '.join(KINDS)})")
    text, data = _read_json(path)
    if isinstance(data, dict) and ("kind" in data or "words" in data):
        try:
            return tokenizer_from_dict(data)
        except VocabularyError as err:
            raise DataLoadError(f"{path}: {err}") from err
    return BpeTokenizer._from_json(path, text, data)


def train_tokenizer(kind: str, texts: Iterable[str],
                    vocab_size: int = BPE_VOCAB_SIZE) -> Tokenizer:
    """A `kind` tokenizer learnt from `texts` (strings, consumed once: the pieces of a corpus,
    as corpus.pieces gives them); bpe has `vocab_size` tokens at most.
    Raises ValidationError for an unknown kind, a vocab_size below 257 (bpe) or a text that is
    not a string."""
    if kind not in KINDS:
        raise ValidationError(f"tokenizer kind = {kind!r}, expected one of {', '.join(KINDS)}")
    if kind == "bpe":
        return BpeTokenizer.from_texts(texts, vocab_size)
    return _CLASSES[kind].from_texts(texts)


def tokens_per_byte(tokenizer: Tokenizer, texts: str | Iterable[str]) -> float:
    """Tokens per byte of UTF-8 text over `texts` (one string, or pieces of one as
    corpus.pieces gives them). Raises ValidationError when there is no text."""
    tokens = n_bytes = 0
    for text in [texts] if isinstance(texts, str) else texts:
        tokens += len(tokenizer.encode(text))
        n_bytes += len(text.encode("utf-8", "surrogatepass"))
    if n_bytes == 0:
        raise ValidationError("tokens_per_byte: the text is empty")
    return tokens / n_bytes
