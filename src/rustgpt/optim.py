"""Adam / AdamW over the model's flat parameter buffer: one fused kernel call per step,
gradient-norm clipping included; or the step deferred, to run beside the next forward."""

from __future__ import annotations

import math

import numpy as np

from rustgpt import _kernels as K
from rustgpt.errors import ValidationError
from rustgpt.layers import FlatParameters, zeros_hugepage


def decay_ranges(specs: list[tuple[str, tuple[int, ...], str, float]]) -> np.ndarray:
    """The parts of the flat buffer that AdamW's weight decay applies to: the parameters
    of two or more dimensions (weight matrices and the embeddings), as nanoGPT's
    configure_optimizers; biases and layer-norm gains and shifts are not decayed.
    specs: FlatParameters' table. Returns (R, 2) intp, the [start, end) of each run of
    such parameters, adjacent ones merged, in buffer order."""
    ranges: list[list[int]] = []
    offset = 0
    for _, shape, _, _ in specs:
        n = math.prod(shape)
        if len(shape) >= 2:
            if ranges and ranges[-1][1] == offset:
                ranges[-1][1] += n
            else:
                ranges.append([offset, offset + n])
        offset += n
    return np.array(ranges, np.intp).reshape(-1, 2)


class Adam:
    """Adam (weight_decay = 0, as RustGPT) or AdamW: decoupled weight decay on the
    parameters of two or more dimensions only (``decay_ranges``).

    State: first and second moments m, v (P,) and the step count t, all exposed for
    checkpoints via ``state_dict`` / ``load_state_dict``; ``pending``, a step that
    ``step(defer=True)`` left to apply (see there)."""

    def __init__(self, params: FlatParameters, beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        self.params = params
        self.beta1, self.beta2, self.eps, self.weight_decay = beta1, beta2, eps, weight_decay
        self.decay = decay_ranges(params.specs)  # (R, 2)
        self.m = zeros_hugepage(params.data.size)
        self.v = zeros_hugepage(params.data.size)
        self.t = 0
        self.pending: K.AdamStep | None = None

    def step(self, lr: float, max_grad_norm: float | None = None, defer: bool = False,
             sum_squares: float | None = None) -> float:
        """params -= Adam(lr, grad), the gradient first scaled down to global L2 norm
        ``max_grad_norm`` if it is longer (None: no clipping). Returns the gradient's norm
        before clipping. A NaN or infinite norm leaves the parameters, the moments and the
        step count as they were (the caller decides what to do about it).

        With ``defer``, only the norm is taken now and the update waits in ``pending``
        (t counts it already) until ``settle()``, or until ``LLM.loss_and_backward``
        applies it beside its forward; the grads must stay as they are until then. The
        result is the same, bit for bit. ``sum_squares``: the gradient's sum of squares,
        if the caller has it already (``sum_squares(grad)``'s bits, as ``Plan.run`` gives
        it), which a deferred step then does not take again."""
        if not lr > 0:
            raise ValidationError(f"Adam.step: lr = {lr}, expected > 0")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValidationError(f"Adam.step: max_grad_norm = {max_grad_norm}, expected > 0 "
                                  f"or None")
        self.settle()
        if defer:
            if sum_squares is None:
                sum_squares = K.sum_squares(self.params.grad)
            norm = math.sqrt(sum_squares)
            if math.isfinite(norm):
                self.pending = K.AdamStep(self.params.data, self.m, self.v, self.params.grad,
                                          lr, self.beta1, self.beta2, self.eps,
                                          self.weight_decay, self.t + 1, max_grad_norm or 0.0,
                                          norm, self.decay)
        else:
            norm = K.adam_update(self.params.data, self.m, self.v, self.params.grad, lr,
                                 self.beta1, self.beta2, self.eps, self.weight_decay,
                                 self.t + 1, max_grad_norm or 0.0, self.decay)
        if math.isfinite(norm):
            self.t += 1
        return norm

    def settle(self) -> None:
        """Apply the pending step, if there is one not applied yet."""
        if self.pending is not None:
            if not self.pending.applied:
                self.pending.apply()
            self.pending = None

    def state_dict(self) -> dict:
        """Copies of the moments m, v (P,) and the step count t (a pending step applied
        first)."""
        self.settle()
        return {"m": self.m.copy(), "v": self.v.copy(), "t": self.t}

    def load_state_dict(self, state: dict) -> None:
        """Restore a state_dict; raises ValidationError if m or v do not match the
        parameters' shape."""
        self.settle()
        for key in ("m", "v"):
            arr = np.asarray(state[key], np.float32)
            if arr.shape != self.m.shape:
                raise ValidationError(f"optimizer state: {key} has shape {arr.shape}, "
                                      f"expected {self.m.shape}")
            getattr(self, key)[...] = arr
        self.t = int(state["t"])
