"""Vocab: RustGPT's tokenization rules, encode/decode, errors, statistics, round trips."""

import string
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rustgpt.errors import TokenError, VocabularyError
from rustgpt.tokenizer import EOS, UNK, Vocab, tokenize

TEXTS = ["User: How do mountains form? Assistant: Plates collide, slowly. </s>",
         "The sun's light (mostly) reaches us in 8 minutes! </s>"]


def test_tokenize_splits_words_and_punctuation():
    assert tokenize("Hello, world! </s>") == ["Hello", ",", "world", "!", "</s>"]
    assert tokenize("don't  stop\n...") == ["don", "'", "t", "stop", ".", ".", "."]
    assert tokenize("") == []


def test_vocab_is_the_sorted_set_plus_special_tokens():
    v = Vocab.from_texts(TEXTS)
    assert v.words == sorted(v.words)
    assert EOS in v and UNK in v
    assert {"How", "?", "(", "sun", "s"} <= set(v.words)
    assert v.size == len(v) == len(set(v.words))


def test_encode_decode():
    v = Vocab.from_texts(TEXTS)
    ids = v.encode("User: How do mountains form? </s>")
    assert v.decode(ids) == "User: How do mountains form? </s>"
    assert v.encode("volcanoes erupt")[0] == v.unk_id
    assert v.decode([v.token_id("sun"), v.token_id("'"), v.token_id("s")]) == "sun's"


def test_errors():
    v = Vocab.from_texts(TEXTS)
    with pytest.raises(TokenError, match="token 1 = 'volcanoes' is not in the vocabulary"):
        v.encode_or_error("How volcanoes")
    with pytest.raises(TokenError, match=r"id 1 = 999 is outside the vocabulary"):
        v.decode_or_error([0, 999])
    assert v.decode([0, 999]).endswith(UNK)
    with pytest.raises(VocabularyError, match="appears twice"):
        Vocab(["a", "a", EOS, UNK])
    with pytest.raises(VocabularyError, match="special token '<unk>' is missing"):
        Vocab(["a", EOS])
    with pytest.raises(VocabularyError, match="entry 0"):
        Vocab(["a b", EOS, UNK])


def test_statistics_and_dict_round_trip():
    v = Vocab.from_texts(TEXTS)
    stats = v.statistics(top=3)
    assert stats["size"] == v.size and stats["special_tokens"] == [EOS, UNK]
    assert stats["total_words"] == sum(len(tokenize(t)) for t in TEXTS)
    counts = Counter(t for text in TEXTS for t in tokenize(text))
    assert [c for _, c in stats["most_frequent"]] == sorted(counts.values(), reverse=True)[:3]
    assert Vocab.from_dict(v.to_dict()) == v
    with pytest.raises(VocabularyError):
        Vocab.from_dict({"words": "nope"})


words = st.text(alphabet=string.ascii_letters + string.digits + string.punctuation,
                min_size=1, max_size=8)


@settings(max_examples=200, deadline=None)
@given(st.lists(words, min_size=1, max_size=12))
def test_round_trip_on_in_vocabulary_text(parts):
    text = " ".join(parts)
    v = Vocab.from_texts([text])
    ids = v.encode_or_error(text)
    assert v.encode_or_error(v.decode(ids)) == ids


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_arbitrary_unicode_never_raises(text):
    v = Vocab.from_texts(TEXTS)
    ids = v.encode(text)
    assert all(0 <= i < v.size for i in ids)
    v.decode(ids)
