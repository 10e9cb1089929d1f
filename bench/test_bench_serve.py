"""Serving benchmarks (bench/serve.py): aggregate tokens/s and time to first token at 1,
4, 16 and 64 concurrent streams, default model and d512/L6. Plain `pytest` skips them:
    python -m pytest --benchmark-only bench/test_bench_serve.py -s
extra_info holds each level's row; the table prints at the end (-s shows it)."""

import pytest

pytest.importorskip("uvicorn")

from bench.serve import MODELS, measure, table  # noqa: E402


@pytest.mark.parametrize("name", list(MODELS))
def test_bench_serve(benchmark, name):
    rows = benchmark.pedantic(measure, args=(name,), rounds=1, iterations=1)
    benchmark.extra_info["levels"] = rows
    print("\n" + table(rows))
