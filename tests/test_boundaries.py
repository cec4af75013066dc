"""The serving side never imports torch, transformers or export/ (the serving image has none
of them); export/ never imports grpc, and may import the serving side's torch- and grpc-free
modules (the bundle contract in service.bundle, the onnxruntime decode code), so that what the
exporter verifies is what is served."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GRPC = {"grpc", "grpc_health", "grpc_reflection", "grpc_status", "google.rpc"}
FORBIDDEN = {"service": {"torch", "transformers", "export"}, "export": GRPC}


def _imports(path: Path) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
    return out


def _forbidden(name: str, banned: set[str]) -> bool:
    return any(name == b or name.startswith(b + ".") for b in banned)


def modules(package: str) -> list[str]:
    out = []
    for path in sorted((REPO / package).rglob("*.py")):
        rel = path.relative_to(REPO).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        if parts[-1] != "__main__":
            out.append(".".join(parts))
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_static_imports(package: str) -> None:
    bad = [
        f"{path.relative_to(REPO)}:{line} imports {name}"
        for path in sorted((REPO / package).rglob("*.py"))
        for line, name in _imports(path)
        if _forbidden(name, FORBIDDEN[package])
    ]
    assert bad == []


def test_export_imports_only_grpc_free_service_modules() -> None:
    """A service module export/ imports must itself import no grpc (nor torch: it is served)."""
    bad = []
    for path in sorted((REPO / "export").rglob("*.py")):
        for line, name in _imports(path):
            if name.split(".")[0] != "service":
                continue
            target = REPO / (name.replace(".", "/") + ".py")
            assert target.is_file(), f"{path.name}:{line} imports {name}, not a module file"
            bad += [
                f"{path.relative_to(REPO)}:{line} imports {name}, which imports {inner}"
                for _, inner in _imports(target)
                if _forbidden(inner, GRPC | {"torch"})
            ]
    assert bad == []


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_importing_every_module_loads_nothing_forbidden(package: str) -> None:
    mods = modules(package)
    assert mods, f"{package} has no modules"
    forbidden = sorted(FORBIDDEN[package])
    code = (
        "import importlib, sys\n"
        f"for m in {mods!r}: importlib.import_module(m)\n"
        f"bad = sorted(n for n in sys.modules if any(n == b or n.startswith(b + '.') "
        f"for b in {forbidden!r}))\n"
        "print(','.join(bad))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == ""
