"""The project's pieces the retriever is built from, imported in this one place."""

from ..config import ModelConfig, load_config
from ..convert import staging, write_weights
from ..image_processing import fetch_image
from ..loading import check_weights, get_model_path, load_weights, quantize_like, resolve_dtype
from ..model import Model, padding_mask
from ..processing import Processor

__all__ = [
    "Model",
    "ModelConfig",
    "Processor",
    "check_weights",
    "fetch_image",
    "get_model_path",
    "load_config",
    "load_weights",
    "padding_mask",
    "quantize_like",
    "resolve_dtype",
    "staging",
    "write_weights",
]
