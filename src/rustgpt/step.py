"""TrainStep: one optimizer step over an LLM, and everything that makes it fast.

The model (rustgpt.model) is math only: forward, loss and backward as kernel calls. A step
adds, in this order:

1. loss and backward over one or more micro-batches (gradient accumulation: the first
   overwrites the gradient buffer, the others add to it; the loss of each is scaled by the
   step's whole number of targets, over every process, so the sum is the step's mean);
2. the one place between backward and update where the gradient buffer is summed over the
   processes of a data-parallel run (``comm.allreduce``, rustgpt.comm; nothing in a run of
   one process), with the losses and hits;
3. the gradient's global norm, taken after that, clipping and the Adam update, which may be
   deferred: left pending and applied beside the next step's forward.

In bf16 precision (rustgpt.precision) the step owns a bf16 copy of the weights: its first
micro-step rounds them into it (after the update, which the copy's one kernel call waits
for), and every matmul of its forward and backward runs in bf16, reading the weights from
the copy; everything else stays float32.

Speed comes from recorded plans: the first step of each shape runs layer by layer and is
recorded (``_kernels.Plan``); later steps of that shape copy their ids into the plan's
arrays and replay it in C, without the Python in between. The rule that makes this safe
is written where layers are written (rustgpt.layers): every array operation in a layer's
forward or backward is a kernel call; numpy work there runs only while recording.
``replay=False`` turns replay off (every step runs layer by layer), and tests compare the
two. Recording belongs to the step's thread, so two models train in two threads.

A micro-step of an even number of rows and at least SPLIT_MIN_TOKENS tokens runs as two
halves of its rows, each recorded as a plan of its own (its own activations; the second
half's gradients in a buffer of their own, added to the first's after): replayed side by
side, one thread each, the halves never wait for each other, where splitting every call
of a step between the threads made them wait at each of its hundred or so calls (the
own-text recipe's step of 12 x 64 tokens: 34 -> 31 ms on 2 threads). The halves are part
of the arithmetic, not of the thread count: one thread runs them one after the other, with
the same results, bit for bit.

Readers of the model in other threads (generation while training) see consistent weights:
the step holds ``model.lock`` while it changes them, readers hold it while they read, and
a pending update is applied only by the thread that made it (``LLM.settle``).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from rustgpt import _kernels as K
from rustgpt.comm import SingleProcess
from rustgpt.errors import TrainingError, ValidationError
from rustgpt.layers import Workspace, dropout_seed
from rustgpt.model import activation_bytes
from rustgpt.precision import Bf16Weights, resolve
from rustgpt.resources import allocating, check_memory
from rustgpt.threads import StepThreads

if TYPE_CHECKING:
    from rustgpt.model import LLM
    from rustgpt.optim import Adam

MAX_PLANS = 256  # recorded plans kept per step, one per batch shape and target count
# Replays of steps of at most this many tokens apply a deferred update beside their forward
# and run their backward as two streams, one thread each (Plan.run): too few rows to split
# each matmul between threads well. Longer steps would leave a thread idle: the update ends
# in the middle of a long forward call, which started on one thread.
SMALL_STEP_TOKENS = 64
# Micro-steps of an even number of rows and at least this many tokens run as two halves of
# their rows, side by side on two threads (TrainStep._halves).
SPLIT_MIN_TOKENS = 512


class _Plans(dict):
    """Recorded plans by key (a dict of entries), kept while the workspaces they were
    recorded over keep their buffers: ``keep`` drops them all first when one of those has
    replaced a buffer since (plans over the old ones would keep them alive) or MAX_PLANS
    are kept."""

    def __init__(self, *workspaces: Workspace) -> None:
        super().__init__()
        self._workspaces = workspaces
        self._generation: tuple[int, ...] | None = None  # theirs when the plans were kept

    def keep(self, key, entry) -> None:
        generation = tuple(ws.generation for ws in self._workspaces)
        if generation != self._generation or len(self) >= MAX_PLANS:
            self.clear()
            self._generation = generation
        self[key] = entry


class TrainStep:
    """Steps of `model` with `optimizer` (an Adam over ``model.params``).

    ``run(batches, lr)`` takes one step and returns (loss, gradient norm before clipping).
    max_grad_norm: clip to this global L2 norm (None: no clipping). replay: replay recorded
    plans (False: every step layer by layer; the same results, bit for bit). comm: the
    processes of a data-parallel run (rustgpt.comm), each running this step on its part of
    the batch; None: one process. precision: the matmuls' precision, fp32, bf16 or auto
    (rustgpt.precision.resolve; ``precision`` holds the one chosen). ``threads`` chooses
    between one kernel thread and all for each step (rustgpt.threads); ``last_correct`` is
    the latest step's number of targets predicted right (over every process);
    ``comm_seconds`` the time its sums over the processes took."""

    def __init__(self, model: LLM, optimizer: Adam, max_grad_norm: float | None = 5.0, *,
                 replay: bool = True, comm: SingleProcess | None = None,
                 precision: str = "fp32") -> None:
        if optimizer.params is not model.params:
            raise ValidationError("TrainStep: the optimizer updates another model's "
                                  "parameters, expected Adam(model.params)")
        self.model = model
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self.replay = replay
        self.comm = comm or SingleProcess()
        self.threads = StepThreads()
        self.precision = resolve(precision, "[training] precision")
        # bf16: the weights' bf16 copy (P,) the matmuls read, refreshed every step
        self._bf16 = Bf16Weights(model.params.data) if self.precision == "bf16" else None
        # a micro-step's dropout seed (layers.dropout_seed): the workspace carries it, so
        # its layers (and plans) draw their masks from it
        self._dropout_seed = np.zeros(3, np.intc) if model.config.dropout > 0 else None
        self.workspace = Workspace(self._dropout_seed)  # the step's activations
        self._activations = 0  # bytes of the largest step checked: the workspace holds them
        # the second half of a micro-step run as two (_halves): its gradient buffer (a
        # params.with_grad(), made at the first such step), dropout seed, workspace and
        # the bytes that holds
        self._second_grads = None
        self._second_seed = np.zeros(3, np.intc) if self._dropout_seed is not None else None
        self._second_workspace = Workspace(self._second_seed)
        self._second_activations = 0
        # (B, T, targets, the step's targets, accumulate) -> (plan, ids, targets, losses,
        # hits, forward calls); (B, T, the step's targets, accumulate, "halves") -> the
        # two halves' (plan, ids, targets, losses, hits)
        self._plans = _Plans(self.workspace, self._second_workspace)
        self.plans_recorded = 0  # micro-steps run layer by layer (and recorded) so far
        # loss(): its workspace (no dropout) and plans by batch shape
        self._loss_workspace = Workspace()
        self._loss_plans = _Plans(self._loss_workspace)
        self.last_correct = self.last_targets = 0
        self.comm_seconds = 0.0

    def run(self, batches: Sequence[tuple], lr: float, defer: bool = False,
            first_row: int = 0) -> tuple[float, float]:
        """One step over `batches`, a list of (inputs, targets) micro-batches (each (B, T)
        token ids, targets IGNORE_INDEX at padding) whose gradients add up. Returns (loss,
        gradient norm before clipping): the mean cross-entropy over all their targets.
        Raises TrainingError on a NaN/inf loss or gradient, before the parameters change.

        ``defer=True`` leaves the update pending; the next step applies it beside its
        forward, which saves time on two or more threads; the results are the same, bit for
        bit. Until then ``model.params.data`` lags one update behind (``model.settle()``).
        first_row: the index of the batches' first row in the step's whole batch, of which
        this process holds a part (dropout masks follow the row, see K.dropout)."""
        if not batches:
            raise ValidationError("TrainStep.run: no batches, expected at least one")
        checked = [self.model._checked_batch(inputs, targets) for inputs, targets in batches]
        tokens = sum(ids.size for ids, _, _ in checked)
        recorded = self.plans_recorded  # a step that records a plan is not timed
        with self.model.lock:
            return self.threads.run(lambda: self._run(checked, lr, defer, first_row), tokens,
                                    lambda: self.plans_recorded != recorded)

    def loss_and_backward(self, inputs, targets, dropout_step: int = 0,
                          norm: bool = False) -> tuple[float, float | None]:
        """LLM.loss_and_backward through this step's plans (a shape's first call is
        recorded, later ones replay it), without an update: (loss, the gradients' sum of
        squares when `norm` and a replay took it on the way, else None)."""
        ids, tgt, count = self.model._checked_batch(inputs, targets)
        with self.model.lock:
            loss, right, sum_squares = self._backward(ids, tgt, count, count, False,
                                                      dropout_step, norm)
        self.last_correct = right
        return loss / count, sum_squares

    def loss(self, inputs, targets) -> tuple[float, int, int]:
        """LLM.loss through this step's plans, in its precision: (summed loss, number of
        targets, number predicted right), without dropout or gradients. A shape's first
        call runs layer by layer and is recorded, later ones replay it, on a workspace of
        their own (the loss estimates of a text run: the same shape every time)."""
        model = self.model
        ids, tgt, count = model._checked_batch(inputs, targets)
        with model.reading():
            entry = self._loss_plans.get(ids.shape) if self.replay else None
            if entry is None:
                ws = self._loss_workspace
                plan = K.Plan() if self.replay else None
                ids, tgt = ids.copy(), tgt.copy()  # the plan's own inputs
                # in bf16 the copy is rounded again: a deferred update applied since the
                # step's own rounding changed the weights
                with model._activations_of(*ids.shape), \
                        plan if plan is not None else nullcontext(), self._matmuls(True):
                    losses, hits = model._loss(ws, ids, tgt)
                if plan is not None:
                    self._loss_plans.keep(ids.shape, (plan, ids, tgt, losses, hits))
            else:
                plan, plan_ids, plan_tgt, losses, hits = entry
                plan_ids[...] = ids
                plan_tgt[...] = tgt
                plan.run()
            return float(losses.sum(dtype=np.float64)), count, int(np.count_nonzero(hits))

    def _run(self, checked: list, lr: float, defer: bool,
             first_row: int) -> tuple[float, float]:
        opt, model, comm = self.optimizer, self.model, self.comm
        total = sum(count for _, _, count in checked)
        if comm.size > 1:  # the loss is the mean over every process's targets
            began = time.perf_counter()
            total = int(comm.sum([total])[0])
            self.comm_seconds = time.perf_counter() - began
        n = len(checked)
        loss_sum, correct, sum_squares = 0.0, 0, None
        for i, (ids, tgt, count) in enumerate(checked):
            # the replay of the last micro-step sums the gradient's squares on the way,
            # unless the sum over the processes changes the gradient after it
            take_norm = defer and i == n - 1 and comm.size == 1
            # dropout masks: those of micro-step i of the step about to be taken
            part, right, sum_squares = self._backward(ids, tgt, count, total, i > 0,
                                                      opt.t * n + i + 1, take_norm, first_row)
            loss_sum += part
            correct += right
        if comm.size > 1:
            began = time.perf_counter()
            comm.allreduce(model.params.grad)
            loss_sum, correct = comm.sum([loss_sum, correct])
            self.comm_seconds += time.perf_counter() - began
        self.last_correct, self.last_targets = int(correct), total
        loss = loss_sum / total
        # the update checks the norm itself and leaves everything as it was if not finite
        norm = opt.step(lr, self.max_grad_norm, defer, sum_squares) if math.isfinite(loss) \
            else model.grad_norm()
        if opt.pending is not None:
            model._defer(opt)
        if not (math.isfinite(loss) and math.isfinite(norm)):
            raise TrainingError(f"loss = {loss}, gradient norm = {norm} at optimizer step "
                                f"{opt.t + 1}: training diverged (parameters left as they "
                                f"were before this step)")
        return loss, norm

    def _backward(self, ids: np.ndarray, tgt: np.ndarray, count: int, total: int,
                  accumulate: bool, dropout_step: int, norm: bool,
                  first_row: int = 0) -> tuple[float, int, float | None]:
        """One micro-step's loss and backward, its losses scaled by 1 / `total`: (summed
        loss of its targets, targets predicted right, the gradients' sum of squares when
        `norm` and a replay took it on the way, else None). A step that train_step left
        pending is applied first: during a replay, beside the forward if the step has at
        most SMALL_STEP_TOKENS tokens (``Plan.run``: one thread updating while another runs
        it), and such a step's backward then runs as two streams, the weight gradients on
        a thread of their own."""
        model = self.model
        if ids.shape[0] % 2 == 0 and ids.size >= SPLIT_MIN_TOKENS:
            return self._halves(ids, tgt, total, accumulate, dropout_step, first_row)
        if self._dropout_seed is not None:  # the calls read it when they run
            self._dropout_seed[...] = dropout_seed(model.seed, dropout_step, first_row)
        key = (*ids.shape, count, total, accumulate)
        entry = self._plans.get(key) if self.replay else None
        if entry is None:
            model.settle()
            ws = self.workspace
            plan = K.Plan() if self.replay else None
            ids, tgt = ids.copy(), tgt.copy()  # the plan's own inputs
            B, T = ids.shape
            need = activation_bytes(model.config, model.tokenizer.size, B, T)
            # the workspace only grows: what it holds already is not asked for again
            with model._activations_of(B, T, self._activations), \
                    plan if plan is not None else nullcontext(), self._matmuls(not accumulate):
                losses, hits, forward = model._loss_and_backward(ws, ids, tgt, 1.0 / total,
                                                                 accumulate, plan)
            self._activations = max(self._activations, need)
            if plan is not None:
                self._plans.keep(key, (plan, ids, tgt, losses, hits, forward))
            self.plans_recorded += 1
            sum_squares = None
        else:
            plan, plan_ids, plan_tgt, losses, hits, forward = entry
            plan_ids[...] = ids
            plan_tgt[...] = tgt
            small = ids.size <= SMALL_STEP_TOKENS
            if not small:
                model.settle()
            deferred = model._deferred
            sum_squares = plan.run(deferred and deferred.pending, forward, small,
                                   model.params.grad if norm else None)
            if deferred is not None:
                deferred.pending = model._deferred = None
        return float(losses.sum(dtype=np.float64)), int(np.count_nonzero(hits)), sum_squares

    def _halves(self, ids: np.ndarray, tgt: np.ndarray, total: int, accumulate: bool,
                dropout_step: int, first_row: int) -> tuple[float, int, None]:
        """One micro-step as two halves of its rows, each a forward and backward of its
        own (summed loss, targets predicted right, None): the first half's gradients go
        to params.grad (added to it when `accumulate`), the second's into a buffer of
        their own, then added to them. A replay runs the halves side by side, one kernel
        thread each (K.run_pair): on two threads that beats splitting each call of a step
        this size between them, which leaves the threads waiting on each other at every
        call. The arithmetic is the same on any number of threads, replayed or not."""
        model = self.model
        B, T = ids.shape
        half = B // 2
        model.settle()
        if self._bf16 is not None and not accumulate:
            self._bf16.refresh()  # the weights changed since the last step: before both halves
        if self._second_grads is None:
            what = "TrainStep: the gradient buffer of a batch's second half"
            check_memory(model.params.grad.nbytes, f"{what} needs")
            with allocating(what):
                self._second_grads = model.params.with_grad()
        for seed, row in ((self._dropout_seed, first_row), (self._second_seed, first_row + half)):
            if seed is not None:  # dropout masks follow the rows of the whole batch
                seed[...] = dropout_seed(model.seed, dropout_step, row)
        key = (B, T, total, accumulate, "halves")
        entry = self._plans.get(key) if self.replay else None
        if entry is None:
            entry = []
            need = activation_bytes(model.config, model.tokenizer.size, half, T)
            for part in range(2):
                rows = slice(part * half, (part + 1) * half)
                ws, held = ((self.workspace, self._activations) if part == 0 else
                            (self._second_workspace, self._second_activations))
                plan = K.Plan() if self.replay else None
                part_ids, part_tgt = ids[rows].copy(), tgt[rows].copy()  # the plan's own
                with model._activations_of(half, T, held), \
                        model._gradients_into(self._second_grads if part else None), \
                        plan if plan is not None else nullcontext(), self._matmuls(False):
                    losses, hits, _ = model._loss_and_backward(
                        ws, part_ids, part_tgt, 1.0 / total, accumulate and part == 0, plan)
                entry.append((plan, part_ids, part_tgt, losses, hits))
            self._activations = max(self._activations, need)
            self._second_activations = max(self._second_activations, need)
            if self.replay:
                self._plans.keep(key, entry)
            self.plans_recorded += 1
        else:
            for part, (_, part_ids, part_tgt, _, _) in enumerate(entry):
                part_ids[...] = ids[part * half:(part + 1) * half]
                part_tgt[...] = tgt[part * half:(part + 1) * half]
            K.run_pair(entry[0][0], entry[1][0])
        K.add(model.params.grad, model.params.grad, self._second_grads.grad)
        return (sum(float(losses.sum(dtype=np.float64)) for _, _, _, losses, _ in entry),
                sum(int(np.count_nonzero(hits)) for _, _, _, _, hits in entry), None)

    @contextmanager
    def _matmuls(self, refresh: bool) -> Iterator[None]:
        """Around a micro-step's kernel calls (and so in its plan): in bf16, the weights'
        bf16 copy refreshed first when `refresh` (a step's first micro-step: the weights
        changed since the last), then every matmul in bf16; in fp32, nothing."""
        if self._bf16 is None:
            yield
            return
        if refresh:
            self._bf16.refresh()
        with self._bf16.matmuls():
            yield
