"""mlx-smolvlm: SmolVLM / Idefics3 vision-language models in native MLX."""

from .cpu_blas import enable_fast_blas

enable_fast_blas()  # must precede the first `import mlx.core`

from .config import ModelConfig  # noqa: E402
from .generate import GenerationResult, PromptCache, generate, stream_generate  # noqa: E402
from .loading import load, load_model  # noqa: E402
from .model import Model  # noqa: E402
from .processing import Processor  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "GenerationResult",
    "Model",
    "ModelConfig",
    "Processor",
    "PromptCache",
    "apply_chat_template",
    "generate",
    "load",
    "load_model",
    "stream_generate",
]


def apply_chat_template(processor: Processor, prompt: str | list, num_images: int = 0, **kw) -> str:
    """Render a prompt string (with `num_images` images) or chat messages with the model's template."""
    from .processing import build_messages

    messages = build_messages(prompt, num_images) if isinstance(prompt, str) else prompt
    return processor.apply_chat_template(messages, add_generation_prompt=True, **kw)
