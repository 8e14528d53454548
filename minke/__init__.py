"""minke: run, serve, fine-tune and evaluate the DeepSeek open models (LLM, MoE, V2)."""

from .version import __version__

from .logging_utils import configure_logging

configure_logging()

from .config import ConfigError, ModelConfig, load_config
from .loader import CheckpointError, load_model

__all__ = ["ConfigError", "CheckpointError", "ModelConfig", "load_config", "load_model", "load_tokenizer",
           "LLM", "SamplingParams", "StructuredOutputsParams", "__version__"]


def __getattr__(name):
    # Lazy imports keep `import minke` light and let pieces land independently.
    if name == "load_tokenizer":
        from .tokenizer import load_tokenizer

        return load_tokenizer
    if name == "SamplingParams":
        from .sampling_params import SamplingParams

        return SamplingParams
    if name == "StructuredOutputsParams":
        from .sampling_params import StructuredOutputsParams

        return StructuredOutputsParams
    if name == "LLM":
        from .engine.llm import LLM

        return LLM
    raise AttributeError(f"module 'minke' has no attribute {name!r}")
