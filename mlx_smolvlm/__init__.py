"""mlx-smolvlm: SmolVLM / Idefics3 vision-language models in native MLX."""

from .cpu_blas import enable_fast_blas

enable_fast_blas()  # must precede the first `import mlx.core`

from .config import ModelConfig  # noqa: E402
from .generate import GenerationResult, PromptCache, generate, stream_generate  # noqa: E402
from .loading import load, load_config, load_model  # noqa: E402
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
    "load_config",
    "load_model",
    "stream_generate",
]


def apply_chat_template(
    processor: Processor,
    config: ModelConfig | dict | str | list | None = None,
    prompt: str | dict | list | None = None,
    num_images: int = 0,
    add_generation_prompt: bool = True,
    return_messages: bool = False,
    **kw,
) -> str | list:
    """Render a prompt string (with `num_images` images in front) or chat messages with the
    model's template, with mlx-vlm's signature: `apply_chat_template(processor, config,
    prompt, num_images=1)`. `config` (model.config, a config dict or None) may be left out:
    `apply_chat_template(processor, prompt, num_images=1)`; the processor holds the template.
    """
    from .processing import build_messages

    if prompt is None and isinstance(config, (str, list, tuple)):
        config, prompt = None, config
    if config is not None and not isinstance(config, (ModelConfig, dict)):
        raise TypeError(
            f"config must be a ModelConfig, a dict or None, got {type(config).__name__}"
        )
    if prompt is None:
        raise TypeError("apply_chat_template needs a prompt (a string or chat messages)")
    if isinstance(prompt, str):
        messages = build_messages(prompt, num_images)
    else:
        messages = [prompt] if isinstance(prompt, dict) else list(prompt)
    if return_messages:
        return messages
    return processor.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, **kw
    )
