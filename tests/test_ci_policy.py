"""CI's skip policy: a test skipped for a missing ../shared or reference environment fails."""

import subprocess
import sys
import textwrap
from pathlib import Path

CONFTEST = Path(__file__).with_name("conftest.py")


def run(tmp_path: Path, ci: str) -> subprocess.CompletedProcess:
    (tmp_path / "conftest.py").write_text(CONFTEST.read_text())
    (tmp_path / "test_skips.py").write_text(
        textwrap.dedent(
            """
            import pytest

            def test_needs_shared():
                pytest.skip("/x/shared/models/M is absent (../shared is not checked out here)")

            def test_needs_reference():
                pytest.skip("SMOLVLM_VIDEO_REF_PYTHON (a Python with torch...) is unset")

            def test_other_skip():
                pytest.skip("not on this platform")
            """
        )
    )
    env = {"CI": ci, "PATH": "", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )


def test_required_skips_fail_in_ci(tmp_path):
    out = run(tmp_path, "true")
    assert out.returncode == 1, out.stdout
    assert "2 failed" in out.stdout and "1 skipped" in out.stdout
    assert "skipped in CI, where it must run" in out.stdout


def test_skips_stay_skips_outside_ci(tmp_path):
    out = run(tmp_path, "")
    assert out.returncode == 0, out.stdout
    assert "3 skipped" in out.stdout and "../shared is not checked out" in out.stdout  # -rs
