"""The package's layers point one way: no module of pyro_vae imports, directly or through others, a
module that imports it back. Imports inside functions count (an import moved into a function to dodge a
cycle still makes the two modules depend on each other)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pyro_vae"


def module_name(path: Path, root: Path) -> str:
    """pyro_vae/diagnostics/nuts.py -> pyro_vae.diagnostics.nuts; a package's __init__.py -> the package."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules(root: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(path, root): path for path in sorted(root.rglob("*.py"))}


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports anywhere in its file (module level, functions, classes).
    Relative imports are resolved; `from .a import b` imports a.b when that is a module, else a."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = name.split(".")
                anchor = anchor[:len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import pyro_vae.a.b` names pyro_vae.a.b
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    modules = package_modules(root)
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles (lists of modules, the first repeated at the end): the shortest cycle through each
    module that is on one, found per strongly connected component; an empty list when there is none."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [cycle for component in components for cycle in cycles_of(graph, component)]


def shortest_cycle(graph: dict[str, set[str]], start: str, within: set[str]) -> list[str]:
    """The shortest cycle from `start` back to it through modules of `within`, by breadth-first search."""
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node] & within):
                if target == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if target not in parents:
                    parents[target] = node
                    following.append(target)
        frontier = following
    raise AssertionError(f"no cycle through {start}")


def cycles_of(graph: dict[str, set[str]], component: set[str]) -> list[list[str]]:
    """The shortest cycle through each module of a strongly connected component, each cycle once (it is
    written from its first module by name)."""
    found = []
    for start in sorted(component):
        cycle = shortest_cycle(graph, start, component)[:-1]
        first = cycle.index(min(cycle))
        cycle = cycle[first:] + cycle[:first]
        if cycle + cycle[:1] not in found:
            found.append(cycle + cycle[:1])
    return found


def test_the_package_has_no_import_cycle():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def write(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)
    return root / "pyro_vae"


@pytest.mark.parametrize("files, cycle", [
    ({"pyro_vae/__init__.py": "", "pyro_vae/a.py": "def f():\n    from .b import g\n",
      "pyro_vae/b.py": "from .a import f\n"},
     ["pyro_vae.a", "pyro_vae.b", "pyro_vae.a"]),
    ({"pyro_vae/__init__.py": "", "pyro_vae/a.py": "from . import b\n",
      "pyro_vae/b.py": "import pyro_vae.c\n", "pyro_vae/c.py": "class C:\n    def m(self):\n"
                                                               "        from pyro_vae.a import x\n"},
     ["pyro_vae.a", "pyro_vae.b", "pyro_vae.c", "pyro_vae.a"]),
    ({"pyro_vae/__init__.py": "", "pyro_vae/sub/__init__.py": "from .x import y\n",
      "pyro_vae/sub/x.py": "from ..a import z\n", "pyro_vae/a.py": "from .sub import x\n"},
     ["pyro_vae.a", "pyro_vae.sub.x", "pyro_vae.a"]),
])
def test_a_cycle_is_found_and_named(tmp_path, files, cycle):
    graph = import_graph(write(tmp_path, files))
    assert find_cycles(graph) == [cycle]


def test_imports_that_point_one_way_are_no_cycle(tmp_path):
    root = write(tmp_path, {"pyro_vae/__init__.py": "from .a import f\nfrom .b import g\n",
                            "pyro_vae/a.py": "import torch\n",
                            "pyro_vae/b.py": "from .a import f\nimport os\n",
                            "pyro_vae/sub/__init__.py": "from .x import y\n",
                            "pyro_vae/sub/x.py": "from .. import b\n"})
    graph = import_graph(root)
    assert graph["pyro_vae.b"] == {"pyro_vae.a"} and graph["pyro_vae.sub.x"] == {"pyro_vae.b"}
    assert find_cycles(graph) == []
