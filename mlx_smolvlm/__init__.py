"""mlx-smolvlm: SmolVLM / Idefics3 vision-language models in native MLX."""

import sys
import types

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
from .loading import load, load_config, load_model  # noqa: E402
from .model import Model, ModelConfig  # noqa: E402
from .processing import Processor, apply_chat_template  # noqa: E402

__version__ = "0.1.0"


class _Package(types.ModuleType):
    """This package, whose `generate` stays the function when the `generate` command module is
    imported (the import system would otherwise bind the submodule to the package's name)."""

    def __setattr__(self, name: str, value: object) -> None:
        if name == "generate" and isinstance(value, types.ModuleType):
            return  # the command stays importable as `mlx_smolvlm.generate` via sys.modules
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

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
    "load_config",
    "load_model",
    "stream_generate",
]
