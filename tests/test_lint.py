"""The linters and the type checker pass over the repository, as configured in pyproject.toml: ``ruff check``,
``ruff format --check`` and ``mypy`` (the package ``jaxcnn``). Each runs from the repository root in its own
process; a failure prints what the tool reported. Skipped when the tool is not installed
(``pip install -e ".[lint]"``).

mypy keeps its cache in ``.mypy_cache`` (ignored by git): about 15 s from a cold cache, under a second after.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_tool(module: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m module args`` in the repository root, skipping the test when ``module`` is not installed."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f'{module} is not installed (pip install -e ".[lint]")')
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=600, check=False
    )


def assert_passes(run: subprocess.CompletedProcess, command: str) -> None:
    if run.returncode != 0:
        pytest.fail(f"{command} failed (exit status {run.returncode}):\n{run.stdout}{run.stderr}", pytrace=False)


def test_ruff_check():
    assert_passes(run_tool("ruff", "check", "--no-fix", "."), "ruff check .")


def test_ruff_format():
    assert_passes(run_tool("ruff", "format", "--check", "."), "ruff format --check .")


def test_mypy():
    # No arguments: pyproject.toml's [tool.mypy] names the package to check and the settings.
    assert_passes(run_tool("mypy"), "mypy")
