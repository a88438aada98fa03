"""The layers point one way and no module imports itself round a cycle.

tokens/ (the registry) knows nothing above it; delivery/ (providers, engine, credentials, payload)
knows nothing of campaigns/; campaigns/ may use both. pushsvc/ (settings, urls, the Celery app,
metrics, logging) sits on top; below it only its metrics and logging modules may be imported.
simulator/ stands apart: it plays Apple, Google, Huawei and a push service, so production code never
imports it (only the commands that start it and the campaign test fixtures do), and it imports
nothing of the project but the providers' topic grammar (delivery/topics.py).
Function-local imports count (they are how cycles hide); `if TYPE_CHECKING:` blocks do not.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("tokens", "delivery", "campaigns", "pushsvc", "simulator")
FORBIDDEN = {
    "tokens": {"delivery", "campaigns", "simulator"},
    "delivery": {"campaigns", "simulator"},
    "campaigns": {"simulator"},
    "pushsvc": {"simulator"},
    "simulator": {"tokens", "delivery", "campaigns", "pushsvc"},
}
PUSHSVC_SHARED = {"pushsvc.metrics", "pushsvc.logging"}
# The only imports across the simulator's border: (importer, imported).
SIMULATOR_BORDER = {
    ("delivery.management.commands.run_simulator", "simulator.server"),
    ("campaigns.management.commands.demo", "simulator.testing"),
    ("campaigns.pytest_fixtures", "simulator.testing"),
    ("simulator.core", "delivery.topics"),
}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in ROOT.glob("*/**/*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] not in PACKAGES or "migrations" in rel.parts:
            continue
        name = ".".join(rel.with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    return modules


def _resolve(name: str, modules: dict[str, Path]) -> str:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = []
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(_resolve(alias.name, modules) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name if path.name == "__init__.py" else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            # `from pkg import module` imports the module, not the package's __init__.
            found.update(
                _resolve(f"{base}.{alias.name}", modules) or _resolve(base, modules) for alias in node.names
            )
    return {m for m in found if m and m != name and m.split(".")[0] in PACKAGES}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycles() -> None:
    assert _cycles(_graph()) == []


def _wrong_imports(graph: dict[str, set[str]]) -> list[str]:
    wrong = []
    for module, imported in graph.items():
        layer = module.split(".")[0]
        for target in imported:
            top = target.split(".")[0]
            if (top in FORBIDDEN.get(layer, ()) and (module, target) not in SIMULATOR_BORDER) or (
                top == "pushsvc" and layer != "pushsvc" and target not in PUSHSVC_SHARED
            ):
                wrong.append(f"{module} -> {target}")
    return sorted(wrong)


def test_no_upward_imports() -> None:
    assert _wrong_imports(_graph()) == []


def test_the_check_sees_a_cycle_and_an_upward_import() -> None:
    """The checker itself: a planted cycle and a planted upward edge are found."""
    graph = {"delivery.a": {"delivery.b"}, "delivery.b": {"delivery.a", "campaigns.x"}, "campaigns.x": set()}
    assert _cycles(graph) == [["delivery.a", "delivery.b"]]
    assert _wrong_imports(graph) == ["delivery.b -> campaigns.x"]


def test_the_check_guards_the_simulator_border() -> None:
    """Production code importing the simulator, or the simulator importing the project, is found;
    the listed border crossings are not."""
    graph = {
        "delivery.engine.x": {"simulator.core"},
        "pushsvc.settings": {"simulator.server"},
        "simulator.apns": {"delivery.credentials", "pushsvc.metrics", "simulator.core"},
        "simulator.core": {"delivery.topics"},
        "delivery.management.commands.run_simulator": {"simulator.server"},
    }
    assert _wrong_imports(graph) == [
        "delivery.engine.x -> simulator.core",
        "pushsvc.settings -> simulator.server",
        "simulator.apns -> delivery.credentials",
        "simulator.apns -> pushsvc.metrics",
    ]
    # The real graph has the simulator's modules, and every listed crossing is one that exists.
    real = _graph()
    assert {"simulator.world", "simulator.apns", "simulator.server"} <= set(real)
    assert {(a, b) for a, b in SIMULATOR_BORDER if b in real.get(a, ())} == SIMULATOR_BORDER
