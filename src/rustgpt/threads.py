"""StepThreads: run training steps on one thread or on all, whichever is faster now.

A 2-thread step hands data between the cores at every one of its ~100 kernels. On a shared
virtual machine that traffic is sometimes far slower than usual: on the benchmark VM, 2 MB
written by one vCPU and read by the other took 28 us in quiet spells and 0.8-1.1 ms for
stretches of 10 s and more, and a batch-1 step of the default model took 0.6 ms, then 2.2
ms, while one thread steadily took 0.9 ms. Nothing inside the process says which spell it
is in, so StepThreads measures: steps run in the current mode, and about once a second a
few run in the other one; the mode with the lower time per token (by a margin) is kept.

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
MARGIN = 0.9  # the other mode wins when its time per token is below MARGIN x this mode's


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
        self._probe: list | None = None  # [seconds, tokens, steps left] while probing
        self._restart(time.perf_counter())

    def run(self, step: Callable[[], R], tokens: int,
            untimed: Callable[[], bool] | None = None) -> R:
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
            probe[1] += tokens
            probe[2] -= 1
            if probe[2] == 0:
                if probe[0] / probe[1] < MARGIN * self._time / self._tokens:
                    self.single = not self.single
                self._restart(now)
            return
        self._time += seconds
        self._tokens += tokens
        self._steps += 1
        if now >= self._next_probe:
            # a probe of steps this long, twice as slow, costs PROBE_SHARE of this window
            wait = PROBE_STEPS * self._time / self._steps / PROBE_SHARE
            if now - self._start >= wait:
                self._probe = [0.0, 0, PROBE_STEPS]
            else:
                self._next_probe = self._start + wait

    def _restart(self, now: float) -> None:
        """A new measuring window of the current mode."""
        self._probe = None
        self._time, self._tokens, self._steps = 0.0, 0, 0
        self._start = now
        self._next_probe = now + PROBE_SECONDS
