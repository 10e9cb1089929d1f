"""rustgpt-cli serve: the app under uvicorn, logging through rustgpt's handlers, draining
on SIGTERM (no new requests, the in-flight ones finish within the drain timeout, exit 0).
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import time
from typing import Callable

import uvicorn

from rustgpt.config import GenerationConfig
from rustgpt.errors import LlmError
from rustgpt.serve.app import create_app

log = logging.getLogger(__name__)


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, draining on the first SIGTERM or SIGINT: it keeps listening, new
    requests get 503 (/health too, so a load balancer moves on), and it stops once no
    request is in flight or the drain timeout has passed (the rest are then cut). A second
    signal stops it at once. It also stops when the model failed to load."""

    def __init__(self, config: uvicorn.Config, app, drain_timeout: float) -> None:
        super().__init__(config)
        self.rustgpt = app.state.rustgpt
        self.drain_timeout = drain_timeout
        self._deadline = 0.0

    def handle_exit(self, sig, frame) -> None:
        """The first signal starts the drain; a second one is uvicorn's stop, now."""
        if self.rustgpt.draining:
            self.config.timeout_graceful_shutdown = 0
            super().handle_exit(sig, frame)
            return
        self.rustgpt.draining = True
        self._deadline = time.monotonic() + self.drain_timeout
        log.info("serve: draining: %d requests in flight, %g s to finish",
                 self.rustgpt.engine.busy, self.drain_timeout)

    async def on_tick(self, counter: int) -> bool:
        """uvicorn's check, every 0.1 s, whether to stop; and ours: the model failed, or
        a drain is over (what is left of its time bounds uvicorn's own wait for the
        connections to close)."""
        if self.rustgpt.engine.state == "failed":
            return True
        if self.rustgpt.draining:
            left = self._deadline - time.monotonic()
            if self.rustgpt.engine.busy == 0 or left <= 0:
                self.config.timeout_graceful_shutdown = max(left, 0.0)
                return True
        return await super().on_tick(counter)


def _without_colors(record: logging.LogRecord) -> bool:
    """uvicorn's records less their terminal-colored copy of the message (a JSON log would
    carry its escape codes)."""
    record.__dict__.pop("color_message", None)
    return True


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run_server(load: Callable, *, host: str = "127.0.0.1", port: int = 8000,
               api_key: str | None = None, generation: GenerationConfig | None = None,
               max_batch: int = 16, max_queue: int = 64, threads: int | None = None,
               drain_timeout: float = 30.0) -> None:
    """Serve the model `load()` returns (a loader that can be pickled: the engine's own
    process calls it, while /health says "loading") until SIGTERM or SIGINT: create_app's
    options, plus where to listen and how long in-flight requests may take to finish after
    the signal (see _Uvicorn). Returns after the drain; raises LlmError when the model
    cannot be loaded."""
    if api_key is None and not _loopback(host):
        log.warning("serve: listening on %s without an API key: anyone who reaches this "
                    "address can use the model (--api-key or RUSTGPT_API_KEY)", host)
    app = create_app(load, api_key=api_key, generation=generation, max_batch=max_batch,
                     max_queue=max_queue, threads=threads, process=True)
    rustgpt_log = logging.getLogger("rustgpt")
    uvicorn_log = logging.getLogger("uvicorn")  # its startup and shutdown lines, as ours
    uvicorn_log.handlers = list(rustgpt_log.handlers)
    uvicorn_log.setLevel(rustgpt_log.level)
    uvicorn_log.propagate = False
    logging.getLogger("uvicorn.error").addFilter(_without_colors)
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False,
                            lifespan="on")
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        _Uvicorn(config, app, drain_timeout).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    engine = app.state.rustgpt.engine
    if engine.state == "failed":
        raise LlmError(engine.error)
