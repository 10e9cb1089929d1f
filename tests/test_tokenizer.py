"""Tokenizers: the interface each kind keeps; word (RustGPT's rules, encode/decode, errors,
statistics), char and bpe round trips; dicts and files (corrupt, foreign); training a kind."""

import json
import string
from collections import Counter

import numpy as np
import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st

from rustgpt.errors import DataLoadError, TokenError, ValidationError, VocabularyError
from rustgpt.tokenizer import (
    BPE_EOS,
    EOS,
    KINDS,
    UNK,
    BpeTokenizer,
    CharTokenizer,
    Tokenizer,
    Vocab,
    load_tokenizer,
    tokenize,
    tokenizer_from_dict,
    tokens_per_byte,
    train_tokenizer,
)

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
    with pytest.raises(TokenError, match=r"id 0 = -1 is outside the vocabulary"):
        v.decode_or_error(np.array([-1]))
    assert v.decode([0, 999]).endswith(UNK) and v.decode([-1]) == UNK
    with pytest.raises(VocabularyError, match="appears twice"):
        Vocab(["a", "a", EOS, UNK])
    with pytest.raises(VocabularyError, match="special token '<unk>' is missing"):
        Vocab(["a", EOS])
    with pytest.raises(VocabularyError, match="entry 0"):
        Vocab(["a b", EOS, UNK])


def test_decode_accepts_numpy_integers():
    v = Vocab.from_texts(TEXTS)
    ids = v.encode("User: How do mountains form? </s>")
    text = v.decode(ids)
    for same in (np.array(ids), np.array(ids, np.int32), np.array(ids, np.uint16),
                 [np.int64(i) for i in ids], tuple(ids)):
        assert v.decode(same) == v.decode_or_error(same) == text
    assert v.decode(iter(ids)) == v.decode_or_error(i for i in ids) == text
    assert v.decode([]) == v.decode_or_error(np.array([], np.int64)) == ""


@pytest.mark.parametrize("ids, message", [
    ([0, 1.5], r"id 1 = 1\.5 is a float, expected an integer token id"),
    ([2.0], r"id 0 = 2\.0 is a float"),
    (np.array([1.0, 2.0]), r"id 0 = .*1\.0.* is a float64"),
    ([0, 0, True], r"id 2 = True is a bool"),
    ([np.bool_(False)], r"id 0 = .*False_? is a bool"),
    (["x"], r"id 0 = 'x' is a str"),
    ([None], r"id 0 = None is a NoneType"),
    ([[1, 2]], r"id 0 = \[1, 2\] is a list"),
    (np.array([[1, 2]]), r"ids = array\(\[\[1, 2\]\]\), expected a sequence of integer token ids"),
    ("12", r"ids = '12', expected a sequence"),
    (7, r"ids = 7, expected a sequence"),
    (None, r"ids = None, expected a sequence"),
])
def test_decode_refuses_ids_that_are_not_integers(ids, message):
    v = Vocab.from_texts(TEXTS)
    for decode in (v.decode, v.decode_or_error):
        with pytest.raises(TokenError, match=message):
            decode(ids)


def test_encode_refuses_text_that_is_not_a_string():
    v = Vocab.from_texts(TEXTS)
    for encode in (v.encode, v.encode_or_error, tokenize):
        with pytest.raises(ValidationError, match="text is a bytes, expected a string"):
            encode(b"How")
        with pytest.raises(ValidationError, match="text is a NoneType"):
            encode(None)


def test_statistics_and_dict_round_trip():
    v = Vocab.from_texts(TEXTS)
    stats = v.statistics(top=3)
    assert stats["size"] == v.size and stats["special_tokens"] == [EOS, UNK]
    assert stats["has_eos_token"] is True and stats["has_unk_token"] is True
    assert v.words[stats["eos_id"]] == EOS and v.words[stats["unk_id"]] == UNK
    assert stats["total_words"] == sum(len(tokenize(t)) for t in TEXTS)
    assert stats["unique_words"] == len(set(t for text in TEXTS for t in tokenize(text)))
    counts = Counter(t for text in TEXTS for t in tokenize(text))
    assert [c for _, c in stats["most_frequent"]] == sorted(counts.values(), reverse=True)[:3]
    assert v.statistics(top=0)["most_frequent"] == []
    for top in (-1, 1.5, True):
        with pytest.raises(ValidationError, match=f"statistics: top = {top!r}, expected"):
            v.statistics(top=top)
    assert Vocab.from_dict(v.to_dict()) == v
    with pytest.raises(VocabularyError):
        Vocab.from_dict({"words": "nope"})
    explicit = Vocab(["a", EOS, UNK]).statistics()
    assert explicit["total_words"] == explicit["unique_words"] == 0
    assert explicit["has_eos_token"] and explicit["eos_id"] == 1


@pytest.mark.parametrize("count", ["3", -1, 1.5, True, None])
def test_counts_must_be_non_negative_integers(count):
    data = {"words": ["a", EOS, UNK], "counts": {"a": count}}
    with pytest.raises(VocabularyError, match=f"count of 'a' = {count!r}, expected a non-negative"):
        Vocab.from_dict(data)


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


# ---- every kind ----------------------------------------------------------------------------

PLAY = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, "
        "speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n") * 20
ODD = "naïve café, 你好 🙂👍🏽 \t\r\n\x00 \u200b <|endoftext|> </s> <unk> \ufffd"


@pytest.fixture(scope="module")
def bpe():
    return BpeTokenizer.from_texts(PLAY.splitlines(keepends=True), vocab_size=300)


@pytest.fixture(scope="module")
def tokenizer_of(bpe):
    made = {"word": Vocab.from_texts([PLAY]), "char": CharTokenizer.from_texts([PLAY]),
            "bpe": bpe}
    return made.__getitem__


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_has_the_interface(kind, tokenizer_of):
    tok = tokenizer_of(kind)
    assert isinstance(tok, Tokenizer) and tok.kind == kind
    ids = tok.encode(PLAY)
    assert ids and all(isinstance(i, int) and 0 <= i < tok.size for i in ids)
    for special in (tok.eos_id, tok.unk_id):
        assert special is None or 0 <= special < tok.size
    again = tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
    assert type(again) is type(tok) and again == tok and again.encode(PLAY) == ids
    with pytest.raises(ValidationError, match="text is a bytes, expected a string"):
        tok.encode(b"abc")
    with pytest.raises(TokenError, match="id 1 = 1.5 is a float"):
        tok.decode([0, 1.5])
    assert tok.decode(np.array(ids[:5], np.uint16)) == tok.decode(ids[:5])


def test_special_ids(tokenizer_of):
    word, char, bpe = map(tokenizer_of, KINDS)
    assert word.decode([word.eos_id, word.unk_id]) == f"{EOS} {UNK}"
    assert char.eos_id is None and char.unk_id == char.size - 1 == len(set(PLAY))
    assert bpe.decode([bpe.eos_id]) == BPE_EOS and bpe.unk_id is None


def test_char_round_trip_and_unknown_characters():
    tok = CharTokenizer.from_texts(iter(PLAY.splitlines(keepends=True)))  # streamed pieces
    assert tok == CharTokenizer.from_texts([PLAY]) and tok.chars == sorted(set(PLAY))
    assert tok.decode(tok.encode(PLAY)) == PLAY
    ids = tok.encode("Speak, Zeus!")
    assert ids.count(tok.unk_id) == 2 and tok.decode(ids) == "Speak, \ufffdeus\ufffd"
    with pytest.raises(TokenError, match=rf"id 0 = {tok.size} is outside the vocabulary"):
        tok.decode([tok.size])
    with pytest.raises(TokenError, match="id 0 = -1 is outside"):
        tok.decode([-1])


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=sorted(set(PLAY)), max_size=200))
def test_char_is_lossless_on_its_characters(text):
    tok = CharTokenizer.from_texts([PLAY])
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_bpe_is_lossless_on_any_text(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_round_trip_on_text_char_would_lose(bpe):
    char = CharTokenizer.from_texts([PLAY])
    assert char.decode(char.encode(ODD)) != ODD
    ids = bpe.encode(ODD)
    assert bpe.decode(ids) == ODD and bpe.eos_id in ids  # the special token, whole
    assert len(bpe.encode(PLAY)) < len(PLAY) / 2  # merges were learnt
    with pytest.raises(TokenError, match=r"id 1 = 300 is outside the vocabulary \[0, 300\)"):
        bpe.decode([0, 300])
    with pytest.raises(ValidationError, match="character 1 = '\\\\ud800' is a lone surrogate"):
        bpe.encode("a\ud800")
    with pytest.raises(ValidationError, match="vocab_size = 256, expected an integer >= 257"):
        BpeTokenizer.from_texts([PLAY], vocab_size=256)


def test_tokens_per_byte(tokenizer_of):
    assert tokens_per_byte(tokenizer_of("char"), "héllo") == 5 / 6
    pieces = PLAY.splitlines(keepends=True)
    assert tokens_per_byte(tokenizer_of("bpe"), pieces) == pytest.approx(
        len(tokenizer_of("bpe").encode(PLAY)) / len(PLAY))
    with pytest.raises(ValidationError, match="the text is empty"):
        tokens_per_byte(tokenizer_of("char"), [])


# ---- dicts and files -------------------------------------------------------------------------

def test_a_word_dict_without_kind_still_loads():
    old = {"words": ["a", EOS, UNK], "counts": {"a": 2}}  # what checkpoints held before kinds
    tok = tokenizer_from_dict(old)
    assert isinstance(tok, Vocab) and tok.words == ["a", EOS, UNK]
    assert tok.to_dict() == {"kind": "word", **old} and Vocab.from_dict(tok.to_dict()) == tok


@pytest.mark.parametrize("data, message", [
    ([1, 2], r"tokenizer: a list, expected an object with a 'kind'"),
    ({"kind": "sentencepiece"}, r"kind = 'sentencepiece', expected one of word, char, bpe"),
    ({}, r"kind = None, expected one of"),
    ({"kind": "char", "chars": "abc"}, r"char tokenizer: expected an object with a 'chars' list"),
    ({"kind": "char", "chars": ["a", "bc"]}, r"entry 1 = 'bc', expected one character"),
    ({"kind": "char", "chars": ["a", "a"]}, r"'a' appears twice \(entries 0 and 1\)"),
    ({"kind": "bpe"}, r"bpe tokenizer: expected an object with 'tokenizer_json'"),
    ({"kind": "bpe", "tokenizer_json": "{}"}, r"tokenizer_json: not a Hugging Face tokenizer"),
    ({"kind": "word", "words": [EOS]}, r"special token '<unk>' is missing"),
])
def test_malformed_dicts(data, message):
    with pytest.raises(VocabularyError, match=message):
        tokenizer_from_dict(data)
    with pytest.raises(VocabularyError, match="kind = 'char', expected 'word'"):
        Vocab.from_dict({"kind": "char", "words": [EOS, UNK]})


@pytest.mark.parametrize("kind", KINDS)
def test_saved_files_load_back(kind, tokenizer_of, tmp_path):
    tok = tokenizer_of(kind)
    path = tmp_path / "tok.json"
    tok.save(path)
    assert load_tokenizer(str(path)) == tok
    assert load_tokenizer(path).encode(PLAY) == tok.encode(PLAY)
    if kind == "bpe":  # Hugging Face's own format
        hf = tokenizers.Tokenizer.from_file(str(path))
        assert hf.encode(ODD, add_special_tokens=False).ids == tok.encode(ODD)
        assert BpeTokenizer.from_file(path) == tok
    else:
        assert json.loads(path.read_text())["kind"] == kind


def test_a_foreign_hugging_face_tokenizer(tmp_path):
    vocab = {"[UNK]": 0, "[SEP]": 1, "</s>": 2, "speak": 3, "##s": 4, "hear": 5}
    wordpiece = tokenizers.Tokenizer(tokenizers.models.WordPiece(vocab, unk_token="[UNK]"))
    wordpiece.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    wordpiece.save(str(tmp_path / "wp.json"))
    tok = load_tokenizer(tmp_path / "wp.json")
    assert tok.kind == "bpe" and tok.size == 6 and tok.unk_id == 0 and tok.eos_id == 2
    assert tok.encode("hear speaks zz") == [5, 3, 4, 0]


@pytest.mark.parametrize("content, message", [
    (b'{"model": {"type": "BPE", "vocab"', r"bad.json: not JSON \(.* at line 1 column \d+\), "
                                           r"expected a tokenizer file"),
    (b"", r"bad.json: not JSON \(Expecting value at line 1 column 1\)"),
    (b'{"version": "1.0", "model": {"type": "BPE", "vocab": 3}}',
     r"bad.json: not a Hugging Face tokenizer.json \(invalid type"),
    (b'{"weights": [1, 2]}', r"bad.json: an object without 'model' or 'kind', expected a Hugging "
                            r"Face tokenizer.json"),
    (b"[1, 2]", r"bad.json: a JSON array, expected a Hugging Face tokenizer.json"),
    (b'{"kind": "char", "chars": [1]}', r"bad.json: char tokenizer: entry 0 = 1, expected one"),
    (b'{"kind": "x"}', r"bad.json: tokenizer: kind = 'x', expected one of word, char, bpe"),
    (b'{"model": "\xff"}', r"bad.json: byte 11 is not UTF-8, expected a tokenizer file"),
])
def test_corrupt_or_foreign_tokenizer_files(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(DataLoadError, match=message) as err:
        load_tokenizer(path)
    assert "\n" not in str(err.value)


def test_load_tokenizer_kinds_and_missing_files(tmp_path):
    assert load_tokenizer("char", [PLAY]) == CharTokenizer.from_texts([PLAY])
    assert load_tokenizer("word", [PLAY]) == Vocab.from_texts([PLAY])
    assert load_tokenizer("bpe", [PLAY], vocab_size=280).size == 280
    with pytest.raises(ValidationError, match="tokenizer 'char': a kind is built from text"):
        load_tokenizer("char")
    with pytest.raises(DataLoadError, match=r"none.json: no such file, expected a tokenizer "
                                            r"file or a kind \(word, char, bpe\)"):
        load_tokenizer(tmp_path / "none.json")
    with pytest.raises(DataLoadError, match=r": not a regular file"):
        load_tokenizer(tmp_path)


# ---- training a kind ------------------------------------------------------------------------

def test_train_tokenizer_on_streamed_texts():
    pieces = PLAY.splitlines(keepends=True)
    assert train_tokenizer("char", iter(pieces)) == CharTokenizer.from_texts([PLAY])
    assert train_tokenizer("word", iter(pieces)) == Vocab.from_texts([PLAY])
    assert train_tokenizer("bpe", iter(pieces), vocab_size=280) == BpeTokenizer.from_texts(
        pieces, vocab_size=280)
    with pytest.raises(ValidationError, match=r"tokenizer kind = 'bytes', expected one of "
                                              r"word, char, bpe"):
        train_tokenizer("bytes", pieces)
    with pytest.raises(ValidationError, match=r"vocab_size = 100, expected an integer >= 257"):
        train_tokenizer("bpe", iter(pieces), vocab_size=100)
    with pytest.raises(ValidationError, match=r"text is a bytes, expected a string"):
        train_tokenizer("char", [b"abc"])
