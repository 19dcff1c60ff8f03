"""Shared fixtures: where the real model files live, markers for optional references, and CI's
rule that a test skipped for a missing ../shared or reference environment is a failure."""

import os
from pathlib import Path

import pytest

import mlx_smolvlm  # noqa: F401  (loads the fast CPU BLAS before any test imports mlx)

# ../shared sits beside the checkout; SMOLVLM_SHARED overrides it.
SHARED = Path(os.environ.get("SMOLVLM_SHARED", Path(__file__).resolve().parents[2] / "shared"))
MODELS = SHARED / "models"
# Skip reasons that mean CI is missing something it must have (CI=true turns them into failures).
REQUIRED_IN_CI = ("../shared", "SMOLVLM_VIDEO_REF_PYTHON", "SMOLVLM_COLPALI_REF_PYTHON")


def real_model_dir(name: str = "SmolVLM-256M-Instruct") -> Path:
    """Path of a real checkpoint's config/tokenizer files, or skip the test when absent."""
    path = MODELS / name
    if not (path / "config.json").exists():
        pytest.skip(f"{path} is absent (../shared is not checked out here)")
    return path


@pytest.fixture
def smolvlm_256m_dir() -> Path:
    return real_model_dir("SmolVLM-256M-Instruct")


def required_but_skipped(report: pytest.TestReport) -> bool:
    """Whether `report` is a skip for something CI must provide."""
    return report.skipped and any(reason in str(report.longrepr) for reason in REQUIRED_IN_CI)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI", "").lower() in ("1", "true") and required_but_skipped(report):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where it must run: {report.longrepr}"
