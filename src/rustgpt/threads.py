"""StepThreads: run training steps on one thread or on all, whichever is faster now.

A 2-thread step hands data between the cores at every one of its ~100 kernels. On a shared
virtual machine that traffic is sometimes far slower than usual: on the benchmark VM, 2 MB
written by one vCPU and read by the other took 28 us in quiet spells and 0.8-1.1 ms for
stretches of 10 s and more, and a batch-1 step of the default model took 0.6 ms, then 2.2
ms, while one thread steadily took 0.9 ms. Nothing inside the process says which spell it
is in, so StepThreads measures: steps run in the current mode, and about once a second a
few run in the other one, and the other mode wins when those steps took less time (by a
margin) than steps of the same size recently took in the current mode. Step sizes differ
(a schedule's sequences do, and a short step costs more per token), so the probe is
compared step by step with the current mode's recent time for the same token count, not
with its average over other steps; that recent time is the least of the last few such
steps, so a step slowed for a moment (another pool of threads still spinning) does not
count as the mode's speed, while a slowdown that lasts does after a few steps. (Against
that least time the other mode needs to be faster by rather more than the margin: the
choice leans towards staying.)

Probes are spaced so that they cost at most ``PROBE_SHARE`` of the time even when the
other mode is twice as slow: about once a second for steps of a few milliseconds, rarely
for long ones. The kernels give bit-identical results on any thread count, so the choice
changes speed, never the numbers.
"""

from __future__ import annotations

import time
from typing import Callable, TypeVar

from rustgpt import _kernels as K

R = TypeVar("R")

PROBE_SECONDS = 1.0  # time between probes of the other mode, at least
PROBE_STEPS = 8  # steps per probe
PROBE_SHARE = 0.02  # probes are spaced to cost at most this share of the time
MARGIN = 0.9  # the other mode wins when its probe took below MARGIN x this mode's time
RECENT = 4  # steps of one size whose least time is this mode's time for that size


class StepThreads:
    """Chooses between one thread and the caller's thread count for each training step.

    ``run(step, tokens)`` calls ``step()`` with the chosen count set for the calling thread
    (K.set_local_threads; the caller's count is back after) and times it, unless
    ``untimed()`` says afterwards that the step did one-time work (such as recording a
    kernel plan) whose time says nothing about the mode. ``enabled = False`` runs every
    step on the caller's count. ``single`` says which mode is current."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.single = False  # the current mode: one thread, or the caller's count
        # seconds, tokens and steps of the current mode since _start (the last probe)
        self._time, self._tokens, self._steps = 0.0, 0, 0
        self._recent: dict[int, list[float]] = {}  # tokens -> seconds of the last such steps
        self._probe: list | None = None  # [seconds, this mode's for the same, steps left]
        self._restart(time.perf_counter())

    def run(self, step: Callable[[], R], tokens: int,
            untimed: Callable[[], bool] | None = None) -> R:
        """``step()`` on the chosen thread count, timed towards the choice (see the class
        docstring); returns what it returns."""
        threads = K.get_num_threads()
        if not self.enabled or threads == 1:
            return step()
        probing = self._probe is not None
        one = self.single != probing  # a probe runs the other mode
        if one:
            before = K.set_local_threads(1)  # this thread only
        try:
            start = time.perf_counter()
            result = step()
            end = time.perf_counter()
        finally:
            if one:
                K.set_local_threads(before)
        if untimed is None or not untimed():
            self._account(end - start, tokens, end)
        return result

    def _account(self, seconds: float, tokens: int, now: float) -> None:
        probe = self._probe
        if probe is not None:
            probe[0] += seconds
            probe[1] += self._expected(tokens)
            probe[2] -= 1
            if probe[2] == 0:
                if probe[0] < MARGIN * probe[1]:
                    self.single = not self.single
                    self._recent = {}  # times of the mode left behind
                self._restart(now)
            return
        self._time += seconds
        self._tokens += tokens
        self._steps += 1
        times = self._recent.get(tokens)
        if times is None:
            if len(self._recent) >= 4096:
                self._recent = {}  # sizes seldom repeat: the window's average serves
            times = self._recent[tokens] = []
        times.append(seconds)
        if len(times) > RECENT:
            del times[0]
        if now >= self._next_probe:
            # a probe of steps this long, twice as slow, costs PROBE_SHARE of this window
            wait = PROBE_STEPS * self._time / self._steps / PROBE_SHARE
            if now - self._start >= wait:
                self._probe = [0.0, 0, PROBE_STEPS]
            else:
                self._next_probe = self._start + wait

    def _expected(self, tokens: int) -> float:
        """Seconds a step of `tokens` takes in the current mode: the least of the last steps
        of that size, else the window's time per token."""
        times = self._recent.get(tokens)
        return min(times) if times else tokens * self._time / self._tokens

    def _restart(self, now: float) -> None:
        """A new measuring window of the current mode."""
        self._probe = None
        self._time, self._tokens, self._steps = 0.0, 0, 0
        self._start = now
        self._next_probe = now + PROBE_SECONDS
