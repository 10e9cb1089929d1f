"""Whole-model benchmarks, rustgpt / PyTorch / numpy side by side (one group per workload).

Run from the repository root (plain `pytest` skips them):
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m pytest --benchmark-only bench/test_bench_model.py
Every row runs at 2 threads (bench_threads); PyTorch rows are skipped without torch.
extra_info holds tokens/s at the best round. The workloads come from bench/compare.py.
"""

import pytest

from bench.compare import (
    DEFAULT_THREADS,
    FRAMEWORKS,
    GEN_TOKENS,
    SHAPES,
    bundled_data,
    count_tokens,
    generation_model,
    generation_run,
    schedule_steps,
    set_threads,
    synthetic_steps,
    synthetic_vocab,
    training_run,
)
from rustgpt.config import ModelConfig


def _needs(framework):
    if framework == "torch":
        pytest.importorskip("torch")


@pytest.fixture(scope="module")
def bundled():
    pre, chat, vocab = bundled_data()
    return vocab, schedule_steps(vocab, pre, chat)


def _record(benchmark, tokens, blas_note, threads=DEFAULT_THREADS):
    benchmark.extra_info["tokens_per_s"] = tokens / benchmark.stats.stats.min
    benchmark.extra_info["threads"] = threads
    benchmark.extra_info["numpy_blas_threads"] = blas_note


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_bench_schedule_step(benchmark, framework, bundled, bench_threads):
    """(a) RustGPT's schedule at batch 1: one epoch of each phase of the bundled data."""
    _needs(framework)
    vocab, steps = bundled
    run = training_run(framework, ModelConfig(), vocab, steps)
    benchmark.group = f"a. schedule steps, batch 1, bundled data ({len(steps)} examples)"
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    _record(benchmark, count_tokens(steps), bench_threads)


ROUNDS = {"b": 10, "c": 5, "d": 3}


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("key", list(SHAPES))
def test_bench_training_step(benchmark, key, framework, bench_threads):
    """(b) d128/h256/L3/T64/B16, (c) d256/h1024/L4/T128/B16, (d) d512/h2048/L6/T256/B8."""
    _needs(framework)
    shape, steps = SHAPES[key], synthetic_steps(SHAPES[key])
    run = training_run(framework, shape.config(), synthetic_vocab(), steps)
    benchmark.group = f"{key}. training step {shape.label}"
    benchmark.pedantic(run, rounds=ROUNDS[key], warmup_rounds=1)
    _record(benchmark, count_tokens(steps), bench_threads)


@pytest.mark.parametrize("kind", ["rustgpt", "rustgpt top-p", "torch", "numpy"])
def test_bench_generate(benchmark, kind, bundled, bench_threads):
    """(e) 64 new tokens: rustgpt with its KV cache (greedy, top-p) vs greedy decoding that
    recomputes the prefix (PyTorch, numpy)."""
    _needs(kind)
    run = generation_run(kind, generation_model(bundled[0]))
    benchmark.group = f"e. generate {GEN_TOKENS} tokens"
    decoded = benchmark.pedantic(run, rounds=10, warmup_rounds=1)
    assert decoded == GEN_TOKENS
    _record(benchmark, GEN_TOKENS, bench_threads)


@pytest.mark.parametrize("threads", [1, 2])
def test_bench_thread_scaling(benchmark, threads, bench_threads):
    """(g) rustgpt on workload (d) at 1 and at 2 threads."""
    shape, steps = SHAPES["d"], synthetic_steps(SHAPES["d"])
    run = training_run("rustgpt", shape.config(), synthetic_vocab(), steps)
    benchmark.group = f"g. rustgpt thread scaling, {shape.label}"
    set_threads(threads)
    try:
        benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    finally:
        set_threads(DEFAULT_THREADS)
    _record(benchmark, count_tokens(steps), bench_threads, threads)
