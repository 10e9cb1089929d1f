"""rustgpt: a small GPT-style language model trained from scratch on the CPU.

    import rustgpt
    model = rustgpt.load("checkpoints")            # the best checkpoint of a training run
    print(model.generate("How do mountains form?"))

The heavy parts (numpy, the C extension) load on first use of a name that needs them, so
importing ``rustgpt.errors`` or running ``rustgpt-cli --help`` stays fast.
"""

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
from rustgpt.resources import bound_omp_num_threads

# OpenMP reads OMP_NUM_THREADS once, when the C extension first loads it: bounded before that
bound_omp_num_threads()

__version__ = "0.1.0"

_LAZY = {
    "LLM": "rustgpt.model",
    "KVCache": "rustgpt.model",
    "Vocab": "rustgpt.tokenizer",
    "Dataset": "rustgpt.data",
    "Config": "rustgpt.config",
    "ModelConfig": "rustgpt.config",
    "TrainingConfig": "rustgpt.config",
    "GenerationConfig": "rustgpt.config",
    "load_config": "rustgpt.config",
    "Trainer": "rustgpt.training",
    "TrainStep": "rustgpt.step",
    "build_run": "rustgpt.run",
    "Run": "rustgpt.run",
    "Adam": "rustgpt.optim",
    "Checkpoint": "rustgpt.checkpoint",
    "CheckpointManager": "rustgpt.checkpoint",
    "load": "rustgpt.checkpoint",
    "Metrics": "rustgpt.metrics",
    "setup_logging": "rustgpt.log",
    "generate": "rustgpt.generation",
    "kernels_info": "rustgpt._kernels",
    "set_num_threads": "rustgpt._kernels",
    "set_local_threads": "rustgpt._kernels",
    "get_num_threads": "rustgpt._kernels",
    "set_simd": "rustgpt._kernels",
    "set_bf16": "rustgpt._kernels",
}

__all__ = sorted(_LAZY) + [
    "ArchitectureError", "ConfigError", "DataLoadError", "LlmError", "SerializationError",
    "ShapeMismatch", "TokenError", "TrainingError", "ValidationError", "VocabularyError",
    "__version__",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rustgpt' has no attribute {name!r}")


def __dir__():
    return __all__
