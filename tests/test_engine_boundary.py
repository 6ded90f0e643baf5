"""The engine (``onnxopt/``) never imports a pass; the catalog is reached only by name."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "onnxopt"


def _imported_modules(path: Path) -> list[str]:
    """Absolute names of every module a file imports (relative imports resolved)."""
    package = ["onnxopt", *path.parent.relative_to(ENGINE).parts]
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            names += [module] + [f"{module}.{alias.name}" for alias in node.names]
    return names


def test_no_engine_module_imports_the_catalog() -> None:
    offenders = {
        str(path.relative_to(ROOT)): name
        for path in ENGINE.rglob("*.py")
        for name in _imported_modules(path)
        if name == "onnxopt.passes" or name.startswith("onnxopt.passes.")
    }
    assert not offenders, offenders


def test_importing_the_whole_engine_loads_no_pass() -> None:
    code = (
        "import importlib, pkgutil, sys\n"
        "import onnxopt\n"
        "for info in pkgutil.walk_packages(onnxopt.__path__, 'onnxopt.'):\n"
        "    if not info.name.startswith(('onnxopt.passes', 'onnxopt.__main__')):\n"
        "        importlib.import_module(info.name)\n"
        "print(sorted(m for m in sys.modules if m.startswith('onnxopt.passes')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    assert out.strip() == "[]"
