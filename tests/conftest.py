"""Shared fixtures: where the real model files live, and markers for optional references."""

import os
from pathlib import Path

import pytest

import mlx_smolvlm  # noqa: F401  (loads the fast CPU BLAS before any test imports mlx)

# ../shared sits beside the checkout; SMOLVLM_SHARED overrides it.
SHARED = Path(os.environ.get("SMOLVLM_SHARED", Path(__file__).resolve().parents[2] / "shared"))
MODELS = SHARED / "models"


def real_model_dir(name: str = "SmolVLM-256M-Instruct") -> Path:
    """Path of a real checkpoint's config/tokenizer files, or skip the test when absent."""
    path = MODELS / name
    if not (path / "config.json").exists():
        pytest.skip(f"{path} is absent (../shared is not checked out here)")
    return path


@pytest.fixture
def smolvlm_256m_dir() -> Path:
    return real_model_dir("SmolVLM-256M-Instruct")
