"""The decoding engine in a process of its own (``create_app(..., process=True)``, which
``rustgpt-cli serve`` uses).

In one process the engine thread and the event loop take turns under one interpreter lock:
at many streams each token's Python (sampling and detokenizing on one side, its JSON event
on the other) waits for the other side's. Here a child process runs the Engine
(rustgpt.serve.engine) with its own interpreter; the server's process keeps an
EngineProcess, which offers the HTTP side what an Engine does (start, submit, stop, busy,
state, error, and a ``model`` holding the loaded model's config and tokenizer) and
forwards over a pipe:

    server -> child: ("submit", id, prompt ids, max_new, sampling, seed, stop, submitted),
                     ("cancel", id), ("stop",)
    child -> server: ("ready", config, tokenizer dict) or ("failed", error) once loaded;
                     ("updates", [(id, text, finish_reason, completion tokens)], metrics
                     events) after each round; ("log", record) for the child's log records;
                     ("stopped",) last

The child's metrics go back as events (name, method, value) that the server's Metrics
replays, its log records through the server's handlers (text or JSON, as configured). The
child ignores SIGINT and SIGTERM (the server drains, then stops it) and stops when the
server's end of the pipe closes. The model comes from a loader that can be pickled (a
module-level function, or functools.partial of one): the child is spawned, not forked.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
import time
from typing import TYPE_CHECKING, Callable

from rustgpt.serve.engine import Engine, Job, QueueFull

if TYPE_CHECKING:
    from rustgpt.config import ModelConfig
    from rustgpt.model import LLM
    from rustgpt.serve.metrics import Metrics
    from rustgpt.serve.engine import Update

log = logging.getLogger(__name__)


class ModelInfo:
    """What the HTTP side reads of the model the child loaded: its config and tokenizer
    (prompts are tokenized, and answers' limits set, in the server's process)."""

    def __init__(self, config: ModelConfig, tokenizer) -> None:
        self.config, self.tokenizer = config, tokenizer


class EngineProcess:
    """An Engine in a child process, with the Engine's interface for the HTTP side (see the
    module's docstring). The options are the Engine's; max_queue bounds the jobs waiting
    beyond max_batch in flight."""

    def __init__(self, load: Callable[[], LLM], *, max_batch: int = 16, max_queue: int = 64,
                 threads: int | None = None, metrics: Metrics | None = None,
                 precision: str = "fp32") -> None:
        self._load = load
        self.max_batch, self.max_queue, self.threads = max_batch, max_queue, threads
        self.metrics, self.precision = metrics, precision
        self.model: ModelInfo | None = None
        self.state = "loading"
        self.error = ""
        self._jobs: dict[int, Job] = {}  # in flight: submitted, not finished
        self._next_id = 0
        self._send_lock = threading.Lock()
        self._sink: Callable[[list[Update]], None] = lambda updates: None
        self._conn = self._process = self._reader = None

    def start(self, sink: Callable[[list[Update]], None]) -> None:
        """Spawn the child, which loads the model and then decodes; `sink` gets each round's
        updates on the reader thread, as an Engine's sink on its thread."""
        self._sink = sink
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=_child, name="rustgpt-engine", daemon=True,
            args=(child, self._load, self.max_batch, self.max_batch + self.max_queue,
                  self.threads, self.precision, logging.getLogger("rustgpt").getEffectiveLevel()))
        self._process.start()
        child.close()
        self._reader = threading.Thread(target=self._read, name="rustgpt-engine-reader",
                                        daemon=True)
        self._reader.start()

    def submit(self, job: Job) -> None:
        """Send `job` to the child; raises QueueFull when max_batch + max_queue jobs are in
        flight already."""
        if len(self._jobs) >= self.max_batch + self.max_queue:
            raise QueueFull(f"the queue holds {self.max_queue} requests already")
        job_id, self._next_id = self._next_id, self._next_id + 1
        self._jobs[job_id] = job
        job._on_cancel = lambda: self._cancel(job_id)
        self._send(("submit", job_id, job.prompt_ids, job.max_new, job.sampling, job.seed,
                    job.stop, job.submitted))

    def stop(self, timeout: float | None = None) -> None:
        """Stop the child (the jobs left end "cancelled") and wait for it."""
        if self._process is None:
            return
        try:
            self._send(("stop",))
        except OSError:  # the child is gone already
            pass
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join()
        self._reader.join(timeout)
        self._conn.close()
        if self.state != "failed":
            self.state = "stopped"

    @property
    def busy(self) -> int:
        """Jobs in flight."""
        return len(self._jobs)

    def _send(self, message: tuple) -> None:
        with self._send_lock:
            self._conn.send(message)

    def _cancel(self, job_id: int) -> None:
        """Tell the child to drop job `job_id` if it is still in flight."""
        if job_id in self._jobs:
            try:
                self._send(("cancel", job_id))
            except OSError:  # the child is gone: the reader ends every job
                pass

    # ---- the reader thread -------------------------------------------------------------

    def _read(self) -> None:
        """Deliver what the child sends until it stops or exits."""
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "updates":
                self._deliver(message[1], message[2])
            elif kind == "log":
                record = logging.makeLogRecord(message[1])
                logging.getLogger(record.name).handle(record)
            elif kind == "ready":
                from rustgpt.tokenizer import tokenizer_from_dict

                self.model = ModelInfo(message[1], tokenizer_from_dict(message[2]))
                self.state = "ready"
            elif kind == "failed":
                self.error, self.state = message[1], "failed"
            elif kind == "stopped":
                return
        # the child exited without saying "stopped": every job left ends with "error"
        self._process.join(5)
        if self.state != "failed":
            self.error = f"the engine process exited (exit code {self._process.exitcode})"
            self.state = "failed"
            log.error("serve: %s", self.error)
        jobs, self._jobs = list(self._jobs.values()), {}
        for job in jobs:
            job.finish_reason = "error"
        if jobs:
            self._sink([(job, "", "error") for job in jobs])

    def _deliver(self, updates: list[tuple], events: list[tuple]) -> None:
        if self.metrics is not None:
            for name, method, value in events:
                getattr(getattr(self.metrics, name), method)(value)
        out = []
        for job_id, text, reason, completion_tokens in updates:
            job = self._jobs.get(job_id) if reason is None else self._jobs.pop(job_id, None)
            if job is None:
                continue
            job.completion_tokens = completion_tokens
            if reason is not None:
                job.finish_reason = reason
            out.append((job, text, reason))
        if out:
            self._sink(out)


# ---- the child -------------------------------------------------------------------------------

class _Recorder:
    """The Metrics the child's Engine updates: each call becomes an event the server's
    process replays (see EngineProcess._deliver)."""

    class _Metric:
        def __init__(self, recorder: _Recorder, name: str) -> None:
            self.recorder, self.name = recorder, name

        def inc(self, value: float = 1.0) -> None:
            self.recorder.add(self.name, "inc", value)

        def observe(self, value: float) -> None:
            self.recorder.add(self.name, "observe", value)

        def set(self, value: float) -> None:
            self.recorder.add(self.name, "set", value)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[tuple] = []
        for name in ("prompt_tokens", "completion_tokens", "time_to_first_token",
                     "time_per_token", "batch_size", "active", "queued"):
            setattr(self, name, self._Metric(self, name))

    def add(self, name: str, method: str, value: float) -> None:
        with self._lock:
            self._events.append((name, method, value))

    def take(self) -> list[tuple]:
        with self._lock:
            events, self._events = self._events, []
        return events


class _PipeHandler(logging.Handler):
    """Sends the child's log records to the server's process, formatted there."""

    def __init__(self, send: Callable[[tuple], None]) -> None:
        super().__init__()
        self._send = send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = dict(record.__dict__)
            data["msg"], data["args"] = record.getMessage(), None
            if record.exc_info:
                data["exc_text"] = logging.Formatter().formatException(record.exc_info)
            data["exc_info"] = None
            self._send(("log", data))
        except Exception:  # a record that cannot be sent must not stop the engine
            self.handleError(record)


def _child(conn, load: Callable[[], LLM], max_batch: int, max_queue: int,
           threads: int | None, precision: str, level: int) -> None:
    """The engine process: load, decode what the server sends, report back (see the
    module's docstring)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server drains, then says "stop"
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    lock = threading.Lock()

    def send(message: tuple) -> None:
        with lock:
            conn.send(message)

    logger = logging.getLogger("rustgpt")
    logger.handlers = [_PipeHandler(send)]
    logger.setLevel(level)
    logger.propagate = False
    recorder = _Recorder()

    def sink(updates: list[Update]) -> None:  # on the engine thread, after each round
        send(("updates", [(job.id, text, reason, job.completion_tokens)
                          for job, text, reason in updates], recorder.take()))

    engine = Engine(load, max_batch=max_batch, max_queue=max_queue, threads=threads,
                    metrics=recorder, precision=precision)
    engine.start(sink)
    while engine.state == "loading":  # a "stop" may come first (the server is draining)
        if conn.poll(0.005) and conn.recv()[0] == "stop":
            engine.stop()
            send(("stopped",))
            return
    if engine.state != "ready":
        send(("failed", engine.error))
        return
    send(("ready", engine.model.config, engine.model.tokenizer.to_dict()))
    jobs: dict[int, Job] = {}
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the server's process is gone
            break
        if message[0] == "submit":
            job_id, ids, max_new, sampling, seed, stop, submitted = message[1:]
            job = Job(ids, max_new, sampling, seed, stop)
            job.id, job.submitted = job_id, submitted
            jobs[job_id] = job
            engine.submit(job)  # never full: the server bounds the jobs in flight
        elif message[0] == "cancel":
            job = jobs.pop(message[1], None)
            if job is not None:
                job.cancel()
        elif message[0] == "stop":
            break
        if len(jobs) > 4 * (max_batch + max_queue):  # forget the finished ones now and then
            jobs = {i: job for i, job in jobs.items() if job.finish_reason is None}
    engine.stop()
    send(("stopped",))
