"""StepThreads: the choice of one thread or all for short training steps, on a fake clock."""

import random

import pytest

from rustgpt import _kernels as K
from rustgpt import threads as T


class FakeClock:
    """perf_counter for rustgpt.threads; a fake step advances it by the time the step
    'takes' at the thread count it finds set."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(T.time, "perf_counter", c.perf_counter)
    return c


@pytest.fixture
def four_threads(set_threads):
    set_threads(4)


def steps(tuner, clock, n, seconds_at, tokens=10):
    """Run n fake steps; seconds_at(threads) is a step's duration. Returns the thread
    counts the steps ran on."""
    seen = []

    def step():
        threads = K.get_num_threads()
        seen.append(threads)
        clock.now += seconds_at(threads)
        return threads

    for _ in range(n):
        assert tuner.run(step, tokens) == seen[-1]
        assert K.get_num_threads() == 4  # the caller's count is back after every step
    return seen


def test_switches_to_one_thread_when_it_is_faster_and_back(clock, four_threads):
    tuner = T.StepThreads()
    # every thread until the first probe (1 s), then one thread but for probes
    slow_sharing = steps(tuner, clock, 10_000, lambda t: 2e-4 if t == 1 else 5e-4)
    assert tuner.single
    assert set(slow_sharing[:1990]) == {4}
    assert slow_sharing[-5000:].count(1) > 4900
    quiet = steps(tuner, clock, 30_000, lambda t: 4e-4 if t == 1 else 1e-4)
    assert not tuner.single
    assert quiet[-10_000:].count(4) > 9900


def test_stays_on_every_thread_while_that_is_faster(clock, four_threads):
    tuner = T.StepThreads()
    seen = steps(tuner, clock, 30_000, lambda t: 3e-4 if t == 1 else 1e-4)
    assert not tuner.single
    probes = seen.count(1)
    assert 0 < probes <= T.PROBE_STEPS * (clock.now / T.PROBE_SECONDS + 1)


def test_untimed_steps_do_not_count(clock, four_threads):
    """Slow one-time steps (plan recordings) in every thread's window would make a slower
    single thread look faster; left out, they do not. Every step has a new size here, so the
    probes are compared with the window's time per token."""
    recording = [False]

    def step():
        threads = K.get_num_threads()
        clock.now += 1e-2 if recording[0] else 2e-4 if threads == 1 else 1e-4

    def modes(untimed):
        tuner, seen = T.StepThreads(), set()
        for i in range(30_000):
            recording[0] = i % 50 == 0 and not tuner.single and tuner._probe is None
            tuner.run(step, 10 + i, untimed)
            seen.add(tuner.single)
        return seen

    assert modes(lambda: recording[0]) == {False}
    assert modes(None) == {False, True}  # timed, the recordings make it switch


def test_a_moment_of_contention_does_not_count(clock, four_threads):
    """A step slowed once (another thread pool still spinning) does not set its size's
    time; a slowdown that lasts does, after a few steps."""
    slow = [0]

    def step():
        one = K.get_num_threads() == 1
        clock.now += (2e-4 if one else 1e-4) * (1 if one or not slow[0] else slow[0])

    tuner = T.StepThreads()
    for i in range(30_000):  # every 20th step on all threads is 20 times slower, any size
        slow[0] = 20 if i % 20 == 0 else 0
        tuner.run(step, 10 + i % 7)
        assert not tuner.single
    slow[0] = 20  # from now on every step on all threads is
    for _ in range(30_000):
        tuner.run(step, 10)
    assert tuner.single


@pytest.mark.parametrize("one_thread", [1.2, 0.5])
def test_probes_are_compared_with_steps_of_their_size(clock, four_threads, one_thread):
    """Steps of 2 and 60 tokens take about the same time, so per token a probe of mostly
    long steps looks far faster than the window's average: compared with steps of the same
    size, one thread 20% slower never wins, and one twice as fast does."""
    sizes = random.Random(0)
    tokens = [0]

    def step():
        slower = one_thread if K.get_num_threads() == 1 else 1.0
        clock.now += slower * (1e-3 + 1e-6 * tokens[0])

    tuner, seen = T.StepThreads(), set()
    for _ in range(30_000):
        tokens[0] = sizes.choice((2, 60))
        tuner.run(step, tokens[0])
        seen.add(tuner.single)
    assert seen == ({False} if one_thread > 1 else {False, True})
    assert tuner.single == (one_thread < 1)


def test_a_small_gain_does_not_switch(clock, four_threads):
    tuner = T.StepThreads()
    steps(tuner, clock, 30_000, lambda t: 0.97e-4 if t == 1 else 1e-4)  # 3%: within MARGIN
    assert not tuner.single


def test_probes_of_long_steps_are_spaced_out(clock, four_threads):
    """Probes of steps twice as slow cost at most PROBE_SHARE of the time in extra time."""
    tuner = T.StepThreads()
    seen = steps(tuner, clock, 2000, lambda t: 0.1 if t == 1 else 0.05)  # 100 s
    assert not tuner.single
    assert 0 < seen.count(1) * (0.1 - 0.05) <= T.PROBE_SHARE * clock.now


def test_disabled_or_one_thread_runs_as_asked(clock, four_threads):
    tuner = T.StepThreads(enabled=False)
    assert set(steps(tuner, clock, 10_000, lambda t: 1e-4 if t == 1 else 5e-4)) == {4}
    K.set_num_threads(1)
    tuner = T.StepThreads()
    assert tuner.run(K.get_num_threads, 10) == 1


def test_a_failing_step_restores_the_thread_count(clock, four_threads):
    tuner = T.StepThreads()
    tuner.single = True

    def fail():
        assert K.get_num_threads() == 1
        raise RuntimeError("diverged")

    with pytest.raises(RuntimeError, match="diverged"):
        tuner.run(fail, 10)
    assert K.get_num_threads() == 4


# ---- the bound on thread counts (resources.max_threads) ------------------------------------

def test_thread_counts_above_the_bound_are_refused(set_threads):
    from rustgpt.errors import ValidationError
    from rustgpt.resources import max_threads

    bound = max_threads()
    set_threads(bound)  # the bound itself is allowed
    assert K.get_num_threads() == bound or not K.kernels_info()["openmp"]
    for fn in (K.set_num_threads, K.set_local_threads):
        for n in (bound + 1, 100_000):
            with pytest.raises(ValidationError, match=rf"{fn.__name__}: n = {n}, expected at "
                                                      rf"most {bound} \(4 x the \d+ logical"):
                fn(n)
    assert K.set_local_threads(0) == 0  # nothing was set by the refused calls


def _python(code, **env):
    """Run `code` in a fresh interpreter with `env` added; its stdout and stderr."""
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout, done.stderr


# a parallel kernel call after import: with 100000 threads it crashed the OpenMP runtime
KERNEL_RUN = """
import os, numpy as np, rustgpt
from rustgpt import _kernels as K
from rustgpt.resources import max_threads
a = np.ones((256, 256), np.float32); c = np.empty_like(a)
K.sgemm(c, a, a)
assert c[0, 0] == 256
print(os.environ["OMP_NUM_THREADS"], K.get_num_threads(), max_threads())
"""


@pytest.mark.skipif(not K.kernels_info()["openmp"], reason="needs OpenMP")
@pytest.mark.parametrize("value", ["100000", "40000,3", "1"])
def test_omp_num_threads_is_bounded_before_openmp_reads_it(value):
    out, err = _python(KERNEL_RUN, OMP_NUM_THREADS=value)
    env, threads, bound = out.split()
    counts = [min(int(n), int(bound)) for n in value.split(",")]
    assert env == ",".join(map(str, counts)) and int(threads) == counts[0]
    warnings = err.count("OMP_NUM_THREADS")
    assert warnings == (counts != [int(n) for n in value.split(",")])  # once, if capped
    if warnings:
        assert f"OMP_NUM_THREADS = {value} is more than {bound}" in err


@pytest.mark.skipif(not K.kernels_info()["openmp"], reason="needs OpenMP")
def test_omp_num_threads_is_bounded_when_openmp_was_loaded_first():
    """Another library loaded OpenMP (and it read the variable) before rustgpt: the kernels'
    count is bounded all the same."""
    import ctypes.util

    gomp = ctypes.util.find_library("gomp")
    if gomp is None:
        pytest.skip("the OpenMP runtime is not libgomp")
    _, threads, bound = _python(f"import ctypes; ctypes.CDLL({gomp!r})\n" + KERNEL_RUN,
                                OMP_NUM_THREADS="100000")[0].split()
    assert threads == bound
