"""Configuration: attrs classes with RustGPT's defaults, validated on construction.

Later layers (file < environment ``LLM_<SECTION>_<KEY>`` < CLI) are merged by ``load_config``.
"""

from __future__ import annotations

import attrs

from rustgpt.errors import ArchitectureError, ConfigError


def _positive(section: str):
    def check(instance, attribute, value):
        if isinstance(value, bool) or not value > 0:
            raise ConfigError(f"[{section}] {attribute.name} = {value!r}, expected > 0")
    return check


def _non_negative(section: str):
    def check(instance, attribute, value):
        if isinstance(value, bool) or not value >= 0:
            raise ConfigError(f"[{section}] {attribute.name} = {value!r}, expected >= 0")
    return check


def _unit_interval(section: str, closed_low: bool = True):
    def check(instance, attribute, value):
        ok = (0 <= value < 1) if closed_low else (0 < value <= 1)
        if not ok:
            interval = "[0, 1)" if closed_low else "(0, 1]"
            raise ConfigError(f"[{section}] {attribute.name} = {value!r}, expected in {interval}")
    return check


@attrs.frozen
class ModelConfig:
    """Architecture; the defaults are RustGPT's."""

    embedding_dim: int = attrs.field(default=128, validator=_positive("model"))
    hidden_dim: int = attrs.field(default=256, validator=_positive("model"))
    num_layers: int = attrs.field(default=3, validator=_positive("model"))
    num_heads: int = attrs.field(default=1, validator=_positive("model"))
    max_seq_len: int = attrs.field(default=80, validator=_positive("model"))

    def __attrs_post_init__(self) -> None:
        if self.embedding_dim % self.num_heads:
            raise ArchitectureError(f"[model] num_heads = {self.num_heads} must divide "
                                    f"embedding_dim = {self.embedding_dim}")


@attrs.frozen
class TrainingConfig:
    """The two RustGPT phases, their optimizer and schedule."""

    pretraining_epochs: int = attrs.field(default=100, validator=_non_negative("training"))
    pretraining_lr: float = attrs.field(default=5e-4, validator=_positive("training"))
    instruction_epochs: int = attrs.field(default=100, validator=_non_negative("training"))
    instruction_lr: float = attrs.field(default=1e-4, validator=_positive("training"))
    batch_size: int = attrs.field(default=1, validator=_positive("training"))
    max_grad_norm: float = attrs.field(default=5.0, validator=_positive("training"))
    beta1: float = attrs.field(default=0.9, validator=_unit_interval("training"))
    beta2: float = attrs.field(default=0.999, validator=_unit_interval("training"))
    eps: float = attrs.field(default=1e-8, validator=_positive("training"))
    weight_decay: float = attrs.field(default=0.0, validator=_non_negative("training"))
    # "constant" is RustGPT's; "cosine" warms up linearly for warmup_steps, then decays to 10%
    schedule: str = attrs.field(default="constant",
                                validator=attrs.validators.in_(("constant", "cosine")))
    warmup_steps: int = attrs.field(default=0, validator=_non_negative("training"))
    shuffle: bool = False  # RustGPT walks the examples in file order
    seed: int = attrs.field(default=42, validator=_non_negative("training"))
    threads: int = attrs.field(default=0, validator=_non_negative("training"))  # 0: automatic


@attrs.frozen
class GenerationConfig:
    """Decoding; the defaults are RustGPT's greedy decoding."""

    max_tokens: int = attrs.field(default=80, validator=_positive("generation"))
    temperature: float = attrs.field(default=0.0, validator=_non_negative("generation"))
    top_k: int = attrs.field(default=0, validator=_non_negative("generation"))  # 0: off
    top_p: float = attrs.field(default=1.0, validator=_unit_interval("generation", False))
    min_p: float = attrs.field(default=0.0, validator=_unit_interval("generation"))
    repetition_penalty: float = attrs.field(default=1.0, validator=_positive("generation"))
    beam_width: int = attrs.field(default=1, validator=_positive("generation"))
    seed: int | None = None
