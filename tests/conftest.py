"""Shared test configuration: float64 available everywhere (float32 tests pass float32 arrays explicitly)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import jax

jax.config.update("jax_enable_x64", True)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("JAXCNN_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the checkout (or ``$JAXCNN_SHARED_DATA``); skips when absent."""
    if not (SHARED_DATA / "mnist").is_dir():
        pytest.skip(f"real MNIST files not found in {SHARED_DATA} (set JAXCNN_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    """A persistent compilation cache private to the module that uses it: a program compiled again (the
    same network and settings in another run of that module) is read back instead of recompiled. The
    previous settings are restored afterwards."""
    from jax._src import compilation_cache as cc

    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    saved = {name: getattr(jax.config, name) for name in names}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla-cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    cc.reset_cache()
    yield
    for name, value in saved.items():
        jax.config.update(name, value)
    cc.reset_cache()


@pytest.fixture(scope="session")
def offline():
    """The bundled 5,000-image MNIST subset (its fixed 4,000 / 1,000 split), loaded once."""
    from jaxcnn import data as jdata

    return jdata.load_dataset(jdata.OFFLINE_NAME, log=lambda s: None)
