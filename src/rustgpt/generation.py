"""Decoding: greedy (RustGPT's), temperature, top-k, top-p, min-p, repetition penalty,
beam search, and a streaming iterator, all over the model's KV cache.

Randomness comes from a ``numpy.random.Generator`` passed in (or seeded here), never global;
decoding state (cache, generator) belongs to the call, never to the model.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Iterator

import numpy as np

from rustgpt.errors import ValidationError
from rustgpt.model import check_seed
from rustgpt.resources import allocating, check_memory

if TYPE_CHECKING:
    from rustgpt.model import LLM

log = logging.getLogger(__name__)

PROMPT_PREFIX = "User: "  # RustGPT's chat format


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


def _check_memory(model: LLM, batch: int, prompt_len: int, extra: int, what: str) -> None:
    """Refuse decoding that needs more memory than is available: the KV cache and the
    prompt's activations (model.decoding_bytes), plus `extra` bytes."""
    check_memory(model.decoding_bytes(batch, prompt_len) + extra, f"generate: {what} needs")


def _prompt_ids(model: LLM, prompt: str, raw: bool) -> list[int]:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValidationError(f"generate: prompt {prompt!r} is empty, expected some text")
    ids = model.tokenizer.encode(prompt if raw else PROMPT_PREFIX + prompt)
    limit = model.config.max_seq_len - 1  # leave room for at least one new token
    if len(ids) > limit:
        log.warning("prompt of %d tokens keeps its last %d (max_seq_len %d)", len(ids), limit,
                    model.config.max_seq_len, extra={"prompt_tokens": len(ids)})
        ids = ids[-limit:]
    return ids


def stream(model: LLM, prompt: str, *, max_tokens: int | None = None, temperature: float = 0.0,
           top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
           repetition_penalty: float = 1.0, seed: int | None = None,
           rng: np.random.Generator | None = None, raw: bool = False,
           use_cache: bool = True) -> Iterator[str]:
    """Yield the answer's text piece by piece as tokens are decoded; stops at </s>, after
    `max_tokens` new tokens or at max_seq_len. ``use_cache=False`` recomputes the whole
    prefix each step (the reference the cache is tested against)."""
    budget = model.config.max_seq_len if max_tokens is None else max_tokens
    _check_options(budget, temperature, top_k, top_p, min_p, repetition_penalty, 1, seed, rng)
    rng = rng if rng is not None else np.random.default_rng(seed)
    ids = _prompt_ids(model, prompt, raw)
    budget = min(budget, model.config.max_seq_len - len(ids))
    if use_cache:
        _check_memory(model, 1, len(ids), 0, "decoding")
    with allocating("generate: decoding"):
        yield from _stream(model, ids, budget, rng, temperature, top_k, top_p, min_p,
                           repetition_penalty, use_cache)


def _stream(model: LLM, ids: list[int], budget: int, rng: np.random.Generator,
            temperature: float, top_k: int, top_p: float, min_p: float,
            repetition_penalty: float, use_cache: bool) -> Iterator[str]:
    cache = model.new_cache(1) if use_cache else None
    logits = model.prefill(cache, [ids])[0] if use_cache else model.forward([ids])[0, -1]
    new: list[int] = []
    text = ""
    while len(new) < budget:
        penalised = apply_repetition_penalty(logits, ids + new, repetition_penalty)
        token = sample(penalised, rng, temperature, top_k, top_p, min_p)
        if token == model.tokenizer.eos_id:
            return
        new.append(token)
        full = model.tokenizer.decode(new)
        yield full[len(text):]
        text = full
        if len(new) < budget:
            logits = (model.step(cache, [token])[0] if use_cache
                      else model.forward([ids + new])[0, -1])


def beam_search(model: LLM, prompt: str, *, beam_width: int = 4, max_tokens: int | None = None,
                raw: bool = False, length_penalty: float = 1.0) -> list[int]:
    """Token ids of the best of `beam_width` beams, scored by summed log-probability divided
    by length**length_penalty (finished beams include their </s>)."""
    budget = model.config.max_seq_len if max_tokens is None else max_tokens
    _check_options(budget, 0.0, 0, 1.0, 0.0, 1.0, beam_width, length_penalty=length_penalty)
    ids = _prompt_ids(model, prompt, raw)
    budget = min(budget, model.config.max_seq_len - len(ids))
    # besides the cache: a copy of its keys or values while beams are reordered, and each
    # step's scores, (W, V) float64: log-probabilities, candidates, their order and sort
    W = beam_width
    c = model.config
    reorder = 4 * c.num_layers * W * c.max_seq_len * c.embedding_dim
    _check_memory(model, W, len(ids), reorder + 5 * 8 * W * model.tokenizer.size,
                  f"beam_width = {W}")
    with allocating(f"generate: beam_width = {W}"):
        return _beam_search(model, ids, W, budget, length_penalty)


def _beam_search(model: LLM, ids: list[int], W: int, budget: int,
                 length_penalty: float) -> list[int]:
    eos = model.tokenizer.eos_id
    cache = model.new_cache(W)
    logits = model.prefill(cache, [ids] * W)
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
            logits = model.step(cache, tokens)
    alive = [(norm(s, len(b)), b) for s, b in zip(scores, beams) if np.isfinite(s) and b]
    return max(finished + alive, key=lambda item: item[0], default=(0.0, []))[1]


def generate(model: LLM, prompt: str, *, max_tokens: int | None = None, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
             repetition_penalty: float = 1.0, beam_width: int = 1, seed: int | None = None,
             rng: np.random.Generator | None = None, raw: bool = False,
             use_cache: bool = True) -> str:
    """The model's answer to `prompt` (prefixed with "User: " unless `raw`), without </s>.

    Greedy by default (RustGPT); temperature > 0 samples, filtered by top_k / top_p / min_p;
    beam_width > 1 runs beam search. Raises ValidationError for options of the wrong type or
    out of range, and for decoding that needs more memory than is available."""
    _check_options(1 if max_tokens is None else max_tokens, temperature, top_k, top_p, min_p,
                   repetition_penalty, beam_width, seed, rng)
    if beam_width > 1:
        return model.tokenizer.decode(beam_search(model, prompt, beam_width=beam_width,
                                              max_tokens=max_tokens, raw=raw))
    return "".join(stream(model, prompt, max_tokens=max_tokens, temperature=temperature,
                          top_k=top_k, top_p=top_p, min_p=min_p,
                          repetition_penalty=repetition_penalty, seed=seed, rng=rng, raw=raw,
                          use_cache=use_cache))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
