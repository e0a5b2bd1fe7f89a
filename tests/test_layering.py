"""Layering: ``regnet_zoo/core`` imports nothing of regnet_zoo above it, ``networks/`` nothing of the data,
engines, API or CLI layers, neither at module level nor inside functions (checked on the source with ``ast``),
and importing them really loads none of those modules (checked in a fresh interpreter)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import regnet_zoo

PACKAGE = Path(regnet_zoo.__file__).resolve().parent
FORBIDDEN_IN_NETWORKS = ("regnet_zoo.data", "regnet_zoo.engines", "regnet_zoo.api", "regnet_zoo.cli")
ALLOWED_IN_CORE = ("regnet_zoo.core", "regnet_zoo.errors")


def _modules(layer: str) -> list[str]:
    """``regnet_zoo.<layer>`` and its submodules."""
    return sorted(
        f"regnet_zoo.{layer}" if p.stem == "__init__" else f"regnet_zoo.{layer}.{p.stem}"
        for p in (PACKAGE / layer).glob("*.py")
    )


def _source(module: str) -> Path:
    path = PACKAGE.joinpath(*module.split(".")[1:])
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _imported_names(module: str) -> set[str]:
    """Absolute names of the regnet_zoo modules (or module members) that ``module``'s source imports."""
    path = _source(module)
    package = module if path.stem == "__init__" else module.rsplit(".", 1)[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names |= {f"{base}.{alias.name}" for alias in node.names} | {base}
    return {n for n in names if n == "regnet_zoo" or n.startswith("regnet_zoo.")}


def _violations(name: str, allowed, forbidden) -> list[str]:
    bad = []
    for imported in sorted(name for name in _imported_names(name)):
        if imported == "regnet_zoo":
            bad.append(imported)  # the package root re-exports upper layers
        elif forbidden and imported.startswith(forbidden):
            bad.append(imported)
        elif allowed and not imported.startswith(allowed):
            bad.append(imported)
    return bad


@pytest.mark.parametrize("module", _modules("networks"))
def test_networks_import_no_upper_layer(module):
    assert _violations(module, None, FORBIDDEN_IN_NETWORKS) == []


@pytest.mark.parametrize("module", _modules("core"))
def test_core_imports_only_core(module):
    assert _violations(module, ALLOWED_IN_CORE, None) == []


def test_importing_the_lower_layers_loads_no_upper_layer():
    """A fresh interpreter imports every core and networks module; none of the upper layers gets loaded."""
    modules = _modules("core") + _modules("networks")
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('regnet_zoo'))))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=PACKAGE.parent
    )
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(modules) <= set(loaded)
    upper = [m for m in loaded if m.startswith(FORBIDDEN_IN_NETWORKS)]
    assert upper == []


def test_the_checker_sees_a_violation(tmp_path, monkeypatch):
    """The ast check is not vacuous: an upward import inside a function is found."""
    fake = tmp_path / "regnet_zoo" / "networks"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("def f():\n    from regnet_zoo.engines.workflows import x\n    return x\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "regnet_zoo")
    assert _violations("regnet_zoo.networks.bad", None, FORBIDDEN_IN_NETWORKS) == [
        "regnet_zoo.engines.workflows",
        "regnet_zoo.engines.workflows.x",
    ]
