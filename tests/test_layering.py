"""The layers of DESIGN.md, read from the source with ast: nets -> backends -> kernels, and never back up.

kernels/ imports nothing of the project; backends/ does not import nets; nets/ imports no private
kernels module (kernels._x or a backend's kernel module), neither numba nor cupy, and names no
backend: no comparison with, collection of, or get_backend call on "numpy", "numba" or "cupy"
(it asks its Backend instead). Help texts and docstrings may still name them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from backends import BACKEND_NAMES

REPO = Path(__file__).resolve().parent.parent
PROJECT_PACKAGES = ("backends", "bench", "kernels", "nets", "tests")


def modules(package: str) -> list[Path]:
    return sorted((REPO / package).glob("*.py"))


def imported(path: Path) -> list[tuple[int, str]]:
    """(line, dotted name) of every module an ``import`` or ``from ... import`` statement loads."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def is_backend_name(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value in BACKEND_NAMES


def names_a_backend(node: ast.AST) -> bool:
    """A backend name as a constant, or a tuple/list/set holding one."""
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(is_backend_name(element) for element in node.elts)
    return is_backend_name(node)


def backend_names_used(path: Path) -> list[str]:
    """Where a module decides by a backend's name: comparisons, collections of names, get_backend("...")."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Compare) and any(names_a_backend(n) for n in (node.left, *node.comparators)):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)) and names_a_backend(node):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Call) and any(is_backend_name(a) for a in node.args):
            callee = ast.unparse(node.func)
            if callee.endswith("get_backend"):
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


@pytest.mark.parametrize("path", modules("kernels"), ids=lambda p: p.name)
def test_kernels_import_nothing_of_the_project(path):
    outside = [
        f"line {line}: {name}"
        for line, name in imported(path)
        if name.split(".")[0] in PROJECT_PACKAGES and name.split(".")[0] != "kernels"
    ]
    assert not outside, f"kernels/{path.name} imports the project: {outside}"


@pytest.mark.parametrize("path", modules("backends"), ids=lambda p: p.name)
def test_backends_do_not_import_nets(path):
    upward = [f"line {line}: {name}" for line, name in imported(path) if name.split(".")[0] in ("nets", "bench")]
    assert not upward, f"backends/{path.name} imports a layer above it: {upward}"


@pytest.mark.parametrize("path", modules("nets"), ids=lambda p: p.name)
def test_nets_reach_no_private_kernels_and_no_gpu_library(path):
    backend_modules = {f"kernels.{name}_kernels" for name in BACKEND_NAMES}
    wrong = []
    for line, name in imported(path):
        parts = name.split(".")
        if parts[0] == "kernels" and (any(part.startswith("_") for part in parts[1:]) or name in backend_modules):
            wrong.append(f"line {line}: {name}")
        elif parts[0] in ("numba", "cupy", "cupyx"):
            wrong.append(f"line {line}: {name}")
    assert not wrong, f"nets/{path.name} reaches below the kernels' public API: {wrong}"


@pytest.mark.parametrize("path", modules("nets"), ids=lambda p: p.name)
def test_nets_name_no_backend(path):
    found = backend_names_used(path)
    assert not found, f"nets/{path.name} decides by a backend's name (ask the Backend instead): {found}"


def test_the_checks_see_what_they_forbid(tmp_path):
    """The detectors on a module that breaks every rule: each rule fails on the code it names."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from kernels import _generic as g\nfrom kernels.numba_kernels import JIT\nimport cupy\nfrom nets import x\n"
        "COLUMN_LOOP_BACKENDS = ('numpy', 'numba')\n"
        "if be.name == 'cupy':\n    pass\nreference = get_backend('numpy')\n"
    )
    names = [name for _, name in imported(bad)]
    assert {"kernels._generic", "kernels.numba_kernels", "cupy", "nets"} <= set(names)
    found = backend_names_used(bad)
    assert len(found) == 3, found
