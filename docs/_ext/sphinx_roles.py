"""A griffe extension for the API reference: Sphinx roles in docstrings become Markdown, comments of constants
become their docstrings.

jaxcnn's docstrings name other objects with Sphinx roles (``:func:`fit```, ``:class:`~jaxcnn.layers.Layer```),
which read well in ``help()`` and in the source. mkdocstrings renders Markdown, so after the package is loaded
every role is rewritten:

* when its target is an object that the API reference renders (a public member of a public module, or the
  module itself), as an autorefs cross-reference, ``[`fit`][jaxcnn.train.fit]``; ``mkdocs build --strict``
  then fails if the reference does not resolve;
* otherwise (a private helper, an internal module) as inline code, ``` `fit` ```.

A leading ``~`` shows only the last component, as in Sphinx. Targets are looked up as written, then relative
to the docstring's class, module and the modules above it (Sphinx's order).

An argument entry naming several parameters at once (``x, w, stride: as passed to conv2d``), which the
Google-style parser would take for one parameter of that name, is repeated for each of them.

A constant or field documented by a comment (the block of comment lines directly above its assignment, or
the comment at the end of its line) and not by an attribute docstring gets that comment as its docstring,
so that the reference shows what the source says (``tests/test_docs.py`` accepts the same two forms). A
field of :class:`jaxcnn.train.TrainConfig` gets its help text, the one ``jaxcnn train --help`` shows.
"""

from __future__ import annotations

import ast
import functools
import io
import re
import textwrap
import tokenize
from pathlib import Path
from typing import Any

import griffe

ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|exc|obj|const):`(?P<tilde>~?)(?P<target>[\w.]+)(?:\(\))?`")

API_PAGES = Path(__file__).resolve().parents[1] / "api"


def rendered_modules() -> list[str]:
    """The modules the API reference renders (``::: module`` lines of docs/api/*.md)."""
    return [
        line[4:].strip()
        for page in sorted(API_PAGES.glob("*.md"))
        for line in page.read_text().splitlines()
        if line.startswith("::: ")
    ]


class SphinxRoles(griffe.Extension):
    """Rewrites Sphinx roles in every docstring of the ``jaxcnn`` package (see the module docstring)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.name != "jaxcnn":
            return
        anchors = _anchors(pkg)
        for obj in _walk(pkg):
            if obj.is_attribute and obj.docstring is None:
                comment = _comment(obj) or _setting_help(obj)
                if comment:
                    obj.docstring = griffe.Docstring(comment, lineno=obj.lineno, parent=obj)
            if obj.docstring is not None:
                obj.docstring.value = split_grouped_args(obj.docstring.value)
                obj.docstring.value = ROLE.sub(
                    functools.partial(_rewrite, obj=obj, pkg=pkg, anchors=anchors), obj.docstring.value
                )


def _walk(obj: griffe.Object):
    yield obj
    for member in obj.members.values():
        if not member.is_alias and (member.is_module or member.is_class or member.is_function or member.is_attribute):
            yield from _walk(member)  # type: ignore[arg-type]


def _public(module: griffe.Module, name: str, member) -> bool:
    exported = module.exports
    if exported is not None:
        return name in exported
    return not name.startswith("_") and not member.is_alias


def _anchors(pkg: griffe.Module) -> dict[str, str]:
    """Canonical path -> the path the reference renders it under (modules, their public members, methods)."""
    out: dict[str, str] = {}
    for path in rendered_modules():
        if not path.startswith("jaxcnn"):
            continue
        module = pkg if path == "jaxcnn" else pkg.get_member(path.removeprefix("jaxcnn."))
        out.setdefault(module.path, module.path)
        for name, member in module.members.items():
            if not _public(module, name, member):
                continue
            shown = f"{path}.{name}"
            try:
                target = member.final_target if member.is_alias else member
            except griffe.AliasResolutionError:
                continue
            if target.is_module and name in target.members:
                # ``from .dense import dense``: at run time the package attribute is the function, which
                # the page renders with an explicit directive (griffe keeps the submodule under the name).
                target = target.members[name]
                target = target.final_target if target.is_alias else target
            out.setdefault(target.path, shown)
            out.setdefault(shown, shown)
            if target.is_class:
                for method in target.members:
                    if not method.startswith("_"):
                        out.setdefault(f"{target.path}.{method}", f"{shown}.{method}")
                        out.setdefault(f"{shown}.{method}", f"{shown}.{method}")
    return out


def _resolve(target: str, obj: griffe.Object, pkg: griffe.Module) -> str | None:
    """The canonical path of ``target`` as seen from ``obj``'s docstring, or None."""
    scopes = [""]
    scope = obj if obj.is_class or obj.is_module else obj.parent
    while scope is not None:
        scopes.insert(0, scope.path + ".")
        scope = scope.parent
    for prefix in scopes:
        path = prefix + target
        if not path.startswith("jaxcnn"):
            continue
        try:
            found = pkg if path == "jaxcnn" else pkg.get_member(path.removeprefix("jaxcnn."))
            return found.final_target.path if found.is_alias else found.path
        except (KeyError, ValueError, griffe.AliasResolutionError):
            continue
    return None


def _rewrite(match: re.Match, obj: griffe.Object, pkg: griffe.Module, anchors: dict[str, str]) -> str:
    target = match["target"]
    text = target.rsplit(".", 1)[-1] if match["tilde"] else target
    canonical = _resolve(target, obj, pkg)
    if canonical is not None and canonical in anchors:
        return f"[`{text}`][{anchors[canonical]}]"
    return f"`{text}`"


SECTION = re.compile(r"^(?P<indent>\s*)(?:Args|Arguments|Parameters|Keyword Args|Keyword Arguments):\s*$")
GROUPED = re.compile(r"^(?P<indent>\s+)(?P<names>[\w*]+(?:\s*,\s*[\w*]+)+)(?P<rest>\s*(?:\([^)]*\))?:(?:\s.*)?)$")


def split_grouped_args(text: str) -> str:
    """Repeats an argument entry ``a, b: text`` (with its continuation lines) as ``a: text`` and ``b: text``."""
    lines, out, i = text.splitlines(), [], 0
    section_indent = None
    while i < len(lines):
        line = lines[i]
        header = SECTION.match(line)
        if header:
            section_indent = len(header["indent"])
            out.append(line)
            i += 1
            continue
        indent = len(line) - len(line.lstrip())
        if section_indent is not None and line.strip() and indent <= section_indent:
            section_indent = None
        grouped = GROUPED.match(line) if section_indent is not None else None
        if grouped is None:
            out.append(line)
            i += 1
            continue
        entry_indent = len(grouped["indent"])
        body = []
        i += 1
        while i < len(lines) and lines[i].strip() and len(lines[i]) - len(lines[i].lstrip()) > entry_indent:
            body.append(lines[i])
            i += 1
        for name in (n.strip() for n in grouped["names"].split(",")):
            out.append(f"{grouped['indent']}{name}{grouped['rest']}")
            out.extend(body)
    return "\n".join(out)


def _comment(obj: griffe.Object) -> str:
    """The comment documenting an attribute: the comment lines right above it, else the one ending its line."""
    if obj.filepath is None or obj.lineno is None or isinstance(obj.filepath, list):
        return ""
    lines = Path(obj.filepath).read_text().splitlines()
    above = []
    i = obj.lineno - 2
    while i >= 0 and lines[i].strip().startswith("#") and not lines[i].strip().startswith("# ---"):
        above.insert(0, lines[i].strip().lstrip("#").strip())
        i -= 1
    if above:
        return " ".join(above)
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(lines[obj.lineno - 1] + "\n").readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return ""
    return " ".join(t.string.lstrip("#").strip() for t in tokens if t.type == tokenize.COMMENT)


def _setting_help(obj: griffe.Object) -> str:
    """The help text of a ``TrainConfig`` field, ``name: type = _setting(default, "help", ...)``."""
    if obj.filepath is None or obj.lineno is None or obj.endlineno is None or isinstance(obj.filepath, list):
        return ""
    lines = Path(obj.filepath).read_text().splitlines()[obj.lineno - 1 : obj.endlineno]
    try:
        tree = ast.parse(textwrap.dedent("\n".join(lines)))
    except SyntaxError:
        return ""
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "_setting"):
            continue
        help_text = node.args[1] if len(node.args) >= 2 else None
        if isinstance(help_text, ast.Constant) and isinstance(help_text.value, str):
            return help_text.value.replace("%%", "%")  # argparse's escape
    return ""
