"""rustgpt: a small GPT-style language model trained from scratch on the CPU."""

from rustgpt._kernels import get_num_threads, kernels_info, set_num_threads, set_simd
from rustgpt.errors import (
    ArchitectureError,
    ConfigError,
    DataLoadError,
    LlmError,
    SerializationError,
    ShapeMismatch,
    TokenError,
    TrainingError,
    ValidationError,
    VocabularyError,
)

__version__ = "0.1.0"
