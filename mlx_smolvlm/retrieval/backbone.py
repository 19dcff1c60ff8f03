"""The project's pieces the retriever is built from, imported in this one place."""

from ..backends.cpu import prepare
from ..loading import get_model_path, load_into, load_weights
from ..model import Model, ModelConfig, load_config
from ..model.mask import padding_mask
from ..processing import Processor
from ..processing.image import fetch_image
from ..utils import atomic
from ..utils.validation import read_json

__all__ = [
    "Model",
    "ModelConfig",
    "Processor",
    "atomic",
    "fetch_image",
    "get_model_path",
    "load_into",
    "load_config",
    "load_weights",
    "padding_mask",
    "prepare",
    "read_json",
]
