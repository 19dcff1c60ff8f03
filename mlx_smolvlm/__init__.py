"""mlx-smolvlm: SmolVLM / Idefics3 vision-language models in native MLX."""

from .cpu_blas import enable_fast_blas

enable_fast_blas()  # must precede the first `import mlx.core`

from .config import ModelConfig  # noqa: E402
from .loading import load, load_model  # noqa: E402
from .model import Model  # noqa: E402

__version__ = "0.1.0"

__all__ = ["Model", "ModelConfig", "load", "load_model"]
