"""`rustgpt-cli tokenizer train` on 100 MiB of text (the Python standard library's .py
sources, repeated): bpe (vocabulary 1024) and char, one round each.
`pytest --benchmark-only bench/test_bench_tokenizer.py`; the target is under 60 s."""

import sysconfig
from pathlib import Path

import pytest
from click.testing import CliRunner

from rustgpt.cli import main
from rustgpt.tokenizer import load_tokenizer

CORPUS_BYTES = 100 * 2**20


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """CORPUS_BYTES of UTF-8 text in one file: the standard library's sources (those that
    are UTF-8) over and over, cut at a newline."""
    sources = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if "site-packages" not in path.parts:
            data = path.read_bytes()
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                continue  # a few tests are Latin-1 on purpose; char training would refuse them
            sources.append(data)
    text = b"".join(sources)
    copies = -(-CORPUS_BYTES // len(text))
    data = (text * copies)[:CORPUS_BYTES]
    path = tmp_path_factory.mktemp("tokenizer") / "stdlib.txt"
    path.write_bytes(data[:data.rfind(b"\n") + 1])
    return path


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_bench_tokenizer_train(benchmark, corpus, kind, tmp_path):
    benchmark.group = f"tokenizer train, {corpus.stat().st_size / 2**20:.0f} MiB"
    out = tmp_path / "tok.json"
    size = ["--vocab-size", "1024"] if kind == "bpe" else []

    def train():
        return CliRunner().invoke(main, ["tokenizer", "train", str(corpus), "--kind", kind,
                                         *size, "-o", str(out), "--no-progress"])

    result = benchmark.pedantic(train, rounds=1, iterations=1)
    assert result.exit_code == 0, result.output
    tokenizer = load_tokenizer(out)
    benchmark.extra_info.update(kind=kind, bytes=corpus.stat().st_size, vocab=tokenizer.size)
