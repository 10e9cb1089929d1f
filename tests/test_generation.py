"""Decoding: samplers, cache vs full recompute, streaming, beam search, bad options; raw
text on models trained on text and the window past max_seq_len."""

import numpy as np
import pytest

from rustgpt import generation as G
from rustgpt.config import ModelConfig
from rustgpt.errors import ValidationError
from rustgpt.model import LLM
from rustgpt.tokenizer import Vocab, train_tokenizer

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
            z = model.forward([seq[-CFG.max_seq_len:]])[0, -1].astype(np.float64)
            logp += z[t] - np.log(np.exp(z - z.max()).sum()) - z.max()
            seq.append(t)
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
                                              r"[\d.]+ [MG]B of memory, 64.0 MB is available$"):
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


# ---- models trained on text: raw continuation, the sliding window, streaming ---------------

PLAY = ("ROMEO:\nBut soft, what light through yonder window breaks?\n"
        "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\n")
GPT = ModelConfig(arch="gpt", embedding_dim=16, hidden_dim=32, num_layers=2, num_heads=2,
                  max_seq_len=16)


@pytest.fixture(scope="module")
def char_model():
    return LLM(GPT, train_tokenizer("char", [PLAY]), seed=3)


@pytest.fixture(scope="module")
def word_model():
    """RustGPT's block, a word vocabulary, and weights whose answers run past max_seq_len
    before any </s>."""
    return LLM(CFG, Vocab(sorted(set(WORDS)) + ["</s>", "<unk>"]), seed=0)


def crop_reference(model, ids, n, temperature=0.0, top_k=0, seed=None):
    """nanoGPT's loop: every token from the full forward over the last max_seq_len tokens
    (no cache); stops at the end-of-text token."""
    rng = np.random.default_rng(seed)
    T, seq, out = model.config.max_seq_len, list(ids), []
    for _ in range(n):
        token = G.sample(model.forward([seq[-T:]])[0, -1], rng, temperature, top_k)
        if token == model.tokenizer.eos_id:
            break
        seq.append(token)
        out.append(token)
    return out


def test_chat_tuned_by_tokenizer_kind_and_default_max_tokens(word_model, char_model):
    assert G.chat_tuned(word_model) and G.default_max_tokens(word_model) == 80
    assert not G.chat_tuned(char_model) and G.default_max_tokens(char_model) == 256
    # no end-of-text id (char): the default budget, one character per token
    assert len(G.generate(char_model, "ROMEO:")) == 256
    answer = G.generate(word_model, "the sun")  # runs to the budget, no </s> on the way
    assert len(word_model.tokenizer.encode(answer)) == 80
    assert G.generate(char_model, "ROMEO:", max_tokens=7) == G.generate(char_model, "ROMEO:")[:7]


def test_text_models_continue_the_prompt_as_raw_text(char_model):
    tok = char_model.tokenizer
    raw = tok.decode(crop_reference(char_model, tok.encode("ROMEO:"), 12))
    assert G.generate(char_model, "ROMEO:", max_tokens=12) == raw
    assert G.generate(char_model, "ROMEO:", max_tokens=12, raw=True) == raw
    templated = tok.decode(crop_reference(char_model, tok.encode("User: ROMEO:"), 12))
    assert G.generate(char_model, "ROMEO:", max_tokens=12, raw=False) == templated
    assert len(G.generate(char_model, "\n", max_tokens=3)) == 3  # whitespace is text here
    with pytest.raises(ValidationError, match="prompt '' is empty"):
        G.generate(char_model, "")


@pytest.mark.parametrize("which", ["word_model", "char_model"])
@pytest.mark.parametrize("options", [{}, {"temperature": 0.9, "top_k": 5, "seed": 4}])
def test_decoding_beyond_max_seq_len_keeps_the_last_window(which, options, request):
    """Past max_seq_len the cache is refilled from the last max_seq_len tokens: the tokens
    of nanoGPT's crop, recomputed in full at every step (RustGPT's block and the GPT one)."""
    model = request.getfixturevalue(which)
    T = model.config.max_seq_len
    prompt = "the sun" if which == "word_model" else "ROMEO:"
    ids = model.tokenizer.encode(("User: " if which == "word_model" else "") + prompt)
    expected = crop_reference(model, ids, 3 * T, **options)
    assert len(ids) + len(expected) > 2 * T
    for use_cache in (True, False):
        assert G.generate(model, prompt, max_tokens=3 * T, use_cache=use_cache,
                          **options) == model.tokenizer.decode(expected)


def test_a_long_prompt_keeps_its_last_max_seq_len_tokens(char_model, caplog):
    ids = char_model.tokenizer.encode(PLAY)
    expected = crop_reference(char_model, ids[-GPT.max_seq_len:], 20)
    assert G.generate(char_model, PLAY, max_tokens=20) == char_model.tokenizer.decode(expected)
    assert f"keeps its last {GPT.max_seq_len}" in caplog.text


def test_beam_search_beyond_max_seq_len(word_model, char_model):
    """Beams read the last max_seq_len tokens too: one beam is greedy decoding, and beams
    of a model without an end-of-text token run to max_tokens."""
    T = GPT.max_seq_len
    greedy = char_model.tokenizer.decode(crop_reference(
        char_model, char_model.tokenizer.encode("ROMEO:"), 3 * T))
    one = G.beam_search(char_model, "ROMEO:", beam_width=1, max_tokens=3 * T)
    assert char_model.tokenizer.decode(one) == greedy
    assert len(G.beam_search(char_model, "ROMEO:", beam_width=3, max_tokens=3 * T)) == 3 * T
    beams = G.beam_search(word_model, "the sun", beam_width=3, max_tokens=3 * T)
    assert 0 < len(beams) <= 3 * T


def test_stream_decodes_incrementally_and_never_splits_a_character(monkeypatch):
    """Each piece is decoded from the last few tokens (linear work, not a decode of the whole
    answer per token) and no piece ends inside a character whose bytes BPE split; the pieces
    join to generate()'s text."""
    texts = ["héllo wörld ✓ 日本語 ünïcödé\n", "the sun rises in the east\n"] * 10
    tokenizer = train_tokenizer("bpe", texts, vocab_size=300)
    model = LLM(GPT, tokenizer, seed=2)
    options = dict(temperature=1.5, seed=9, max_tokens=200)
    decoded, sampled = [], []  # ids decoded per call; tokens sampled
    decode, sample = tokenizer.decode, G.sample
    monkeypatch.setattr(tokenizer, "decode", lambda ids: decoded.append(len(ids)) or decode(ids))
    monkeypatch.setattr(G, "sample", lambda *args: sampled.append(1) or sample(*args))
    pieces = list(G.stream(model, "héllo", **options))
    assert len(sampled) > 100 and sum(decoded) <= 2 * (tokenizer.stream_context + 2) * len(sampled)
    assert len(pieces) < len(sampled)  # some characters took more than one token
    assert "".join(pieces) == G.generate(model, "héllo", **options)
    assert all(p and not p.endswith("\ufffd") for p in pieces[:-1])
    assert any(ord(ch) > 127 for ch in "".join(pieces))  # multi-byte characters came out


def test_chat_prompt_in_rustgpts_format(model):
    """A chat-tuned model reads the last question alone; a model trained on text the
    conversation, each earlier answer closed by the end-of-text token if there is one."""
    talk = [("system", "be brief"), ("user", "How do mountains form?"),
            ("assistant", "the sun rises"), ("user", "How do?")]
    assert G.chat_prompt(model, talk) == "User: How do? Assistant:"
    text_model = LLM(CFG, train_tokenizer("char", ["abcdefghijklmnopqrstuvwxyz ?:AHSU"]))
    assert G.chat_prompt(text_model, talk) == (
        "be brief User: How do mountains form? Assistant: the sun rises User: How do? "
        "Assistant:")


def test_text_stream_holds_back_an_incomplete_character():
    tokenizer = train_tokenizer("bpe", ["héllo wörld " * 20], vocab_size=257)  # bytes
    ids = tokenizer.encode("né ö")
    text = G.TextStream(tokenizer)
    pieces = [text.push(i) for i in ids]
    assert "" in pieces and not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) + text.finish() == "né ö"


@pytest.mark.parametrize("kind", ["word", "char"])
def test_text_stream_pieces_join_to_the_whole_decode(kind):
    """Word and char streams decode each token with only stream_context tokens before it
    (1: a word's space, glued punctuation and special tokens depend on the previous
    token; 0 for characters), and their pieces still join to the decode of all tokens."""
    texts = ["the sun ( rises ) , in the east . </s> w1 : w2 ?"]
    tokenizer = Vocab.from_texts(texts) if kind == "word" else train_tokenizer("char", texts)
    assert tokenizer.stream_context == (1 if kind == "word" else 0)
    rng = np.random.default_rng(0)
    for _ in range(50):
        ids = rng.integers(0, tokenizer.size, rng.integers(1, 30)).tolist()
        text = G.TextStream(tokenizer)
        pieces = [text.push(i) for i in ids]
        assert "".join(pieces) + text.finish() == tokenizer.decode(ids), ids
