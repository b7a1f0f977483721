"""No import cycle anywhere in the package: every ``import`` of a ``qlm_plugin`` module counts, at the
top of a module, inside a function or under ``TYPE_CHECKING`` alike (a cycle broken by an import
moved into a function is still two modules that need each other). ``hooks/`` and ``adapters/`` are
read as the ``qlm_plugin.hooks`` and ``qlm_plugin.adapters`` sub-packages they install as.

Also: the coordinator's parts import one way only, jobs at the bottom and the front ends on top."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = (("qlm_plugin", "qlm_plugin"), ("hooks", "qlm_plugin.hooks"), ("adapters", "qlm_plugin.adapters"))


def modules() -> dict[str, Path]:
    out = {}
    for folder, prefix in SOURCES:
        for path in (ROOT / folder).rglob("*.py"):  # (the qlm_plugin/hooks and /adapters links not followed)
            parts = [prefix, *path.relative_to(ROOT / folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join(parts)
            if not name.startswith("qlm_plugin.proto.qlm"):  # generated
                out[name] = path
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qlm_plugin"):
                targets = [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("qlm_plugin")]
            for target in targets:
                found = resolve(target)
                if found is not None and found != name:
                    graph[name].add(found)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in list(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
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
    return found


def test_the_checker_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_of_the_package_imports_itself_back() -> None:
    assert cycles(import_graph()) == []


def test_the_coordinator_parts_import_one_way() -> None:
    layers = [
        "qlm_plugin.coordinator.journal",
        "qlm_plugin.coordinator.batch_store",
        "qlm_plugin.coordinator.jobs",
        "qlm_plugin.coordinator.engine_sleep",
        "qlm_plugin.coordinator.devices",
        "qlm_plugin.coordinator.instances",
        "qlm_plugin.coordinator.forward",
        "qlm_plugin.coordinator.dispatch",
        "qlm_plugin.coordinator.registry",
        "qlm_plugin.coordinator.coordinator",
        "qlm_plugin.coordinator.http_api",
        "qlm_plugin.coordinator.relay",
        "qlm_plugin.coordinator.http_workers",
        "qlm_plugin.coordinator.batches",
        "qlm_plugin.coordinator.batch_api",
        "qlm_plugin.coordinator.grpc_api",
        "qlm_plugin.coordinator.server",
    ]
    graph = import_graph()
    for i, part in enumerate(layers):
        above = set(layers[i + 1 :])
        assert not graph[part] & above, f"{part} imports {sorted(graph[part] & above)}, above it"
