"""Text corpora: finding files, reading them (strict or replacing, progress, the cut rule), bad
input, the token file (contents, cache, dtype), the split, random windows and the bytes a token
range stands for."""

import logging
import shutil

import numpy as np
import pytest

from rustgpt import corpus
from rustgpt.corpus import TokenFile, count_bytes, documents, find_sources, pieces, random_windows
from rustgpt.errors import DataLoadError, ValidationError, VocabularyError
from rustgpt.tokenizer import KINDS, train_tokenizer


class CharTokenizer:
    """The tokenizer interface over characters (and a newline): id = offset + the character's
    rank, then an eos id if asked for. Records every text it encodes."""

    def __init__(self, chars, eos=False, offset=0):
        self.chars = sorted(set(chars) | {"\n"})
        self.index = {c: offset + i for i, c in enumerate(self.chars)}
        self.offset = offset
        self.eos_id = offset + len(self.chars) if eos else None
        self.size = offset + len(self.chars) + eos
        self.encoded = []

    def encode(self, text):
        self.encoded.append(text)
        return [self.index[c] for c in text]

    def decode(self, ids):
        return "".join(self.chars[i - self.offset] for i in ids if i != self.eos_id)

    def to_dict(self):
        return {"chars": self.chars, "eos": self.eos_id is not None, "offset": self.offset}


class ByteTokenizer:
    """Byte-level: one id per UTF-8 byte; decoding a cut character gives U+FFFD."""

    size = 256

    def encode(self, text):
        return list(text.encode())

    def decode(self, ids):
        return bytes(ids).decode("utf-8", "replace")

    def to_dict(self):
        return {"kind": "bytes"}


def write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


# the documents of `corpus_dir`, in the order a build reads them
DOCS = ["hello world\n", "doc one", "doc two\n", "héllo €\nnext"]


@pytest.fixture
def corpus_dir(tmp_path):
    root = tmp_path / "corpus"
    write(root / "a.txt", b"\xef\xbb\xbf" + DOCS[0].encode())  # a BOM, skipped
    write(root / "c.jsonl", '{"text": "doc one", "id": 1}\n\n{"text": "doc two\\n"}\n'
                            '{"text": ""}\n')
    write(root / "sub" / "b.md", DOCS[3])
    write(root / ".hidden" / "x.txt", "hidden")
    write(root / "notes.py", "not text")
    return root


def names(sources):
    return [s.name for s in sources]


def test_find_sources_file_directory_glob_jsonl(corpus_dir):
    d = corpus_dir
    assert [(s.name, s.jsonl) for s in find_sources([d])] == [
        ("a.txt", False), ("c.jsonl", True), ("sub/b.md", False)]
    assert names(find_sources([d / "a.txt"])) == ["a.txt"]
    assert names(find_sources(str(d / "c.jsonl"))) == ["c.jsonl"]
    assert names(find_sources([str(d / "**" / "*.md"), str(d / "*.txt")])) == ["sub/b.md",
                                                                                "a.txt"]
    # a file given by name is read whatever its suffix; a file found twice is kept once
    assert names(find_sources([d / "notes.py", d, d / "a.txt"])) == [
        "notes.py", "a.txt", "c.jsonl", "sub/b.md"]


@pytest.mark.parametrize("spec,message", [
    ("missing.txt", "missing.txt: no such file or directory"),
    ("*.nothing", "*.nothing: no file matches this pattern"),
    ("empty", "empty: a directory with no text files (.txt, .md or .jsonl)"),
])
def test_find_sources_errors(tmp_path, monkeypatch, spec, message):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "empty" / "code.py", "x = 1\n")
    with pytest.raises(DataLoadError) as err:
        find_sources([spec])
    assert str(err.value) == message
    with pytest.raises(DataLoadError, match="no text given"):
        find_sources([])


@pytest.mark.parametrize("name,content,message", [
    ("bad.txt", b"ok\nbad \xff here", "bad.txt: line 2: not UTF-8 (byte 0xff at offset 7)"),
    ("utf16.txt", "hi".encode("utf-16-le"), "utf16.txt: line 1: a NUL byte at offset 1, "
                                            "expected UTF-8 text (a binary file, or UTF-16?)"),
    ("bad.jsonl", b'{"text": "a"}\n{"text": "\xe9"}\n',
     "bad.jsonl: line 2: not UTF-8 (byte 0xe9 at offset 24)"),
    ("bad.jsonl", '{"text": "a"}\nnot json\n',
     "bad.jsonl: line 2: malformed JSON (Expecting value at column 1), expected an object "
     "with a string 'text'"),
    ("bad.jsonl", '[1]\n', "bad.jsonl: line 1: an array, expected an object with a string "
                           "'text'"),
    ("bad.jsonl", '{"txt": "a"}\n', "bad.jsonl: line 1: no 'text', expected an object with "
                                    "a string 'text'"),
    ("bad.jsonl", '{"text": 3}\n', "bad.jsonl: line 1: 'text' is a number, expected an "
                                   "object with a string 'text'"),
    ("empty.txt", "", "empty.txt: empty corpus (0 bytes of text, 0 tokens)"),
])
def test_bad_text_is_one_line_and_leaves_no_file(tmp_path, name, content, message):
    path = write(tmp_path / name, content)
    cache = tmp_path / "cache"
    with pytest.raises(DataLoadError) as err:
        TokenFile.build([path], CharTokenizer("abé"), cache)
    assert str(err.value) == f"{tmp_path}/{message}"
    assert list(cache.iterdir()) == []  # the temporary file is gone, no token file


def test_error_offsets_are_the_files_across_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "CHUNK_BYTES", 8)
    path = write(tmp_path / "a.txt", b"\xef\xbb\xbfone two\nthree four five\nsix \xc3")
    with pytest.raises(DataLoadError, match=r"a.txt: line 3: not UTF-8 \(byte 0xc3 at offset 31\)"):
        TokenFile.build([path], CharTokenizer("onetwhrfuivsx \n"), tmp_path / "cache")


def test_empty_corpus_of_several_files(tmp_path):
    paths = [write(tmp_path / "a.txt", ""), write(tmp_path / "b.jsonl", '{"text": ""}\n')]
    with pytest.raises(DataLoadError, match=r"a.txt \(\+1 files\): empty corpus"):
        TokenFile.build(paths, CharTokenizer("a", eos=True), tmp_path / "cache")


def test_ids_outside_the_vocabulary(tmp_path):
    tok = CharTokenizer("ab")
    tok.size = 1
    with pytest.raises(VocabularyError, match=r"a.txt: the tokenizer gave id 1, outside its "
                                              r"vocabulary \[0, 1\)"):
        TokenFile.build([write(tmp_path / "a.txt", "ab")], tok, tmp_path / "cache")


def test_tokens_are_the_documents_encoded_and_joined(corpus_dir, tmp_path):
    """Each document, then eos if the tokenizer has one, else a newline unless it ends in
    one; the empty jsonl text is skipped."""
    text_bytes = sum(len(d.encode()) for d in DOCS)
    tok = CharTokenizer("".join(DOCS))
    tf = TokenFile.build([corpus_dir], tok, tmp_path / "cache")
    assert tf.tokens.dtype == np.uint16 and len(tf) == tf.meta["tokens"]
    assert tf.tokens.tolist() == tok.encode("".join(d if d.endswith("\n") else d + "\n"
                                                    for d in DOCS))
    assert tf.meta["text_bytes"] == text_bytes
    assert [s["name"] for s in tf.meta["sources"]] == ["a.txt", "c.jsonl", "sub/b.md"]
    assert tf.meta["tokenizer"] == tok.to_dict() and tf.meta["dtype"] == "uint16"

    eos = CharTokenizer("".join(DOCS), eos=True)
    tf = TokenFile.build([corpus_dir], eos, tmp_path / "cache")
    assert tf.tokens.tolist() == sum((eos.encode(d) + [eos.eos_id] for d in DOCS), [])


def test_pieces_are_cut_before_whitespace(tmp_path, monkeypatch):
    """Pieces of at most CHUNK_BYTES (bytes of a file, characters of a JSON text), cut before
    a newline, else a space, that follows a non-space, else at a character's start."""
    monkeypatch.setattr(corpus, "CHUNK_BYTES", 12)
    text = "alpha beta\n\n  gamma delta epsilon\nééééééééé zeta"
    start = ["alpha beta", "\n\n  gamma", " delta", " epsilon"]
    tok = CharTokenizer(text, eos=True)
    for name, content, pieces in [
            ("a.txt", text, start + ["\nééééé", "éééé", " zeta"]),
            ("a.jsonl", '{"text": "%s"}' % text.replace("\n", "\\n"),
             start + ["\nééééééééé", " zeta"])]:
        tok.encoded.clear()
        tf = TokenFile.build([write(tmp_path / name, content)], tok, tmp_path / "cache")
        assert tok.encoded == pieces
        assert tf.tokens.tolist() == tok.encode(text) + [tok.eos_id]


def test_pieces_keep_every_byte_and_report_progress(tmp_path):
    lines = [f"line {i} é🙂\r\n" for i in range(corpus.CHUNK_BYTES // 8)]  # across reads
    write(tmp_path / "a.txt", "".join(lines))
    write(tmp_path / "sub" / "b.md", "no newline at the end")
    write(tmp_path / "skipped.json", "[]")
    sources = find_sources([tmp_path])
    seen = []
    got = list(pieces(sources, progress=seen.append))
    assert "".join(got) == "".join(lines) + "no newline at the end"
    assert len(got) > 2 and all(p[0].isspace() for p in got[1:-1])  # cut before whitespace
    assert sum(seen) == sum(s.path.stat().st_size for s in sources)


@pytest.mark.parametrize("kind", KINDS)
def test_pieces_train_the_tokenizer_the_whole_text_does(tmp_path, monkeypatch, kind):
    """No word, and no pre-split of byte-level BPE, straddles a cut."""
    monkeypatch.setattr(corpus, "CHUNK_BYTES", 24)
    text = ("First Citizen:\nBefore we proceed any further, hear me   speak.\n\n\tAll: don't!"
            " Speak,\n speak.\n") * 30
    write(tmp_path / "a.txt", text)
    got = list(pieces(find_sources([tmp_path / "a.txt", tmp_path])))  # a.txt once
    assert len(got) > 100 and "".join(got) == text
    trained, whole = (train_tokenizer(kind, texts, vocab_size=300) for texts in (got, [text]))
    assert trained == whole and getattr(trained, "counts", 0) == getattr(whole, "counts", 0)


def test_replace_reads_any_bytes_with_one_warning_per_file(tmp_path, caplog):
    filler = (b"speak, " * corpus.CHUNK_BYTES)[:corpus.CHUNK_BYTES - 1]
    path = write(tmp_path / "latin1.txt", filler + "é".encode() + b"ok\n caf\xe9 \xff\n")
    at = corpus.CHUNK_BYTES + 8  # the é across the first read is fine; \xe9 is not
    with pytest.raises(DataLoadError, match=rf"latin1.txt: line 2: not UTF-8 \(byte 0xe9 at "
                                            rf"offset {at}\)"):
        list(pieces(find_sources([path])))
    write(path, path.read_bytes() + b"\0\n")  # a NUL is UTF-8: "replace" reads it as it is
    jsonl = write(tmp_path / "b.jsonl", b'{"text": "a"}\n{"text": "\xe9\xe9"}\n')
    with caplog.at_level(logging.WARNING, logger="rustgpt"):
        text = "".join(pieces(find_sources([path, jsonl]), "replace"))
    start = (filler + "é".encode() + b"ok\n caf").decode()
    assert text == start + "\ufffd \ufffd\n\0\na\ufffd\ufffd"
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: line 2: not UTF-8 (byte 0xe9 at offset {at}); read as U+FFFD, as is every "
        f"such byte of the file",
        f"{jsonl}: line 2: not UTF-8 (byte 0xe9 at offset 24); read as U+FFFD, as is every such "
        f"byte of the file"]
    write(path, b"cut \xe2\x82")  # ends inside a character
    with pytest.raises(DataLoadError, match=r"line 1: not UTF-8 \(byte 0xe2 at offset 4\)"):
        list(pieces(find_sources([path])))
    with pytest.raises(ValidationError, match=r"errors = 'ignore', expected 'strict' or "
                                              r"'replace'"):
        list(documents(find_sources([path]), "ignore"))


def test_pieces_of_a_corpus_without_text(tmp_path):
    paths = [write(tmp_path / "a.txt", ""), write(tmp_path / "b.jsonl", '{"text": ""}\n')]
    with pytest.raises(DataLoadError, match=r"a.txt \(\+1 files\): empty corpus, expected some "
                                            r"text"):
        list(pieces(find_sources(paths)))


def test_reuse_and_rebuild(corpus_dir, tmp_path):
    cache = tmp_path / "cache"
    tok = CharTokenizer("".join(DOCS) + "!")
    first = TokenFile.build([corpus_dir], tok, cache)
    tokens = first.tokens.tolist()
    mtime = first.path.stat().st_mtime_ns
    encoded = len(tok.encoded)
    again = TokenFile.build([corpus_dir], tok, cache)
    assert again.path == first.path and again.key == first.key
    assert first.path.stat().st_mtime_ns == mtime and len(tok.encoded) == encoded  # not rebuilt
    assert sorted(p.name for p in cache.iterdir()) == [first.path.name,
                                                       first.path.with_suffix(".json").name]

    moved = shutil.copytree(corpus_dir, tmp_path / "moved")  # names are relative: same key
    assert TokenFile.build([moved], tok, cache).path == first.path

    write(moved / "a.txt", "hello world!\n")  # a changed corpus
    changed = TokenFile.build([moved], tok, cache)
    assert changed.path != first.path and changed.tokens[:12].tolist() == tok.encode("hello world!")
    other = CharTokenizer("".join(DOCS) + "?")  # a changed tokenizer
    assert TokenFile.build([corpus_dir], other, cache).path not in (first.path, changed.path)

    path = first.path
    del first, again  # their maps of the file about to be damaged
    with open(path, "r+b") as f:  # a damaged token file is built again
        f.truncate(4)
    rebuilt = TokenFile.build([corpus_dir], tok, cache)
    assert rebuilt.path == path and len(tok.encoded) > encoded and rebuilt.tokens.tolist() == tokens


@pytest.mark.parametrize("offset,dtype", [(0, np.uint16), (65536 - 3, np.uint16),
                                          (70000, np.uint32)])
def test_dtype_follows_the_vocabulary(tmp_path, offset, dtype):
    tok = CharTokenizer("ab\n", offset=offset)
    tf = TokenFile.build([write(tmp_path / "a.txt", "abba\n")], tok, tmp_path / "cache")
    assert tf.tokens.dtype == dtype and tf.meta["dtype"] == np.dtype(dtype).name
    assert tf.tokens.tolist() == tok.encode("abba\n")


@pytest.fixture
def hundred(tmp_path):
    """A token file of 100 tokens, each a different value mod 7."""
    text = "".join("abcdefg"[i % 7] for i in range(99)) + "\n"
    return TokenFile.build([write(tmp_path / "a.txt", text)], CharTokenizer(text),
                           tmp_path / "cache")


def test_split(hundred):
    train, val = hundred.split(seq_len=8)
    assert (len(train), len(val)) == (90, 10)
    assert np.shares_memory(train, hundred.tokens) and np.shares_memory(val, hundred.tokens)
    assert train.tolist() + val.tolist() == hundred.tokens.tolist()
    train, val = hundred.split(seq_len=99, val_fraction=0)
    assert (len(train), len(val)) == (100, 0)


@pytest.mark.parametrize("seq_len,fraction,error,message", [
    (8, 1.0, ValidationError, "val_fraction = 1.0, expected a number in [0, 1)"),
    (8, -0.1, ValidationError, "val_fraction = -0.1, expected a number in [0, 1)"),
    (8, float("nan"), ValidationError, "val_fraction = nan, expected a number in [0, 1)"),
    (8, "0.1", ValidationError, "val_fraction = '0.1', expected a number in [0, 1)"),
    (10, 0.1, DataLoadError, "a.txt: the val split has 10 of the corpus's 100 tokens "
                             "(val_fraction 0.1), fewer than one window of max_seq_len + 1 = "
                             "11; expected a longer corpus, a larger val_fraction or a smaller "
                             "max_seq_len"),
    (90, 0.1, DataLoadError, "a.txt: the train split has 90 of the corpus's 100 tokens "
                             "(val_fraction 0.1), fewer than one window of max_seq_len + 1 = "
                             "91; expected a longer corpus, a smaller val_fraction or a smaller "
                             "max_seq_len"),
])
def test_split_errors(hundred, seq_len, fraction, error, message):
    with pytest.raises(error) as err:
        hundred.split(seq_len, fraction)
    assert str(err.value) == message


def test_random_windows_are_slices_drawn_by_one_rng_call(hundred):
    train, _ = hundred.split(seq_len=8)
    B, T = 5, 8
    rng = np.random.default_rng(7)
    state = rng.bit_generator.state
    x, y = random_windows(train, B, T, rng)
    assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == np.int32
    assert x.flags.c_contiguous and y.flags.c_contiguous
    reference = np.random.default_rng(7)
    starts = reference.integers(0, len(train) - T, size=B)
    for b, s in enumerate(starts):
        assert x[b].tolist() == train[s:s + T].tolist()
        assert y[b].tolist() == train[s + 1:s + T + 1].tolist()
    assert rng.bit_generator.state == reference.bit_generator.state  # that call and no other

    resumed = np.random.default_rng()
    resumed.bit_generator.state = state
    for _ in range(2):
        assert resumed.bit_generator.state == state
        x2, y2 = random_windows(train, B, T, resumed)
        np.testing.assert_array_equal(x2, x)
        np.testing.assert_array_equal(y2, y)
        x, y = random_windows(train, B, T, rng)
        state = resumed.bit_generator.state

    x, y = random_windows(train[:T + 1], 3, T, rng)  # one window fits: offset 0 only
    assert (x == train[:T]).all() and (y == train[1:T + 1]).all()
    with pytest.raises(ValidationError, match=r"random_windows: 8 tokens, fewer than one "
                                              r"window of seq_len \+ 1 = 9"):
        random_windows(train[:T], 1, T, rng)


@pytest.mark.parametrize("decode_tokens", [1 << 16, 5])  # at least a character's 4 bytes
def test_count_bytes(corpus_dir, tmp_path, monkeypatch, decode_tokens):
    monkeypatch.setattr(corpus, "DECODE_TOKENS", decode_tokens)
    eos = CharTokenizer("".join(DOCS), eos=True)
    tf = TokenFile.build([corpus_dir], eos, tmp_path / "cache")
    assert count_bytes(tf.tokens, eos) == tf.meta["text_bytes"]  # eos is not text
    plain = CharTokenizer("".join(DOCS))
    tf = TokenFile.build([corpus_dir], plain, tmp_path / "cache")
    added = sum(not d.endswith("\n") for d in DOCS)  # the newlines that join documents
    assert count_bytes(tf.tokens, plain) == tf.meta["text_bytes"] + added
    _, val = tf.split(seq_len=4)
    assert count_bytes(val, plain) == len(plain.decode(val).encode())

    text = "aé€𝄞 bé€𝄞\n" * 3  # characters of 2, 3 and 4 bytes, cut between decode calls
    tf = TokenFile.build([write(tmp_path / "b.txt", text)], ByteTokenizer(), tmp_path / "cache")
    assert count_bytes(tf.tokens, ByteTokenizer()) == len(text.encode())
