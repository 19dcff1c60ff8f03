"""mlx-smolvlm: SmolVLM / Idefics3 vision-language models in native MLX."""

from .backends.blas import enable_fast_blas

enable_fast_blas()  # must precede the first `import mlx.core`; prints nothing

from .generation import (  # noqa: E402
    GenerationResult,
    PromptCache,
    batch_generate,
    batch_stream_generate,
    generate,
    stream_generate,
)
from .loading import load, load_model  # noqa: E402
from .model import Model, ModelConfig  # noqa: E402
from .processing import Processor, apply_chat_template  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "GenerationResult",
    "Model",
    "ModelConfig",
    "Processor",
    "PromptCache",
    "apply_chat_template",
    "batch_generate",
    "batch_stream_generate",
    "generate",
    "load",
    "load_model",
    "stream_generate",
]
