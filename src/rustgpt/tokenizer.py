"""Vocab: RustGPT's word tokenizer (whitespace split, each ASCII punctuation character its
own token, ``</s>`` special) plus ``<unk>`` so unknown words are never silently lost."""

from __future__ import annotations

import string
from collections import Counter
from typing import Iterable, Sequence

from rustgpt.errors import TokenError, VocabularyError

EOS = "</s>"
UNK = "<unk>"
SPECIAL_TOKENS = (EOS, UNK)
_PUNCTUATION = frozenset(string.punctuation)
# decode() writes no space before a closing mark and none after an opening one
_CLOSING = frozenset(".,!?;:)]}%'")
_OPENING = frozenset("([{$'")


def tokenize(text: str) -> list[str]:
    """Split `text` into RustGPT's tokens: words, single punctuation characters, ``</s>``."""
    tokens: list[str] = []
    for word in text.split():
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


class Vocab:
    """A word vocabulary: token strings <-> integer ids.

    Build it with ``Vocab.from_texts`` (sorted set of the texts' tokens plus the special
    tokens, as RustGPT builds its vocabulary) or from an explicit word list.
    """

    def __init__(self, words: Sequence[str], counts: dict[str, int] | None = None) -> None:
        words = list(words)
        index: dict[str, int] = {}
        for i, word in enumerate(words):
            if not isinstance(word, str) or not word or any(c.isspace() for c in word):
                raise VocabularyError(f"vocabulary: entry {i} = {word!r}, expected a non-empty "
                                      f"string without whitespace")
            if word in index:
                raise VocabularyError(f"vocabulary: {word!r} appears twice (entries "
                                      f"{index[word]} and {i})")
            index[word] = i
        for special in SPECIAL_TOKENS:
            if special not in index:
                raise VocabularyError(f"vocabulary: special token {special!r} is missing")
        self.words = words
        self._index = index
        self.counts = dict(counts or {})
        self.eos_id = index[EOS]
        self.unk_id = index[UNK]

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> Vocab:
        """The sorted set of every token in `texts`, plus ``</s>`` and ``<unk>``."""
        counts = Counter(token for text in texts for token in tokenize(text))
        return cls(sorted(set(counts) | set(SPECIAL_TOKENS)), dict(counts))

    @property
    def size(self) -> int:
        return len(self.words)

    def __len__(self) -> int:
        return len(self.words)

    def contains(self, word: str) -> bool:
        return word in self._index

    __contains__ = contains

    def token_id(self, word: str) -> int | None:
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
        """Text of `ids`: tokens joined by spaces, punctuation attached; bad ids become <unk>."""
        n = self.size
        return self._join([self.words[i] if 0 <= i < n else UNK for i in map(int, ids)])

    def decode_or_error(self, ids: Iterable[int]) -> str:
        """Text of `ids`; raises TokenError for an id outside [0, size)."""
        tokens = []
        for position, i in enumerate(ids):
            if not 0 <= int(i) < self.size:
                raise TokenError(f"id {position} = {i} is outside the vocabulary [0, {self.size})")
            tokens.append(self.words[int(i)])
        return self._join(tokens)

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
        """Size, special tokens present, total words counted at build time, most frequent."""
        return {
            "size": self.size,
            "special_tokens": [t for t in SPECIAL_TOKENS if t in self._index],
            "total_words": sum(self.counts.values()),
            "most_frequent": Counter(self.counts).most_common(top),
        }

    def to_dict(self) -> dict:
        return {"words": self.words, "counts": self.counts}

    @classmethod
    def from_dict(cls, data: dict) -> Vocab:
        """Inverse of to_dict; raises VocabularyError on a malformed dict."""
        if not isinstance(data, dict) or not isinstance(data.get("words"), list):
            raise VocabularyError("vocabulary: expected an object with a 'words' list")
        counts = data.get("counts") or {}
        if not isinstance(counts, dict):
            raise VocabularyError("vocabulary: 'counts' must be an object")
        return cls(data["words"], counts)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.words == other.words

    def __repr__(self) -> str:
        return f"Vocab(size={self.size})"
