"""Python code blocks of the Markdown documents (README.md, docs/*.md), found and run as a user would run them.

A block fenced as ```` ```python ```` is an example that must run as written; tests run each document's blocks
in order, in one namespace, with JAX's default configuration (float32; the suite enables float64 globally).
A block that is not meant to run here (it downloads data, or shows a fragment) is fenced
```` ```python {.notest} ````: GitHub still highlights it as Python, and MkDocs (``attr_list``) renders it
the same way. Any other text after ``python`` on a fence line is an error, so that a block cannot stop
running by a typo.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax

FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<code>.*?)^```[ \t]*$", re.S | re.M)
NOTEST = "python {.notest}"


def python_blocks(text: str, *, source: str = "document") -> list[str]:
    """The runnable Python blocks of ``text`` (info string exactly ``python``), in order."""
    blocks = []
    for match in FENCE.finditer(text):
        info = match["info"].strip()
        if info == "python":
            blocks.append(match["code"])
        elif info.startswith("python") and info != NOTEST:
            raise ValueError(
                f"{source}: a code block is fenced as {info!r}; use ```python (run by the tests) or "
                f"```{NOTEST} (not run)"
            )
    return blocks


def skipped_blocks(text: str) -> int:
    """How many Python blocks of ``text`` are marked not to run."""
    return sum(match["info"].strip() == NOTEST for match in FENCE.finditer(text))


def run_blocks(blocks: list[str], source: str | Path, namespace: dict | None = None) -> dict:
    """Runs ``blocks`` in order in one namespace (returned), as a user's script with float32 defaults."""
    namespace = {"__name__": "__docs__"} if namespace is None else namespace
    with jax.enable_x64(False):
        for i, block in enumerate(blocks):
            exec(compile(block, f"{source} (python block {i + 1})", "exec"), namespace)  # the docs' own examples
    return namespace
