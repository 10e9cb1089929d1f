"""rustgpt.serve through a real uvicorn on a free port: httpx and the openai client,
streaming and not, 32 concurrent streams, disconnects, every bad request, the key, the
queue limit, /health and /metrics; and rustgpt-cli serve itself (SIGTERM drain)."""

import concurrent.futures
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from rustgpt.config import Config, GenerationConfig, ModelConfig  # noqa: E402
from rustgpt.errors import SerializationError, ValidationError  # noqa: E402
from rustgpt.generation import chat_prompt, generate  # noqa: E402
from rustgpt.model import LLM  # noqa: E402
from rustgpt.serve import create_app  # noqa: E402
from rustgpt.serve.app import INLINE_TOKENIZE  # noqa: E402
from rustgpt.tokenizer import CharTokenizer  # noqa: E402
from tests.serving import WORDS, Running, sse, tiny_model  # noqa: E402

KEY = "sekrit"
AUTH = {"Authorization": f"Bearer {KEY}"}
T = 64  # the served model's context


@pytest.fixture(scope="module", params=["thread", "process"])
def served(request):
    """The app on the engine thread, and with the engine in a process of its own
    (rustgpt-cli serve's); the model it serves (the process loads its own copy)."""
    model = tiny_model(T)
    load = model if request.param == "thread" else functools.partial(tiny_model, T)
    running = Running(create_app(load, api_key=KEY, max_batch=16, max_queue=64,
                                 process=request.param == "process"))
    yield running, model
    running.close()


@pytest.fixture(scope="module")
def served_in_thread():
    """The app with its engine on a thread of this process, for tests that reach into it."""
    model = tiny_model(T)
    running = Running(create_app(model, api_key=KEY, max_batch=16, max_queue=64))
    yield running, model
    running.close()


@pytest.fixture
def client(served):
    with httpx.Client(base_url=served[0].url, headers=AUTH, timeout=20) as c:
        yield c


def chat(content, **options):
    return {"model": "rustgpt", "messages": [{"role": "user", "content": content}], **options}


def expected_chat(model, content, **options):
    return generate(model, chat_prompt(model, [("user", content)]), raw=True, **options)


def stream(client, path, body):
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return sse(r.iter_lines())


def test_health_page_and_models(served, client):
    running, _ = served
    assert httpx.get(running.url + "/health").json() == {"status": "ok"}  # no key needed
    page = httpx.get(running.url + "/")
    assert page.status_code == 200 and "/v1/chat/completions" in page.text
    assert "<script src" not in page.text and "http" not in page.text.split("<script>")[1]
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["rustgpt"]


def test_completions_equal_generate(served, client):
    _, model = served
    seen = set()  # the responses' ids
    for options in ({}, {"temperature": 0.8, "top_p": 0.9, "seed": 7},
                    {"temperature": 1.2, "top_k": 4, "min_p": 0.05, "repetition_penalty": 1.3,
                     "seed": 1}):
        body = {"model": "rustgpt", "prompt": "w3 w4 w5", "max_tokens": 12, **options}
        out = client.post("/v1/completions", json=body).json()
        assert out["object"] == "text_completion" and out["id"].startswith("cmpl-")
        assert len(out["id"]) == 5 + 24 and out["id"] not in seen
        seen.add(out["id"])
        [choice] = out["choices"]
        expected = generate(model, "w3 w4 w5", raw=True, max_tokens=12, **options)
        assert (choice["text"], choice["finish_reason"]) == (expected, "length"), options
        assert out["usage"] == {"prompt_tokens": 3, "completion_tokens": 12,
                                "total_tokens": 15}
    ids = model.tokenizer.encode("w3 w4 w5")  # a prompt of token ids
    out = client.post("/v1/completions", json={"model": "rustgpt", "prompt": ids,
                                               "max_tokens": 12}).json()
    assert out["choices"][0]["text"] == generate(model, "w3 w4 w5", raw=True, max_tokens=12)


def test_chat_streams_the_answer_in_openai_chunks(served, client):
    _, model = served
    expected = expected_chat(model, "w1 w2?", max_tokens=10)
    whole = client.post("/v1/chat/completions", json=chat("w1 w2?", max_tokens=10)).json()
    assert whole["object"] == "chat.completion"
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": expected}
    events, done = stream(client, "/v1/chat/completions",
                          chat("w1 w2?", max_completion_tokens=10, stream=True,
                               stream_options={"include_usage": True}))
    assert done
    assert {e["object"] for e in events} == {"chat.completion.chunk"}
    assert len({e["id"] for e in events}) == 1
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [e["choices"][0]["delta"].get("content", "") for e in events[1:-1]]
    assert "".join(deltas) == expected and len(deltas) > 3
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 10
    assert all(e["usage"] is None for e in events[:-1])


def test_completion_stream_and_the_context_bound(served, client):
    """A request ends at the model's context: T - P + 1 tokens after a P-token prompt."""
    _, model = served
    prompt = " ".join(WORDS[i % 40] for i in range(T - 5))
    events, done = stream(client, "/v1/completions",
                          {"model": "rustgpt", "prompt": prompt, "max_tokens": 50,
                           "stream": True})
    assert done and events[-1]["choices"][0]["finish_reason"] == "length"
    text = "".join(e["choices"][0]["text"] for e in events)
    assert text == generate(model, prompt, raw=True, max_tokens=6)
    assert len(model.tokenizer.encode(text)) == 6


def test_the_openai_client(served):
    running, model = served
    client = openai.OpenAI(base_url=running.url + "/v1", api_key=KEY)
    answer = client.chat.completions.create(
        model="rustgpt", messages=[{"role": "user", "content": "w9 w8"}], max_tokens=8)
    assert answer.choices[0].message.content == expected_chat(model, "w9 w8", max_tokens=8)
    assert answer.usage.completion_tokens == 8
    pieces = client.chat.completions.create(
        model="rustgpt", messages=[{"role": "user", "content": "w9 w8"}], max_tokens=8,
        stream=True, stream_options={"include_usage": True})
    chunks = list(pieces)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        answer.choices[0].message.content
    assert chunks[-1].usage.total_tokens == answer.usage.total_tokens
    text = client.completions.create(model="rustgpt", prompt="w1", max_tokens=5,
                                     temperature=0.9, seed=3).choices[0].text
    assert text == generate(model, "w1", raw=True, max_tokens=5, temperature=0.9, seed=3)
    streamed = client.completions.create(model="rustgpt", prompt="w1", max_tokens=5,
                                         temperature=0.9, seed=3, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text
    with pytest.raises(openai.BadRequestError, match="tools is not supported"):
        client.chat.completions.create(
            model="rustgpt", messages=[{"role": "user", "content": "w1"}],
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])


def test_32_concurrent_streams_are_all_right(served):
    """32 streams at once (16 decode, 16 wait): each text equals its request alone."""
    running, model = served
    requests = [(" ".join(WORDS[i % 40:i % 40 + 1 + i % 5]),
                 {"temperature": 0.0} if i % 2 else {"temperature": 0.9, "seed": i})
                for i in range(32)]

    def one(i):
        prompt, options = requests[i]
        with httpx.Client(base_url=running.url, headers=AUTH, timeout=30) as c:
            events, done = stream(c, "/v1/completions",
                                  {"model": "rustgpt", "prompt": prompt, "max_tokens": 24,
                                   "stream": True, **options})
        assert done
        return "".join(e["choices"][0]["text"] for e in events)

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        texts = list(pool.map(one, range(32)))
    for (prompt, options), text in zip(requests, texts):
        assert text == generate(model, prompt, raw=True, max_tokens=24, **options)


def test_a_client_that_leaves_frees_its_row_within_a_step(served_in_thread, monkeypatch):
    """Closing the connection mid-stream cancels the job; the engine drops it before its
    next step (at most the step already under way runs with it)."""
    running, model = served_in_thread
    engine = running.app.state.rustgpt.engine
    steps, plain = [], model.step

    def slow_step(cache, ids):  # 5 ms a step: the stream lasts a while
        steps.append([job.cancelled for job in engine._active])
        time.sleep(0.005)
        return plain(cache, ids)

    monkeypatch.setattr(model, "step", slow_step)
    with httpx.Client(base_url=running.url, headers=AUTH, timeout=20) as c:
        with c.stream("POST", "/v1/completions", json={"model": "rustgpt", "prompt": "w1",
                                                       "max_tokens": T, "stream": True}) as r:
            assert next(r.iter_lines()).startswith("data: ")
    deadline = time.monotonic() + 5
    while engine.busy:
        assert time.monotonic() < deadline, "the row was not freed"
        time.sleep(0.001)
    assert sum(cancelled == [True] for cancelled in steps) <= 1, steps
    assert len(steps) < T // 2


BAD = [  # (path, body (bytes: sent raw), status, message fragment, param)
    ("/v1/chat/completions", b"{not json", 400, "not valid JSON", None),
    ("/v1/chat/completions", b"[1, 2]", 400, "the body is an array, expected a JSON object",
     None),
    ("/v1/chat/completions", b"\xff\xfe", 400, "not valid JSON", None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "w1"}]}, 400,
     "model is missing", "model"),
    ("/v1/chat/completions", chat("w1", model="gpt-4"), 404, "model 'gpt-4' does not exist",
     "model"),
    ("/v1/chat/completions", {"model": "rustgpt"}, 400, "messages is missing", "messages"),
    ("/v1/chat/completions", {"model": "rustgpt", "messages": "hi"}, 400,
     "messages is a string, expected an array", "messages"),
    ("/v1/chat/completions", {"model": "rustgpt", "messages": [{"role": "tool",
                                                                "content": "x"}]}, 400,
     "messages[0].role = 'tool' is not supported", "messages[0].role"),
    ("/v1/chat/completions", {"model": "rustgpt", "messages": [{"role": "user"}]}, 400,
     "messages[0].content is null", "messages[0].content"),
    ("/v1/chat/completions", {"model": "rustgpt", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages[0].content[0] is not a text part", "messages[0].content[0]"),
    ("/v1/chat/completions", chat("w1", temperature="hot"), 400,
     "temperature is a string, expected a number", "temperature"),
    ("/v1/chat/completions", chat("w1", max_tokens=1.5), 400,
     "max_tokens is a number, expected an integer", "max_tokens"),
    ("/v1/chat/completions", chat("w1", stream="yes"), 400,
     "stream is a string, expected a boolean", "stream"),
    ("/v1/chat/completions", chat("w1", top_p=2), 400, "top_p = 2, expected a number in (0, 1]",
     "top_p"),
    ("/v1/chat/completions", chat("w1", max_tokens=0), 400, "max_tokens = 0, expected an "
     "integer >= 1", "max_tokens"),
    ("/v1/chat/completions", chat("w1", seed=-1), 400, "seed = -1, expected an integer >= 0",
     "seed"),
    ("/v1/chat/completions", chat("w1", stop=["a", ""]), 400, "expected a non-empty string",
     "stop"),
    ("/v1/chat/completions", chat("w1", n=2), 400, "n = 2 is not supported", "n"),
    ("/v1/chat/completions", chat("w1", logprobs=True), 400, "logprobs is not supported",
     "logprobs"),
    ("/v1/chat/completions", chat("w1", tools=[{"type": "function"}]), 400,
     "tools is not supported", "tools"),
    ("/v1/chat/completions", chat("w1", frobnicate=1), 400, "frobnicate is not supported",
     "frobnicate"),
    ("/v1/chat/completions", chat("w1", stream_options={"include_usage": True}), 400,
     "stream_options needs stream: true", "stream_options"),
    ("/v1/chat/completions", chat(" ".join(["w1"] * 200)), 400,
     "the prompt is 204 tokens, more than the model's context of 64", "messages"),
    ("/v1/completions", {"model": "rustgpt", "prompt": ["w1", "w2"]}, 400,
     "prompt is missing or not a string", "prompt"),
    ("/v1/completions", {"model": "rustgpt", "prompt": [3, 999]}, 400,
     "prompt holds token id 999", "prompt"),
    ("/v1/completions", {"model": "rustgpt", "prompt": ""}, 400, "the prompt is empty",
     "prompt"),
    ("/v1/completions", {"model": "rustgpt", "prompt": "w1", "echo": True}, 400,
     "echo is not supported", "echo"),
]


@pytest.mark.parametrize("path,body,status,message,param", BAD)
def test_bad_requests_get_an_openai_error(client, path, body, status, message, param):
    r = (client.post(path, content=body) if isinstance(body, bytes)
         else client.post(path, json=body))
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["param"] == param
    assert set(error) == {"message", "type", "param", "code"}
    assert "Traceback" not in r.text


def test_bodies_over_1_mb_routes_and_methods(client):
    big = json.dumps(chat("w1 " * 400_000)).encode()
    r = client.post("/v1/chat/completions", content=big)
    assert r.status_code == 413 and "larger than 1048576 bytes" in r.json()["error"]["message"]

    def chunked():  # no Content-Length: counted as it arrives
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]

    assert client.post("/v1/chat/completions", content=chunked()).status_code == 413
    assert client.get("/v1/nothing").json()["error"]["message"] == "GET /v1/nothing: Not Found"
    assert client.get("/v1/completions").status_code == 405


def test_an_internal_error_is_a_500_without_details(served_in_thread, monkeypatch):
    def broken(job):
        raise RuntimeError("secret internals")

    running = served_in_thread[0]
    monkeypatch.setattr(running.app.state.rustgpt.engine, "submit", broken)
    r = httpx.post(running.url + "/v1/chat/completions", headers=AUTH, json=chat("w1"))
    assert r.status_code == 500 and "secret" not in r.text
    assert r.json()["error"]["message"] == "internal error (the server's log has the details)"


def test_neutral_values_of_unsupported_fields_pass(client):
    body = chat("w1", max_tokens=2, n=1, logprobs=False, presence_penalty=0, tools=None,
                user="me", frequency_penalty=0)
    assert client.post("/v1/chat/completions", json=body).status_code == 200


def test_a_conversation_as_the_model_reads_it(served, client):
    """RustGPT's chat model answers the last question alone; a model trained on text reads
    the conversation, its latest messages that fit in half the context."""
    _, model = served
    old = [{"role": "user", "content": "w5 w6"}, {"role": "assistant", "content": "w6 w7"}]
    body = {"model": "rustgpt", "max_tokens": 5,
            "messages": old + [{"role": "user", "content": "w1 w2"}]}
    out = client.post("/v1/chat/completions", json=body).json()
    assert out["usage"]["prompt_tokens"] == len(model.tokenizer.encode("User: w1 w2 Assistant:"))
    text_model = LLM(ModelConfig(embedding_dim=16, hidden_dim=16, num_layers=1,
                                 max_seq_len=80), CharTokenizer("abcdefghiknorstu :?AU"))
    running = Running(create_app(text_model))
    try:
        kept = "Assistant: ok User: hi? Assistant:"  # 35 characters of at most 40
        for size in (40, 2 * INLINE_TOKENIZE):  # tokenized on the event loop, in a thread
            old = [{"role": "user", "content": "a" * size},
                   {"role": "assistant", "content": "ok"}]
            body["messages"] = old + [{"role": "user", "content": "hi?"}]
            out = httpx.post(running.url + "/v1/chat/completions", json=body).json()
            assert out["usage"]["prompt_tokens"] == len(kept), size
    finally:
        running.close()


def test_the_api_key(served):
    running, _ = served
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                    {"Authorization": f"Basic {KEY}"}):
        for method, path in (("GET", "/v1/models"), ("GET", "/metrics"),
                             ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")):
            r = httpx.request(method, running.url + path, headers=headers, json=chat("w1"))
            assert r.status_code == 401, (headers, path)
            assert r.json()["error"]["code"] == "invalid_api_key"
            assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(running.url + "/health").status_code == 200


def sample_value(text, name):
    return float(next(line.split()[-1] for line in text.splitlines()
                      if line.startswith(name + " ")))


def test_metrics(served, client):
    before = client.get("/metrics").text
    client.post("/v1/completions", json={"model": "rustgpt", "prompt": "w1 w2", "max_tokens": 3})
    text = client.get("/metrics").text
    for name, grew in (("rustgpt_completion_tokens_total", 3), ("rustgpt_prompt_tokens_total", 2),
                       ("rustgpt_time_to_first_token_seconds_count", 1),
                       ("rustgpt_time_per_output_token_seconds_count", 2)):
        assert sample_value(text, name) - sample_value(before, name) == grew, name
    for name in ("rustgpt_requests_total{route=\"/v1/completions\",status=\"200\"}",
                 "rustgpt_prompt_tokens_total", "rustgpt_completion_tokens_total",
                 "rustgpt_time_to_first_token_seconds_bucket",
                 "rustgpt_time_per_output_token_seconds_bucket", "rustgpt_active_requests",
                 "rustgpt_queued_requests", "rustgpt_batch_size_bucket"):
        assert name in text, name


def test_health_and_requests_wait_for_the_model():
    loaded = threading.Event()

    def load():  # on the engine thread, while the server already answers
        loaded.wait(10)
        return tiny_model(T)

    running = Running(create_app(load), ready=False)
    try:
        health = httpx.get(running.url + "/health")
        assert health.status_code == 503 and health.json() == {"status": "loading"}
        early = httpx.post(running.url + "/v1/completions", json={"model": "rustgpt",
                                                                   "prompt": "w1"})
        assert early.status_code == 503 and early.json()["error"]["code"] == "server_loading"
        assert early.headers["retry-after"] == "1"
        loaded.set()
        deadline = time.monotonic() + 10
        while httpx.get(running.url + "/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert httpx.post(running.url + "/v1/completions", json={
            "model": "rustgpt", "prompt": "w1", "max_tokens": 2}).status_code == 200
    finally:
        loaded.set()
        running.close()


def test_a_full_queue_answers_429(monkeypatch):
    model = tiny_model(T)
    running = Running(create_app(model, max_batch=1, max_queue=1,
                                 generation=GenerationConfig(max_tokens=40)))
    plain, gate = model.step, threading.Event()
    monkeypatch.setattr(model, "step", lambda c, i: (gate.wait(10), plain(c, i))[1])
    try:
        body = {"model": "rustgpt", "prompt": "w1", "stream": True}
        with httpx.Client(base_url=running.url, timeout=20) as c:
            with c.stream("POST", "/v1/completions", json=body) as first, \
                    c.stream("POST", "/v1/completions", json=body) as second:
                # the first decodes (held at its first step until the gate opens), the
                # second waits in the queue: the third finds it full
                assert first.status_code == second.status_code == 200
                third = httpx.post(running.url + "/v1/completions", json=body)
                assert third.status_code == 429 and third.headers["retry-after"] == "1"
                assert third.json()["error"]["code"] == "queue_full"
                gate.set()
                events, done = sse(second.iter_lines())  # the queued one runs in turn
                assert done and len(events) == 40 + 1  # max_tokens from [generation]
    finally:
        gate.set()
        running.close()


# ---- the engine in a process of its own ---------------------------------------------------

def test_process_needs_a_loader_it_can_pickle():
    for model in (tiny_model(T), lambda: tiny_model(T)):
        with pytest.raises(ValidationError, match="expected a loader that can be pickled"):
            create_app(model, process=True)


def _failing_loader():
    raise SerializationError("model.safetensors: not a checkpoint")


def test_a_process_that_cannot_load_says_why():
    running = Running(create_app(_failing_loader, process=True), ready=False)
    try:
        deadline = time.monotonic() + 20
        while (health := httpx.get(running.url + "/health")).json()["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert health.status_code == 503 and health.json() == {"status": "failed"}
        r = httpx.post(running.url + "/v1/completions", json={"model": "rustgpt", "prompt": "w"})
        assert r.status_code == 503
        assert r.json()["error"]["message"] == ("the server is failed: model.safetensors: not "
                                                "a checkpoint")
    finally:
        running.close()


@pytest.fixture
def slow_process(checkpoint):
    """The slow checkpoint below served with its engine in a process, one row and one
    waiting: a stream of 2,000 tokens lasts seconds."""
    from rustgpt.cli import _load_model

    running = Running(create_app(functools.partial(_load_model, str(checkpoint)), max_batch=1,
                                 max_queue=1, threads=1, process=True))
    yield running
    running.close()


def test_a_process_frees_a_left_row_and_answers_429(slow_process):
    running, body = slow_process, {"model": "rustgpt", "prompt": "w1", "max_tokens": 2000,
                                   "stream": True}
    engine = running.app.state.rustgpt.engine
    with httpx.Client(base_url=running.url, timeout=20) as c:
        with c.stream("POST", "/v1/completions", json=body) as first, \
                c.stream("POST", "/v1/completions", json=body) as second:
            lines = first.iter_lines()  # kept: a dropped iterator closes the stream
            assert next(lines).startswith("data: ")  # decoding; the second waits
            third = httpx.post(running.url + "/v1/completions", json=body)
            assert third.status_code == 429 and third.json()["error"]["code"] == "queue_full"
            assert second.status_code == 200
    deadline = time.monotonic() + 5  # both left: the child drops them
    while engine.busy:
        assert time.monotonic() < deadline, "the rows were not freed"
        time.sleep(0.005)
    text = httpx.get(running.url + "/metrics").text
    assert sample_value(text, "rustgpt_completion_tokens_total") < 1000  # cut short


def test_a_process_that_dies_ends_its_requests(slow_process):
    running = slow_process
    engine = running.app.state.rustgpt.engine
    with httpx.Client(base_url=running.url, timeout=20) as c:
        with c.stream("POST", "/v1/completions", json={
                "model": "rustgpt", "prompt": "w1", "max_tokens": 2000, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            engine._process.kill()
            events, done = sse(lines)
    assert not done and events[-1]["error"]["message"] == "the request ended early (error)"
    health = httpx.get(running.url + "/health")
    assert health.status_code == 503 and health.json() == {"status": "failed"}
    assert engine.error.startswith("the engine process exited (exit code -9)")


# ---- rustgpt-cli serve --------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_without_the_extra_says_what_to_install():
    code = ("import sys; sys.modules['starlette'] = None; from rustgpt.cli import main; "
            "main(['serve'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "error: serve needs starlette, from the serve extra: pip install 'rustgpt[serve]'"]


def test_listening_beyond_loopback_without_a_key_warns(caplog):
    """192.0.2.1 (TEST-NET-1) is no address of this machine: uvicorn cannot bind it and
    stops, after the warning; nothing is sent anywhere."""
    from rustgpt.serve.server import run_server

    with pytest.raises(SystemExit):
        run_server(tiny_model, host="192.0.2.1", port=free_port())
    assert "listening on 192.0.2.1 without an API key" in caplog.text


def test_serve_refuses_a_missing_checkpoint(tmp_path):
    out = subprocess.run([sys.executable, "-m", "rustgpt.cli", "serve", "--checkpoint",
                          str(tmp_path / "none")], capture_output=True, text=True)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [f"error: {tmp_path / 'none'}: no such checkpoint"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint of a model slow enough on one thread (a millisecond or more a token)
    that a stream of 2,000 tokens outlasts a drain of 2 s."""
    from rustgpt.checkpoint import Checkpoint
    from rustgpt.model import LLM

    model = LLM(ModelConfig(embedding_dim=384, hidden_dim=1536, num_layers=6, num_heads=6,
                            max_seq_len=2048), tiny_model().tokenizer)
    model.output.b[model.tokenizer.eos_id] = -1e4
    path = tmp_path_factory.mktemp("serve") / "model.safetensors"
    Checkpoint.from_model(model, Config(model=model.config)).save(path)
    return path


def test_sigterm_drains_and_exits_0(checkpoint):
    """SIGTERM with two streams in flight: new requests get 503 (/health: draining), the
    short stream finishes, the long one is cut at --drain-timeout, exit 0. The key comes
    from RUSTGPT_API_KEY; logs are JSON lines; --precision bf16 reaches the engine."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rustgpt.cli", "serve", "--checkpoint", str(checkpoint),
         "--port", str(port), "--drain-timeout", "2", "--threads", "1",
         "--log-format", "json", "--precision", "bf16"],
        env={**os.environ, "RUSTGPT_API_KEY": KEY}, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "no server"
            time.sleep(0.05)
        results = {}

        def run(name, max_tokens):
            with httpx.Client(base_url=url, headers=AUTH, timeout=20) as c:
                lines = []
                try:
                    with c.stream("POST", "/v1/completions", json={
                            "model": "rustgpt", "prompt": "w1", "max_tokens": max_tokens,
                            "stream": True}) as r:
                        for line in r.iter_lines():
                            lines.append(line)
                except httpx.TransportError:  # cut by the drain timeout
                    pass
                results[name] = sse(lines)

        threads = [threading.Thread(target=run, args=a) for a in (("short", 60),
                                                                    ("long", 2000))]
        for t in threads:
            t.start()
        while "rustgpt_active_requests 2.0" not in httpx.get(url + "/metrics", headers=AUTH).text:
            time.sleep(0.01)
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        drained = httpx.get(url + "/health")
        assert drained.status_code == 503 and drained.json() == {"status": "draining"}
        late = httpx.post(url + "/v1/completions", headers=AUTH,
                          json={"model": "rustgpt", "prompt": "w1"})
        assert late.status_code == 503 and late.json()["error"]["code"] == "server_draining"
        assert proc.wait(10) == 0
        took = time.monotonic() - began
        for t in threads:
            t.join()
        short, short_done = results["short"]
        assert short_done and short[-1]["choices"][0]["finish_reason"] == "length"
        long, long_done = results["long"]
        assert not long_done and len(long) < 2000
        assert 2 <= took < 8
    finally:
        proc.kill()
        stderr = proc.stderr.read()
    records = [json.loads(line) for line in stderr.splitlines()]  # every line is JSON
    assert any(r["logger"] == "rustgpt.serve.access" and r["path"] == "/v1/completions"
               for r in records)
    assert any("matmuls in bf16" in r["message"] for r in records)
