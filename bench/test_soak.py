"""Soak: many training steps and generations in one process must not grow its memory.
A benchmark (skipped by plain `pytest`): `pytest --benchmark-only bench/test_soak.py`."""

import resource

import numpy as np

from rustgpt.config import ModelConfig
from rustgpt.data import make_batch
from rustgpt.generation import generate
from rustgpt.model import LLM
from rustgpt.optim import Adam
from rustgpt.tokenizer import Vocab


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def soak(model, opt, rng, rounds):
    for _ in range(rounds):
        seqs = [rng.integers(0, model.tokenizer.size, int(rng.integers(2, 81))).astype(np.intc)
                for _ in range(int(rng.integers(1, 9)))]  # every shape in turn
        model.train_step(*make_batch(seqs), opt, 1e-4)
        generate(model, "w1 w2 w3", max_tokens=40, temperature=0.8, top_p=0.9, rng=rng)


def test_no_memory_growth(benchmark, rng):
    model = LLM(ModelConfig(), Vocab([f"w{i}" for i in range(760)] + ["</s>", "<unk>"]))
    opt = Adam(model.params)
    soak(model, opt, rng, 300)  # warm: workspaces reach their largest shapes
    before = rss_mb()
    benchmark.pedantic(soak, args=(model, opt, rng, 300), rounds=3, iterations=1)
    growth = rss_mb() - before
    benchmark.extra_info.update(rss_before_mb=before, growth_mb=growth)
    assert growth < 8, f"resident memory grew by {growth:.1f} MB over 900 steps + generations"
