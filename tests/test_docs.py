"""The documentation: every public name has a docstring, the guides' examples run, the docstrings' examples
pass, and the site builds with no broken link or cross-reference.

* Public modules are :data:`PUBLIC_MODULES`, each with an API page ``docs/api/*.md`` (``::: module``);
  every other module of the package is listed in :data:`INTERNAL_MODULES`, so that a new module has to be
  placed in one or the other.
* A public name is one in the module's ``__all__``, or, without ``__all__``, one not starting with ``_``
  that the module defines itself (not one it imports); dunder names (``__version__``) are exempt.
  Functions, classes and modules are documented by their own docstring (not one inherited, nor the
  ``Name(field, ...)`` text that NamedTuple and dataclass generate); a constant by a string literal right
  after its assignment (an attribute docstring, which the API reference shows) or a comment on or directly
  above it (which the reference lifts into a docstring, see ``docs/_ext/sphinx_roles.py``).
* The Python blocks of every docs page run, page by page, in order, on small shapes; the guides' results
  are checked too (see ``tests/_docblocks.py`` for the ```` ```python {.notest} ```` fence of blocks that
  are not meant to run).
* Doctests: every ``>>>`` example in the docstrings of the package's modules.
* ``mkdocs build --strict`` into a temporary directory, when MkDocs is installed (``pip install -e ".[docs]"``).
"""

from __future__ import annotations

import ast
import doctest
import importlib
import importlib.util
import inspect
import io
import pkgutil
import re
import subprocess
import sys
import tokenize
import types
from functools import cache
from pathlib import Path

import numpy as np
import pytest

import jax

import jaxcnn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _docblocks import python_blocks, run_blocks, skipped_blocks

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"

PUBLIC_MODULES = (
    "jaxcnn",
    "jaxcnn.ops",
    "jaxcnn.layers",
    "jaxcnn.gradients",
    "jaxcnn.gradcheck",
    "jaxcnn.reference",
    "jaxcnn.models",
    "jaxcnn.train",
    "jaxcnn.data",
    "jaxcnn.bench",
    "jaxcnn.inference",
    "jaxcnn.per_example",
    "jaxcnn.host",
)
# Modules of the package that are not part of the documented API (their docstrings are still checked by
# the doctest collector). The submodules of a public package are its implementation: the package's
# ``__all__`` is its API.
INTERNAL_MODULES = (
    "jaxcnn.__main__",
    "jaxcnn.cli",
    "jaxcnn.inference_cli",
    "jaxcnn.modelcheck",
    "jaxcnn.provenance",
    "jaxcnn.shapes",
)


# ---------------------------------------------------------------------------------------------------
# Public modules and their pages


def test_every_module_is_public_or_internal():
    found = {f"jaxcnn.{m.name}" for m in pkgutil.iter_modules(jaxcnn.__path__)}
    unplaced = sorted(found - set(PUBLIC_MODULES) - set(INTERNAL_MODULES))
    assert not unplaced, (
        f"modules {unplaced} are neither in PUBLIC_MODULES (give each a page docs/api/NAME.md "
        "holding '::: module' and a line in mkdocs.yml's nav) nor in INTERNAL_MODULES of "
        "tests/test_docs.py"
    )
    gone = sorted((set(PUBLIC_MODULES) | set(INTERNAL_MODULES)) - found - {"jaxcnn"})
    assert not gone, f"tests/test_docs.py lists modules that do not exist: {gone}"


def _api_pages() -> dict[str, Path]:
    pages = {}
    for page in sorted((DOCS / "api").glob("*.md")):
        for line in page.read_text().splitlines():
            if line.startswith("::: "):
                pages[line[4:].strip()] = page
    return pages


@pytest.mark.parametrize("module", PUBLIC_MODULES)
def test_public_module_has_an_api_page_in_the_nav(module):
    pages = _api_pages()
    assert module in pages, f"no page in docs/api/ renders {module} ('::: {module}')"
    nav_entry = pages[module].relative_to(DOCS).as_posix()
    assert nav_entry in (REPO / "mkdocs.yml").read_text(), f"{nav_entry} is not in mkdocs.yml's nav"


# ---------------------------------------------------------------------------------------------------
# Docstrings of public names


def public_names(module: types.ModuleType) -> list[str]:
    """``__all__``, or the names not starting with ``_`` that ``module`` defines (assigns, defs, classes)."""
    if hasattr(module, "__all__"):
        return sorted(module.__all__)
    defined = set()
    for node in ast.parse(inspect.getsource(module)).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.Assign):
            defined.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            defined.add(node.target.id)
    return sorted(name for name in defined if not name.startswith("_"))


def _own_docstring(obj) -> str | None:
    """The docstring ``obj`` itself was given: not inherited, not generated by NamedTuple or dataclass."""
    if inspect.isclass(obj):
        doc = obj.__dict__.get("__doc__")
        if doc and doc.startswith(f"{obj.__name__}("):  # NamedTuple / dataclass: "Name(field, ...)"
            return None
        return doc
    return getattr(obj, "__doc__", None)


@cache
def _module_tree(name: str) -> ast.Module:
    return ast.parse(inspect.getsource(importlib.import_module(name)))


def _imported_from(module_name: str, tree: ast.Module, name: str) -> str | None:
    """The module that ``module_name`` imports ``name`` from, if it does."""
    is_package = hasattr(importlib.import_module(module_name), "__path__")
    package = module_name if is_package else module_name.rpartition(".")[0]
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == name for a in node.names):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                return f"{base}.{node.module}" if node.module else base
            return node.module
    return None


def constant_documented(module_name: str, name: str) -> bool:
    """Whether the constant ``name`` of ``module_name`` (or of the module it is imported from) has an attribute
    docstring, or a comment on its line or directly above it."""
    tree = _module_tree(module_name)
    body = tree.body
    for i, node in enumerate(body):
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        if not any(isinstance(t, ast.Name) and t.id == name for t in targets):
            continue
        following = body[i + 1] if i + 1 < len(body) else None
        value = following.value if isinstance(following, ast.Expr) else None
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            return True
        lines = inspect.getsource(importlib.import_module(module_name)).splitlines()
        above = lines[node.lineno - 2].strip() if node.lineno >= 2 else ""
        if above.startswith("#") and not above.startswith("# ---"):  # not a section rule
            return True
        try:
            tokens = tokenize.generate_tokens(io.StringIO(lines[node.lineno - 1] + "\n").readline)
            return any(t.type == tokenize.COMMENT for t in tokens)
        except (tokenize.TokenError, SyntaxError):  # the first line of a multi-line assignment
            return False
    source = _imported_from(module_name, tree, name)
    return source is not None and constant_documented(source, name)


def undocumented(module_name: str) -> tuple[list[str], int]:
    """The public names of ``module_name`` without documentation, and how many public names it has."""
    module = importlib.import_module(module_name)
    names = public_names(module)
    missing = []
    for name in names:
        if name.startswith("__") and name.endswith("__"):  # __version__ and the like: documented by convention
            continue
        obj = getattr(module, name)
        if inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isroutine(obj):
            ok = bool((_own_docstring(obj) or "").strip())
        else:
            ok = constant_documented(module_name, name)
        if not ok:
            missing.append(name)
    return missing, len(names)


@pytest.mark.parametrize("module", PUBLIC_MODULES)
def test_public_names_have_docstrings(module, record_property):
    missing, total = undocumented(module)
    record_property("public_names", total)
    assert not missing, f"{module}: {len(missing)} of {total} public names have no docstring: {', '.join(missing)}"


def test_module_docstrings():
    for name in PUBLIC_MODULES:
        assert (importlib.import_module(name).__doc__ or "").strip(), f"{name} has no module docstring"


def test_docstring_checker_catches_what_it_should():
    # The checker itself: generated NamedTuple/dataclass docstrings and inherited ones do not count.
    import dataclasses
    from typing import NamedTuple

    class Plain(NamedTuple):
        a: int

    @dataclasses.dataclass
    class Data:
        a: int

    class Written(NamedTuple):
        """Has one."""

        a: int

    assert _own_docstring(Plain) is None and _own_docstring(Data) is None and _own_docstring(Written)
    assert constant_documented("jaxcnn.train.config", "CHECK_TOLERANCE")  # a comment block above it


# ---------------------------------------------------------------------------------------------------
# The guides' Python blocks

# Pages whose examples a dedicated test below runs and checks; every other page's runnable blocks run too.
GUIDES = ("training.md", "gradients.md")


def _pages_with_python() -> list[str]:
    return sorted(
        page.relative_to(DOCS).as_posix()
        for page in DOCS.rglob("*.md")
        if python_blocks(page.read_text(), source=str(page.relative_to(REPO)))
    )


def test_python_fences_are_runnable_or_notest():
    # python_blocks raises on a fence that is neither ```python nor ```python {.notest}.
    assert set(GUIDES) <= set(_pages_with_python())


@pytest.mark.parametrize("page", [p for p in _pages_with_python() if p not in GUIDES])
def test_page_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever a page writes lands in a temporary directory
    run_blocks(python_blocks((DOCS / page).read_text(), source=f"docs/{page}"), f"docs/{page}")


def test_training_guide_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the guide writes runs/ into the working directory
    text = (DOCS / "training.md").read_text()
    blocks = python_blocks(text, source="docs/training.md")
    assert len(blocks) >= 3, blocks
    ns = run_blocks(blocks, "docs/training.md")
    # The run wrote its files, and resuming the finished run changed nothing.
    run = tmp_path / "runs" / "mine"
    assert {"config.json", "metrics.jsonl", "checkpoint.npz"} <= {p.name for p in run.iterdir()}
    assert [h["epoch"] for h in ns["fitted"].history] == [1, 2]
    assert ns["again"].history == ns["fitted"].history
    leaves = jax.tree_util.tree_leaves
    for a, b in zip(leaves(ns["again"].params), leaves(ns["fitted"].params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_gradients_guide_runs():
    text = (DOCS / "gradients.md").read_text()
    blocks = python_blocks(text, source="docs/gradients.md")
    assert len(blocks) >= 3, blocks
    ns = run_blocks(blocks, "docs/gradients.md")
    assert ns["result"].ok and all(r.ok for r in ns["results"])
    leaves = jax.tree_util.tree_leaves
    for route in ("autodiff", "autodiff_same_forward"):
        for a, b in zip(leaves(ns["grads"]["manual"]), leaves(ns["grads"][route]), strict=True):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def test_skipped_blocks_are_few():
    # Non-running blocks are the exception: each must be justified next to it in the page.
    counts = {p.name: skipped_blocks(p.read_text()) for p in DOCS.rglob("*.md")}
    assert sum(counts.values()) <= 3, counts


def _help(command: str) -> str:
    import contextlib
    import io

    from jaxcnn.cli import main

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        try:
            main([command, "--help"])
        except SystemExit:
            pass
    return text.getvalue()


COMMAND_LINE = r"\bjaxcnn (train|gradcheck|evaluate|predict|bench)\b([^\n`]*)"


def test_docs_commands_use_real_flags():
    # Every `jaxcnn COMMAND --flag` shown in the docs is a flag of that command.
    used: dict[str, set[str]] = {}
    for page in sorted(DOCS.rglob("*.md")):
        for command, rest in re.findall(COMMAND_LINE, page.read_text()):
            used.setdefault(command, set()).update(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", rest))
    assert used.get("train"), "the docs show no jaxcnn train flags"
    missing = {command: sorted(f for f in flags if f not in _help(command)) for command, flags in used.items()}
    assert not any(missing.values()), f"the docs use flags that do not exist: {missing}"


# ---------------------------------------------------------------------------------------------------
# Doctests


def package_modules() -> list[str]:
    names = ["jaxcnn"]
    for info in pkgutil.walk_packages(jaxcnn.__path__, prefix="jaxcnn."):
        if not info.name.endswith(".__main__"):  # entry points: importing them runs them
            names.append(info.name)
    return sorted(names)


def collect_doctests() -> list[doctest.DocTest]:
    """Every docstring example (``>>>``) of every module of the package, each found once (re-exports of a
    function are not collected again in the package that re-exports it)."""
    finder = doctest.DocTestFinder(exclude_empty=True)
    tests = []
    for name in package_modules():
        module = importlib.import_module(name)
        tests.extend(t for t in finder.find(module, name) if t.examples)
    return tests


DOCTESTS = collect_doctests()


def run_doctest(test: doctest.DocTest) -> tuple[int, str]:
    """Runs one docstring's examples as a user's session would (float32 defaults); ``(failures, report)``."""
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report: list[str] = []
    test.globs = dict(test.globs)
    with jax.enable_x64(False):
        failed, _ = runner.run(test, out=report.append, clear_globs=True)
    return failed, "".join(report)


def test_doctest_collector_works():
    # The package's modules are all visited, and an example is found and run where one exists.
    assert len(package_modules()) > len(PUBLIC_MODULES)
    example = types.ModuleType("example")
    exec('def f():\n    """Two.\n\n    >>> 1 + 1\n    2\n    >>> f()\n    3\n    """\n    return 2\n', example.__dict__)
    found = [t for t in doctest.DocTestFinder().find(example, "example") if t.examples]
    assert [len(t.examples) for t in found] == [2]
    failed, report = run_doctest(found[0])
    assert failed == 1 and "Expected:\n    3\nGot:\n    2" in report, report
    print(f"{len(DOCTESTS)} docstrings with {sum(len(t.examples) for t in DOCTESTS)} doctest examples")


@pytest.mark.parametrize("test", DOCTESTS, ids=lambda t: t.name)
def test_doctest(test):
    failed, report = run_doctest(test)
    if failed:
        pytest.fail(report, pytrace=False)


# ---------------------------------------------------------------------------------------------------
# The site


def test_site_builds_strict(tmp_path):
    for name in ("mkdocs", "mkdocstrings", "mkdocstrings_handlers"):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f'{name} is not installed (pip install -e ".[docs]")')
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if run.returncode:
        warnings = "\n".join(line for line in run.stderr.splitlines() if not line.startswith("INFO"))
        pytest.fail(f"mkdocs build --strict failed:\n{warnings[-6000:]}", pytrace=False)
    assert (tmp_path / "site" / "api" / "layers" / "index.html").exists()
