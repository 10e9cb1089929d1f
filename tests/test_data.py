"""Dataset loading and validation (JSON, CSV), statistics, encoding and padded batches."""

import json
import os
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rustgpt.data import Dataset, make_batch
from rustgpt.errors import DataLoadError
from rustgpt.tokenizer import Vocab


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def test_json_and_csv(tmp_path):
    j = Dataset.load(write(tmp_path, "a.json", json.dumps(["one two </s>", "three </s>"])))
    assert j.examples == ["one two </s>", "three </s>"] and len(j) == 2
    c = Dataset.load(write(tmp_path, "a.csv", 'User: hi,Assistant: yo </s>\n"a, b",c\n'))
    assert c.examples == ["User: hi,Assistant: yo </s>", "a, b,c"]


@pytest.mark.parametrize("name,content,message", [
    ("missing.json", None, "missing.json: no such file"),
    ("bad.json", "[\"a\",", "bad.json: line 1 column 6: malformed JSON"),
    ("obj.json", '{"a": 1}', "top level is an object, expected an array of strings"),
    ("empty.json", "[]", "no examples"),
    ("num.json", '["a", 3]', "item 1 is a number, expected a string"),
    ("blank.json", '["a", "  "]', "item 1 is an empty string"),
    ("latin.json", b'["caf\xe9"]', "line 1: not UTF-8"),
    ("ragged.csv", "a,b\nc\n", "line 2: 1 columns, expected 2"),
    ("data.txt", "x", "unknown data format '.txt'"),
])
def test_bad_files_name_file_and_problem(tmp_path, name, content, message):
    path = tmp_path / name if content is None else write(tmp_path, name, content)
    with pytest.raises(DataLoadError, match=message.replace("(", r"\(").replace("[", r"\[")):
        Dataset.load(path)


def test_unreadable_and_oversized_files(tmp_path):
    path = write(tmp_path, "a.json", '["a b"]')
    with pytest.raises(DataLoadError, match="more than the limit of 4"):
        Dataset.load(path, max_bytes=4)
    if os.geteuid() != 0:  # root reads anything
        path.chmod(0)
        with pytest.raises(DataLoadError, match="permission denied"):
            Dataset.load(path)
    with pytest.raises(DataLoadError, match="not a regular file"):
        Dataset.load_json(tmp_path)


def test_statistics_and_encoding(caplog):
    ds = Dataset(["a b c </s>", "a </s>", "b " * 20 + "</s>", "</s>"])
    vocab = Vocab.from_texts(ds.examples)
    stats = ds.statistics(vocab)
    assert stats["examples"] == 4 and stats["max_words"] == 21 and stats["min_words"] == 1
    seqs = ds.encode(vocab, max_seq_len=8)
    assert [len(s) for s in seqs] == [4, 2, 9]  # the long one cut to 9, "</s>" alone skipped
    assert "truncated" in caplog.text and "skipped" in caplog.text
    split = ds.encode(vocab, max_seq_len=8, long_examples="split")
    assert [len(s) for s in split] == [4, 2, 9, 9, 5]  # 22 tokens: windows 0-8, 8-16, 16-21
    long_ids = np.asarray(vocab.encode(ds.examples[2]))
    targets = np.concatenate([s[1:] for s in split[2:]])
    np.testing.assert_array_equal(targets, long_ids[1:])  # every target kept exactly once


def test_make_batch_pads_on_the_right():
    inputs, targets = make_batch([np.array([1, 2, 3, 4]), np.array([5, 6])], pad_id=0)
    np.testing.assert_array_equal(inputs, [[1, 2, 3], [5, 0, 0]])
    np.testing.assert_array_equal(targets, [[2, 3, 4], [6, -1, -1]])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.text(), st.integers(), st.none(), st.lists(st.text())), max_size=5))
def test_json_loader_never_crashes(tmp_path_factory, items):
    path = tmp_path_factory.mktemp("d") / "x.json"
    path.write_text(json.dumps(items))
    try:
        ds = Dataset.load(path)
    except DataLoadError:
        return
    assert all(isinstance(e, str) and e.strip() for e in ds.examples)


# ---- reading in pieces --------------------------------------------------------------------------

TRICKY = ["plain </s>", 'quote " and \\ backslash </s>', "caf\u00e9 \U0001F600 \u2028 </s>",
          "tab\tnew\nline </s>", "x" * 50 + " </s>", "}{][,: </s>"]


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1 << 20])
@pytest.mark.parametrize("ensure_ascii,indent,bom", [(True, None, ""), (False, 1, "\ufeff"),
                                                     (False, "\t", ""), (True, 0, "\ufeff")])
def test_json_read_in_pieces_gives_what_json_loads_gives(tmp_path, monkeypatch, chunk,
                                                         ensure_ascii, indent, bom):
    """Strings split anywhere between pieces (an escape, a surrogate pair, whitespace) come
    out as json.loads reads them."""
    from rustgpt import data

    monkeypatch.setattr(data, "CHUNK_CHARS", chunk)
    text = bom + json.dumps(TRICKY, ensure_ascii=ensure_ascii, indent=indent).replace(
        "\n", "\r\n") + " \n"  # ensure_ascii writes the emoji as a surrogate pair of escapes
    path = write(tmp_path, "t.json", text)
    assert Dataset.load(path).examples == json.loads(text.lstrip("\ufeff"))


def test_valid_arrays_are_not_read_whole(tmp_path, monkeypatch):
    from rustgpt import data

    def whole(*args):
        raise AssertionError("read whole")
    monkeypatch.setattr(data, "_read_text", whole)
    path = write(tmp_path, "a.json", json.dumps(TRICKY))
    assert Dataset.load(path).examples == TRICKY
    csv_path = write(tmp_path, "a.csv", 'a,"b\nc"\r\nd,e\n')
    assert Dataset.load(csv_path).examples == ["a,b\nc", "d,e"]


@pytest.mark.parametrize("name,content,message", [
    ("deep.json", "[" * 100_000 + "]" * 100_000, "JSON nested too deeply to parse, expected "
                                                  "an array of strings"),
    ("deep_item.json", '["a", ' + "[" * 100_000 + "]" * 100_000 + "]", "nested too deeply"),
    ("open.json", "[" * 100_000, "nested too deeply"),
    ("trailing.json", '["a",]', "line 1 column 6: malformed JSON"),
    ("extra.json", '["a"] x', "line 1 column 7: malformed JSON (Extra data)"),
    ("late.json", '[\n"a",\n"b"\n"c"]', "line 4 column 1: malformed JSON"),
    ("escape.json", '["a\\x"]', "line 1 column 4: malformed JSON (Invalid \\escape"),
    ("control.json", '["a\tb"]', "line 1 column 4: malformed JSON (Invalid control"),
    ("late_latin.json", b'["a", "b",\n "c",\n "caf\xe9"]', "line 3: not UTF-8"),
    ("late_latin.csv", b'a\nb\n"c\nd"\ncaf\xe9\n', "line 5: not UTF-8"),
])
def test_bad_files_read_in_pieces(tmp_path, monkeypatch, name, content, message):
    """Problems found in any piece say where in the file (pieces of 3 characters here)."""
    from rustgpt import data

    monkeypatch.setattr(data, "CHUNK_CHARS", 3)
    with pytest.raises(DataLoadError, match=re.escape(message)):
        Dataset.load(write(tmp_path, name, content))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux's /proc")
def test_loading_holds_the_examples_not_the_file(tmp_path):
    """Peak memory of loading 20 MB files, one character outside Latin-1 among them (which
    made the whole decoded text 4 bytes a character): when they were read whole, 5.7x the
    file (JSON) and 9.6x (CSV); read in pieces, about 2x: the strings themselves."""
    import random
    import subprocess
    import sys

    rng = random.Random(0)
    words = "the sun rises in east and sets west mountains form rain falls".split()
    n = 200_000
    items = [" ".join(rng.choices(words, k=18)) + " </s>" for _ in range(n)]
    items[n // 2] += " \U0001F600"
    # VmHWM, the peak resident size: getrusage's maxrss in a child starts at the parent's
    code = ("import re, sys\nfrom rustgpt.data import Dataset\n"
            "kb = lambda key: int(re.search(key + r':\\s+(\\d+) kB', open('/proc/self/status')"
            ".read()).group(1))\nrss = kb('VmRSS')\n"
            f"assert len(Dataset.load(sys.argv[1])) == {n}\n"
            "print((kb('VmHWM') - rss) * 1024)")
    for name, text in (("a.json", json.dumps(items, ensure_ascii=False)),
                       ("a.csv", "".join(f"{i},{item}\n" for i, item in enumerate(items)))):
        path = write(tmp_path, name, text)
        out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                             text=True, check=True).stdout
        added = int(out) / path.stat().st_size
        assert added < 3, f"{name}: loading added {added:.1f}x the file's size"
