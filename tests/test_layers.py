"""The package's layers point one way. Two checks on the import graph of pyro_vae, built from the AST
(imports inside functions count: an import moved into a function to dodge a cycle still makes the two
modules depend on each other):

* no cycle: no module imports, directly or through others, a module that imports it back;
* layer order: a module imports only its own layer and those below it (docs/layout.md),

      base < data < config < inference < models < figures < training < evaluation < sweeps < cli

  where base is the top-level utilities every layer may use. The few edges that point up are listed in
  UPWARD with their reason; an edge that no longer exists must leave the list too.
"""

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


# bottom to top; a module's layer is that of its longest listed prefix (a subpackage holds one layer)
LAYERS: list[tuple[str, set[str]]] = [
    ("base", {"pyro_vae.errors", "pyro_vae.registry", "pyro_vae.stats", "pyro_vae.rng", "pyro_vae.sites",
              "pyro_vae.staging", "pyro_vae.device", "pyro_vae.param_store", "pyro_vae.optim",
              "pyro_vae.renames", "pyro_vae._moved"}),
    ("data", {"pyro_vae.data"}),
    ("config", {"pyro_vae.config", "pyro_vae.presets"}),
    ("inference", {"pyro_vae.inference"}),
    ("models", {"pyro_vae.models"}),
    ("figures", {"pyro_vae.figures"}),
    ("training", {"pyro_vae.training"}),
    ("evaluation", {"pyro_vae.evaluation"}),
    ("sweeps", {"pyro_vae.sweeps"}),
    ("cli", {"pyro_vae.cli", "pyro_vae.__main__", "pyro_vae"}),
]
# (importer, imported): why it may point up
UPWARD: dict[tuple[str, str], str] = {}


def layer_of(module: str, layers: list[tuple[str, set[str]]] = LAYERS) -> int | None:
    """The index of the module's layer in `layers` (None: not listed), by its longest listed prefix; the
    package itself only as itself."""
    best, best_length = None, -1
    for index, (_, prefixes) in enumerate(layers):
        for prefix in prefixes:
            exact = prefix == module
            inside = prefix != "pyro_vae" and module.startswith(prefix + ".")
            if (exact or inside) and len(prefix) > best_length:
                best, best_length = index, len(prefix)
    return best


def is_shim(path: Path) -> bool:
    """An old import path kept for users (pyro_vae/_moved.py): it imports nothing but the helper."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("_moved"):
            return True
    return False


def upward_edges(graph: dict[str, set[str]], layers: list[tuple[str, set[str]]] = LAYERS,
                 shims: set[str] = frozenset()) -> set[tuple[str, str]]:
    """The imports from a module to one of a higher layer (shims are outside the layers)."""
    placed = {name: layer_of(name, layers) for name in graph}
    return {(source, target) for source, targets in graph.items() if source not in shims
            for target in targets if target not in shims and None not in (placed[source], placed[target])
            and placed[target] > placed[source]}


def shim_modules(root: Path = PACKAGE) -> set[str]:
    return {name for name, path in package_modules(root).items() if is_shim(path)}


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


def test_every_module_has_a_layer():
    shims = shim_modules()
    unplaced = sorted(name for name in package_modules() if name not in shims and layer_of(name) is None)
    assert not unplaced, f"modules in no layer (add them to LAYERS, or move them into a layer): {unplaced}"


def test_no_module_imports_a_higher_layer():
    edges = upward_edges(import_graph(), shims=shim_modules())
    names = [name for name, _ in LAYERS]
    unexpected = sorted(edges - set(UPWARD))
    assert not unexpected, "imports that point up a layer:\n" + "\n".join(
        f"{a} ({names[layer_of(a)]}) -> {b} ({names[layer_of(b)]})" for a, b in unexpected)
    assert set(UPWARD) <= edges, f"listed in UPWARD but gone (remove them): {sorted(set(UPWARD) - edges)}"


def test_an_import_up_a_layer_is_found(tmp_path):
    """The layer check is not blind: an import inside a function from a lower layer to a higher one is
    found, one from the package's top (cli) down is not, and a shim is outside the layers."""
    root = write(tmp_path, {"pyro_vae/__init__.py": "from .training import t\n",
                            "pyro_vae/data.py": "def f():\n    from .training.t import g\n",
                            "pyro_vae/training/__init__.py": "",
                            "pyro_vae/training/t.py": "from ..data import f\n",
                            "pyro_vae/_moved.py": "",
                            "pyro_vae/old.py": "from ._moved import forward\n"})
    graph = import_graph(root)
    assert upward_edges(graph, shims=shim_modules(root)) == {("pyro_vae.data", "pyro_vae.training.t")}
    assert shim_modules(root) == {"pyro_vae.old"}
    assert layer_of("pyro_vae.old") is None and layer_of("pyro_vae.training.t") == 6
