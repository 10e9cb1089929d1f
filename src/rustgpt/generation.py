"""Decoding: greedy (RustGPT's), temperature, top-k, top-p, min-p, repetition penalty,
beam search, and a streaming iterator, all over the model's KV cache; a chat-tuned model
answers in RustGPT's template, a model trained on text continues its prompt (chat_tuned).

Randomness comes from a ``numpy.random.Generator`` passed in (or seeded here), never global;
decoding state (cache, generator, in bf16 the weights' bf16 copy) belongs to the call, never
to the model.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Iterator

import numpy as np

from rustgpt.errors import ValidationError
from rustgpt.model import check_seed
from rustgpt.precision import Bf16Weights, decoding_weights, matmuls
from rustgpt.resources import allocating, check_memory

if TYPE_CHECKING:
    from rustgpt.model import KVCache, LLM

log = logging.getLogger(__name__)

PROMPT_PREFIX = "User: "  # RustGPT's chat format
ANSWER_PREFIX = "Assistant:"
CHAT_MAX_TOKENS = 80  # RustGPT decodes up to its max_seq_len, 80
TEXT_MAX_TOKENS = 256

# ---- chat-tuned or trained on text ----------------------------------------------------------

def chat_tuned(model: LLM) -> bool:
    """True when `model` is chat-tuned in RustGPT's format, False when it was trained on raw
    text; the one place that tells them apart (for now: by the tokenizer's kind).

    A chat-tuned model (a `word` tokenizer, RustGPT's vocabulary) answers a prompt sent as
    "User: PROMPT", stops at </s>, and decodes CHAT_MAX_TOKENS new tokens at most unless
    told otherwise. A model trained on text (`char`, `bpe`) continues the prompt as raw text
    (stopping at the tokenizer's end-of-text token, if it has one), TEXT_MAX_TOKENS by
    default."""
    return model.tokenizer.kind == "word"


def chat_prompt(model: LLM, messages: list[tuple[str, str]]) -> str:
    """The text a conversation is sent to `model` as, in RustGPT's chat format, ending with
    "Assistant:" for the model to answer: messages are (role, text) pairs, role "system"
    (its text as is), "user" ("User: text") or "assistant" ("Assistant: text", then the
    end-of-text token, as chat examples end). A chat-tuned model (RustGPT's: trained on
    single exchanges, each at position 0) reads the last user message alone, as
    ``rustgpt-cli chat`` answers each line on its own; a model trained on text reads the
    whole conversation."""
    if chat_tuned(model):
        messages = [message for message in messages if message[0] == "user"][-1:]
    tokenizer = model.tokenizer
    end = "" if tokenizer.eos_id is None else " " + tokenizer.decode([tokenizer.eos_id])
    turns = {"system": "{}", "user": PROMPT_PREFIX + "{}",
             "assistant": ANSWER_PREFIX + " {}" + end}
    return " ".join([turns[role].format(text) for role, text in messages] + [ANSWER_PREFIX])


def default_max_tokens(model: LLM) -> int:
    """New tokens at most when none is given: CHAT_MAX_TOKENS or TEXT_MAX_TOKENS, as
    chat_tuned(model) says."""
    return CHAT_MAX_TOKENS if chat_tuned(model) else TEXT_MAX_TOKENS


# ---- samplers: logits (V,) -> token id ------------------------------------------------------

def sample_greedy(logits: np.ndarray) -> int:
    """The likeliest token (the first of ties)."""
    return int(np.argmax(logits))


def apply_repetition_penalty(logits: np.ndarray, history: list[int], penalty: float) -> np.ndarray:
    """CTRL's penalty: logits of tokens already seen are divided by `penalty` when positive,
    multiplied when negative. Returns a new array."""
    out = np.array(logits, np.float64)
    if penalty != 1.0 and history:
        seen = np.unique(history)
        out[seen] = np.where(out[seen] > 0, out[seen] / penalty, out[seen] * penalty)
    return out


def sample_probabilities(logits: np.ndarray, temperature: float, top_k: int = 0,
                         top_p: float = 1.0, min_p: float = 0.0) -> np.ndarray:
    """Probabilities (V,) after temperature, then top-k, top-p (nucleus) and min-p filtering."""
    z = np.asarray(logits, np.float64) / temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    filtered = False
    if 0 < top_k < probs.size:
        kth = np.partition(probs, -top_k)[-top_k]
        probs[probs < kth] = 0.0
        filtered = True
    if min_p > 0.0:
        probs[probs < min_p * probs.max()] = 0.0
        filtered = True
    if filtered:
        probs /= probs.sum()
    if top_p < 1.0:
        # the smallest set of most likely tokens whose mass reaches top_p (1e-9 absorbs the
        # cumsum's rounding), ties at its edge taken in token order; found from the sorted
        # values, cheaper than sorting the token ids
        descending = np.sort(probs)[::-1]
        cumulative = np.cumsum(descending)
        keep = min(int(np.searchsorted(cumulative, top_p - 1e-9)) + 1, probs.size)
        edge = descending[keep - 1]
        kept = probs > edge
        kept[np.flatnonzero(probs == edge)[:keep - np.count_nonzero(kept)]] = True
        probs = np.where(kept, probs, 0.0) / cumulative[keep - 1]
    return probs


def sample(logits: np.ndarray, rng: np.random.Generator, temperature: float = 0.0,
           top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> int:
    """One token id from logits (V,): greedy when temperature == 0, else sampled."""
    if temperature == 0.0:
        return sample_greedy(logits)
    probs = sample_probabilities(logits, temperature, top_k, top_p, min_p)
    # what rng.choice(V, p=probs) does, without its checks of p: one uniform draw, the same
    # token for the same generator state
    cdf = np.cumsum(probs)
    cdf /= cdf[-1]
    return int(cdf.searchsorted(rng.random(), side="right"))


def sample_next(logits: np.ndarray, history: list[int], rng: np.random.Generator,
                temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                min_p: float = 0.0, repetition_penalty: float = 1.0) -> int:
    """The token after `history` (the prompt and the tokens so far) from its logits (V,):
    the repetition penalty over history, then sample(). Every decoding loop's choice."""
    if repetition_penalty != 1.0:  # else no copy: sample() only reads the logits
        logits = apply_repetition_penalty(logits, history, repetition_penalty)
    return sample(logits, rng, temperature, top_k, top_p, min_p)


# ---- the decoding loops ---------------------------------------------------------------------

def _integer(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _real(value) -> bool:
    """A finite real number (not a bool)."""
    return (isinstance(value, (int, float, np.integer, np.floating))
            and not isinstance(value, bool) and math.isfinite(value))


def _check_options(max_tokens, temperature, top_k, top_p, min_p, repetition_penalty, beam_width,
                   seed=None, rng=None, length_penalty=1.0):
    rules = [
        (max_tokens, _integer(max_tokens) and max_tokens >= 1, "max_tokens", "an integer >= 1"),
        (temperature, _real(temperature) and temperature >= 0, "temperature",
         "a number >= 0 (0 = greedy)"),
        (top_k, _integer(top_k) and top_k >= 0, "top_k", "an integer >= 0 (0 = off)"),
        (top_p, _real(top_p) and 0 < top_p <= 1, "top_p", "a number in (0, 1]"),
        (min_p, _real(min_p) and 0 <= min_p < 1, "min_p", "a number in [0, 1)"),
        (repetition_penalty, _real(repetition_penalty) and repetition_penalty > 0,
         "repetition_penalty", "a finite number > 0"),
        (beam_width, _integer(beam_width) and beam_width >= 1, "beam_width", "an integer >= 1"),
        (length_penalty, _real(length_penalty), "length_penalty", "a finite number"),
        (rng, rng is None or isinstance(rng, np.random.Generator), "rng",
         "a numpy.random.Generator or None"),
    ]
    for value, ok, name, rule in rules:
        if not ok:
            raise ValidationError(f"generate: {name} = {value!r}, expected {rule}")
    if seed is not None:
        check_seed(seed, "generate")
    if beam_width > 1 and temperature > 0:
        raise ValidationError("generate: beam search is deterministic, use temperature = 0 "
                              "with beam_width > 1")


def _check_memory(model: LLM, batch: int, prompt_len: int, budget: int, extra: int,
                  what: str) -> None:
    """Refuse decoding that needs more memory than is available: the KV cache and the
    activations of the longest prefill (model.decoding_bytes: the prompt, or the whole
    window once decoding slides), plus `extra` bytes."""
    T = model.config.max_seq_len
    longest = prompt_len if prompt_len + budget <= T else T
    check_memory(model.decoding_bytes(batch, longest) + extra, f"generate: {what} needs")


def _prompt_ids(model: LLM, prompt: str, raw: bool | None) -> list[int]:
    """The prompt's token ids, "User: " first unless raw (None: as chat_tuned says), its
    last max_seq_len kept. A chat prompt needs some text; a raw one, any character
    (whitespace is text to continue)."""
    templated = chat_tuned(model) if raw is None else not raw
    if not isinstance(prompt, str) or not (prompt.strip() if templated else prompt):
        raise ValidationError(f"generate: prompt {prompt!r} is empty, expected some text")
    ids = model.tokenizer.encode(PROMPT_PREFIX + prompt if templated else prompt)
    limit = model.config.max_seq_len
    if len(ids) > limit:
        log.warning("prompt of %d tokens keeps its last %d (max_seq_len %d)", len(ids), limit,
                    model.config.max_seq_len, extra={"prompt_tokens": len(ids)})
        ids = ids[-limit:]
    return ids


def _next_logits(model: LLM, cache: KVCache | None, rows: list[list[int]],
                 weights: Bf16Weights | None = None) -> np.ndarray:
    """Logits (B, V) of the token after each of the B `rows` (token ids, all of one length),
    read from the rows' last max_seq_len tokens: nanoGPT's crop, for every model and
    strategy. `cache` holds all of each row but its last token, or is empty: one step while
    it has room, a prefill of the window once it is full (positions are absolute, so cached
    keys cannot slide: beyond max_seq_len each token costs a forward over the window).
    Without a cache (None), the forward over the window: the reference the cache is
    tested against. With `weights` (a bf16 copy, decoding_weights), the matmuls run in
    bf16."""
    T = model.config.max_seq_len
    with matmuls(weights):
        if cache is None:
            return model.forward([row[-T:] for row in rows])[:, -1]
        if 0 < cache.length < T:
            return model.step(cache, [row[-1] for row in rows])
        return model.prefill(cache, [row[-T:] for row in rows])


def stream(model: LLM, prompt: str, *, max_tokens: int | None = None, temperature: float = 0.0,
           top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
           repetition_penalty: float = 1.0, seed: int | None = None,
           rng: np.random.Generator | None = None, raw: bool | None = None,
           use_cache: bool = True, precision: str = "fp32") -> Iterator[str]:
    """Yield the text of generate()'s tokens piece by piece as they are decoded: each piece
    is decoded after the few tokens before it, not the whole answer again, and a piece
    ending in U+FFFD (a character whose bytes byte-level BPE split across tokens) waits for
    the next token. The pieces join to generate()'s text with every kind of tokenizer
    rustgpt trains (any whose decoding of a prefix of the ids is a prefix of the text)."""
    yield from _pieces(model.tokenizer, _tokens(
        model, prompt, max_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed,
        rng, raw, use_cache, precision))


def _pieces(tokenizer, tokens: Iterator[int]) -> Iterator[str]:
    """stream()'s pieces of the text of `tokens`."""
    text = TextStream(tokenizer)
    for token in tokens:
        piece = text.push(token)
        if piece:
            yield piece
    rest = text.finish()
    if rest:
        yield rest


class TextStream:
    """Incremental decoding, as stream() does it, for loops that get one token at a time
    (a server's batch): ``push(token)`` returns the new text (maybe ""), ``finish()`` the
    text of tokens still held back (an incomplete character)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._head: list[int] = []  # the last tokens whose text is out (stream_context)
        self._head_text = ""
        self._pending: list[int] = []  # tokens whose text is not out yet

    def push(self, token: int) -> str:
        """The text `token` adds after the tokens pushed before it."""
        self._pending.append(token)
        tokens = self._head + self._pending
        text = self.tokenizer.decode(tokens)
        if text.endswith("\ufffd"):
            return ""
        self._head = tokens[len(tokens) - self.tokenizer.stream_context:]
        piece = text[len(self._head_text):]
        self._head_text = self.tokenizer.decode(self._head)
        self._pending = []
        return piece

    def finish(self) -> str:
        """The text of the tokens held back, if any."""
        if not self._pending:
            return ""
        return self.tokenizer.decode(self._head + self._pending)[len(self._head_text):]


def _tokens(model: LLM, prompt: str, max_tokens: int | None, temperature: float, top_k: int,
            top_p: float, min_p: float, repetition_penalty: float, seed: int | None,
            rng: np.random.Generator | None, raw: bool | None,
            use_cache: bool, precision: str = "fp32") -> Iterator[int]:
    """The new token ids, sampled one by one; stops at the end-of-text token (not
    yielded) or after max_tokens (None: default_max_tokens)."""
    budget = default_max_tokens(model) if max_tokens is None else max_tokens
    _check_options(budget, temperature, top_k, top_p, min_p, repetition_penalty, 1, seed, rng)
    rng = rng if rng is not None else np.random.default_rng(seed)
    ids = _prompt_ids(model, prompt, raw)
    if use_cache:
        _check_memory(model, 1, len(ids), budget, 0, "decoding")
    eos = model.tokenizer.eos_id
    weights = decoding_weights(model, precision, "generate: precision")
    with allocating("generate: decoding"):
        cache = model.new_cache(1) if use_cache else None
        context = list(ids)  # the prompt and the tokens decoded so far
        for _ in range(budget):
            logits = _next_logits(model, cache, [context], weights)[0]
            token = sample_next(logits, context, rng, temperature, top_k, top_p, min_p,
                                repetition_penalty)
            if token == eos:
                return
            context.append(token)
            yield token


def beam_search(model: LLM, prompt: str, *, beam_width: int = 4, max_tokens: int | None = None,
                raw: bool | None = None, length_penalty: float = 1.0,
                precision: str = "fp32") -> list[int]:
    """Token ids of the best of `beam_width` beams, scored by summed log-probability divided
    by length**length_penalty (finished beams include their end-of-text token). Beyond
    max_seq_len every beam reads its last max_seq_len tokens, as sampling does."""
    budget = default_max_tokens(model) if max_tokens is None else max_tokens
    _check_options(budget, 0.0, 0, 1.0, 0.0, 1.0, beam_width, length_penalty=length_penalty)
    ids = _prompt_ids(model, prompt, raw)
    # besides the cache: a copy of its keys or values while beams are reordered, and each
    # step's scores, (W, V) float64: log-probabilities, candidates, their order and sort
    W = beam_width
    c = model.config
    reorder = 4 * c.num_layers * W * c.max_seq_len * c.embedding_dim
    _check_memory(model, W, len(ids), budget, reorder + 5 * 8 * W * model.tokenizer.size,
                  f"beam_width = {W}")
    with allocating(f"generate: beam_width = {W}"):
        return _beam_search(model, ids, W, budget, length_penalty,
                            decoding_weights(model, precision, "generate: precision"))


def _beam_search(model: LLM, ids: list[int], W: int, budget: int, length_penalty: float,
                 weights: Bf16Weights | None) -> list[int]:
    eos = model.tokenizer.eos_id
    cache = model.new_cache(W)
    logits = _next_logits(model, cache, [ids] * W, weights)
    beams: list[list[int]] = [[] for _ in range(W)]
    scores = np.full(W, -np.inf)
    scores[0] = 0.0  # the W copies of the prompt are one beam until the first expansion
    finished: list[tuple[float, list[int]]] = []
    norm = lambda score, length: score / max(length, 1) ** length_penalty
    for step in range(budget):
        logp = _log_softmax(logits)  # (W, V)
        candidates = (scores[:, None] + logp).reshape(-1)
        order = np.argsort(-candidates, kind="stable")[:2 * W]
        parents, tokens, new_scores = [], [], []
        for flat in order:
            if not np.isfinite(candidates[flat]):
                break
            parent, token = divmod(int(flat), logp.shape[1])
            if token == eos:
                finished.append((norm(candidates[flat], len(beams[parent]) + 1), beams[parent]))
            else:
                parents.append(parent)
                tokens.append(token)
                new_scores.append(candidates[flat])
            if len(parents) == W:
                break
        best_finished = max((s for s, _ in finished), default=-np.inf)
        best_alive = max((norm(s, step + 1) for s in new_scores), default=-np.inf)
        if not parents or best_finished >= best_alive or len(finished) >= W:
            break
        pad = W - len(parents)  # keep the cache's batch at W with dead copies
        parents += [parents[0]] * pad
        tokens += [tokens[0]] * pad
        new_scores += [-np.inf] * pad
        beams = [beams[p] + [t] for p, t in zip(parents, tokens)]
        scores = np.array(new_scores)
        cache.reorder(np.array(parents))
        if step + 1 < budget:
            logits = _next_logits(model, cache, [ids + beam for beam in beams], weights)
    alive = [(norm(s, len(b)), b) for s, b in zip(scores, beams) if np.isfinite(s) and b]
    return max(finished + alive, key=lambda item: item[0], default=(0.0, []))[1]


def generate(model: LLM, prompt: str, *, max_tokens: int | None = None, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
             repetition_penalty: float = 1.0, beam_width: int = 1, seed: int | None = None,
             rng: np.random.Generator | None = None, raw: bool | None = None,
             use_cache: bool = True, precision: str = "fp32") -> str:
    """The model's new text after `prompt`, without the end-of-text token.

    A chat-tuned model answers "User: " + prompt; a model trained on text continues the
    prompt itself (see chat_tuned; `raw` True / False sends the prompt without / with the
    template whatever the model). At most `max_tokens` new tokens (None: 80 for a
    chat-tuned model, 256 for one trained on text); beyond max_seq_len the model reads the
    last max_seq_len tokens. Greedy by default (RustGPT); temperature > 0 samples, filtered
    by top_k / top_p / min_p; beam_width > 1 runs beam search. `precision`: the matmuls'
    precision, fp32, bf16 (from a bf16 copy of the weights, made for the call) or auto
    (rustgpt.precision.resolve). Raises ValidationError for options of the wrong type or out
    of range, and for decoding that needs more memory than is available."""
    _check_options(1 if max_tokens is None else max_tokens, temperature, top_k, top_p, min_p,
                   repetition_penalty, beam_width, seed, rng)
    if beam_width > 1:
        ids = beam_search(model, prompt, beam_width=beam_width, max_tokens=max_tokens, raw=raw,
                          precision=precision)
    else:
        ids = list(_tokens(model, prompt, max_tokens, temperature, top_k, top_p, min_p,
                           repetition_penalty, seed, rng, raw, use_cache, precision))
    return model.tokenizer.decode(ids)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
