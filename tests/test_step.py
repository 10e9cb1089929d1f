"""TrainStep: replay equals layer-by-layer for every architecture option, gradient
accumulation, the sum over processes, and threads: readers of a model that another thread
trains, and two models trained in two threads."""

import threading

import numpy as np
import pytest

from rustgpt.comm import SingleProcess
from rustgpt.config import ModelConfig
from rustgpt.errors import ValidationError
from rustgpt.model import LLM
from rustgpt.optim import Adam
from rustgpt.step import TrainStep
from rustgpt.tokenizer import Vocab
from tests import reference as ref

SIZES = dict(embedding_dim=16, hidden_dim=24, num_layers=2, num_heads=2, max_seq_len=12)
OPTIONS = {**ref.ARCHS, "gpt-dropout": {"arch": "gpt", "dropout": 0.1}}


def vocab(n=17):
    return Vocab([f"w{i}" for i in range(n - 2)] + ["</s>", "<unk>"])


def batches(rng, count, shapes=((2, 12), (1, 7), (3, 5))):
    """`count` batches cycling through `shapes`, with some padding in the (1, 7) ones."""
    out = []
    for i in range(count):
        B, T = shapes[i % len(shapes)]
        ids = rng.integers(0, 17, (B, T + 1))
        inputs, targets = ids[:, :-1].copy(), ids[:, 1:].copy()
        if B == 1:
            targets[0, -2:] = -1
        out.append((inputs, targets))
    return out


def train(options, data, replay=True, defer=True, seed=3, precision="fp32"):
    """Steps of a new model over `data`, a list of batches or of lists of micro-batches:
    (losses and norms, the final weights, the TrainStep)."""
    model = LLM(ModelConfig(**SIZES, **options), vocab(), seed=seed)
    step = TrainStep(model, Adam(model.params, weight_decay=0.1), 1.0, replay=replay,
                     precision=precision)
    curve = [step.run(b if isinstance(b, list) else [b], 1e-2, defer=defer) for b in data]
    return curve, model.state_dict(), step


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_replay_off_gives_the_same_training(rng, options):
    """Every step layer by layer (replay=False) = recorded plans replayed: the same losses,
    norms and weights, bit for bit, for every architecture option (dropout included)."""
    data = batches(rng, 9)
    replayed, weights, step = train(options, data)
    direct, direct_weights, direct_step = train(options, data, replay=False)
    assert step.plans_recorded == 3 and direct_step.plans_recorded == 9
    assert direct == replayed
    for name in weights:
        np.testing.assert_array_equal(direct_weights[name], weights[name])


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_loss_replays_the_models_loss(rng, options):
    """TrainStep.loss (a recorded forward and loss, replayed) between deferred steps = the
    model's own LLM.loss after them, bit for bit, for every architecture option (no
    dropout), replay on or off; one recording per shape."""
    data = batches(rng, 6)
    for replay in (True, False):
        model = LLM(ModelConfig(**SIZES, **options), vocab(), seed=3)
        step = TrainStep(model, Adam(model.params), 1.0, replay=replay)
        for b in data:
            step.run([b], 1e-2, defer=True)
            estimates = [step.loss(*e) for e in data[:3]]  # settles the pending update
            assert estimates == [model.loss(*e) for e in data[:3]]
        assert len(step._loss_plans) == (3 if replay else 0)


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_halves_of_a_batch_train_as_the_whole(rng, set_threads, monkeypatch, options):
    """Micro-steps of an even number of rows and SPLIT_MIN_TOKENS run as two halves of
    their rows (side by side on two threads): bit for bit the same on 1 and 2 threads,
    replayed or not; and, to float32 rounding, the steps of the whole batches (dropout
    masks follow the rows), gradient accumulation and odd batches (run whole) among them."""
    data = batches(rng, 8, shapes=((4, 12), (3, 5), (2, 10)))
    data[3] = [data[3], data[4]]  # two micro-batches, both split
    monkeypatch.setattr("rustgpt.step.SPLIT_MIN_TOKENS", 16)
    runs = []
    for threads, replay in ((2, True), (1, True), (2, False)):
        set_threads(threads)
        runs.append(train(options, data, replay=replay))
    assert any(key[-1] == "halves" for key in runs[0][2]._plans)
    for curve, weights, _ in runs[1:]:
        assert curve == runs[0][0]
        for name in weights:
            np.testing.assert_array_equal(weights[name], runs[0][1][name], err_msg=name)
    monkeypatch.setattr("rustgpt.step.SPLIT_MIN_TOKENS", 10**9)
    curve, weights, step = train(options, data)
    assert not any(key[-1] == "halves" for key in step._plans)
    for (loss, norm), (whole_loss, whole_norm) in zip(runs[0][0], curve):
        assert loss == pytest.approx(whole_loss, rel=1e-5)
        assert norm == pytest.approx(whole_norm, rel=1e-4)
    for name in weights:
        ref.assert_close(runs[0][1][name], weights[name], 1e-4, 1e-5, name)


def test_halves_in_bf16_read_a_fresh_copy(rng, set_threads, monkeypatch):
    """bf16 with halves: the weights' copy is rounded before either half reads it, so the
    halves side by side on two threads give the bits of one thread, and track the whole
    batch in bf16."""
    data = batches(rng, 6, shapes=((4, 12),))
    monkeypatch.setattr("rustgpt.step.SPLIT_MIN_TOKENS", 16)
    runs = []
    for threads in (2, 1):
        set_threads(threads)
        runs.append(train({"arch": "gpt"}, data, precision="bf16"))
    assert runs[0][0] == runs[1][0]
    monkeypatch.setattr("rustgpt.step.SPLIT_MIN_TOKENS", 10**9)
    whole = train({"arch": "gpt"}, data, precision="bf16")
    for (loss, _), (whole_loss, _) in zip(runs[0][0], whole[0]):
        assert loss == pytest.approx(whole_loss, rel=1e-3)


def test_gradient_accumulation_equals_one_big_batch(rng):
    """Two micro-batches in one step = one batch holding both: the mean loss over all
    their targets and its gradient (to float32 rounding), and the same update."""
    config = ModelConfig(**SIZES, arch="gpt")
    (x1, y1), (x2, y2) = batches(rng, 2, shapes=((2, 8), (3, 8)))
    whole = np.concatenate([x1, x2]), np.concatenate([y1, y2])
    results = []
    for parts in ([(x1, y1), (x2, y2)], [whole]):
        model = LLM(config, vocab(), seed=1)
        step = TrainStep(model, Adam(model.params), None)
        loss, norm = step.run(parts, 1e-2)
        results.append((loss, norm, model.params.data.copy()))
        again = step.run(parts, 1e-2)  # replayed: the same step on the updated weights
        results[-1] += again
    (l1, n1, w1, a1, b1), (l2, n2, w2, a2, b2) = results
    assert l1 == pytest.approx(l2, rel=1e-6) and n1 == pytest.approx(n2, rel=1e-5)
    assert a1 == pytest.approx(a2, rel=1e-5) and b1 == pytest.approx(b2, rel=1e-4)
    ref.assert_close(w1, w2, 1e-5, 1e-6, "weights after one step")


class Mirror(SingleProcess):
    """Two processes holding the same batch, as seen from one: every sum doubles."""

    size = 2

    def __init__(self):
        self.grads = []

    def allreduce(self, buffer):
        self.grads.append(buffer.copy())
        buffer *= 2

    def sum(self, values):
        return 2 * np.asarray(values, np.float64)


def test_the_gradient_is_summed_over_processes_before_the_norm(rng):
    """With a communicator the step scales its loss by every process's targets, sums the
    gradient over the processes after backward, and takes the norm of the sum: two
    processes on the same batch make the step of one process on it."""
    (x, y), = batches(rng, 1)
    one = LLM(ModelConfig(**SIZES), vocab(), seed=2)
    two = LLM(ModelConfig(**SIZES), vocab(), seed=2)
    mirror = Mirror()
    plain = TrainStep(one, Adam(one.params), 1.0)
    step = TrainStep(two, Adam(two.params), 1.0, comm=mirror)
    for defer in (False, True, True):  # the deferred path takes the norm after the sum too
        loss, norm = plain.run([(x, y)], 1e-2, defer=defer)
        m_loss, m_norm = step.run([(x, y)], 1e-2, defer=defer)
        assert m_loss == pytest.approx(loss, rel=1e-6) and m_norm == pytest.approx(norm, rel=1e-6)
        assert step.last_correct == 2 * plain.last_correct
    assert len(mirror.grads) == 3
    ref.assert_close(two.state_dict()["output.w"], one.state_dict()["output.w"], 1e-6, 1e-7,
                     "weights")
    with pytest.raises(ValidationError, match="no batches"):
        step.run([], 1e-3)


def test_readers_in_other_threads_leave_the_training_alone(rng):
    """Generating on a model while another thread trains it: the trained weights are those
    of training alone, bit for bit, and no reader applies the training's pending update
    (four generating threads, deferred updates)."""
    data = batches(rng, 30)
    alone = train({}, data)[1]
    model = LLM(ModelConfig(**SIZES), vocab(), seed=3)
    step = TrainStep(model, Adam(model.params, weight_decay=0.1), 1.0)
    done = threading.Event()
    errors, settled_by = [], set()
    settle = step.optimizer.settle

    def settle_noting_the_thread():
        settled_by.add(threading.get_ident())
        settle()

    step.optimizer.settle = settle_noting_the_thread

    def read():
        try:
            cache_ids = np.arange(4)
            while not done.is_set():
                model.forward(cache_ids)
                cache = model.new_cache()
                model.prefill(cache, cache_ids)
                model.step(cache, [1])
                model.state_dict()
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    readers = [threading.Thread(target=read) for _ in range(4)]
    for t in readers:
        t.start()
    try:
        for b in data:
            step.run([b], 1e-2, defer=True)
    finally:
        done.set()
        for t in readers:
            t.join()
    assert not errors, errors
    assert settled_by <= {threading.get_ident()}  # only the training thread applied updates
    trained = model.state_dict()  # this thread's pending update applied
    for name in alone:
        np.testing.assert_array_equal(trained[name], alone[name])


def test_two_models_train_in_two_threads(rng):
    """Plans are recorded per thread: two models recording and replaying at once train as
    each does alone."""
    data = batches(rng, 12)
    alone = [train({}, data, seed=s)[1] for s in (4, 5)]
    results, errors = [None, None], []

    def work(i, seed):
        try:
            results[i] = train({}, data, seed=seed)[1]
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i, s)) for i, s in enumerate((4, 5))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for got, expected in zip(results, alone):
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name])


def test_an_optimizer_of_another_model_is_refused():
    a = LLM(ModelConfig(**SIZES), vocab())
    b = LLM(ModelConfig(**SIZES), vocab())
    with pytest.raises(ValidationError, match="another model's parameters"):
        TrainStep(a, Adam(b.params))
