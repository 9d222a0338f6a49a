"""The repository passes its own linter and type checker, as configured in pyproject.toml.

Both run from the repository root as CI runs them; mypy keeps its incremental cache in
``.mypy_cache`` there, so only the first run in a checkout pays for a full check.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(tool: str, *args: str) -> None:
    if importlib.util.find_spec(tool) is None:
        pytest.skip(f"{tool} is not installed: install the dev extra (pip install -e '.[dev]')")
    proc = subprocess.run([sys.executable, "-m", tool, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, check=False)
    assert proc.returncode == 0, f"{tool} {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"


def test_ruff_passes() -> None:
    _run("ruff", "check", "--no-fix", ".")


def test_mypy_passes() -> None:
    _run("mypy")
