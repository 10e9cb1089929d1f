"""Decoding: samplers, cache vs full recompute, streaming, beam search, bad options."""

import numpy as np
import pytest

from rustgpt import generation as G
from rustgpt.config import ModelConfig
from rustgpt.errors import ValidationError
from rustgpt.model import LLM
from rustgpt.tokenizer import Vocab

WORDS = "the sun rises in east and sets west User Assistant : ? How do mountains form".split()
CFG = ModelConfig(embedding_dim=16, hidden_dim=32, num_layers=2, num_heads=2, max_seq_len=24)


@pytest.fixture(scope="module")
def model():
    return LLM(CFG, Vocab(sorted(set(WORDS)) + ["</s>", "<unk>"]), seed=5)


def test_greedy_is_stepwise_argmax(model):
    ids = model.tokenizer.encode("User: How do mountains form?")
    out = []
    for _ in range(6):
        token = int(np.argmax(model.forward([ids + out])[0, -1]))
        if token == model.tokenizer.eos_id:
            break
        out.append(token)
    assert G.generate(model, "How do mountains form?", max_tokens=6) == model.tokenizer.decode(out)


@pytest.mark.parametrize("options", [{}, {"temperature": 0.8, "top_p": 0.9, "seed": 1},
                                     {"temperature": 1.0, "top_k": 3, "seed": 2},
                                     {"temperature": 0.7, "min_p": 0.1, "repetition_penalty": 1.3,
                                      "seed": 3}])
def test_cache_gives_the_tokens_of_full_recompute(model, options):
    cached = G.generate(model, "How do", max_tokens=20, **options)
    full = G.generate(model, "How do", max_tokens=20, use_cache=False, **options)
    assert cached == full


def test_same_seed_same_text_and_stream_matches(model):
    a = G.generate(model, "the sun", temperature=1.0, seed=11, max_tokens=15)
    b = G.generate(model, "the sun", temperature=1.0, seed=11, max_tokens=15)
    pieces = list(G.stream(model, "the sun", temperature=1.0, seed=11, max_tokens=15))
    assert a == b == "".join(pieces)
    assert len(pieces) <= 15


def test_sample_probabilities_filters():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    np.testing.assert_allclose(G.sample_probabilities(logits, 1.0), [0.5, 0.3, 0.15, 0.05])
    np.testing.assert_allclose(G.sample_probabilities(logits, 1.0, top_k=2), [0.625, 0.375, 0, 0])
    np.testing.assert_allclose(G.sample_probabilities(logits, 1.0, top_p=0.8), [0.625, 0.375, 0, 0])
    np.testing.assert_allclose(G.sample_probabilities(logits, 1.0, top_p=0.81),
                               [0.5, 0.3, 0.15, 0] / np.float64(0.95))
    np.testing.assert_allclose(G.sample_probabilities(logits, 1.0, min_p=0.5), [0.625, 0.375, 0, 0])
    rng = np.random.default_rng(0)
    draws = [G.sample(logits, rng, temperature=1.0, top_k=1) for _ in range(20)]
    assert draws == [0] * 20


def test_repetition_penalty():
    out = G.apply_repetition_penalty(np.array([2.0, -2.0, 1.0]), [0, 1], 2.0)
    np.testing.assert_allclose(out, [1.0, -4.0, 1.0])


def test_beam_search_scores_at_least_as_well_as_greedy(model):
    def score(tokens):
        ids = model.tokenizer.encode("User: the sun")
        logp, seq = 0.0, list(ids)
        for t in tokens + [model.tokenizer.eos_id]:
            z = model.forward([seq])[0, -1].astype(np.float64)
            logp += z[t] - np.log(np.exp(z - z.max()).sum()) - z.max()
            seq.append(t)
            if len(seq) >= CFG.max_seq_len:
                break
        return logp / (len(tokens) + 1)

    greedy = model.tokenizer.encode(G.generate(model, "the sun"))
    beam = G.beam_search(model, "the sun", beam_width=4)
    assert score(beam) >= score(greedy) - 1e-6
    assert G.generate(model, "the sun", beam_width=1) == model.tokenizer.decode(greedy)


@pytest.mark.parametrize("options,message", [
    ({"temperature": -1}, "temperature = -1"), ({"top_p": 0}, "top_p = 0"),
    ({"top_p": 1.5}, "top_p = 1.5"), ({"top_k": -1}, "top_k = -1"),
    ({"beam_width": 0}, "beam_width = 0"), ({"max_tokens": 0}, "max_tokens = 0"),
    ({"min_p": 1.0}, "min_p = 1.0"), ({"repetition_penalty": 0}, "repetition_penalty = 0"),
    ({"beam_width": 2, "temperature": 0.5}, "beam search is deterministic"),
])
def test_bad_options(model, options, message):
    with pytest.raises(ValidationError, match=message):
        G.generate(model, "the sun", **options)


def test_prompts_empty_unknown_long_and_odd(model, caplog):
    for empty in ("", "   \n"):
        with pytest.raises(ValidationError, match="is empty"):
            G.generate(model, empty)
    assert isinstance(G.generate(model, "zebra quokka", max_tokens=3), str)  # all <unk>
    long = " ".join(["sun"] * 100)
    assert isinstance(G.generate(model, long, max_tokens=3), str)
    assert "keeps its last" in caplog.text
    assert isinstance(G.generate(model, "sun\x00\x1b[31m \u202e" + "x" * 100_000, max_tokens=2), str)


def test_top_p_is_the_smallest_nucleus_ties_in_token_order(rng):
    """sample_probabilities' top-p against the definition: sort tokens by probability
    (stable: equal ones in token order), keep the shortest prefix reaching top_p."""
    for i in range(300):
        V = int(rng.integers(1, 40))
        logits = (rng.integers(-3, 3, V) if i % 2 else rng.standard_normal(V)).astype(np.float32)
        top_p = float(rng.choice([0.1, 0.5, 0.9, 0.999999]))
        z = logits.astype(np.float64)
        probs = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        order = np.argsort(-probs, kind="stable")
        keep = int(np.searchsorted(np.cumsum(probs[order]), top_p - 1e-9)) + 1
        expected = np.zeros(V)
        expected[order[:keep]] = probs[order[:keep]]
        np.testing.assert_allclose(G.sample_probabilities(logits, 1.0, top_p=top_p),
                                   expected / expected.sum(), rtol=1e-12, atol=0)


def test_sample_draws_what_rng_choice_would(rng):
    probs = rng.random(763) ** 4
    logits = np.log(probs).astype(np.float32)
    p = G.sample_probabilities(logits, 1.0)
    mine, theirs = np.random.default_rng(7), np.random.default_rng(7)
    assert [G.sample(logits, mine, 1.0) for _ in range(200)] == \
        [int(theirs.choice(p.size, p=p)) for _ in range(200)]


@pytest.mark.parametrize("options,message", [
    ({"max_tokens": 1.5}, "max_tokens = 1.5, expected an integer >= 1"),
    ({"max_tokens": True}, "max_tokens = True, expected an integer"),
    ({"top_k": 1.5}, "top_k = 1.5, expected an integer"),
    ({"top_k": False}, "top_k = False, expected an integer"),
    ({"beam_width": 2.0}, "beam_width = 2.0, expected an integer"),
    ({"beam_width": True}, "beam_width = True, expected an integer"),
    ({"temperature": float("nan")}, "temperature = nan, expected a number >= 0"),
    ({"temperature": float("inf")}, "temperature = inf, expected a number"),
    ({"temperature": "0.5"}, "temperature = '0.5', expected a number"),
    ({"top_p": float("nan")}, "top_p = nan, expected a number in"),
    ({"min_p": True}, "min_p = True, expected a number in"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty = inf, expected a finite"),
    ({"seed": -1, "temperature": 1.0}, "seed = -1, expected an integer >= 0"),
    ({"seed": 1.5}, "seed = 1.5, expected an integer >= 0"),
    ({"seed": True}, "seed = True, expected an integer >= 0"),
    ({"rng": 5, "temperature": 1.0}, "rng = 5, expected a numpy.random.Generator"),
])
def test_option_types(model, options, message):
    """Options of the wrong type are refused with one line, not accepted (True as 1 token,
    1.5 as 2) or failing deep inside numpy."""
    with pytest.raises(ValidationError, match=f"^generate: {message.replace('(', '.')}"):
        G.generate(model, "the sun", **options)


def test_length_penalty_and_numpy_scalars(model):
    with pytest.raises(ValidationError, match="length_penalty = nan, expected a finite"):
        G.beam_search(model, "the sun", length_penalty=float("nan"))
    assert isinstance(G.generate(model, "the sun", max_tokens=np.int64(2), seed=np.uint8(3),
                                 temperature=np.float32(0.5), top_k=np.int32(3)), str)


def test_beams_too_big_for_the_memory_are_refused(model, monkeypatch):
    """beam_width = 20000 reached 13 GB (and ran on) with the default model."""
    from rustgpt import resources

    monkeypatch.setattr(resources, "available_memory", lambda: 64 * 2**20)
    with pytest.raises(ValidationError, match=r"^generate: beam_width = 20000 needs about "
                                              r"[\d.]+ MB of memory, 64.0 MB is available$"):
        G.generate(model, "the sun", beam_width=20_000)
    assert G.generate(model, "the sun", beam_width=4) == G.generate(model, "the sun",
                                                                   beam_width=4)
    monkeypatch.setattr(resources, "available_memory", lambda: 1000)
    with pytest.raises(ValidationError, match=r"^generate: decoding needs about"):
        G.generate(model, "the sun")


def test_failed_allocations_in_decoding_become_one_line_errors(model, monkeypatch):
    def fail(*args):
        raise MemoryError
    monkeypatch.setattr(type(model), "prefill", fail)
    with pytest.raises(ValidationError, match=r"^generate: beam_width = 3: out of memory"):
        G.generate(model, "the sun", beam_width=3)
    with pytest.raises(ValidationError, match=r"^generate: decoding: out of memory"):
        G.generate(model, "the sun")
