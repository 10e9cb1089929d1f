"""Dataset loading and validation (JSON, CSV), statistics, encoding and padded batches."""

import json
import os

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
