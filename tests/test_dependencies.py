"""Every package the library reaches is declared in pyproject.toml and imports in this environment.

A fresh install has only what pyproject.toml declares (`.ci/run` makes a new virtual environment per
run); a package the code imports inside a function, or a backend a library picks at run time (the
NetCDF engine diagnose writes with), would otherwise fail only when a user reaches that command."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import pkgutil
import re
import sys
from pathlib import Path

import pytest
import tomllib

import pyro_vae
from pyro_vae.evaluation.diagnostics import report as diagnose_report

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pyro_vae"


def _declared() -> set[str]:
    """Normalized distribution names of pyproject.toml's dependencies that apply to this Python."""
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = set()
    for line in project["dependencies"]:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate():
            names.add(_normalize(requirement.name))
    return names


def _optional() -> set[str]:
    """Normalized distribution names of pyproject.toml's optional extras (tensorboard, ray, mlflow; not
    dev, which gathers them for CI)."""
    from packaging.requirements import Requirement

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return {_normalize(Requirement(line).name) for group, lines in extras.items() if group != "dev"
            for line in lines}


def _imported_at_module_level(module: str) -> list[str]:
    """The package files that import top-level module `module` in their module body (on import)."""
    files = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                     else [])
            if any(name.split(".")[0] == module for name in names):
                files.append(str(path.relative_to(ROOT)))
    return files


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported_top_levels() -> dict[str, set[str]]:
    """Top-level module name -> the package files importing it, module level and inside functions."""
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def _third_party(found: dict[str, set[str]]) -> dict[str, set[str]]:
    return {name: files for name, files in found.items()
            if name not in sys.stdlib_module_names and name not in {"pyro_vae", "__future__"}}


def test_every_module_of_the_package_imports():
    names = [info.name for info in pkgutil.walk_packages(pyro_vae.__path__, "pyro_vae.")]
    assert "pyro_vae.cli" in names and "pyro_vae.evaluation.diagnostics.report" in names
    for name in names:
        importlib.import_module(name)


@pytest.mark.parametrize("module", sorted(_third_party(_imported_top_levels())))
def test_every_imported_package_is_declared_and_installed(module):
    importlib.import_module(module)
    distributions = importlib.metadata.packages_distributions().get(module, [])
    assert distributions, f"{module} is imported by the package but no installed distribution provides it"
    provided = {_normalize(d) for d in distributions}
    if provided & _declared():
        return
    assert provided & _optional(), (
        f"{module} (from {sorted(distributions)}) is imported by "
        f"{sorted(_third_party(_imported_top_levels())[module])} but pyproject.toml does not declare it")
    # an optional extra is imported where it is asked for, so the package imports without it
    assert not _imported_at_module_level(module), (
        f"{module} is an optional extra but {_imported_at_module_level(module)} import it on import")


def test_the_netcdf_engine_diagnose_writes_with_is_declared_and_installed():
    engine = diagnose_report.NETCDF_ENGINE
    importlib.import_module(engine)
    assert _normalize(engine) in _declared()
    import h5py  # the HDF5 library h5netcdf writes through: its [h5py] extra

    assert h5py.__version__


@pytest.mark.skipif(sys.version_info < (3, 12), reason="arviz 1.x needs Python 3.12; 3.11 gets arviz-base")
def test_arviz_is_the_1x_line_where_python_allows_it():
    import arviz

    assert int(arviz.__version__.split(".")[0]) >= 1


def test_the_ci_script_installs_into_a_fresh_environment_and_runs_the_readme_command():
    script = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"^(python -m pytest)\b", readme, re.M)
    assert command, "README shows the test command on a line of its own"
    assert "-m venv" in script and '".[dev]"' in script
    assert re.search(r'"\$VENV/bin/python" -m pytest\b', script), "tests run with the new environment"
