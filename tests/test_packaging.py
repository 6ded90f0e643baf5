"""Packaging: every package folder of the engine and the catalog is installed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is in the standard library "
                    "from Python 3.11")
def test_every_package_folder_is_listed_in_pyproject():
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = set()
    for prefix, folder in config["package-dir"].items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base).parts
            found.add(".".join((prefix, *rel)))
    assert found <= listed, f"not installed by a regular install: {sorted(found - listed)}"


def _layout_block() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```", 2)[1]


def test_readme_layout_names_every_module_of_the_tree() -> None:
    block = _layout_block()
    missing = []
    for top in ("onnxopt", "passes"):
        for path in sorted((ROOT / top).rglob("*.py")):
            if path.name in ("__init__.py", "__main__.py"):
                continue
            name = path.name if path.parent.name == top else path.stem
            if name not in block:
                missing.append(str(path.relative_to(ROOT)))
        for folder in sorted(p for p in (ROOT / top).iterdir() if (p / "__init__.py").exists()):
            if f"{folder.name}/" not in block:
                missing.append(f"{folder.relative_to(ROOT)}/")
    assert not missing, f"README Layout does not mention {missing}"


def test_the_readme_test_command_collects_every_test_file() -> None:
    """`pytest` as CI runs it reaches every tests/**/test_*.py: pytest's default
    norecursedirs skips any folder named build, which silently left tests/build out."""
    import subprocess

    found = subprocess.run([sys.executable, "-m", "pytest", "--collect-only",
                            "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout
    collected = {line.split("::")[0] for line in found.splitlines() if "::" in line}
    on_disk = {p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").rglob("test_*.py")}
    assert on_disk - collected == set()
