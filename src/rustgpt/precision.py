"""Matmul precision: the fp32 | bf16 | auto setting resolved against this CPU, and the bf16
copy of a model's weights that bf16 matmuls read.

In bf16 only the matmuls' operands are bf16 (their sums stay float32); master weights,
Adam moments, layer norms, softmax, cross-entropy and the residual stream stay float32.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

import numpy as np

from rustgpt import _kernels as K
from rustgpt.errors import ValidationError

if TYPE_CHECKING:
    from rustgpt.model import LLM

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "auto")
FAST_BF16 = ("avx512bf16", "amx")  # the bf16 paths faster than float32
_told: set[tuple[str, str]] = set()  # (where, setting) resolve() has logged already


def resolve(precision: str, where: str) -> str:
    """"fp32" or "bf16" for the setting `precision` (fp32, bf16 or auto) of `where` (a
    config key, for the log line): auto is bf16 where the CPU has AMX or AVX512-BF16,
    else fp32; bf16 on a CPU without either runs on the portable C path, slower than fp32
    for matmuls of many rows (a decoding step's few rows read the weights' bf16 copy in
    place on every CPU).
    Each of the two says so in a log line, once per process for each `where`. Raises
    ValidationError for another value."""
    if precision not in PRECISIONS:
        raise ValidationError(f"{where} = {precision!r}, expected one of "
                              f"{', '.join(PRECISIONS)}")
    path = K.kernels_info()["bf16"]
    tell = (where, precision) not in _told
    _told.add((where, precision))
    if precision == "auto":
        chosen = "bf16" if path in FAST_BF16 else "fp32"
        if tell:
            log.info("%s = auto: %s (bf16 paths of this CPU: %s)", where, chosen,
                     ", ".join(K.bf16_paths()), extra={"precision": chosen, "bf16_path": path})
        return chosen
    if precision == "bf16" and path not in FAST_BF16 and tell:
        log.warning("%s = bf16 on the portable path: this CPU has neither AMX nor "
                    "AVX512-BF16, so bf16 matmuls of many rows (training, prefill) run "
                    "slower than fp32", where, extra={"precision": "bf16", "bf16_path": path})
    return precision


class Bf16Weights:
    """A bf16 copy of a flat float32 parameter buffer (values, (P,)): ``refresh()`` after
    the values change; ``matmuls()`` is the context in which this thread's matmuls run in
    bf16, reading the weights from the copy (K.Bf16Matmuls)."""

    def __init__(self, values: np.ndarray) -> None:
        self.values = values
        self.copy = np.empty(values.size, np.uint16)  # (P,)

    def refresh(self) -> None:
        """Round the values into the copy (a kernel call: recorded into a plan)."""
        K.to_bf16(self.copy, self.values)

    def matmuls(self) -> K.Bf16Matmuls:
        """``with weights.matmuls():`` every sgemm of this thread in bf16."""
        return K.Bf16Matmuls(self.values, self.copy)


def decoding_weights(model: LLM, precision: str, where: str) -> Bf16Weights | None:
    """The bf16 copy of `model`'s weights that decoding's matmuls read when `precision`
    (fp32, bf16 or auto: resolve, logged as `where`) comes to bf16, made now while the
    model is read consistently (``model.reading()``); None for fp32. A few rows at a time
    (M <= 16) read the copy in place, so a decoding step moves half the bytes of float32
    weights."""
    if resolve(precision, where) == "fp32":
        return None
    weights = Bf16Weights(model.params.data)
    with model.reading():
        weights.refresh()
    return weights


def matmuls(weights: Bf16Weights | None) -> AbstractContextManager:
    """``with matmuls(weights):`` this thread's matmuls in bf16 from `weights`, or as
    they are (fp32) for None."""
    return weights.matmuls() if weights is not None else nullcontext()
