"""Old import paths keep working: each module that moved into a layer subpackage (docs/layout.md) and that
README.md, docs/, scripts/ or a user's plugin names keeps a two-line shim at its old path
(pyro_vae/_moved.py), whose attributes are the new module's, each with a DeprecationWarning that names
the new path. The checks run in a fresh interpreter: importing an old path that is also the name of one
of the package's functions (pyro_vae.train, pyro_vae.evaluate) rebinds that attribute of the package."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pyro_vae"


def shims(root: Path = PACKAGE) -> dict[str, str]:
    """Old module -> new module, read from the shim files (`forward(__name__, "new")`)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "forward" and \
                    isinstance(node.args[1], ast.Constant):
                parts = list(path.relative_to(root.parent).with_suffix("").parts)
                if parts[-1] == "__init__":
                    parts.pop()
                found[".".join(parts)] = node.args[1].value
    return found


CHECK = """
import importlib, json, sys, warnings
from types import ModuleType
import pyro_vae
moved = json.loads(sys.argv[1])
functions = {old: getattr(pyro_vae, old.split(".")[1]) for old in moved if old.count(".") == 1
             and callable(getattr(pyro_vae, old.split(".")[1], None))
             and not isinstance(getattr(pyro_vae, old.split(".")[1]), ModuleType)}
results = {}
for old, new in moved.items():
    target = importlib.import_module(new)
    name = next(n for n in getattr(target, "__all__", dir(target)) if not n.startswith("_"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = getattr(importlib.import_module(old), name)
    results[old] = {"same": value is getattr(target, name),
                    "warnings": [str(w.message) for w in caught if w.category is DeprecationWarning],
                    "name": name}
# an old module path that is also the name of a function of the package: the package's attribute is now
# the old module, which calls that function
results["displaced"] = sorted(old for old, function in functions.items()
                              if getattr(pyro_vae, old.split(".")[1])._displaced is function
                              and callable(getattr(pyro_vae, old.split(".")[1])))
results["functions"] = sorted(functions)
print(json.dumps(results))
"""


def test_each_old_path_gives_the_new_objects_with_a_warning_naming_the_new_path(tmp_path):
    moved = shims()
    assert {"pyro_vae.model", "pyro_vae.m2", "pyro_vae.train"} <= set(moved)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run([sys.executable, "-c", CHECK, json.dumps(moved)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.splitlines()[-1])
    functions = results.pop("functions")
    assert "pyro_vae.train" in functions and results.pop("displaced") == functions
    for old, new in moved.items():
        result = results[old]
        assert result["same"], old
        assert result["warnings"] == [f"{old} moved to {new}: import {result['name']} from {new}"], old


def test_a_shim_is_found_with_its_new_path(tmp_path):
    (tmp_path / "pyro_vae").mkdir()
    (tmp_path / "pyro_vae" / "old.py").write_text(
        'from ._moved import forward\n\n__getattr__, __dir__ = forward(__name__, "pyro_vae.new.place")\n')
    (tmp_path / "pyro_vae" / "plain.py").write_text("def forward(a, b):\n    return a\n")
    assert shims(tmp_path / "pyro_vae") == {"pyro_vae.old": "pyro_vae.new.place"}
