"""No module of megaseg or data_prep imports itself through a loop of imports.

The graph is read from the source with ``ast`` (nothing is imported): every ``import`` and
``from ... import`` statement counts, at module level, inside functions and inside
``if TYPE_CHECKING:`` blocks alike (a function-level import is a lazy edge, not a missing one),
relative imports resolved against the importing module, ``from pkg import name`` counted as an
edge to ``pkg.name`` where that is a module, and ``importlib.import_module("literal")`` counted
too. An import of ``a.b.c`` is an edge to ``a.b.c`` alone, not to the packages ``a`` and
``a.b`` whose ``__init__`` runs first (a package that re-exports its modules would otherwise
put every module that imports a sibling in a loop). One narrow exception: the body of a
module-level ``__getattr__`` that raises a ``DeprecationWarning`` is a one-release alias for
an old import path, run only when a user touches the old name, and is left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("megaseg", "data_prep")


def _module_files() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _is_deprecation_getattr(node: ast.AST) -> bool:
    if not (isinstance(node, ast.FunctionDef) and node.name == "__getattr__"):
        return False
    return any(isinstance(n, ast.Name) and n.id == "DeprecationWarning" for n in ast.walk(node))


def _walk(tree: ast.Module):
    """Every node of ``tree`` except the bodies of module-level deprecation ``__getattr__``s."""
    stack: list[ast.AST] = [n for n in tree.body if not _is_deprecation_getattr(n)]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(ast.iter_child_nodes(node))


def _origin(node: ast.ImportFrom, package: str) -> str:
    """The absolute module a ``from ... import`` reads from, ``package`` being the importer's."""
    if not node.level:
        return node.module or ""
    base = package.split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The in-package modules that module ``name`` (file ``path``) imports."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]

    def resolve(target: str) -> str | None:
        # the longest prefix of `target` that is one of our modules
        while target:
            if target in modules:
                return target
            target = target.rpartition(".")[0]
        return None

    found: set[str] = set()
    for node in _walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(resolve(alias.name))
        elif isinstance(node, ast.ImportFrom):
            origin = _origin(node, package)
            for alias in node.names:
                submodule = f"{origin}.{alias.name}"
                found.add(submodule if submodule in modules else resolve(origin))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.add(resolve(node.args[0].value))
    found.discard(None)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _module_files()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)

    cycles = []
    for component in components:
        # a shortest path back to the start, inside the component, to name one real loop
        members = set(component)
        start = component[0]
        paths = {start: [start]}
        frontier = [start]
        loop = None
        while frontier and loop is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & members):
                    if w == start:
                        loop = paths[v] + [start]
                        break
                    if w not in paths:
                        paths[w] = paths[v] + [w]
                        nxt.append(w)
                if loop:
                    break
            frontier = nxt
        cycles.append(loop)
    return cycles


def test_graph_sees_the_packages():
    graph = import_graph()
    # the walk found the modules and resolved both absolute and relative imports
    assert "megaseg.inference" in graph and "data_prep.pipeline" in graph
    assert "megaseg.preprocess" in graph["megaseg.inference"]
    assert any(graph[m] for m in graph if m.startswith("data_prep.readers."))


def test_finder_names_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_model_registry_is_a_leaf_and_the_store_writer_calls_nothing_above_it():
    graph = import_graph()
    assert graph["megaseg.models.registry"] <= {"megaseg.deprecation"}
    assert "megaseg.models.factory" not in graph["megaseg.checkpoint"]
    assert "data_prep.pipeline" not in graph["data_prep.store_writer"]
    assert "data_prep.fetch" not in graph["data_prep.readers.package"]
    # the generators take label maps as tensors: megaseg.data never reaches up into data_prep
    assert not [(m, d) for m in graph if m.startswith("megaseg.data.") for d in graph[m]
                if d.startswith("data_prep")]  # fmt: skip


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def deprecated_aliases(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the old names it serves through ``moved(__name__, {...}, rest=...)`` (see
    megaseg/deprecation.py); ``"*"`` when it serves every name of a module that moved whole
    but for the names of its own lazy ``_EXPORTS`` table (not deprecated)."""
    aliases: dict[str, set[str]] = {}
    for name, path in modules.items():
        body = ast.parse(path.read_text(encoding="utf-8")).body
        exports = {
            k.value
            for node in body
            if isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in node.targets)
            and isinstance(node.value, ast.Dict)
            for k in node.value.keys
        }
        for node in body:
            call = node.value if isinstance(node, ast.Assign) else None
            if not (
                isinstance(call, ast.Call)
                and isinstance(call.func, ast.Name)
                and call.func.id == "moved"
                and len(call.args) >= 2
                and isinstance(call.args[1], ast.Dict)
            ):
                continue
            served = aliases.setdefault(name, set())
            served |= {k.value for k in call.args[1].keys}
            if len(call.args) > 2 or any(k.arg == "rest" for k in call.keywords):
                served.add("*")
                served |= {f"!{e}" for e in exports}  # "!name": exported, not deprecated
    return aliases


def test_package_imports_nothing_through_a_deprecated_alias():
    modules = _module_files()
    aliases = deprecated_aliases(modules)
    assert "megaseg.checkpoint" in aliases  # the scan sees the aliases
    assert "*" in aliases["megaseg.data.synthetic_v2"]
    used = []
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom):
                continue
            origin = _origin(node, package)
            served = aliases.get(origin, set())
            used += [
                f"{name}: from {origin} import {a.name}"
                for a in node.names
                if a.name in served
                or (
                    "*" in served
                    and f"!{a.name}" not in served
                    and f"{origin}.{a.name}" not in modules
                )
            ]
    assert not used, "deprecated paths used inside the package:\n" + "\n".join(used)


def test_deprecated_names_are_not_also_bound_in_their_old_module():
    """A name that a module binds itself (an import, a def, an assignment) never reaches its
    ``__getattr__``: its alias would never warn."""
    modules = _module_files()
    clashes = []
    for name, served in deprecated_aliases(modules).items():
        bound = set()
        for node in ast.parse(modules[name].read_text(encoding="utf-8")).body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                bound.add(node.name)
            elif isinstance(node, ast.Assign):
                bound |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        clashes += [f"{name}.{n}" for n in sorted(served & bound)]
    assert not clashes, f"deprecated aliases shadowed by a name of the module: {clashes}"
