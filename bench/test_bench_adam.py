"""The fused Adam update (gradient norm, clipping to 5, update) vs the same math in float32
numpy, over the default model's size, and as AdamW (weight decay on the matrices' ranges);
and the update followed by the next forward vs the update beside it (AdamStep, Plan.run).
`pytest --benchmark-only bench/test_bench_adam.py`."""

import numpy as np
import pytest

from rustgpt import _kernels as K

N = 553_083  # parameters of the default model on the bundled data


@pytest.fixture
def state(rng):
    p, m, g = (rng.standard_normal(N).astype(np.float32) for _ in range(3))
    return p, m, np.abs(rng.standard_normal(N)).astype(np.float32), g


@pytest.fixture(scope="module")
def decay():
    """The default model's decay ranges (its matrices and embeddings), as Adam passes them."""
    from bench.compare import bundled_data
    from rustgpt.config import ModelConfig
    from rustgpt.model import parameter_specs
    from rustgpt.optim import decay_ranges

    return decay_ranges(parameter_specs(ModelConfig(), bundled_data()[2].size))


def test_bench_adam_rustgpt(benchmark, state, decay, bench_threads):
    """RustGPT's Adam as the optimizer calls it: the decay ranges given, weight decay 0."""
    p, m, v, g = state
    benchmark.group = f"adam {N} parameters"
    benchmark(K.adam_update, p, m, v, g, 1e-4, t=10, max_norm=5.0, decay=decay)


def test_bench_adamw_rustgpt(benchmark, state, decay, bench_threads):
    """AdamW, weight decay 0.1 on the default model's matrices and embeddings."""
    p, m, v, g = state
    benchmark.group = f"adam {N} parameters"
    benchmark(K.adam_update, p, m, v, g, 1e-4, weight_decay=0.1, t=10, max_norm=5.0,
              decay=decay)


def numpy_adam(p, m, v, g, lr=1e-4, t=1, max_norm=5.0) -> None:
    """The kernel's math in float32 numpy, in place: norm, clip to max_norm, update."""
    c1, c2 = 1 / (1 - 0.9**t), 1 / (1 - 0.999**t)
    gs = g * min(1.0, max_norm / float(np.sqrt(np.dot(g, g))))
    m[...] = 0.9 * m + 0.1 * gs
    v[...] = 0.999 * v + 0.001 * gs * gs
    p[...] -= lr * (m * c1) / (np.sqrt(v * c2) + 1e-8)


def test_bench_adam_numpy(benchmark, state, bench_threads):
    benchmark.group = f"adam {N} parameters"
    benchmark(numpy_adam, *state, t=10)


@pytest.fixture(scope="module")
def forward_plan():
    """The default model's forward over 17 tokens (the schedule's average step), recorded
    as a plan, with an optimizer whose gradients are random."""
    from bench.compare import bundled_data
    from rustgpt.config import ModelConfig
    from rustgpt.model import LLM
    from rustgpt.optim import Adam

    vocab = bundled_data()[2]
    model = LLM(ModelConfig(), vocab, seed=0)
    model.params.grad[...] = np.random.default_rng(0).standard_normal(N) * 1e-3
    ids = np.arange(17, dtype=np.intc)[None] % vocab.size
    with K.Plan() as plan:
        model.forward(ids)
    return plan, model, Adam(model.params)


def _adam_step(model, optimizer):
    norm = float(np.sqrt(K.sum_squares(model.params.grad)))
    return K.AdamStep(model.params.data, optimizer.m, optimizer.v, model.params.grad, 1e-9,
                      0.9, 0.999, 1e-8, 0.0, 10, 5.0, norm, optimizer.decay)


def test_bench_adam_then_forward(benchmark, forward_plan, bench_threads):
    """The Adam update, then the next step's forward (train_step without defer)."""
    plan, model, optimizer = forward_plan
    benchmark.group = "adam update and the next forward, default model, 17 tokens"

    def run():
        _adam_step(model, optimizer).apply()
        plan.run()
    benchmark(run)


def test_bench_adam_beside_forward(benchmark, forward_plan, bench_threads):
    """The same update overlapped with that forward (train_step(defer=True), the Trainer)."""
    plan, model, optimizer = forward_plan
    benchmark.group = "adam update and the next forward, default model, 17 tokens"
    benchmark(lambda: plan.run(_adam_step(model, optimizer), len(plan)))
