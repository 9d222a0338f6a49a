"""The layering rules of DESIGN.md, checked on the source and on what imports actually load."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "tip_fed"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _sources(sub: str) -> list[Path]:
    return [p for p in (PKG / sub).rglob("*.py") if "_pb2" not in p.name]


def test_only_crypto_imports_tenseal():
    offenders = [str(p.relative_to(ROOT)) for p in PKG.rglob("*.py")
                 if p.parent.name != "crypto" and any(n.split(".")[0] == "tenseal" for n in _imports(p))]
    assert offenders == []


def test_only_flower_imports_flwr():
    offenders = [str(p.relative_to(ROOT)) for p in PKG.rglob("*.py")
                 if p.parent.name != "flower" and any(n.split(".")[0] == "flwr" for n in _imports(p))]
    assert offenders == []


@pytest.mark.parametrize("package, forbidden", [
    ("core", {"tenseal", "flwr", "grpc", "tip_fed.crypto", "tip_fed.protocol", "tip_fed.market", "tip_fed.wire"}),
    ("crypto", {"flwr", "grpc", "torch", "tip_fed.core", "tip_fed.protocol", "tip_fed.market"}),
    ("protocol", {"flwr", "grpc", "tip_fed.market", "simulations"}),
    ("market", {"flwr", "grpc", "simulations", "tip_fed.cli"}),
    ("grpc", {"flwr", "simulations", "tip_fed.market", "tip_fed.flower", "tip_fed.cli"}),
    ("flower", {"grpc", "simulations", "tip_fed.market", "tip_fed.grpc", "tip_fed.cli"}),
])
def test_dependencies_point_down(package, forbidden):
    bad = []
    for path in _sources(package):
        for name in _imports(path):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert bad == []


def test_importing_core_loads_no_crypto_or_network_stack():
    code = "import sys, tip_fed.core.gradients, tip_fed.core.precondition, tip_fed.core.influence; " \
           "print(sorted(m for m in ('tenseal', 'flwr', 'grpc') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_no_module_is_oversized():
    big = [f"{p.relative_to(ROOT)}: {n}" for p in PKG.rglob("*.py") if "_pb2" not in p.name
           and (n := len(p.read_text().splitlines())) > 600]
    assert big == []
