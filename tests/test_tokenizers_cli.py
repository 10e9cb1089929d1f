"""rustgpt-cli tokenizer train|encode|decode|info through Click's CliRunner: the files it
writes (a Hugging Face tokenizer.json for bpe), round trips, and one-line errors."""

import json

import pytest
import tokenizers
from click.testing import CliRunner

from rustgpt.cli import main, tokenizer_train
from rustgpt.tokenizer import KINDS

PLAY = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, "
        "speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n") * 20


def run(*args):
    return CliRunner().invoke(main, ["tokenizer", *map(str, args)])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    (root / "play.txt").write_text(PLAY)
    (root / "more").mkdir()
    (root / "more" / "notes.md").write_text("naïve café 🙂\n")
    return root


def test_train_bpe_writes_a_hugging_face_tokenizer_json(corpus, tmp_path):
    out = tmp_path / "tok.json"
    result = run("train", corpus / "play.txt", corpus / "more", "--kind", "bpe",
                 "--vocab-size", 300, "-o", out)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"wrote {out}: bpe tokenizer, 300 tokens, from 2 files")
    hf = tokenizers.Tokenizer.from_file(str(out))
    assert hf.get_vocab_size() == 300

    text = "Speak, café 🙂! <|endoftext|>"
    encoded = run("encode", out, text)
    assert encoded.exit_code == 0, encoded.output
    ids = [int(i) for i in encoded.stdout.split()]
    assert ids == hf.encode(text, add_special_tokens=False).ids
    decoded = run("decode", out, encoded.stdout.strip())  # the ids as one argument
    assert decoded.exit_code == 0 and decoded.stdout == text + "\n"
    assert run("decode", out, *ids).stdout == text + "\n"  # or one each

    info = run("info", out, "--text", corpus / "play.txt")
    assert info.exit_code == 0, info.output
    lines = info.stdout.splitlines()
    assert lines[:4] == ["kind: bpe", "vocabulary: 300 tokens", "eos_id: 0 '<|endoftext|>'",
                         "unk_id: none"]
    assert lines[4].startswith("tokens per byte: 0.") and lines[4].endswith("play.txt")


def test_train_char_and_word(corpus, tmp_path):
    char = tmp_path / "char.json"
    result = run("train", corpus, "--kind", "char", "-o", char)
    assert result.exit_code == 0, result.output
    chars = json.loads(char.read_text())
    assert chars["kind"] == "char" and chars["chars"] == sorted(set(PLAY + "naïve café 🙂\n"))
    ids = run("encode", char, "All: speak?").stdout
    assert run("decode", char, ids).stdout == "All: speak?\n"
    info = run("info", char, "--text", corpus / "play.txt").stdout.splitlines()
    assert info[0] == "kind: char" and info[2] == "eos_id: none"
    assert info[4] == f"tokens per byte: 1.0000 (1.00 bytes per token) on {corpus / 'play.txt'}"
    word = tmp_path / "word.json"
    assert run("train", corpus / "play.txt", "--kind", "word", "-o", word).exit_code == 0
    assert run("encode", word, "All: speak").stdout.split() == [
        str(json.loads(word.read_text())["words"].index(w)) for w in ("All", ":", "speak")]


def test_train_on_globs_and_json_lines(corpus, tmp_path):
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": "naïve café 🙂\n"}) + "\n")
    out = tmp_path / "char.json"
    result = run("train", corpus / "*.txt", tmp_path / "docs.jsonl", "--kind", "char", "-o", out)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"wrote {out}: char tokenizer, ")
    assert "from 2 files" in result.stdout
    assert json.loads(out.read_text())["chars"] == sorted(set(PLAY + "naïve café 🙂\n"))
    info = run("info", out, "--text", tmp_path / "*.jsonl")
    assert info.exit_code == 0 and info.stdout.splitlines()[4].startswith("tokens per byte: 0.")


def test_kinds_name_the_bundled_datas_tokenizers():
    info = run("info", "word")
    assert info.exit_code == 0, info.output
    assert info.stdout.splitlines()[0] == "kind: word"
    assert run("encode", "char", "How").stdout.count(" ") == 2


def test_kind_choices_are_the_librarys():
    kind = next(p for p in tokenizer_train.params if p.name == "kind")
    assert tuple(kind.type.choices) == KINDS


def test_errors_are_one_line(corpus, tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"caf\xe9\n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "x.py").write_text("x = 1\n")
    (tmp_path / "foreign.json").write_text('{"weights": []}')
    (tmp_path / "corrupt.json").write_text('{"model": ')
    cases = [
        (("train", latin1, "--kind", "char", "-o", tmp_path / "x.json"),
         "latin1.txt: line 1: not UTF-8 (byte 0xe9 at offset 3)"),
        (("train", latin1, "--kind", "word", "-o", tmp_path / "x.json"),
         "latin1.txt: line 1: not UTF-8 (byte 0xe9 at offset 3)"),
        (("train", tmp_path / "code", "-o", tmp_path / "x.json"),
         "code: a directory with no text files (.txt, .md or .jsonl)"),
        (("train", tmp_path / "empty.txt", "-o", tmp_path / "x.json"),
         "empty.txt: empty corpus, expected some text"),
        (("train", tmp_path / "*.nothing", "-o", tmp_path / "x.json"),
         "*.nothing: no file matches this pattern"),
        (("train", corpus, "--kind", "char", "--vocab-size", 300, "-o", tmp_path / "x.json"),
         "--vocab-size sets the size of a bpe vocabulary"),
        (("train", corpus, "--vocab-size", 100, "-o", tmp_path / "x.json"),
         "vocab_size = 100, expected an integer >= 257"),
        (("train", tmp_path / "none", "-o", tmp_path / "x.json"),
         "none: no such file or directory"),
        (("info", tmp_path / "foreign.json"), "foreign.json: an object without 'model' or 'kind'"),
        (("info", tmp_path / "corrupt.json"), "corrupt.json: not JSON"),
        (("encode", tmp_path / "none.json", "hi"), "none.json: no such file, expected a tokenizer"),
        (("decode", "char", "1", "x"), "id 1 = 'x', expected an integer token id"),
        (("decode", "char", "-1"), "id 0 = -1 is outside the vocabulary"),
    ]
    for args, message in cases:
        result = run(*args)
        assert result.exit_code == 1, (args, result.output)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, (
            args, result.stderr)
    assert not (tmp_path / "x.json").exists()
    bpe = run("train", latin1, "-o", tmp_path / "x.json")  # bpe takes any bytes
    assert bpe.exit_code == 0 and "line 1: not UTF-8 (byte 0xe9 at offset 3)" in bpe.stderr
