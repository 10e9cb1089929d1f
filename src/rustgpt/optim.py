"""Adam / AdamW over the model's flat parameter buffer: one fused kernel call per step."""

from __future__ import annotations

import numpy as np

from rustgpt import _kernels as K
from rustgpt.errors import ValidationError
from rustgpt.layers import FlatParameters, zeros_hugepage


class Adam:
    """Adam (weight_decay = 0, as RustGPT) or AdamW (decoupled weight decay).

    State: first and second moments m, v (P,) and the step count t, all exposed for
    checkpoints via ``state_dict`` / ``load_state_dict``."""

    def __init__(self, params: FlatParameters, beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        self.params = params
        self.beta1, self.beta2, self.eps, self.weight_decay = beta1, beta2, eps, weight_decay
        self.m = zeros_hugepage(params.data.size)
        self.v = zeros_hugepage(params.data.size)
        self.t = 0

    def step(self, lr: float, grad_scale: float = 1.0) -> None:
        """params -= Adam(lr, grad * grad_scale); grad_scale carries gradient clipping."""
        if not lr > 0:
            raise ValidationError(f"Adam.step: lr = {lr}, expected > 0")
        self.t += 1
        K.adam_update(self.params.data, self.m, self.v, self.params.grad, lr, self.beta1,
                      self.beta2, self.eps, self.weight_decay, self.t, grad_scale)

    def state_dict(self) -> dict:
        return {"m": self.m.copy(), "v": self.v.copy(), "t": self.t}

    def load_state_dict(self, state: dict) -> None:
        for key in ("m", "v"):
            arr = np.asarray(state[key], np.float32)
            if arr.shape != self.m.shape:
                raise ValidationError(f"optimizer state: {key} has shape {arr.shape}, "
                                      f"expected {self.m.shape}")
            getattr(self, key)[...] = arr
        self.t = int(state["t"])
