"""The float32 numpy model computes what rustgpt computes: logits, loss, every gradient and
a few Adam steps with clipping (the "numpy" column of bench/ is the same model)."""

import numpy as np
import pytest

from rustgpt.config import ModelConfig
from rustgpt.data import make_batch
from rustgpt.model import LLM
from rustgpt.optim import Adam
from rustgpt.tokenizer import Vocab

from bench.numpy_model import NumpyGPT
from tests import reference as ref

SMALL = ModelConfig(embedding_dim=12, hidden_dim=33, num_layers=2, num_heads=3, max_seq_len=9)


@pytest.fixture
def model():
    return LLM(SMALL, Vocab([f"w{i}" for i in range(17)] + ["</s>", "<unk>"]), seed=3)


@pytest.fixture
def batch(rng):
    return make_batch([rng.integers(0, 19, n).astype(np.intc) for n in (10, 7, 2)])


def test_logits_loss_and_gradients(model, batch):
    inputs, targets = batch
    net = NumpyGPT.from_rustgpt(model)
    ref.assert_close(net.forward(inputs), model.forward(inputs), 1e-4, 1e-5, "logits")
    loss = net.loss_and_backward(inputs, targets)
    assert loss == pytest.approx(model.loss_and_backward(inputs, targets), rel=1e-5)
    for name, grad in model.params.grads.items():
        scale = max(np.abs(grad).max(), 1e-6)
        ref.assert_close(net.grads[name] / scale, grad / scale, 0, 2e-4, name)


def test_loss_is_the_float64_reference(model, batch):
    inputs, targets = batch
    net = NumpyGPT.from_rustgpt(model)
    p = {name: v.astype(np.float64) for name, v in net.values.items()}
    expected = ref.model_loss(p, inputs, targets, SMALL.num_layers, SMALL.num_heads)
    assert net.loss_and_backward(inputs, targets) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("max_grad_norm", [5.0, 0.1], ids=["clip-5", "clip-active"])
def test_training_steps_match(model, batch, max_grad_norm):
    inputs, targets = batch
    net = NumpyGPT.from_rustgpt(model)
    optimizer = Adam(model.params)
    lr = 1e-3
    for step in range(5):
        loss, norm = model.train_step(inputs, targets, optimizer, lr, max_grad_norm)
        n_loss, n_norm = net.train_step(inputs, targets, lr, max_grad_norm)
        assert n_loss == pytest.approx(loss, rel=1e-5), f"step {step}"
        assert n_norm == pytest.approx(norm, rel=1e-4), f"step {step}"
    ref.assert_close(net.data, model.params.data, 0, 1e-2 * lr, "weights after 5 steps")


def test_generate_no_cache_is_greedy_argmax(model):
    net = NumpyGPT.from_rustgpt(model)
    ids = [1, 2, 3]
    new = net.generate_no_cache(ids, 4)
    seq = ids + new
    for i, token in enumerate(new):
        assert token == int(model.forward([seq[:len(ids) + i]])[0, -1].argmax())
