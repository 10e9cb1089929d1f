"""The serve engine without HTTP: continuous batching gives every job the tokens it gets
alone (and generation.generate's), stop strings, end-of-text, cancellation, load failure."""

import threading

import pytest

pytest.importorskip("prometheus_client")

from rustgpt.errors import SerializationError  # noqa: E402
from rustgpt.generation import generate  # noqa: E402
from rustgpt.serve.engine import Engine, Job, QueueFull  # noqa: E402
from rustgpt.serve.metrics import Metrics  # noqa: E402
from tests.serving import WORDS, tiny_model  # noqa: E402

GREEDY = dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0)


def run(model, jobs, max_batch=16, on_update=None, metrics=None, precision="fp32"):
    """Each job's (text, finish reason), all submitted before the engine starts (so the
    first round takes min(len(jobs), max_batch) of them into one batch)."""
    engine = Engine(lambda: model, max_batch=max_batch, metrics=metrics, precision=precision)
    texts, reasons, finished = {}, {}, threading.Event()

    def sink(updates):
        for job, text, reason in updates:
            texts[job] = texts.get(job, "") + text
            if reason is not None:
                reasons[job] = reason
            if on_update:
                on_update(job)
        if len(reasons) == len(jobs):
            finished.set()

    for job in jobs:
        engine.submit(job)
    engine.start(sink)
    assert finished.wait(20), f"{len(reasons)} of {len(jobs)} jobs finished"
    engine.stop()
    return [(texts.get(job, ""), reasons[job]) for job in jobs]


def prompts(n):
    """n prompts of 1 to 12 words."""
    return [" ".join(WORDS[(7 * i + j) % 40] for j in range(1 + i % 12)) for i in range(n)]


def options(i):
    """Greedy for even i; seeded sampling with each filter in turn for odd i."""
    if i % 2 == 0:
        return dict(GREEDY), None
    sampling = dict(GREEDY, temperature=0.7 + 0.1 * (i % 5))
    sampling.update([{"top_p": 0.9}, {"top_k": 5}, {"min_p": 0.05},
                     {"repetition_penalty": 1.3}][i // 2 % 4])
    return sampling, 100 + i


def test_a_batch_of_16_gives_each_job_its_tokens_alone():
    """16 jobs of different lengths, greedy and seeded sampling, decoded as one batch:
    each job's text equals the job run alone and generation.generate with its options."""
    model = tiny_model(64)
    metrics = Metrics(16)
    texts = prompts(16)
    make = lambda i: Job(model.tokenizer.encode(texts[i]), 20 + i, *options(i))
    together = run(model, [make(i) for i in range(16)], metrics=metrics)
    batched = metrics.registry.get_sample_value("rustgpt_batch_size_bucket", {"le": "8.0"})
    steps = metrics.registry.get_sample_value("rustgpt_batch_size_count")
    assert batched < steps, "no step decoded more than 8 rows: the jobs were not batched"
    for i, (text, reason) in enumerate(together):
        sampling, seed = options(i)
        expected = generate(model, texts[i], raw=True, max_tokens=20 + i, seed=seed,
                            **sampling)
        assert text == expected, f"job {i} ({sampling}, seed {seed}) in a batch of 16"
        assert run(model, [make(i)], max_batch=1) == [(expected, "length")]
        assert reason == "length"


def test_bf16_batch_gives_each_job_its_bf16_tokens_alone():
    """precision bf16: 16 jobs decoded as one batch, each job's text that of
    generation.generate in bf16 (a few rows read the weights' bf16 copy alike, one row or
    16)."""
    model = tiny_model(64)
    texts = prompts(16)
    together = run(model, [Job(model.tokenizer.encode(texts[i]), 12, *options(i))
                           for i in range(16)], precision="bf16")
    for i, (text, reason) in enumerate(together):
        sampling, seed = options(i)
        assert (text, reason) == (generate(model, texts[i], raw=True, max_tokens=12, seed=seed,
                                           precision="bf16", **sampling), "length"), f"job {i}"


def test_jobs_join_and_leave_between_steps():
    """More jobs than rows: the waiting ones join as others leave; each still gets its
    own tokens."""
    model = tiny_model(64)
    texts = prompts(7)
    jobs = [Job(model.tokenizer.encode(t), 3 + 5 * i, *options(i)) for i, t in enumerate(texts)]
    for i, (text, reason) in enumerate(run(model, jobs, max_batch=3)):
        sampling, seed = options(i)
        assert text == generate(model, texts[i], raw=True, max_tokens=3 + 5 * i, seed=seed,
                                **sampling)


def test_stop_strings_end_the_text_before_them():
    model = tiny_model(64)
    ids = model.tokenizer.encode("w1 w2 w3")
    whole = generate(model, "w1 w2 w3", raw=True, max_tokens=30)
    words = whole.split()
    one = words[4]  # a word, and two words across tokens, held back until they complete
    two = " ".join(words[6:8])
    cut = min(whole.index(one), whole.index(two))
    [(text, reason)] = run(model, [Job(ids, 30, dict(GREEDY), None, (two, one))])
    assert (text, reason) == (whole[:cut], "stop")
    missing = "w39 w39 w39 w39 w39"  # a prefix of it is held back, then sent
    assert run(model, [Job(ids, 30, dict(GREEDY), None, (missing,))]) == [(whole, "length")]


def test_end_of_text_finishes_with_stop():
    model = tiny_model(64, never_ends=False)
    model.output.b[model.tokenizer.eos_id] = 1e4  # always the likeliest
    job = Job(model.tokenizer.encode("w1"), 10, dict(GREEDY))
    assert run(model, [job]) == [("", "stop")]
    assert job.completion_tokens == 0


def test_a_cancelled_job_leaves_at_the_next_round():
    """cancel() between rounds: the job gets no further token, its row is free."""
    model = tiny_model(64)
    long = Job(model.tokenizer.encode("w1"), 60, dict(GREEDY))
    other = Job(model.tokenizer.encode("w2"), 30, dict(GREEDY))

    def cancel_after_3(job):
        if job is long and job.completion_tokens == 3:
            job.cancel()

    results = run(model, [long, other], on_update=cancel_after_3)
    assert results[0][1] == "cancelled" and long.completion_tokens == 3
    assert results[1] == (generate(model, "w2", raw=True, max_tokens=30), "length")


def test_the_queue_is_bounded():
    engine = Engine(tiny_model, max_batch=1, max_queue=2)
    engine.submit(Job([1], 1, dict(GREEDY)))
    engine.submit(Job([1], 1, dict(GREEDY)))
    with pytest.raises(QueueFull, match="the queue holds 2 requests already"):
        engine.submit(Job([1], 1, dict(GREEDY)))


def test_a_model_that_does_not_load_fails_the_jobs():
    def load():
        raise SerializationError("run/best.safetensors: not a checkpoint")

    engine = Engine(load)
    job, ended = Job([1], 5, dict(GREEDY)), threading.Event()
    engine.submit(job)
    engine.start(lambda updates: ended.set())
    assert ended.wait(5)
    engine.stop()
    assert (engine.state, engine.error) == ("failed", "run/best.safetensors: not a checkpoint")
    assert job.finish_reason == "error"
