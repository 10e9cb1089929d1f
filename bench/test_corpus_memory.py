"""Tokenizing a large corpus in bounded memory: a text file of RUSTGPT_BENCH_CORPUS_MB megabytes
(default 1024: the Python standard library's sources, repeated) is built into a token file by a
child process with a character tokenizer; the child's peak RSS must stay below 300 MB.
A benchmark (skipped by plain `pytest`); it needs about 3x the corpus size on disk:
    python -m pytest --benchmark-only bench/test_corpus_memory.py
extra_info holds the child's peak RSS and build time, the corpus size and the token count.
"""

import json
import logging
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

MAX_RSS_MB = 300  # issue 18's target for tokenizing a 1 GB corpus
SEED_BYTES = 64 * 2**20  # the most of the standard library's sources one copy holds


class CharTokenizer:
    """The tokenizer interface over a fixed set of characters, others -> <unk>; encode returns
    a list of ints, as a character tokenizer's does."""

    def __init__(self, chars):
        self.chars = sorted(chars)
        self.index = {c: i for i, c in enumerate(self.chars)}
        self.unk_id = len(self.chars)
        self.size = len(self.chars) + 1

    def encode(self, text):
        index, unk = self.index, self.unk_id
        return [index.get(c, unk) for c in text]

    def decode(self, ids):
        return "".join(self.chars[i] if i < self.unk_id else "<unk>" for i in ids)

    def to_dict(self):
        return {"kind": "char", "chars": self.chars}


def seed_text() -> str:
    """The standard library's .py files (those that are UTF-8 text), up to SEED_BYTES."""
    texts, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        try:
            text = path.read_bytes().decode()
        except (OSError, UnicodeDecodeError):
            continue
        if "\0" in text or not text.endswith("\n") or total + len(text) > SEED_BYTES:
            continue
        texts.append(text)
        total += len(text)
    return "".join(texts)


def write_corpus(path: Path, size: int, seed: str) -> int:
    """Copies of `seed` into `path` up to `size` bytes (the last one cut after a line);
    returns the corpus's characters."""
    data = seed.encode()
    chars = 0
    with open(path, "wb") as f:
        while size > 0:
            piece = data if len(data) <= size else data[:data.rfind(b"\n", 0, size) + 1]
            if not piece:
                break
            f.write(piece)
            chars += len(seed) if piece is data else len(piece.decode())
            size -= len(piece)
    return chars


def peak_rss_mb() -> float:
    """This process's peak resident memory since it started (VmHWM, per address space;
    getrusage's ru_maxrss would include the parent's, inherited across fork and exec)."""
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return round(kb / 1024, 1)


def child(corpus: str, cache: str, chars: str) -> None:
    """Build the token file and print its figures and this process's peak RSS, as JSON."""
    from rustgpt.corpus import TokenFile

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    tokenizer = CharTokenizer(json.loads(Path(chars).read_text()))
    started = time.monotonic()
    tf = TokenFile.build([corpus], tokenizer, cache)
    print(json.dumps({"tokens": len(tf), "dtype": tf.meta["dtype"],
                      "text_bytes": tf.meta["text_bytes"],
                      "build_s": round(time.monotonic() - started, 1),
                      "max_rss_mb": peak_rss_mb()}))


def test_tokenize_large_corpus_in_bounded_memory(benchmark, tmp_path):
    size = int(os.environ.get("RUSTGPT_BENCH_CORPUS_MB", "1024")) * 2**20
    seed = seed_text()
    corpus = tmp_path / "corpus.txt"
    chars = write_corpus(corpus, size, seed)
    vocabulary = tmp_path / "chars.json"
    vocabulary.write_text(json.dumps(sorted(set(seed))))

    def build():
        out = subprocess.run([sys.executable, __file__, str(corpus), str(tmp_path / "cache"),
                              str(vocabulary)], stdout=subprocess.PIPE, text=True, check=True)
        return json.loads(out.stdout.splitlines()[-1])

    try:
        result = benchmark.pedantic(build, rounds=1, iterations=1)
        corpus_mb = corpus.stat().st_size / 2**20
        benchmark.extra_info.update(corpus_mb=round(corpus_mb, 1), **result)
        print(f"\n{corpus_mb:.0f} MB corpus: {result['tokens']:,} tokens ({result['dtype']}) "
              f"in {result['build_s']} s, peak RSS {result['max_rss_mb']} MB")
        assert result["text_bytes"] == corpus.stat().st_size and result["tokens"] == chars
        assert result["max_rss_mb"] < MAX_RSS_MB, (
            f"peak RSS {result['max_rss_mb']} MB tokenizing {corpus_mb:.0f} MB")
    finally:
        for path in [corpus, *(tmp_path / "cache").glob("*")]:
            path.unlink(missing_ok=True)  # gigabytes: not kept for pytest's last three runs


if __name__ == "__main__":
    child(*sys.argv[1:])
