"""Shared test configuration: float64 available everywhere (float32 tests pass float32 arrays explicitly)."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import pytest

jax.config.update("jax_enable_x64", True)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("JAXCNN_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the checkout (or ``$JAXCNN_SHARED_DATA``); skips when absent."""
    if not (SHARED_DATA / "mnist").is_dir():
        pytest.skip(f"real MNIST files not found in {SHARED_DATA} (set JAXCNN_SHARED_DATA)")
    return SHARED_DATA
