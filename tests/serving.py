"""Helpers of the serve tests: tiny models, and the app under a real uvicorn on a free
port in a thread of the test process."""

from __future__ import annotations

import json
import socket
import threading
import time

from rustgpt.config import ModelConfig
from rustgpt.model import LLM
from rustgpt.tokenizer import Vocab

WORDS = [f"w{i}" for i in range(40)] + ["?", ".", "User", "Assistant", ":"]


def tiny_model(max_seq_len: int = 64, never_ends: bool = True, seed: int = 5) -> LLM:
    """A word-tokenizer model (chat-tuned in generation's sense) of random weights.
    never_ends: its end-of-text token never wins (answers run to max_tokens or the
    context), so lengths are known."""
    config = ModelConfig(embedding_dim=32, hidden_dim=48, num_layers=2, num_heads=2,
                         max_seq_len=max_seq_len)
    model = LLM(config, Vocab(WORDS + ["</s>", "<unk>"]), seed=seed)
    if never_ends:
        model.output.b[model.tokenizer.eos_id] = -1e4
    return model


class Running:
    """An app under uvicorn on 127.0.0.1 and a free port, in a thread; ``url``; ``close()``
    stops it (lifespan shutdown included)."""

    def __init__(self, app, ready: bool = True) -> None:
        """Returns once uvicorn listens and (ready) the model is loaded."""
        import uvicorn  # the serve extra's; the engine's tests need only tiny_model

        self.app = app
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d" % self._socket.getsockname()[1]
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run,
                                        kwargs={"sockets": [self._socket]}, daemon=True)
        self._thread.start()
        engine = app.state.rustgpt.engine
        deadline = time.monotonic() + 10
        while not (self.server.started and (engine.state == "ready" or not ready)):
            assert time.monotonic() < deadline, f"the server did not start ({engine.state})"
            time.sleep(0.01)

    def close(self) -> None:
        self.server.should_exit = True
        self._thread.join(10)
        self._socket.close()


def sse(lines) -> tuple[list[dict], bool]:
    """The JSON events of a server-sent-event stream's lines, and whether it ended with
    [DONE]."""
    events, done = [], False
    for line in lines:
        if not line.startswith("data: "):
            assert line == "", f"unexpected line {line!r}"
            continue
        assert not done, "events after [DONE]"
        if line == "data: [DONE]":
            done = True
        else:
            events.append(json.loads(line[6:]))
    return events, done
