"""The import graph of Keyvault's own modules: no new cycles, and the KMS layer stays free of Django.

Every ``import``/``from … import`` in a module counts, including those inside
functions: an import tucked into a function to dodge a cycle is still a cycle.
Migrations are left out (Django loads them by name, never by import).

A cycle that has to be tolerated for a while is listed in ``KNOWN_CYCLES`` (empty since the architecture work,
issue 13). The list is a ratchet: a new cycle fails, and so does a
listed one that has gone (take it off the list, so it cannot come back).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("keyvault", "rotation")

#: Strongly connected groups of modules present today. Empty: issue 13 removed the last ones. Keep the
#: ratchet: should a cycle ever have to be tolerated for a while, it is listed here and nowhere else.
KNOWN_CYCLES: set[frozenset[str]] = set()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {
        module_name(path): path
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if "migrations" not in path.parts
    }


def imported_names(path: Path, module: str) -> set[str]:
    """Every dotted name a module imports (``from a import b`` gives ``a`` and ``a.b``), absolute."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            names.add(source)
            names.update(f"{source}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    return {
        module: {target for name in imported_names(path, module) if (target := owner(name)) and target != module}
        for module, path in modules.items()
    }


def cycles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[frozenset[str]] = set()
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph.get(successor, ())))))
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.add(frozenset(component))
    return found


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}

    assert cycles(graph) == {frozenset({"a", "b", "c"})}
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from keyvault import audit\n")
    assert "keyvault.audit" in imported_names(source, "keyvault.m")


def test_no_import_cycles_beyond_the_known_ones():
    found = cycles(import_graph())

    assert found - KNOWN_CYCLES == set(), "new import cycle(s)"
    assert KNOWN_CYCLES - found == set(), "a known cycle is gone: take it off KNOWN_CYCLES"


def test_the_kms_layer_imports_no_django_and_nothing_above_it():
    graph = import_graph()
    modules = project_modules()
    kms = [module for module in graph if module == "keyvault.kms" or module.startswith("keyvault.kms.")]

    assert kms
    for module in kms:
        outside = {target for target in graph[module] if not target.startswith("keyvault.kms") and target != "keyvault"}
        django = {name for name in imported_names(modules[module], module) if name.split(".")[0] == "django"}
        assert outside == set() and django == set(), f"{module} imports {outside | django}"


def _in(module: str, *packages: str) -> bool:
    return any(module == package or module.startswith(package + ".") for package in packages)


#: rotation's own console: the only rotation modules that may build on the keyvault console.
ROTATION_CONSOLE = {"rotation.admin", "rotation.admin_views"}


def test_audit_and_key_services_import_neither_the_console_nor_rotation():
    """The audit chain and the one writer of key state sit below every page and the rotation engine."""
    graph = import_graph()
    lower = [module for module in graph if _in(module, "keyvault.audit", "keyvault.keys")]

    assert lower
    for module in lower:
        above = {target for target in graph[module] if _in(target, "keyvault.console", "rotation")}
        assert above == set(), f"{module} imports {above}"


def test_rotation_reaches_the_keyvault_console_only_from_its_own_console():
    graph = import_graph()

    for module in (module for module in graph if _in(module, "rotation") and module not in ROTATION_CONSOLE):
        console = {target for target in graph[module] if _in(target, "keyvault.console")}
        assert console == set(), f"{module} imports {console}"
    assert ROTATION_CONSOLE <= set(graph), "rotation's console modules moved: update ROTATION_CONSOLE"


#: Rotation's console modules: pages built on the keyvault console, which it must never import back.
ROTATION_CONSOLE_PAGES = ROTATION_CONSOLE | {"rotation.forms"}


def test_the_keyvault_console_imports_no_rotation_console_module():
    """Rotation's console registers its KEK actions and panel into ours; ours may use rotation's services and models."""
    graph = import_graph()
    console = [module for module in graph if _in(module, "keyvault.console")]

    assert console and ROTATION_CONSOLE_PAGES <= set(graph)
    for module in console:
        pages = {target for target in graph[module] if _in(target, *ROTATION_CONSOLE_PAGES)}
        assert pages == set(), f"{module} imports {pages}"


#: The project package: settings, routes and process entry points. It stays thin: it wires the layers
#: together (``urls`` routes to the console) but reaches no rotation module.
PROJECT_MODULES = ("keyvault.settings", "keyvault.urls", "keyvault.celery", "keyvault.wsgi", "keyvault.asgi")


def test_the_project_package_imports_no_rotation_module():
    graph = import_graph()

    assert set(PROJECT_MODULES) <= set(graph)
    for module in PROJECT_MODULES:
        rotation = {target for target in graph[module] if _in(target, "rotation")}
        assert rotation == set(), f"{module} imports {rotation}"
