"""Adam / AdamW over the model's flat buffer: which parameters take the weight decay."""

import math

import numpy as np
import pytest

from rustgpt.config import ModelConfig
from rustgpt.model import LLM, parameter_specs
from rustgpt.optim import Adam, decay_ranges
from rustgpt.tokenizer import Vocab
from tests import reference as ref

SIZES = dict(embedding_dim=16, hidden_dim=24, num_layers=2, num_heads=2, max_seq_len=9)
arch_options = pytest.mark.parametrize("options", ref.ARCHS.values(), ids=ref.ARCHS.keys())


@arch_options
def test_decay_ranges_cover_the_matrices_and_nothing_else(options):
    """The ranges hold exactly the parameters of two or more dimensions (weights and
    embeddings, as nanoGPT's configure_optimizers), adjacent ones merged."""
    specs = parameter_specs(ModelConfig(**SIZES, **options), 19)
    ranges = decay_ranges(specs)
    assert ranges.dtype == np.intp and ranges.shape[1] == 2
    assert (ranges[:, 0] < ranges[:, 1]).all() and (ranges[1:, 0] > ranges[:-1, 1]).all()
    covered = np.zeros(sum(math.prod(shape) for _, shape, _, _ in specs), bool)
    for start, end in ranges:
        covered[start:end] = True
    offset = 0
    for name, shape, _, _ in specs:
        n = math.prod(shape)
        assert covered[offset:offset + n].all() == (len(shape) >= 2), name
        assert covered[offset:offset + n].any() == (len(shape) >= 2), name
        offset += n


def test_decay_ranges_of_the_default_model():
    specs = parameter_specs(ModelConfig(num_layers=1), 10)
    # token + position + wq, wk, wv | ln1 | w1 | b1 | w2 | b2, ln2 | output.w | output.b
    D, H, T, V = 128, 256, 80, 10
    qkv_end = (V + T) * D + 3 * D * D
    w1 = qkv_end + 2 * D
    w2 = w1 + D * H + H
    out = w2 + H * D + D + 2 * D
    assert decay_ranges(specs).tolist() == [[0, qkv_end], [w1, w1 + D * H], [w2, w2 + H * D],
                                            [out, out + D * V]]
    assert decay_ranges([("b", (5,), "zeros", 0.0)]).shape == (0, 2)


@pytest.mark.parametrize("defer", [False, True])
@pytest.mark.parametrize("arch", ["rustgpt", "gpt"])
def test_weight_decay_shrinks_the_matrices_only(defer, arch):
    """With zero gradients AdamW's step is the decay alone: every matrix and embedding
    shrinks by lr * weight_decay, biases and layer-norm parameters stay as they were."""
    model = LLM(ModelConfig(**SIZES, arch=arch), Vocab(["</s>", "<unk>", "a"]), seed=1)
    model.params.data[...] = np.random.default_rng(0).standard_normal(model.params.data.size)
    before = {name: value.copy() for name, value in model.params.values.items()}
    model.params.grad[...] = 0.0
    optimizer = Adam(model.params, weight_decay=0.1)
    assert optimizer.step(1e-2, 1.0, defer=defer) == 0.0
    optimizer.settle()
    for name, value in model.params.values.items():
        if value.ndim >= 2:
            expected = before[name] - np.float32(1e-2 * 0.1) * before[name]
            np.testing.assert_array_equal(value, expected, err_msg=name)
        else:
            np.testing.assert_array_equal(value, before[name], err_msg=name)
