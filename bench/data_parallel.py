"""Data-parallel scaling: `mpiexec -n 2` ranks of one kernel thread each against one process
of one thread, at the same global batch, side by side in one run, whole processes through
`rustgpt-cli train --text` (needs the mpi extra: pip install '.[mpi]').

    python bench/data_parallel.py [--iters 300] [--rounds 2]

Two workloads: the own-text recipe (nanoGPT's shakespeare_char at d128/L4, T 64, batch 12)
and steps of the shape of bench/compare.py's row (c) (d256/h1024/L4/NH4, T 128, batch 16).
Reports tokens/s (the median of each run's steps after the first ten, from metrics.json:
the step's own time, evaluations apart), the wall clock of the whole process, the ratio,
and the all-reduce time per step (the metrics' allreduce_s, waiting for the slower rank
included). The rounds alternate the two sides so drifts in the machine's speed hit both.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.corpus import corpus_path  # noqa: E402

WORKLOADS = {
    "own-text": ["--arch", "gpt", "--num-layers", "4", "--num-heads", "4",
                 "--embedding-dim", "128", "--hidden-dim", "512", "--max-seq-len", "64",
                 "--batch-size", "12"],
    "c": ["--arch", "gpt", "--num-layers", "4", "--num-heads", "4", "--embedding-dim", "256",
          "--hidden-dim", "1024", "--max-seq-len", "128", "--batch-size", "16"],
}


def run(ranks: int, options: list[str], corpus: Path, iters: int, out: Path) -> dict:
    """One training process (ranks = 1) or an MPI job; its tokens/s, wall clock and
    all-reduce seconds per step."""
    cli = [sys.executable, "-m", "rustgpt.cli", "train", "--text", str(corpus), *options,
           "--max-iters", str(iters), "--eval-interval", str(iters), "--eval-iters", "1",
           "--threads", "1", "--no-progress", "--log-level", "WARNING", "--overwrite",
           "--output", str(out)]
    mpiexec = shutil.which("mpiexec", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    command = cli if ranks == 1 else [mpiexec, "-n", str(ranks), *cli]
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - began
    if done.returncode:
        raise SystemExit(f"{' '.join(command[:4])} ... failed:\n{done.stderr}")
    steps = json.loads((out / "metrics.json").read_text())["steps"][10:]
    reduce = [s["allreduce_s"] for s in steps if s["allreduce_s"] is not None]
    return {"tokens_per_s": statistics.median(s["tokens_per_s"] for s in steps),
            "wall_s": wall, "allreduce_ms": 1e3 * statistics.median(reduce) if reduce else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", choices=list(WORKLOADS))
    args = parser.parse_args()
    corpus = corpus_path()
    print(f"corpus {corpus} ({corpus.stat().st_size:,} bytes); {args.iters} steps per run, "
          f"{args.rounds} rounds; 1 thread per process")
    for name, options in WORKLOADS.items():
        if args.only and name != args.only:
            continue
        results = {1: [], 2: []}
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.rounds):
                for ranks in ((1, 2) if r % 2 == 0 else (2, 1)):
                    results[ranks].append(run(ranks, options, corpus, args.iters,
                                              Path(tmp) / f"r{ranks}"))
        one = statistics.median(x["tokens_per_s"] for x in results[1])
        two = statistics.median(x["tokens_per_s"] for x in results[2])
        wall1 = statistics.median(x["wall_s"] for x in results[1])
        wall2 = statistics.median(x["wall_s"] for x in results[2])
        reduce = statistics.median(x["allreduce_ms"] for x in results[2])
        print(f"{name:>8}: 1 process {one:,.0f} tok/s ({wall1:.1f} s), 2 ranks {two:,.0f} "
              f"tok/s ({wall2:.1f} s): {two / one:.2f}x tokens/s, {wall1 / wall2:.2f}x wall; "
              f"all-reduce {reduce:.2f} ms/step")


if __name__ == "__main__":
    main()
