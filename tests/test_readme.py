"""The README's Python examples run as written, and its commands name real flags."""

from __future__ import annotations

import re

import jax
import numpy as np

from conftest import REPO

README = (REPO / "README.md").read_text()


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    with jax.enable_x64(False):  # a user's default configuration (the suite enables float64 globally)
        for block in blocks:
            exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own examples
    # The tour's claims: the conv output shape, both backward formulations agree, the check passes.
    assert namespace["y"].shape == (2, 5, 5, 6)
    np.testing.assert_allclose(namespace["dx"], namespace["dx2"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(namespace["dw"], namespace["dw2"], rtol=1e-5, atol=1e-5)
    assert namespace["result"].ok
    assert np.isfinite(float(namespace["loss"]))


def test_readme_train_flags_exist():
    import contextlib
    import io

    from jaxcnn.cli import main

    help_text = io.StringIO()
    with contextlib.redirect_stdout(help_text):
        try:
            main(["train", "--help"])
        except SystemExit:
            pass
    used = set(re.findall(r"jaxcnn train[^\n]*", README))
    flags = {flag for line in used for flag in re.findall(r"--[a-z][a-z-]+", line)}
    assert flags, "the README shows no jaxcnn train flags"
    missing = sorted(f for f in flags if f not in help_text.getvalue())
    assert not missing, f"README uses flags that jaxcnn train does not have: {missing}"
