"""Generation: prompts and images in, tokens out (one prompt, or a batch of them)."""

from .batch import SamplingParams, batch_generate, batch_stream_generate
from .cache import PromptCache
from .generate import GenerationResult, generate, prepare_inputs, stream_generate

__all__ = [
    "GenerationResult",
    "PromptCache",
    "SamplingParams",
    "batch_generate",
    "batch_stream_generate",
    "generate",
    "prepare_inputs",
    "stream_generate",
]
