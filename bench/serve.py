"""Serving benchmark: aggregate tokens/s and time to first token (p50, p99) of
`rustgpt-cli serve` at 1, 4, 16 and 64 concurrent streams, for the default model and a
d512/L6 one (random weights, end-of-text suppressed, so every request decodes its
max_tokens).

    python bench/serve.py                  # both models, the table in markdown
    python bench/serve.py --model default --streams 1 16
    python bench/serve.py --engine         # the engine alone, no HTTP

The server runs as its own process (the real CLI with its defaults: --max-batch 16,
--max-queue 64, --threads; logging at WARNING); the clients are asyncio streams in this
process, each sending its requests one after another (POST /v1/completions, stream: true)
on a connection it keeps alive between them, as HTTP clients (OpenAI's among them) do.
TTFT is from sending a request to its first token's chunk; tokens/s counts every
completion token over the wall time of the level. Each level is warmed up at its own
concurrency first, then run --repeats times; the best run is reported. The clients share
the machine's cores with the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from rustgpt.checkpoint import Checkpoint
from rustgpt.config import Config, ModelConfig
from rustgpt.data import BUNDLED_CHAT, BUNDLED_PRETRAINING, Dataset
from rustgpt.model import LLM
from rustgpt.tokenizer import Vocab

MODELS = {  # name -> (ModelConfig, prompt words, max_tokens)
    "default": (ModelConfig(), 10, 64),
    "d512/L6": (ModelConfig(embedding_dim=512, hidden_dim=2048, num_layers=6, num_heads=8,
                            max_seq_len=256), 10, 64),
}
STREAMS = (1, 4, 16, 64)
PROMPT = "the sun rises in the east and sets in the west"


def checkpoint(name: str, directory: Path) -> Path:
    """A checkpoint of model `name` with the bundled data's vocabulary and random weights,
    its end-of-text token never chosen."""
    config = MODELS[name][0]
    vocab = Vocab.from_texts(Dataset.load(BUNDLED_PRETRAINING).examples
                             + Dataset.load(BUNDLED_CHAT).examples)
    model = LLM(config, vocab, seed=0)
    model.output.b[vocab.eos_id] = -1e4
    path = directory / f"{name.replace('/', '-')}.safetensors"
    Checkpoint.from_model(model, Config(model=config)).save(path)
    return path


class Server:
    """`rustgpt-cli serve` on a free port, as a process."""

    def __init__(self, path: Path, threads: int | None, max_batch: int) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rustgpt.cli", "serve", "--checkpoint", str(path),
             "--port", str(port), "--max-batch", str(max_batch), "--log-level", "WARNING"]
            + (["--threads", str(threads)] if threads else []))
        import httpx

        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("the server did not start")
            time.sleep(0.1)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


async def _stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str,
                  max_tokens: int) -> tuple[float, int]:
    """One request on a stream's kept-alive connection: (seconds to its first token,
    completion tokens). A plain asyncio client (HTTP/1.1, chunked SSE read line by line):
    an HTTP library would take much of the two cores the server runs on."""
    body = json.dumps({"model": "rustgpt", "prompt": PROMPT, "max_tokens": max_tokens,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()
    began, first, tokens = time.perf_counter(), None, 0
    writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: %s\r\ncontent-type: "
                 b"application/json\r\ncontent-length: %d\r\n\r\n%s"
                 % (host.encode(), len(body), body))
    status = await reader.readline()
    if b" 200 " not in status:
        raise RuntimeError(f"the server answered {status!r}")
    while (line := await reader.readline()) != b"0\r\n":  # the last chunk, empty
        if not line:
            raise RuntimeError("the server closed the connection mid-response")
        if line.startswith(b"data: {"):
            if first is None:
                first = time.perf_counter() - began
            if b'"usage": {' in line:
                tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    await reader.readline()  # the blank line that ends the response
    return first, tokens


async def _level(url: str, streams: int, requests: int, max_tokens: int,
                 repeats: int) -> dict:
    """`requests` requests, `streams` at a time, `repeats` times after a warm-up at the
    same concurrency: the run of the most tokens/s (the others had more interference
    from the rest of the machine)."""
    host, port = url.removeprefix("http://").split(":")

    async def run(requests: int, max_tokens: int) -> dict:
        ttft, tokens = [], 0

        async def worker(n):
            nonlocal tokens
            reader, writer = await asyncio.open_connection(host, int(port))
            try:
                for _ in range(n):
                    first, count = await _stream(reader, writer, host, max_tokens)
                    ttft.append(first)
                    tokens += count
            finally:
                writer.close()

        began = time.perf_counter()
        await asyncio.gather(*(worker(requests // streams) for _ in range(streams)))
        seconds = time.perf_counter() - began
        return {"streams": streams, "requests": len(ttft), "tokens": tokens,
                "seconds": seconds, "tokens_per_s": tokens / seconds,
                "ttft_p50_ms": 1e3 * float(np.percentile(ttft, 50)),
                "ttft_p99_ms": 1e3 * float(np.percentile(ttft, 99))}

    # warm: rows join and leave at this concurrency, so the decoding steps of every batch
    # size up to `streams` have run (their workspaces reached their shapes) before timing
    await run(streams, 8)
    return max([await run(requests, max_tokens) for _ in range(repeats)],
               key=lambda r: r["tokens_per_s"])


def measure(name: str, streams=STREAMS, threads: int | None = None, max_batch: int = 16,
            rounds: int = 4, repeats: int = 3) -> list[dict]:
    """One row per concurrency level: each stream sends `rounds` requests (at least 16
    in all per level); the best of `repeats` such runs (see _level)."""
    max_tokens = MODELS[name][2]
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(checkpoint(name, Path(tmp)), threads, max_batch)
        try:
            return [{"model": name, **asyncio.run(_level(
                server.url, n, max(rounds * n, 16 // n * n), max_tokens, repeats))}
                for n in streams]
        finally:
            server.close()


def _engine_level(model: LLM, n: int, jobs: int, max_tokens: int) -> float:
    """Seconds the engine takes for `jobs` greedy jobs, n at a time."""
    import threading

    from rustgpt.serve.engine import Engine, Job

    ids = model.tokenizer.encode(PROMPT)
    greedy = dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0)
    engine = Engine(lambda: model, max_batch=min(n, 16), max_queue=jobs)  # n at once
    ended, done = threading.Event(), []

    def sink(updates):
        done.extend(job for job, _, reason in updates if reason)
        if len(done) == jobs:
            ended.set()

    for _ in range(jobs):
        engine.submit(Job(ids, max_tokens, dict(greedy)))
    began = time.perf_counter()
    engine.start(sink)
    ended.wait()
    seconds = time.perf_counter() - began
    engine.stop()
    return seconds


def engine_only(name: str, streams=STREAMS, threads: int = 1) -> list[dict]:
    """The same workload on the engine alone, in this process, no HTTP: what batching
    gives before the server's per-token Python (the event loop, JSON) shares the
    interpreter. TTFT is not measured (a level's jobs are all queued at its start)."""
    from rustgpt import _kernels as K

    K.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        model = Checkpoint.load(checkpoint(name, Path(tmp))).build_model()
    max_tokens = MODELS[name][2]
    _engine_level(model, 16, 16, 4)  # warm: the workspaces reach their shapes
    rows = []
    for n in streams:
        jobs = max(4 * n, 16)
        seconds = _engine_level(model, n, jobs, max_tokens)
        rows.append({"model": name, "streams": n, "tokens": jobs * max_tokens,
                     "seconds": seconds, "tokens_per_s": jobs * max_tokens / seconds,
                     "ttft_p50_ms": float("nan"), "ttft_p99_ms": float("nan")})
    return rows


def table(rows: list[dict]) -> str:
    """The rows as a markdown table, with each level's speed-up over one stream."""
    one = {r["model"]: r["tokens_per_s"] for r in rows if r["streams"] == 1}
    lines = ["| model | streams | tokens/s | vs 1 stream | TTFT p50 | TTFT p99 |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        gain = r["tokens_per_s"] / one[r["model"]] if r["model"] in one else float("nan")
        ttft = [f"{r[k]:.1f} ms" if r[k] == r[k] else "-" for k in ("ttft_p50_ms",
                                                                    "ttft_p99_ms")]
        lines.append(f"| {r['model']} | {r['streams']} | {r['tokens_per_s']:,.0f} | "
                     f"{gain:.1f}x | {ttft[0]} | {ttft[1]} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=list(MODELS), action="append")
    parser.add_argument("--streams", type=int, nargs="+", default=list(STREAMS))
    parser.add_argument("--threads", type=int, help="server kernel threads (default: "
                        "rustgpt-cli serve's)")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4, help="requests per stream")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each level, after a warm-up at its concurrency: the "
                             "best is reported")
    parser.add_argument("--engine", action="store_true",
                        help="the engine alone, in this process, without HTTP")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    rows = []
    for name in args.model or list(MODELS):
        rows += (engine_only(name, args.streams, args.threads or 1) if args.engine else
                 measure(name, args.streams, args.threads, args.max_batch, args.rounds,
                         args.repeats))
    print(json.dumps(rows, indent=1) if args.json else table(rows))
    print(f"\n{os.cpu_count()} logical CPUs, server --threads {args.threads or 'default'}, "
          f"--max-batch {args.max_batch}", file=sys.stderr)


if __name__ == "__main__":
    main()
