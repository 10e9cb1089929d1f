"""rustgpt side by side with the same model in PyTorch (bench/torch_port.py) and in float32
numpy (bench/numpy_model.py): every workload of the performance targets, one markdown table.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/compare.py [--quick] [--full] [--threads 2]
        [--only a,b,...]

Workloads: (a) RustGPT's schedule step (batch 1, bundled data), (b)-(d) training steps of
larger shapes, also in bf16 (rustgpt's --precision bf16 beside PyTorch's autocast), (e)
generating 64 tokens, (f) sgemm vs numpy's BLAS, (g) thread scaling;
then peak memory of `rustgpt-cli train`, import and CLI start-up times. `--full` adds
(a-full), the whole RustGPT schedule: rustgpt's Trainer vs the same loop on the PyTorch port,
and (own-text) nanoGPT's CPU shakespeare_char recipe on about 1 MB of Shakespeare
(bench/corpus.py): `rustgpt-cli train --text` vs the port's nanoGPT loop, whole processes,
in fp32 and in the bf16 columns (--precision bf16; the port under autocast).
Rows of one workload are timed round-robin (best of the rounds), each round once the CPU
is free of other processes (see Settle), so such load hits every column alike. A training
row that misses its target gets a footnote: the time the target allows a step, against
the step's kernel calls each timed alone (kernel_floor).

Threads: rustgpt and torch through set_num_threads; numpy's OpenBLAS through threadpoolctl
when installed, else the script restarts itself with OPENBLAS_NUM_THREADS = --threads.
bench/test_bench_model.py reuses the workload builders below.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `bench` and `rustgpt` importable alike
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import rustgpt  # noqa: E402
from rustgpt import _kernels as K  # noqa: E402
from rustgpt.config import Config, ModelConfig, TrainingConfig  # noqa: E402
from rustgpt.data import BUNDLED_CHAT, BUNDLED_PRETRAINING, Dataset, make_batch  # noqa: E402
from rustgpt.generation import stream  # noqa: E402
from rustgpt.model import LLM  # noqa: E402
from rustgpt.step import SMALL_STEP_TOKENS, TrainStep  # noqa: E402
from rustgpt.optim import Adam  # noqa: E402
from rustgpt.precision import FAST_BF16  # noqa: E402
from rustgpt.tokenizer import Vocab  # noqa: E402
from rustgpt.training import Trainer, rustgpt_phases  # noqa: E402

from bench.numpy_model import NumpyGPT  # noqa: E402
from bench.test_bench_adam import numpy_adam  # noqa: E402
from bench.test_bench_attention import numpy_backward as numpy_attention_backward  # noqa: E402
from bench.test_bench_attention import numpy_forward as numpy_attention_forward  # noqa: E402

try:
    import torch
except ImportError:
    torch = None

FRAMEWORKS = ("rustgpt", "torch", "numpy")
# the bf16 columns: rustgpt with precision bf16, PyTorch under torch.autocast("cpu", bf16);
# rows BF16_ROWS only
BF16_FRAMEWORKS = ("rustgpt bf16", "torch bf16")
BF16_ROWS = ("b", "c", "d")
# (bf16 path, row) -> (least rustgpt bf16 / rustgpt fp32, least rustgpt bf16 / torch bf16)
BF16_TARGETS = {("amx", "c"): (2.5, 1.2), ("amx", "d"): (2.5, 1.2),
                ("avx512bf16", "d"): (1.4, None)}
WORKLOADS = ("a", "b", "c", "d", "e", "f", "k", "g", "a-full", "own-text",
             "footprint")  # in table order
LONG_WORKLOADS = ("a-full", "own-text")  # minutes each: only with --full (or --only)
DEFAULT_THREADS = 2  # every side-by-side row runs at this many threads unless told otherwise
VOCAB_SIZE = 763  # the bundled data's vocabulary
FLOOR_ROUNDS = 15  # kernel_floor's repeats of each call


@dataclass(frozen=True)
class Shape:
    """A synthetic training workload: model sizes and a (B, T) batch."""

    D: int
    H: int
    L: int
    NH: int
    T: int
    B: int

    @property
    def label(self) -> str:
        return f"d{self.D}/h{self.H}/L{self.L}/T{self.T}/B{self.B}, {self.NH} head" + \
            ("s" if self.NH > 1 else "")

    def config(self) -> ModelConfig:
        return ModelConfig(embedding_dim=self.D, hidden_dim=self.H, num_layers=self.L,
                           num_heads=self.NH, max_seq_len=self.T)


SHAPES = {"b": Shape(128, 256, 3, 1, 64, 16), "c": Shape(256, 1024, 4, 4, 128, 16),
          "d": Shape(512, 2048, 6, 8, 256, 8)}
# (M, K, N, trans_b): 1024^3, then the model's shapes; the last is the backward's dx = dy W^T
GEMM_SHAPES = [(1024, 1024, 1024, False), (80, 128, 128, False), (80, 128, 256, False),
               (1024, 128, 512, False), (1024, 512, 2048, False), (1024, 512, 2048, True)]
GEN_TOKENS = 64
GEN_PROMPT = "How do mountains form?"  # "User: " + 5 words + "?" = 7 tokens; + 64 < 80
TARGETS = {"a": 5.0, "b": 2.0, "c": 1.5, "d": 1.0, "e": 3.0, "f": 0.85, "f-model": 1.0, "g": 1.8,
           "own-text": 1.5}
# nanoGPT's CPU shakespeare_char recipe (issue 18) as options of `rustgpt-cli train --text
# CORPUS --tokenizer char --arch gpt --schedule cosine`; the PyTorch port's loop (python -m
# bench.torch_port own-text) takes them by the same names
OWN_TEXT = {"num-layers": 4, "num-heads": 4, "embedding-dim": 128, "hidden-dim": 512,
            "max-seq-len": 64, "batch-size": 12, "max-iters": 2000, "pretraining-lr": 1e-3,
            "warmup-steps": 100, "weight-decay": 0.1, "beta2": 0.99, "max-grad-norm": 1.0,
            "eval-interval": 250, "eval-iters": 20}
# rustgpt's final val loss may exceed the port's by this much, and rustgpt bf16's its fp32's
OWN_TEXT_LOSS_MARGIN = 0.02
OWN_TEXT_LOAD = 0.05  # other processes' CPU seconds per second of a run that mark it loaded


# ---- threads ---------------------------------------------------------------------------------

def set_threads(n: int) -> None:
    """rustgpt and torch at `n` threads. Both call omp_set_num_threads: in one process they
    share the OpenMP runtime, so always set both."""
    rustgpt.set_num_threads(n)
    if torch is not None:
        torch.set_num_threads(n)


def limit_threads(n: int) -> tuple[Callable[[], None], str]:
    """rustgpt, torch and numpy's BLAS at `n` threads (BLAS through threadpoolctl if it is
    installed, else as the environment says). Returns (restore, a note for the header)."""
    before = rustgpt.get_num_threads(), torch.get_num_threads() if torch is not None else None
    set_threads(n)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        limits = None
        env = {k: os.environ[k] for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS") if k in os.environ}
        note = (f"numpy's BLAS threads from the environment ({env or 'unset: one per core'}; "
                f"threadpoolctl not installed)")
    else:
        limits = threadpool_limits(n, user_api="blas")
        note = f"numpy's BLAS at {n} threads through threadpoolctl"

    def restore() -> None:
        rustgpt.set_num_threads(before[0])
        if torch is not None:
            torch.set_num_threads(before[1])
        if limits is not None:
            limits.restore_original_limits()

    return restore, note


# ---- workload builders (also used by test_bench_model.py) -------------------------------------

def synthetic_vocab() -> Vocab:
    return Vocab([f"w{i}" for i in range(VOCAB_SIZE - 2)] + ["</s>", "<unk>"])


def synthetic_steps(shape: Shape) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """One (inputs, targets, lr) batch of random ids, (B, T) each."""
    ids = np.random.default_rng(0).integers(0, VOCAB_SIZE, (shape.B, shape.T + 1)).astype(np.intc)
    return [(np.ascontiguousarray(ids[:, :-1]), np.ascontiguousarray(ids[:, 1:]), 1e-4)]


def bundled_data() -> tuple[Dataset, Dataset, Vocab]:
    pre, chat = Dataset.load(BUNDLED_PRETRAINING), Dataset.load(BUNDLED_CHAT)
    return pre, chat, Vocab.from_texts(pre.examples + chat.examples)


def schedule_steps(vocab: Vocab, pre: Dataset, chat: Dataset):
    """RustGPT's schedule at batch 1, one epoch of each phase: pretraining (lr 5e-4), then
    instruction tuning (lr 1e-4), examples in file order; (inputs, targets, lr) each."""
    phases = rustgpt_phases(TrainingConfig(), vocab, ModelConfig().max_seq_len, pre, chat)
    return [(*make_batch([seq]), phase.lr) for phase in phases for seq in phase.sequences]


def count_tokens(steps) -> int:
    """Predicted (non-padding) tokens of a list of steps."""
    return sum(int(np.count_nonzero(targets >= 0)) for _, targets, _ in steps)


def training_flops(config: ModelConfig, vocab_size: int, steps) -> float:
    """FLOPs (two per multiply-add) of the model's training steps on `steps`: every
    position of each (B, T) batch, padding included, through each weight matrix three times
    (forward, input gradient, weight gradient: the queries, keys and values, attention's
    output projection when the model has one, the feed-forward's two and the output layer,
    tied or not) and through causal attention's six products
    of T (T + 1) / 2 pairs (scores and mix forward; their four gradients backward). Layer
    norms, softmax, biases and Adam are left out: they move memory more than they compute,
    and every framework does them alike. PyTorch's step does the same arithmetic, so
    GFLOP/s = this / seconds compares the frameworks and shows how near a target lies to
    what the machine's matmuls reach (row f)."""
    D, H, L = config.embedding_dim, config.hidden_dim, config.num_layers
    projections = 4 if config.attention_projection else 3  # q, k, v (and attention's output)
    weights = L * (projections * D * D + 2 * D * H) + D * vocab_size
    total = 0.0
    for inputs, _, _ in steps:
        B, T = inputs.shape
        total += 2.0 * 3 * weights * B * T + 2.0 * 6 * L * B * T * (T + 1) / 2 * D
    return total


def kernel_floor(config: ModelConfig, vocab: Vocab, steps, rounds: int = FLOOR_ROUNDS) -> dict:
    """A floor under rustgpt's time for `steps`: each kernel call of each step (run layer
    by layer, by a fresh model of its own so that no recorded plan skips the Python, with
    every `_kernels` function wrapped to note its calls), repeated alone on the step's own
    arrays, its best of `rounds` taken, summed by kind in seconds: "matmul" (sgemm,
    sgemm_many), "attention", and "other" (layer norms, cross-entropy, adds, column sums,
    embeddings); "calls" counts them. Adam's update and the Python between calls are
    left out. A call alone has its operands warm in cache, as it rarely has in a step, so
    for steps of more than SMALL_STEP_TOKENS tokens whose calls run one after another on
    all the threads, a target needing less time than this cannot be met by better
    scheduling of the same calls, only by faster kernels. (Smaller steps run as two streams
    of calls side by side, and larger ones of an even number of rows from SPLIT_MIN_TOKENS
    on as two halves of the batch side by side, each call on one thread: other calls, which
    may beat this sum.)"""
    kernels = {name: fn for name, fn in vars(K).items()  # not the scratch's size: no kernel
               if not name.startswith("_") and name != "attention_scratch_shape"
               and callable(fn) and not isinstance(fn, type)}
    calls = []

    def noted(name, fn):
        def call(*args, **kwargs):
            calls.append((name, fn, args, kwargs))
            return fn(*args, **kwargs)
        return call

    for name, fn in kernels.items():
        setattr(K, name, noted(name, fn))
    try:
        for inputs, targets, _ in steps:
            LLM(config, vocab, seed=0).loss_and_backward(inputs, targets)
    finally:
        for name, fn in kernels.items():
            setattr(K, name, fn)
    floor = {"matmul": 0.0, "attention": 0.0, "other": 0.0, "calls": len(calls)}
    for name, fn, args, kwargs in calls:
        best = math.inf
        for _ in range(rounds):
            start = time.perf_counter()
            fn(*args, **kwargs)
            best = min(best, time.perf_counter() - start)
        kind = ("matmul" if name.startswith("sgemm") else
                "attention" if name.startswith("attention") else "other")
        floor[kind] += best
    return floor


def training_runs(framework: str, config: ModelConfig, vocab: Vocab, chunks) -> list[Callable]:
    """One function per chunk of steps (each step loss, backward, clip 5.0, Adam; rustgpt's
    Adam deferred to the next step's forward as its Trainer does, the chunk's last applied
    at its end), all training `framework`'s copy of one freshly initialised rustgpt model
    (seed 0). Frameworks: FRAMEWORKS, and BF16_FRAMEWORKS (rustgpt's TrainStep in bf16,
    the PyTorch port under autocast)."""
    model = LLM(config, vocab, seed=0)
    convert = np.ascontiguousarray  # ids as each framework takes them
    if framework in ("rustgpt", "rustgpt bf16"):
        train = TrainStep(model, Adam(model.params),
                          precision="bf16" if framework.endswith("bf16") else "fp32")

        def step(inputs, targets, lr):  # as the Trainer: each update beside the next forward
            train.run([(inputs, targets)], lr, defer=True)
    elif framework in ("torch", "torch bf16"):
        from bench.torch_port import from_rustgpt

        port = from_rustgpt(model)
        port.make_optimizer()

        def step(inputs, targets, lr):
            port.train_step(inputs, targets, lr, autocast=framework.endswith("bf16"))

        def convert(ids):
            return torch.from_numpy(ids).long()
    else:
        step = NumpyGPT.from_rustgpt(model).train_step

    def make(chunk):
        chunk = [(convert(x), convert(y), lr) for x, y, lr in chunk]

        def run() -> None:
            for inputs, targets, lr in chunk:
                step(inputs, targets, lr)
            model.settle()  # rustgpt's last update of the chunk
        return run

    return [make(chunk) for chunk in chunks]


def training_run(framework: str, config: ModelConfig, vocab: Vocab, steps) -> Callable[[], None]:
    """A function running all `steps` (see training_runs)."""
    return training_runs(framework, config, vocab, [steps])[0]


def generation_model(vocab: Vocab) -> LLM:
    """RustGPT's default model (seed 0) whose </s> logit is pushed down, so every run
    decodes GEN_TOKENS tokens instead of stopping early on random weights."""
    model = LLM(ModelConfig(), vocab, seed=0)
    model.output.b[vocab.eos_id] = -30.0
    return model


def generation_run(kind: str, model: LLM) -> Callable[[], int]:
    """Generate GEN_TOKENS tokens; kind is "rustgpt" (greedy, KV cache), "rustgpt top-p"
    (temperature 1, top_p 0.9, KV cache), "rustgpt bf16" (greedy, KV cache, matmuls in
    bf16 from the weights' bf16 copy), "torch" or "numpy" (greedy, no cache).
    The function returns how many tokens it decoded."""
    if kind.startswith("rustgpt"):
        options = {"rustgpt top-p": dict(temperature=1.0, top_p=0.9, seed=0),
                   "rustgpt bf16": dict(precision="bf16")}.get(kind, {})
        return lambda: sum(1 for _ in stream(model, GEN_PROMPT, max_tokens=GEN_TOKENS, **options))
    ids = model.tokenizer.encode("User: " + GEN_PROMPT)
    if kind == "torch":
        from bench.torch_port import from_rustgpt

        net = from_rustgpt(model)
    else:
        net = NumpyGPT.from_rustgpt(model)
    return lambda: len(net.generate_no_cache(ids, GEN_TOKENS))


def gemm_run(framework: str, M: int, K_: int, N: int, trans_b: bool) -> Callable[[], None]:
    """C = A op(B) at (M, K) x (K, N) in float32."""
    rng = np.random.default_rng(0)
    A = rng.standard_normal((M, K_), np.float32)
    B = rng.standard_normal((N, K_) if trans_b else (K_, N), np.float32)
    C = np.empty((M, N), np.float32)
    if framework == "rustgpt":
        return lambda: K.sgemm(C, A, B, trans_b=trans_b)
    if framework == "torch":
        At, Bt, Ct = torch.from_numpy(A), torch.from_numpy(B), torch.from_numpy(C)
        Bop = Bt.T if trans_b else Bt
        return lambda: torch.mm(At, Bop, out=Ct)
    Bop = B.T if trans_b else B
    return lambda: np.matmul(A, Bop, out=C)


# ---- timing ----------------------------------------------------------------------------------

# Seconds to wait when the timed calls pass from one framework to another: an idle thread
# pool spins on a core for a while after its last call (numpy's OpenBLAS for about 70 ms,
# 2^28 cycles), and during that time a 2-thread step of the next framework waits a
# scheduler tick (about 4 ms) each time its other thread is not running.
HANDOFF_PAUSE = 0.25


def _framework(name) -> str:
    """The framework of a function of measure(): its name, or the first item of it."""
    return name[0] if isinstance(name, tuple) else name


def measure(fns: dict, budget: float, max_rounds: int, min_sample: float = 0.02,
            settle: Callable[[], bool] | None = None) -> tuple[dict, bool]:
    """Best seconds per call of each function, and whether the machine stayed busy.

    One warm-up call each, then rounds that call every function in turn: two, then more
    until `budget` seconds or `max_rounds`. A function whose warm-up alone took more than
    half the budget keeps that time (rounds of it would not fit); fast ones repeat within a
    sample to last at least `min_sample` seconds. `settle()`, called before the warm-up and each round,
    waits for other processes to leave the CPU and returns False if they did not. Where the
    calls pass from one framework to another, HANDOFF_PAUSE seconds go by first (not counted
    in the budget)."""
    quiet = settle() if settle else True
    first, number = {}, {}
    previous, paused = None, 0.0

    def handoff(name) -> None:
        nonlocal previous, paused
        if previous is not None and _framework(name) != _framework(previous):
            time.sleep(HANDOFF_PAUSE)
            paused += HANDOFF_PAUSE
        previous = name

    for name, fn in fns.items():
        handoff(name)
        start = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - start
        number[name] = max(1, math.ceil(min_sample / max(first[name], 1e-9)))
    best = {name: t for name, t in first.items() if t > budget / 2}
    rounds = [name for name in fns if name not in best]
    samples: dict = {name: [] for name in rounds}
    start, paused = time.perf_counter(), 0.0
    for r in range(max_rounds if rounds else 0):
        round_cost = sum(min(samples[n] or [first[n]]) * number[n] for n in rounds)
        if r >= 2 and time.perf_counter() - start - paused + round_cost > budget:
            break
        if settle:
            quiet = settle() and quiet
        for name in rounds:
            handoff(name)
            fn, n = fns[name], number[name]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - t0) / n)
    best.update({name: min(s) for name, s in samples.items()})
    return best, not quiet


class Settle:
    """Waits, before a round, until no other process holds the CPU (the machine may be
    shared): a tiny 2-thread sgemm that takes ~20 us when the cores are free takes
    milliseconds while another process runs, since each OpenMP barrier then waits for a
    time slice. Waits at most `max_wait` seconds per call."""

    PROBE_LIMIT = 5e-4  # seconds: the probe's median above this means the CPU is taken

    def __init__(self, threads: int, max_wait: float) -> None:
        self.threads, self.max_wait = max(threads, 2), max_wait
        self.A = np.ones((80, 128), np.float32)
        self.B = np.ones((128, 128), np.float32)
        self.C = np.empty((80, 128), np.float32)
        self.waited = 0.0

    def busy(self) -> bool:
        before = rustgpt.get_num_threads()
        rustgpt.set_num_threads(self.threads)
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            K.sgemm(self.C, self.A, self.B)
            times.append(time.perf_counter() - t0)
        rustgpt.set_num_threads(before)
        return sorted(times)[3] > self.PROBE_LIMIT

    def __call__(self) -> bool:
        start = time.perf_counter()
        while self.busy():
            if time.perf_counter() - start > self.max_wait:
                self.waited += time.perf_counter() - start
                return False
            time.sleep(0.25)
        self.waited += time.perf_counter() - start
        return True


# ---- the report ------------------------------------------------------------------------------

@dataclass
class Row:
    workload: str
    cells: dict  # framework -> text
    ratio: str = "—"
    target: str = ""
    busy: bool = False  # other processes held the CPU during some round
    note: str = ""  # a footnote under the table (what bounds a missed target)


def _verdict(value: float, target: float, base: str) -> str:
    return f">= {target:g}x {base}: {value:.2f}x, {'met' if value >= target else 'MISSED'}"


def _loss_verdict(words: str, gap: float | None) -> str:
    """An own-text val-loss target, `words` + OWN_TEXT_LOSS_MARGIN; with `gap` (a side's
    final val loss less its base's), whether it is met."""
    text = f"{words} + {OWN_TEXT_LOSS_MARGIN:g}"
    if gap is None:
        return text
    return text + f": {gap:+.4f}, {'met' if gap <= OWN_TEXT_LOSS_MARGIN else 'MISSED'}"


def _bf16_verdict(key: str, rate: dict) -> str:
    """A training row's bf16 ratios of `rate` (framework -> work per second: rustgpt bf16
    against rustgpt fp32 and against PyTorch's autocast) and, where this CPU's bf16 path
    has them, their targets; a row with targets on other paths only says so."""
    path = K.kernels_info()["bf16"]
    own = rate["rustgpt bf16"] / rate["rustgpt"]
    theirs = rate["rustgpt bf16"] / rate["torch bf16"] if "torch bf16" in rate else None
    text = f"bf16 ({path} path): {own:.2f}x rustgpt fp32" + \
        (f", {theirs:.2f}x PyTorch autocast" if theirs is not None else "")
    least_own, least_theirs = BF16_TARGETS.get((path, key), (None, None))
    verdicts = [_verdict(own, least_own, "rustgpt fp32")] if least_own else []
    if least_theirs and theirs is not None:
        verdicts.append(_verdict(theirs, least_theirs, "PyTorch autocast"))
    if verdicts:
        return text + " — " + "; ".join(verdicts)
    return text + (" (targets are set for AMX and AVX512-BF16)"
                   if any(row == key for _, row in BF16_TARGETS) else "")


def _rate(value: float, unit: str) -> str:
    return f"{value:,.0f} {unit}" if value >= 100 else f"{value:,.1f} {unit}"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _cells(cells: dict) -> dict:
    """Every column's text; missing ones are "—" (or say that torch is not installed)."""
    return {f: cells.get(f, "skipped (torch not installed)" if f.startswith("torch")
                         and torch is None else "—") for f in FRAMEWORKS + BF16_FRAMEWORKS}


class Report:
    """Runs the workloads and collects the table's rows."""

    def __init__(self, quick: bool, threads: int) -> None:
        self.quick, self.threads = quick, threads
        self.budget, self.max_rounds = (6.0, 15) if quick else (20.0, 30)
        self.settle = Settle(min(2, os.cpu_count() or 1), 10.0 if quick else 30.0)
        self.rows: list[Row] = []
        self.frameworks = [f for f in FRAMEWORKS if f != "torch" or torch is not None]

    def _measure(self, fns: dict, budget: float | None = None, max_rounds: int | None = None):
        return measure(fns, budget or self.budget, max_rounds or self.max_rounds,
                       settle=self.settle)

    def training_row(self, key: str, label: str, config: ModelConfig, vocab: Vocab, steps,
                     chunk: int | None = None, budget: float | None = None) -> None:
        """Tokens/s of training on `steps`; with `chunk`, timed as chunks of that many steps
        (each chunk's best round, summed: short quiet windows are enough)."""
        _log(f"[{key}] {label}")
        set_threads(self.threads)
        tokens = count_tokens(steps)
        chunks = [steps[i:i + chunk] for i in range(0, len(steps), chunk)] if chunk else [steps]
        frameworks = self.frameworks + [f for f in BF16_FRAMEWORKS if key in BF16_ROWS
                                        and (f != "torch bf16" or torch is not None)]
        runs = {(f, i): run for f in frameworks
                for i, run in enumerate(training_runs(f, config, vocab, chunks))}
        best, busy = self._measure(runs, budget)
        seconds = {f: sum(best[f, i] for i in range(len(chunks))) for f in frameworks}
        rate = {f: tokens / s for f, s in seconds.items()}
        flops = training_flops(config, vocab.size, steps)
        gflops = {f: flops / s / 1e9 for f, s in seconds.items()}
        row = Row(f"{key}. {label}", _cells({f: f"{_rate(r, 'tok/s')} ({gflops[f]:.0f} GFLOP/s)"
                                             for f, r in rate.items()}),
                  target=f">= {TARGETS[key]:g}x PyTorch", busy=busy)
        if "torch" in rate:
            ratio = rate["rustgpt"] / rate["torch"]
            row.ratio, row.target = f"{ratio:.2f}x", _verdict(ratio, TARGETS[key], "PyTorch")
            if ratio < TARGETS[key]:  # what meeting it would take, against row f's sgemm
                row.target += f" (needs {TARGETS[key] * gflops['torch']:.0f} GFLOP/s)"
                if all(inputs.size > SMALL_STEP_TOKENS for inputs, _, _ in steps):
                    row.note = self._floor_note(key, config, vocab, steps, seconds)
        if "rustgpt bf16" in rate:
            row.target += "; " + _bf16_verdict(key, rate)
        self.rows.append(row)

    def _floor_note(self, key: str, config: ModelConfig, vocab: Vocab, steps,
                    seconds: dict) -> str:
        """What a missed training target leaves per step, against kernel_floor."""
        _log(f"[{key}] the step's kernel calls alone")
        floor = kernel_floor(config, vocab, steps)
        n = len(steps)

        def ms(seconds_all: float) -> str:  # per step
            return f"{seconds_all / n * 1e3:,.1f} ms"

        alone = floor["matmul"] + floor["attention"] + floor["other"]
        return (f"{key}: meeting {TARGETS[key]:g}x allows {ms(seconds['torch'] / TARGETS[key])} "
                f"a step (rustgpt took {ms(seconds['rustgpt'])}). Its "
                f"{floor['calls'] // n} kernel calls, each repeated alone on the step's own "
                f"arrays (best of {FLOOR_ROUNDS}), take {ms(alone)} in all: matmuls "
                f"{ms(floor['matmul'])}, attention {ms(floor['attention'])}, the rest "
                f"{ms(floor['other'])}"
                + (f" (means over its {n} steps)." if n > 1 else "."))

    def workload_a(self, pre, chat, vocab) -> None:
        steps = schedule_steps(vocab, pre, chat)
        self.training_row("a", f"RustGPT schedule steps, batch 1, bundled data (one epoch of "
                          f"each phase: {len(steps)} examples), default model", ModelConfig(),
                          vocab, steps, chunk=16, budget=2 * self.budget)

    def workload_e(self, vocab) -> None:
        _log("[e] generation")
        set_threads(self.threads)
        model = generation_model(vocab)
        kinds = ["rustgpt", "rustgpt top-p", "rustgpt bf16"] + [f for f in self.frameworks
                                                                 if f != "rustgpt"]
        runs = {kind: generation_run(kind, model) for kind in kinds}
        for kind, run in runs.items():
            decoded = run()
            assert decoded == GEN_TOKENS, f"{kind} decoded {decoded} tokens, expected {GEN_TOKENS}"
        seconds, busy = self._measure(runs)
        rate = {k: GEN_TOKENS / s for k, s in seconds.items()}
        for kind, label in (("rustgpt", "greedy"), ("rustgpt top-p", "top-p 0.9")):
            cells = {"rustgpt": _rate(rate[kind], "tok/s") + " (KV cache)"}
            if kind == "rustgpt":  # decoding in bf16, from the weights' bf16 copy
                cells["rustgpt bf16"] = _rate(rate["rustgpt bf16"], "tok/s") + " (KV cache)"
            cells.update({f: _rate(rate[f], "tok/s") + " (greedy, no cache)"
                          for f in self.frameworks if f != "rustgpt"})
            row = Row(f"e. generate {GEN_TOKENS} tokens, rustgpt {label}", _cells(cells),
                      target=f">= {TARGETS['e']:g}x PyTorch no-cache generate", busy=busy)
            if "torch" in rate:
                ratio = rate[kind] / rate["torch"]
                row.ratio = f"{ratio:.2f}x"
                row.target = _verdict(ratio, TARGETS["e"], "PyTorch no-cache generate")
            self.rows.append(row)

    def workload_f(self) -> None:
        _log("[f] sgemm")
        set_threads(self.threads)
        for M, K_, N, trans_b in GEMM_SHAPES:
            runs = {f: gemm_run(f, M, K_, N, trans_b) for f in self.frameworks}
            seconds, busy = self._measure(runs, self.budget / 4, 10)
            gflops = {f: 2 * M * K_ * N / s / 1e9 for f, s in seconds.items()}
            label = f"f. sgemm {M}x{K_}x{N}" + (" with B transposed (dx = dy W^T)" if trans_b else "")
            row = Row(label, _cells({f: _rate(g, "GFLOP/s") for f, g in gflops.items()}), busy=busy)
            if "torch" in gflops:
                row.ratio = f"{gflops['rustgpt'] / gflops['torch']:.2f}x"
            key = "f" if M == K_ == N else "f-model"
            row.target = _verdict(gflops["rustgpt"] / gflops["numpy"], TARGETS[key],
                                  "numpy (OpenBLAS)")
            self.rows.append(row)

    def workload_k(self) -> None:
        """The kernels issue 2 times against numpy: attention forward + backward, and the
        Adam update over the default model's 553k parameters."""
        _log("[k] attention and Adam kernels")
        set_threads(self.threads)
        rng = np.random.default_rng(0)
        for B, T, D, NH in ((1, 80, 128, 1), (16, 64, 128, 1), (8, 256, 512, 8)):
            q, k, v, dout = (rng.standard_normal((B, T, D), np.float32) for _ in range(4))
            out = np.empty_like(q)
            att, ds = (np.empty((B, NH, T, T), np.float32) for _ in range(2))
            grads = [np.empty_like(q) for _ in range(3)]
            scratch = np.empty(K.attention_scratch_shape(T, D, NH), np.float32)

            def ours():  # with its scratch kept, as the model does
                K.attention_forward(out, att, q, k, v, NH, scratch)
                K.attention_backward(*grads, dout, att, q, k, v, NH, ds, scratch)

            def theirs():
                _, p = numpy_attention_forward(q, k, v, NH)
                numpy_attention_backward(dout, p, q, k, v, NH)

            seconds, busy = self._measure({"rustgpt": ours, "numpy": theirs}, self.budget / 4, 10)
            self.rows.append(Row(f"k. attention forward + backward B{B} T{T} D{D} NH{NH}",
                                 _cells({f: f"{s * 1e6:,.0f} µs" for f, s in seconds.items()}),
                                 ratio=f"{seconds['numpy'] / seconds['rustgpt']:.2f}x vs numpy",
                                 busy=busy))
        n = LLM(ModelConfig(), bundled_data()[2]).total_parameters()
        p, m, v, g = (rng.standard_normal(n, np.float32) for _ in range(4))
        v = np.abs(v)
        mn, vn, pn = m.copy(), v.copy(), p.copy()
        runs = {"rustgpt": lambda: K.adam_update(p, m, v, g, 1e-4, max_norm=5.0),
                "numpy": lambda: numpy_adam(pn, mn, vn, g)}  # the same math, in place
        seconds, busy = self._measure(runs, self.budget / 4, 10)
        self.rows.append(Row(f"k. Adam update with gradient clipping, {n:,} parameters",
                             _cells({f: f"{s * 1e6:,.0f} µs" for f, s in seconds.items()}),
                             ratio=f"{seconds['numpy'] / seconds['rustgpt']:.2f}x vs numpy",
                             busy=busy))

    def workload_g(self, vocab) -> None:
        """rustgpt on (d) at 1 thread and at 2, round-robin."""
        _log("[g] thread scaling on (d)")
        shape = SHAPES["d"]
        steps = synthetic_steps(shape)
        run = training_run("rustgpt", shape.config(), vocab, steps)

        def at(n):
            def call():
                set_threads(n)
                run()
            return call

        seconds, busy = self._measure({1: at(1), 2: at(2)}, 2 * self.budget)
        set_threads(self.threads)
        tokens = count_tokens(steps)
        speedup = seconds[1] / seconds[2]
        cells = {"rustgpt": f"{speedup:.2f}x ({_rate(tokens / seconds[1], 'tok/s')} -> "
                            f"{_rate(tokens / seconds[2], 'tok/s')})"}
        self.rows.append(Row("g. thread scaling 1 -> 2 threads, rustgpt on (d)", _cells(cells),
                             target=_verdict(speedup, TARGETS["g"], "from 1 to 2 threads"),
                             busy=busy))

    def workload_a_full(self, pre, chat, vocab) -> None:
        """The whole RustGPT schedule (100 + 100 epochs, batch 1): rustgpt's Trainer vs the
        PyTorch port's loop over the same examples in the same order, from the same weights."""
        _log("[a-full] the whole RustGPT schedule (minutes)")
        set_threads(self.threads)
        config = Config()
        cells = {}
        model = LLM(config.model, vocab, seed=config.training.seed)
        port_start = model.state_dict()
        phases = rustgpt_phases(config.training, vocab, config.model.max_seq_len, pre, chat)
        trainer = Trainer(model, config.training, phases)
        quiet = self.settle()
        start = time.perf_counter()
        trainer.run()
        rg_seconds = time.perf_counter() - start
        cells["rustgpt"] = f"{rg_seconds:,.1f} s (final epoch loss {trainer.epoch_loss:.3f})"
        row = Row("a-full. whole RustGPT schedule, wall time (100 + 100 epochs, batch 1)",
                  {}, target=f">= {TARGETS['a']:g}x PyTorch")
        if torch is not None:
            quiet = self.settle() and quiet
            t_seconds, t_loss = torch_schedule(vocab, pre, chat, port_start, config)
            cells["torch"] = f"{t_seconds:,.1f} s (final epoch loss {t_loss:.3f})"
            ratio = t_seconds / rg_seconds
            row.ratio, row.target = f"{ratio:.2f}x", _verdict(ratio, TARGETS["a"], "PyTorch")
        row.cells, row.busy = _cells(cells), not quiet
        self.rows.append(row)

    def workload_own_text(self) -> None:
        """nanoGPT's CPU shakespeare_char recipe (OWN_TEXT) on bench.corpus's text, each side
        a whole process, one after the other, in a directory of its own (its own token file):
        `rustgpt-cli train --text`, then `rustgpt-cli eval --split val` (timed apart), and the
        PyTorch port's loop, which ends with the same evaluation of the val split
        (rustgpt.training.evaluate_text over the port); each in fp32, then in bf16 (rustgpt's
        --precision bf16, the port's training under autocast; both evaluate in float32).
        Three rows, one column a side: the training's wall time (the port's process less
        that evaluation), with the fp32 ratio's verdict and the bf16 ratios; the final val
        loss, with rustgpt's margins over PyTorch's and over its own fp32 loss in bf16; the
        training steps' GFLOP/s against the machine's fp32 FMA peak."""
        from bench.corpus import corpus_path
        from rustgpt.corpus import find_sources, pieces
        from rustgpt.tokenizer import train_tokenizer

        _log("[own-text] nanoGPT's shakespeare_char recipe, whole processes (minutes)")
        corpus = corpus_path()
        vocab_size = train_tokenizer("char", pieces(find_sources([corpus]))).size
        B, T, iters = OWN_TEXT["batch-size"], OWN_TEXT["max-seq-len"], OWN_TEXT["max-iters"]
        config = ModelConfig(embedding_dim=OWN_TEXT["embedding-dim"],
                             hidden_dim=OWN_TEXT["hidden-dim"], num_layers=OWN_TEXT["num-layers"],
                             num_heads=OWN_TEXT["num-heads"], max_seq_len=T, arch="gpt")
        step_flops = training_flops(config, vocab_size, [(np.zeros((B, T)), None, None)])
        options = [f"--{key}={value}" for key, value in OWN_TEXT.items()]
        options.append(f"--threads={self.threads}")
        # PyTorch's autocast on a CPU without AMX or AVX512-BF16 emulates bf16: more than
        # 20 minutes for this recipe on a 2-core AVX2 machine, against under 2 in float32
        fast_bf16 = K.kernels_info()["bf16"] in FAST_BF16
        sides = [f for f in ("rustgpt", "torch", *BF16_FRAMEWORKS) if f.startswith("rustgpt")
                 or torch is not None and (f == "torch" or fast_bf16)]
        skipped = {} if fast_bf16 or torch is None else {
            "torch bf16": "skipped: no AMX or AVX512-BF16 on this CPU (autocast emulates bf16)"}
        runs: dict[str, OwnTextRun] = {}
        quiet = True
        with tempfile.TemporaryDirectory() as tmp:
            for side in sides:
                where = Path(tmp) / side.replace(" ", "-")
                where.mkdir()
                precision = ["--precision=bf16"] if side in BF16_FRAMEWORKS else []
                quiet = self.settle() and quiet
                runs[side] = (OwnTextRun.of_rustgpt(corpus, options + precision, where, B * T)
                              if side.startswith("rustgpt") else
                              OwnTextRun.of_torch_port(corpus, options + precision, where))
        quiet = self.settle() and quiet
        peak = fma_peak(self.threads)
        label = (f"own-text. shakespeare_char recipe, gpt d{config.embedding_dim}/"
                 f"h{config.hidden_dim}/L{config.num_layers}/T{T}/B{B}, {config.num_heads} "
                 f"heads, {iters:,} steps")
        done = {f: r for f, r in runs.items() if r.error is None}
        # other processes' CPU time while a side trained: more than 5% of a core is load
        loaded = any(r.others is not None and r.others > OWN_TEXT_LOAD * r.seconds
                     for r in done.values())
        others = ", ".join(f"{r.others:,.1f} CPU-s while {f} trained"
                           for f, r in done.items() if r.others is not None)
        failed = {f: f"failed: {r.error}" for f, r in runs.items() if r.error is not None}
        failed.update(skipped)  # the cells of sides that did not run, saying why
        rate = {f: iters * B * T / r.seconds for f, r in done.items()}  # tok/s
        gflops = {f: iters * step_flops / r.step_seconds / 1e9 for f, r in done.items()}
        # (side, base, what the target calls them): side's val loss <= base's + margin
        checks = [("rustgpt", "torch", "<= PyTorch"),
                  ("rustgpt bf16", "rustgpt", "bf16 <= rustgpt fp32")]
        gap = {(side, base): done[side].val_loss - done[base].val_loss
               for side, base, _ in checks if side in done and base in done}
        rows = [Row(f"{label}: training, whole process, wall time",
                    _cells({**{f: f"{r.seconds:,.1f} s ({_rate(rate[f], 'tok/s')})"
                               for f, r in done.items()}, **failed}),
                    target=f">= {TARGETS['own-text']:g}x PyTorch", busy=not quiet or loaded,
                    note=f"own-text: the text is {corpus} ({corpus.stat().st_size:,} bytes, "
                         f"{vocab_size} char tokens); wall times are of the training process "
                         f"(the port's less its final evaluation, which rustgpt runs in "
                         f"`rustgpt-cli eval`); the bf16 columns train with --precision bf16 "
                         f"(the port under autocast) and are evaluated in float32 as the fp32 "
                         f"ones; val losses are over the whole val split, "
                         f"estimates over {OWN_TEXT['eval-iters']} random batches"
                         + (f"; other processes used {others}." if others else ".")),
                Row(f"{label}: final val loss",
                    _cells({**{f: f"{r.val_loss:.4f} (estimate {r.val_estimate:.4f})"
                               for f, r in done.items()}, **failed}),
                    target="; ".join(_loss_verdict(words, gap.get((side, base)))
                                     for side, base, words in checks)),
                Row(f"{label}: training steps alone, GFLOP/s (fp32 FMA peak: "
                    f"{f'{peak:.0f} GFLOP/s' if peak else 'unknown, no C compiler'})",
                    _cells({**{f: f"{g:.0f} GFLOP/s" + (f" ({g / peak:.0%} of peak)" if peak else "")
                               for f, g in gflops.items()}, **failed}))]
        if "rustgpt" in rate and "torch" in rate:
            ratio = rate["rustgpt"] / rate["torch"]
            rows[0].ratio = f"{ratio:.2f}x"
            rows[0].target = _verdict(ratio, TARGETS["own-text"], "PyTorch")
            rows[1].ratio = f"{gap['rustgpt', 'torch']:+.4f}"
        if "rustgpt" in rate and "rustgpt bf16" in rate:
            rows[0].target += "; " + _bf16_verdict("own-text", rate)
        self.rows += rows

    def footprint(self) -> None:
        """Peak RSS of a short `rustgpt-cli train`, import and CLI start-up times."""
        _log("[footprint] rustgpt-cli train, imports, CLI start-up")
        cli = _cli()
        repeats = 3 if self.quick else 5
        with tempfile.TemporaryDirectory() as tmp:
            rss = _peak_rss([*cli, "train", "--output", str(Path(tmp) / "ckpt"),
                             "--pretraining-epochs", "2", "--instruction-epochs", "2"], tmp)
            cells = {"rustgpt": f"{rss / 1024:.0f} MiB"}
            if torch is not None:
                t_rss = _peak_rss([sys.executable, __file__, "--torch-train-epochs", "2"], tmp)
                cells["torch"] = f"{t_rss / 1024:.0f} MiB (the port's loop, same data)"
            self.rows.append(Row("peak RSS, `rustgpt-cli train` (default config, 2 + 2 epochs)",
                                 _cells(cells)))
            numpy_s = _best_import("import numpy", repeats)
            rg_s = _best_import("import rustgpt; rustgpt.LLM", repeats)
            cells = {"rustgpt": f"{(rg_s - numpy_s) * 1e3:.0f} ms",
                     "numpy": f"{numpy_s * 1e3:.0f} ms (import numpy itself)"}
            if torch is not None:
                cells["torch"] = f"{(_best_import('import torch', repeats) - numpy_s) * 1e3:.0f} ms" \
                                 " (import torch − import numpy)"
            self.rows.append(Row("`import rustgpt; rustgpt.LLM` − `import numpy`",
                                 _cells(cells)))
            for args in (["--help"], ["config", "show"]):
                seconds = _best_wall([*cli, *args], repeats, tmp)
                self.rows.append(Row(f"`rustgpt-cli {' '.join(args)}` wall time",
                                     _cells({"rustgpt": f"{seconds * 1e3:.0f} ms"})))

    def table(self) -> str:
        head = ("| workload | rustgpt | PyTorch | numpy | rustgpt bf16 | PyTorch bf16 (autocast) "
                "| ratio vs PyTorch | target |")
        lines = [head, "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in self.rows:
            mark = (" †" if r.busy else "") + (" ‡" if r.note else "")
            lines.append(f"| {r.workload}{mark} | {r.cells['rustgpt']} | {r.cells['torch']} | "
                         f"{r.cells['numpy']} | {r.cells['rustgpt bf16']} | "
                         f"{r.cells['torch bf16']} | {r.ratio} | {r.target} |")
        lines += [f"\n‡ {r.note}" for r in self.rows if r.note]
        if any(r.busy for r in self.rows):
            lines += ["", f"† other processes held the CPU during some of this row's rounds even "
                          f"after waiting {self.settle.max_wait:g} s for them: its numbers are "
                          f"unreliable (rows with several threads suffer most)."]
        return "\n".join(lines)


def torch_schedule(vocab, pre, chat, weights, config) -> tuple[float, float]:
    """Wall seconds and last epoch's mean loss of the schedule on the PyTorch port, with the
    Trainer's per-step work (make_batch, clip, Adam) and lr of each phase."""
    from bench.torch_port import TorchGPT

    c = config.model
    port = TorchGPT(vocab.size, c.embedding_dim, c.hidden_dim, c.num_layers, c.num_heads,
                    c.max_seq_len)
    port.load_rustgpt_state(weights)
    port.make_optimizer()
    phases = rustgpt_phases(config.training, vocab, c.max_seq_len, pre, chat)
    start = time.perf_counter()
    losses = []
    for phase in phases:
        for _ in range(phase.epochs):
            losses = [port.train_step(*make_batch([seq]), phase.lr, config.training.max_grad_norm)[0]
                      for seq in phase.sequences]
    return time.perf_counter() - start, float(np.mean(losses))


@dataclass
class OwnTextRun:
    """One side of the own-text workload, run as whole processes: `seconds` of training
    (wall clock), `step_seconds` of its training steps alone, `val_loss` over the whole val
    split and `val_estimate`, the last estimate from random batches, `others`, the CPU
    seconds other processes used while it trained (None: unknown); or `error`, the last
    line a failed process wrote."""

    seconds: float = math.nan
    step_seconds: float = math.nan
    val_loss: float = math.nan
    val_estimate: float = math.nan
    others: float | None = None
    error: str | None = None

    @classmethod
    def of_rustgpt(cls, corpus: Path, options: list[str], tmp: Path,
                   step_tokens: int) -> OwnTextRun:
        """`rustgpt-cli train --text` with `options`, then `rustgpt-cli eval --split val`
        (token files cached in `tmp`); the steps' seconds from metrics.json's tokens_per_s,
        `step_tokens` tokens a step."""
        env = {**os.environ, "LLM_DATA_TOKEN_CACHE": str(tmp / "rustgpt-tokens")}
        out = tmp / "run"
        seconds, train, others = _timed_process(
            [*_cli(), "train", "--text", str(corpus), "--tokenizer", "char", "--arch", "gpt",
             "--schedule", "cosine", *options, "--output", str(out)], env)
        if train.returncode:
            return cls(error=_last_line(train.stderr))
        _, evaluated, _ = _timed_process([*_cli(), "eval", "--checkpoint", str(out), "--text",
                                          str(corpus), "--split", "val", "--json"], env)
        if evaluated.returncode:
            return cls(error=_last_line(evaluated.stderr))
        steps = json.loads((out / "metrics.json").read_text())["steps"]
        return cls(seconds, sum(step_tokens / r["tokens_per_s"] for r in steps
                                if r.get("tokens_per_s")),
                   json.loads(evaluated.stdout)["loss"],
                   next(r["val_loss"] for r in reversed(steps) if r.get("val_loss") is not None),
                   others)

    @classmethod
    def of_torch_port(cls, corpus: Path, options: list[str], tmp: Path) -> OwnTextRun:
        """`python -m bench.torch_port own-text` with `options` (its token file in `tmp`);
        its training time is its process's less its final evaluation of the val split."""
        seconds, done, others = _timed_process(
            [sys.executable, "-m", "bench.torch_port", "own-text", "--text", str(corpus),
             "--cache-dir", str(tmp / "port-tokens"), *options])
        if done.returncode:
            return cls(error=_last_line(done.stderr))
        result = json.loads(done.stdout.splitlines()[-1])
        return cls(seconds - result["val_seconds"], result["step_seconds"],
                   result["val"]["loss"], result["estimates"][-1][2], others)


def _timed_process(cmd: list[str], env: dict | None = None
                   ) -> tuple[float, subprocess.CompletedProcess, float | None]:
    """Wall seconds and the finished process of `cmd`, run in the repository (stdout and
    stderr captured), and the CPU seconds that other processes used meanwhile: the
    machine's busy time less the child's (None without /proc/stat)."""
    busy, children = _busy_cpu_seconds(), _children_cpu_seconds()
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    others = None if busy is None else \
        (_busy_cpu_seconds() - busy) - (_children_cpu_seconds() - children)
    return seconds, done, others


def _busy_cpu_seconds() -> float | None:
    """CPU seconds of all CPUs together not idle since boot (/proc/stat's first line: all
    but idle and iowait, steal included: time the hypervisor gave others), or None."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, idle, iowait, irq, softirq, steal = \
                (int(x) for x in f.readline().split()[1:9])
    except (OSError, ValueError):
        return None
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else "no message"


# 12 independent chains of FMAs per thread, vectors WIDTH bytes wide: no chain waits for
# another, so the FMA units never idle (the chains outnumber their latency times their count)
_FMA_PEAK_C = r"""
#include <omp.h>
#include <stdio.h>
typedef float vf __attribute__((vector_size(WIDTH)));
#define CHAINS 12
int main(void) {
    const long iters = 20000000L;
    double best = 0;
    float sink = 0;
    for (int rep = 0; rep < 5; rep++) {
        double start = omp_get_wtime();
#pragma omp parallel reduction(+ : sink)
        {
            vf a[CHAINS], b = {0}, c = {0};
            b += 0.999999f;
            c += 1e-7f;
            for (int i = 0; i < CHAINS; i++) a[i] = b * (float)i;
            for (long it = 0; it < iters; it++)
#pragma GCC unroll 12
                for (int i = 0; i < CHAINS; i++) a[i] = a[i] * b + c;
            for (int i = 0; i < CHAINS; i++) sink += a[i][0];
        }
        double rate = 2.0 * omp_get_max_threads() * iters * CHAINS * (WIDTH / 4)
                      / (omp_get_wtime() - start);
        if (rate > best) best = rate;
    }
    printf("%.3f %g\n", best / 1e9, sink);
    return 0;
}
"""


def fma_peak(threads: int) -> float | None:
    """The machine's fp32 FMA peak in GFLOP/s at `threads` threads, measured: _FMA_PEAK_C
    with vectors as wide as rustgpt's SIMD path (kernels_info()), built by the system's C
    compiler (-O2 -march=native -fopenmp), best of 5 runs of 0.5-1 s. None when there is
    no C compiler or the build fails."""
    width = {"avx512": 64, "avx2": 32}.get(rustgpt.kernels_info()["simd"], 16)
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        source, program = Path(tmp) / "fma_peak.c", Path(tmp) / "fma_peak"
        source.write_text(_FMA_PEAK_C)
        built = subprocess.run([cc, "-O2", "-march=native", "-fopenmp", f"-DWIDTH={width}",
                                str(source), "-o", str(program)], capture_output=True)
        if built.returncode:
            return None
        out = subprocess.run([str(program)], env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                             check=True, capture_output=True, text=True).stdout
    return float(out.split()[0])


def _cli() -> list[str]:
    """rustgpt-cli beside this interpreter (a pyenv shim on PATH would add its own start-up)."""
    beside = Path(sys.executable).parent / "rustgpt-cli"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("rustgpt-cli")
    return [found] if found else [sys.executable, "-c", "from rustgpt.cli import main; main()"]


_RSS_CHILD = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
              "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
              "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def _peak_rss(cmd: list[str], cwd: str) -> int:
    """ru_maxrss (KiB) of `cmd`, run by an intermediate process so that nothing else this
    script started counts."""
    out = subprocess.run([sys.executable, "-c", _RSS_CHILD, *cmd], cwd=cwd, check=True,
                         capture_output=True, text=True)
    return int(out.stdout.strip())


def _best_import(statement: str, repeats: int) -> float:
    code = f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
    return min(float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                    text=True, cwd=ROOT).stdout) for _ in range(repeats))


def _best_wall(cmd: list[str], repeats: int, cwd: str) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=cwd)
        best = min(best, time.perf_counter() - start)
    return best


def header(args, thread_note: str) -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    coretype = os.environ.get("OPENBLAS_CORETYPE")
    lines = [
        f"# rustgpt vs PyTorch vs numpy — {datetime.datetime.now():%Y-%m-%d %H:%M}",
        "",
        f"- CPU: {cpu}; {os.cpu_count()} logical CPUs, {K.physical_cores()} physical cores",
        f"- rustgpt {rustgpt.__version__}, kernels_info(): {rustgpt.kernels_info()}",
        f"- numpy {np.__version__} ({blas.get('name')} {blas.get('version')}); {thread_note}",
        f"- PyTorch: {torch.__version__ + f', {torch.get_num_threads()} threads' if torch else 'skipped (torch not installed)'}",
        f"- threads: {args.threads} (rustgpt.set_num_threads, torch.set_num_threads)",
        "- OPENBLAS_CORETYPE: " + (f"set to {coretype!r}: numpy's OpenBLAS may use a slower kernel "
                                   f"(run with `env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE`)"
                                   if coretype else "not set")
        + (f"; OPENBLAS_L2_SIZE={os.environ['OPENBLAS_L2_SIZE']}" if "OPENBLAS_L2_SIZE" in os.environ else ""),
        f"- load average at the start: {_loadavg()} (other processes' load makes ratios noisy)",
        f"- timing: time.perf_counter, best of up to {'15' if args.quick else '30'} round-robin "
        f"rounds after a warm-up, each round after the CPU is free of other processes "
        f"(waiting at most {'10' if args.quick else '30'} s){' (--quick)' if args.quick else ''}, "
        f"and {HANDOFF_PAUSE} s between one framework's calls and the next one's (idle thread "
        f"pools stop spinning); rates are predicted tokens (or FLOP) per second",
    ]
    return "\n".join(lines)


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def _torch_train_child(epochs: int) -> None:
    """--torch-train-epochs: the PyTorch port's schedule loop alone (for its peak RSS)."""
    pre, chat, vocab = bundled_data()
    config = Config(training=TrainingConfig(pretraining_epochs=epochs, instruction_epochs=epochs))
    torch_schedule(vocab, pre, chat, LLM(config.model, vocab, seed=42).state_dict(), config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a shorter time budget per workload (a few minutes in all)")
    parser.add_argument("--full", action="store_true",
                        help="also time the whole RustGPT schedule and the own-text recipe "
                             "(a-full, own-text; minutes each)")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                        help="threads of every framework (default %(default)s)")
    parser.add_argument("--only", metavar="LIST",
                        help=f"comma-separated workloads to run, of {','.join(WORKLOADS)} "
                             f"(default: all of them, {' and '.join(LONG_WORKLOADS)} only with "
                             f"--full)")
    parser.add_argument("--torch-train-epochs", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    run = set(WORKLOADS) - (set() if args.full else set(LONG_WORKLOADS))
    if args.only:
        run = set(args.only.split(","))
        if run - set(WORKLOADS):
            parser.error(f"--only: unknown workload(s) {', '.join(sorted(run - set(WORKLOADS)))}, "
                         f"expected some of {','.join(WORKLOADS)}")
    if args.torch_train_epochs:
        _torch_train_child(args.torch_train_epochs)
        return
    try:
        import threadpoolctl  # noqa: F401
    except ImportError:
        # OpenBLAS reads its thread count once, at load: start again with it set
        if os.environ.get("OPENBLAS_NUM_THREADS") != str(args.threads):
            os.environ["OPENBLAS_NUM_THREADS"] = str(args.threads)
            os.execv(sys.executable, [sys.executable, __file__, *sys.argv[1:]])
    _, thread_note = limit_threads(args.threads)
    print(header(args, thread_note), "", sep="\n", flush=True)
    report = Report(args.quick, args.threads)
    start = time.perf_counter()
    pre, chat, vocab = bundled_data()
    synthetic = synthetic_vocab()
    if "a" in run:
        report.workload_a(pre, chat, vocab)
    for key, shape in SHAPES.items():
        if key in run:
            report.training_row(key, f"training step {shape.label}", shape.config(), synthetic,
                                synthetic_steps(shape))
    for key, workload in (("e", lambda: report.workload_e(vocab)), ("f", report.workload_f),
                          ("k", report.workload_k), ("g", lambda: report.workload_g(synthetic)),
                          ("a-full", lambda: report.workload_a_full(pre, chat, vocab)),
                          ("own-text", report.workload_own_text),
                          ("footprint", report.footprint)):
        if key in run:
            workload()
    print(report.table())
    print(f"\nMeasured in {time.perf_counter() - start:.0f} s, {report.settle.waited:.0f} s of it "
          f"waiting for other processes to leave the CPU; load average {_loadavg()} at the end.")


if __name__ == "__main__":
    main()
