"""The layering rules of DESIGN.md, checked on the source of the whole repository and on what imports load.

The import graph is built with ``ast`` from every module of ``tip_fed/``, ``simulations/`` and
``benchmarks/``: top-level and function-level imports alike (an import inside a function is still a
dependency), but not those under ``if TYPE_CHECKING:``, which never run.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "tip_fed"
TOPS = ("tip_fed", "simulations", "benchmarks")

# Packages from the bottom up: a package may import only packages of lower layers (and itself);
# packages of one layer stand beside each other and import none of each other.
LAYERS = (
    {"tip_fed.errors", "tip_fed.lazy", "tip_fed.console", "tip_fed.kinds"},
    {"tip_fed.files", "tip_fed.toml_files"},
    {"tip_fed", "tip_fed.config", "tip_fed.tls", "tip_fed.wire"},
    {"tip_fed.core", "tip_fed.crypto", "tip_fed.sellers_config"},
    {"tip_fed.protocol"},
    {"tip_fed.flower", "tip_fed.grpc", "tip_fed.buyer_config", "tip_fed.testing"},
    {"tip_fed.runtimes", "tip_fed.market"},
    {"tip_fed.workflow"},
    {"tip_fed.bench"},
    {"simulations"},
    {"tip_fed.cli_value"},
    {"tip_fed.cli", "benchmarks"},
)
RANK = {package: rank for rank, layer in enumerate(LAYERS) for package in layer}


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for top in TOPS for p in (ROOT / top).rglob("*.py") if "_pb2" not in p.name}


def _resolve(name: str) -> str:
    """The module of ours that ``import name`` names (its longest known prefix), else ``name`` itself."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in MODULES:
            return ".".join(parts[:i])
    return name


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == "TYPE_CHECKING"


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports when it runs (ours resolved to module names, others as written)."""
    module = _name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for stmt in child.orelse:
                    visit_one(stmt)
            else:
                visit_one(child)

    def visit_one(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.update(_resolve(a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*parts, base] if base else parts)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in MODULES else _resolve(base))
        visit(node)

    visit(ast.parse(path.read_text()))
    return found - {module}


GRAPH = {module: {n for n in _imports(path) if n in MODULES} for module, path in MODULES.items()}


def _package(module: str) -> str:
    """``tip_fed.<sub>`` for a module of a sub-package or a top-level module of tip_fed; the top name otherwise."""
    parts = module.split(".")
    if parts[0] != "tip_fed" or len(parts) == 1:
        return parts[0]
    return ".".join(parts[:2])


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each a circle of imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_the_graph_sees_every_kind_of_import():
    # the graph is only as good as its parser: function-level and relative imports count,
    # imports under TYPE_CHECKING do not
    assert "simulations.scenarios" in GRAPH["simulations.flower_apps"]
    assert "tip_fed.runtimes.flower_deployment" in GRAPH["simulations.exchanges"]  # imported inside a function
    assert "tip_fed.bench.common" in GRAPH["tip_fed.bench.scale"]  # ``from .common import ...``
    assert "tip_fed.protocol" not in GRAPH["tip_fed"]  # TYPE_CHECKING only
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_between_modules():
    assert _cycles(GRAPH) == []


def test_nothing_in_tip_fed_but_the_cli_imports_simulations():
    bad = [f"{m} imports {n}" for m, names in GRAPH.items() for n in names
           if m.startswith("tip_fed") and m != "tip_fed.cli" and _package(n) == "simulations"]
    assert bad == []


def test_every_package_is_placed_in_a_layer():
    assert sorted({_package(m) for m in MODULES} - set(RANK)) == []


def test_packages_import_only_downward():
    bad = [f"{m} ({_package(m)}) imports {n} ({_package(n)})" for m, names in GRAPH.items() for n in names
           if _package(m) != _package(n) and RANK[_package(n)] >= RANK[_package(m)]]
    assert bad == []


def test_only_crypto_imports_tenseal_and_only_flower_imports_flwr():
    # benchmarks/ may probe a library directly (gil_probe times SEAL itself); the code that ships may not
    owners = {"tenseal": "tip_fed.crypto", "flwr": "tip_fed.flower"}
    bad = [f"{m} imports {n}" for m, path in MODULES.items() if _package(m) != "benchmarks"
           for n in _imports(path) if n.split(".")[0] in owners and _package(m) != owners[n.split(".")[0]]]
    assert bad == []


@pytest.mark.parametrize("package, forbidden", [
    ("core", {"tenseal", "flwr", "grpc", "tip_fed.config", "tip_fed.toml_files", "tip_fed.crypto", "tip_fed.protocol",
              "tip_fed.market", "tip_fed.wire"}),
    ("crypto", {"flwr", "grpc", "torch", "tip_fed.core", "tip_fed.protocol", "tip_fed.market"}),
    ("protocol", {"flwr", "grpc", "tip_fed.market", "simulations"}),
    ("market", {"flwr", "grpc", "simulations", "tip_fed.cli"}),
    ("grpc", {"flwr", "simulations", "tip_fed.market", "tip_fed.flower", "tip_fed.cli"}),
    ("flower", {"grpc", "simulations", "tip_fed.market", "tip_fed.grpc", "tip_fed.cli"}),
    ("runtimes", {"flwr", "grpc", "tenseal", "simulations", "tip_fed.market", "tip_fed.bench", "tip_fed.cli"}),
])
def test_dependencies_point_down(package, forbidden):
    bad = []
    for path in (PKG / package).rglob("*.py"):
        for name in _imports(path):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert bad == []


def test_importing_core_loads_no_crypto_or_network_stack():
    code = "import sys, tip_fed.core.gradients, tip_fed.core.precondition, tip_fed.core.influence; " \
           "print(sorted(m for m in ('tenseal', 'flwr', 'grpc') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_rendering_a_report_loads_no_torch():
    # a report is rendered from results files: it must not pay for torch, scipy or the crypto stack
    code = "import sys, tip_fed.market.report; " \
           "print(sorted(m for m in ('torch', 'scipy', 'tenseal') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_process_management_and_the_inprocess_runtime_load_no_network_stack():
    # the reaper runs as ``python -m tip_fed.runtimes.reaper``: it must not pay for Flower or grpcio
    code = "import sys, tip_fed.runtimes.processes, tip_fed.runtimes.inprocess, simulations.runner; " \
           "print(sorted(m for m in ('flwr', 'grpc', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]"


def test_no_module_is_oversized():
    big = [f"{p.relative_to(ROOT)}: {n}" for p in MODULES.values() if (n := len(p.read_text().splitlines())) > 600]
    assert big == []
