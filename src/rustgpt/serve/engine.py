"""The server's decoding engine: one thread owns the model and the kernel threads, and
decodes every active request by one token per batched step (continuous batching).

A request (a Job) waits in a bounded queue; between steps the engine prefills waiting
jobs, one at a time, into free rows of one KV cache of ``max_batch`` rows, then runs one
``LLM.step`` over all rows, each at its own position, and samples each row's token with
its own generator. A finished or cancelled job leaves at once, the last row moving into
its place, so the active rows are always the cache's first B. A row's logits do not
depend on the rows beside it, so a job's tokens are those it would get alone (and those
of ``generation.generate`` with the same options).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import TYPE_CHECKING, Callable

import numpy as np

from rustgpt import _kernels as K
from rustgpt.errors import LlmError
from rustgpt.generation import TextStream, sample_next
from rustgpt.precision import decoding_weights, matmuls

if TYPE_CHECKING:
    from rustgpt.model import LLM
    from rustgpt.serve.metrics import Metrics

log = logging.getLogger(__name__)


class QueueFull(LlmError):
    """The engine's queue holds max_queue jobs already."""


class Job:
    """One request's decoding: prompt token ids, the new tokens allowed (max_new, the
    context's room included), sampling options (those of ``generation.sample_next``), a
    seed (None: random) and stop strings. The engine fills in the rest.

    Updates go to the engine's sink as (job, text, finish_reason): the new text (maybe
    ""), and None until the last update, which says why it ended: "stop" (end-of-text or
    a stop string, which is not part of the text), "length" (max_new tokens),
    "cancelled" or "error". ``inbox`` is the sink's own: where the job's updates go."""

    def __init__(self, prompt_ids: list[int], max_new: int, sampling: dict,
                 seed: int | None = None, stop: tuple[str, ...] = (), inbox=None) -> None:
        self.prompt_ids = prompt_ids
        self.max_new = max_new
        self.sampling = sampling
        self.seed = seed
        self._rng: np.random.Generator | None = None  # made at the first sampled token
        self.stop = stop
        self.inbox = inbox
        self.context = list(prompt_ids)  # the prompt and the tokens so far
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.submitted = time.perf_counter()
        self.last_token: float | None = None  # when the latest token was sampled
        self.cancelled = False  # set by any thread (cancel()); read by the engine
        self._on_cancel: Callable[[], object] | None = None  # an EngineProcess's message
        self._text: TextStream | None = None
        self._held = ""  # text not sent yet: it may be the start of a stop string
        # greedy without a repetition penalty: the token is the logits' argmax, which the
        # engine takes for every row of a step at once
        self.greedy = sampling.get("temperature") == 0.0 and \
            sampling.get("repetition_penalty", 1.0) == 1.0

    @property
    def rng(self) -> np.random.Generator:
        """The job's generator, seeded with `seed` (None: from the OS), made when first
        asked for: a greedy job never draws, and seeding from the OS costs a system call."""
        if self._rng is None:
            self._rng = np.random.default_rng(self.seed)
        return self._rng

    def cancel(self) -> None:
        """Ask the engine to drop this job (its client left); it leaves within one step."""
        self.cancelled = True
        if self._on_cancel is not None:
            self._on_cancel()

    def _visible(self, piece: str, final: bool) -> str:
        """The text to send now of the text held back plus `piece`: up to the first stop
        string (the job then finishes, "stop"), and, unless final, not a tail that may be
        the beginning of one."""
        if not self.stop:
            return piece
        text = self._held + piece
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.finish_reason = "stop"
            self._held = ""
            return text[:cut]
        keep = 0 if final else max((k for s in self.stop for k in range(1, len(s))
                                    if text.endswith(s[:k])), default=0)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]


Update = tuple[Job, str, "str | None"]


class Engine:
    """The decoding thread. ``start(sink)`` loads the model (``load()``, on the engine
    thread) and runs; ``submit(job)`` queues a job (QueueFull when max_queue wait already);
    ``sink(updates)`` is called on the engine thread after each round with the round's
    updates (a list of (job, text, finish_reason)); ``stop()`` cancels what is left and
    ends the thread. precision: the matmuls' (fp32, bf16 or auto; rustgpt.precision), bf16
    from a bf16 copy of the weights made at load.

    ``state`` is "loading", "ready", "failed" (``error`` says why) or "stopped"."""

    def __init__(self, load: Callable[[], LLM], *, max_batch: int = 16, max_queue: int = 64,
                 threads: int | None = None, metrics: Metrics | None = None,
                 precision: str = "fp32") -> None:
        self._load = load
        self.precision = precision  # the setting; the engine thread resolves it at load
        self._weights = None  # in bf16, the weights' bf16 copy the matmuls read
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.threads = threads
        self.metrics = metrics
        self.model: LLM | None = None
        self.state = "loading"
        self.error = ""
        self._waiting: collections.deque[Job] = collections.deque()
        self._active: list[Job] = []  # job i decodes in cache row i
        self._joining = 0  # jobs taken from the queue, not yet in a row
        self._wake = threading.Condition()
        self._stopping = False
        self._sink: Callable[[list[Update]], None] = lambda updates: None
        self._thread = threading.Thread(target=self._run, name="rustgpt-engine", daemon=True)

    def start(self, sink: Callable[[list[Update]], None]) -> None:
        """Start the engine thread, which loads the model and then decodes."""
        self._sink = sink
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue `job`; raises QueueFull when max_queue jobs wait already."""
        with self._wake:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the queue holds {self.max_queue} requests already")
            self._waiting.append(job)
            self._count()
            self._wake.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Cancel the jobs left (their last update says "cancelled") and end the thread."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self.state != "failed":
            self.state = "stopped"

    @property
    def busy(self) -> int:
        """Jobs decoding, joining or waiting."""
        return len(self._active) + self._joining + len(self._waiting)

    def _count(self) -> None:
        if self.metrics is not None:
            self.metrics.active.set(len(self._active))
            self.metrics.queued.set(len(self._waiting))

    # ---- the engine thread -------------------------------------------------------------

    def _run(self) -> None:
        try:
            if self.threads:
                K.set_local_threads(self.threads)
            self.model = self._load()
            self._weights = decoding_weights(self.model, self.precision, "serve: precision")
            self._cache = self.model.new_cache(self.max_batch)
            self._eos = self.model.tokenizer.eos_id
        except Exception as err:  # a checkpoint that does not load: the server reports it
            log.debug("traceback of the error below", exc_info=True)
            self.error = str(err) if isinstance(err, LlmError) else repr(err)
            self.state = "failed"
            log.error("serve: cannot load the model: %s", self.error)
            self._finish_all("error")
            return
        self.state = "ready"
        log.info("serve: model ready: %s parameters, context %d; up to %d requests at once; "
                 "kernel threads: %d; matmuls in %s", f"{self.model.total_parameters():,}",
                 self.model.config.max_seq_len, self.max_batch, K.get_num_threads(),
                 "fp32" if self._weights is None else "bf16")
        try:
            while self._round():
                pass
        except Exception as err:  # a bug, or memory: every job ends with "error"
            log.exception("serve: the engine stopped: %r", err)
            self.error = repr(err)
            self.state = "failed"
        self._finish_all("cancelled" if self.state != "failed" else "error")

    def _round(self) -> bool:
        """Drop cancelled jobs, prefill waiting ones into free rows, step every row; False
        once stop() was called."""
        with self._wake:
            while not (self._waiting or self._active or self._stopping):
                self._wake.wait()
            if self._stopping:
                return False
            free = self.max_batch - len(self._active)
            joining = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
            self._joining = len(joining)
        updates: list[Update] = []
        for row in reversed(range(len(self._active))):
            if self._active[row].cancelled:
                self._leave(row, "cancelled", updates)
        for job in joining:
            self._join(job, updates)
        self._joining = 0
        if self._active:
            self._step(updates)
        with self._wake:
            self._count()
        if updates:
            self._sink(updates)
        return True

    def _join(self, job: Job, updates: list[Update]) -> None:
        """Prefill `job` into the next free row and sample its first token."""
        if job.cancelled:
            updates.append((job, "", "cancelled"))
            return
        row = len(self._active)
        self._active.append(job)
        job._text = TextStream(self.model.tokenizer)
        with matmuls(self._weights):
            logits = self.model.prefill(self._cache.rows(row, row + 1), [job.prompt_ids])[0]
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(len(job.prompt_ids))
        self._advance(row, logits, updates)

    def _step(self, updates: list[Update]) -> None:
        """One token for every active row, in one batched forward."""
        B = len(self._active)
        ids = np.array([job.context[-1] for job in self._active], np.intc)
        with matmuls(self._weights):
            logits = self.model.step(self._cache.rows(0, B), ids)  # (B, V)
        if self.metrics is not None:
            self.metrics.batch_size.observe(B)
        likeliest = logits.argmax(axis=1).tolist()  # the greedy rows' tokens (ties: first)
        for row in reversed(range(B)):  # a row that leaves takes the last one's place
            self._advance(row, logits[row], updates, likeliest[row])

    def _advance(self, row: int, logits: np.ndarray, updates: list[Update],
                 likeliest: int | None = None) -> None:
        """Sample row's next token from its logits (V,) (`likeliest`, their argmax, when
        given and the job is greedy), send its text, and let the job leave when it is
        done."""
        job = self._active[row]
        token = likeliest if job.greedy and likeliest is not None else \
            sample_next(logits, job.context, job.rng, **job.sampling)
        now = time.perf_counter()
        if self.metrics is not None:
            if job.last_token is None:
                self.metrics.time_to_first_token.observe(now - job.submitted)
            else:
                self.metrics.time_per_token.observe(now - job.last_token)
        job.last_token = now
        if token == self._eos:
            self._leave(row, "stop", updates)
            return
        job.context.append(token)
        job.completion_tokens += 1
        text = job._visible(job._text.push(token), final=False)
        if job.finish_reason is None and job.completion_tokens >= job.max_new:
            job.finish_reason = "length"
        if job.finish_reason is not None:
            self._leave(row, job.finish_reason, updates, text)
        elif text:
            updates.append((job, text, None))

    def _leave(self, row: int, reason: str, updates: list[Update], text: str = "") -> None:
        """Job `row` is done: its last text (what stop strings held back, unless one ended
        it) and why; the last row moves into its place."""
        job = self._active[row]
        if reason in ("stop", "length") and job.finish_reason != "stop":
            text += job._visible(job._text.finish(), final=True)
        job.finish_reason = job.finish_reason or reason
        updates.append((job, text, job.finish_reason))
        if self.metrics is not None:
            self.metrics.completion_tokens.inc(job.completion_tokens)
        last = len(self._active) - 1
        if row != last:
            self._cache.move_row(last, row)
            self._active[row] = self._active[last]
        self._active.pop()

    def _finish_all(self, reason: str) -> None:
        """End every job, active or waiting, with `reason`."""
        with self._wake:
            jobs = self._active + list(self._waiting)
            self._active, self._waiting = [], collections.deque()
            self._count()
        for job in jobs:
            job.finish_reason = reason
            if self.metrics is not None:
                self.metrics.completion_tokens.inc(job.completion_tokens)
        if jobs:
            self._sink([(job, "", reason) for job in jobs])
