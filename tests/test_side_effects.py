"""Importing pyro_vae changes no global state: matplotlib's backend and warnings.formatwarning stay
as the user set them, also after drawing a figure; the CLI's main restores formatwarning when it
returns. Each check runs in a fresh interpreter, where nothing else has touched either."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PRELUDE = """
import importlib, pkgutil, warnings
import matplotlib
matplotlib.use("svg")
original = warnings.formatwarning
"""


def run_python(code: str, tmp_path: Path) -> None:
    """Run `code` after PRELUDE in a new interpreter; it must exit 0."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_importing_every_module_keeps_the_backend_and_the_warning_format(tmp_path):
    run_python("""
        import pyro_vae
        names = [m.name for m in pkgutil.walk_packages(pyro_vae.__path__, "pyro_vae.")]
        wanted = {"pyro_vae.cli", "pyro_vae.plots", "pyro_vae.compare", "pyro_vae.diagnostics.report"}
        assert wanted <= set(names)
        for name in names:
            importlib.import_module(name)
        assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
        assert warnings.formatwarning is original
    """, tmp_path)


def test_drawing_a_figure_writes_a_png_and_keeps_the_backend(tmp_path):
    run_python("""
        from pathlib import Path
        from pyro_vae.plots import plot_curves
        rows = [{"epoch": e, "train_loss": 50.0 - e, "test_elbo": -51.0 + e} for e in (1, 2, 3)]
        path = plot_curves(rows, Path("curves.png"))
        assert path.read_bytes()[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
        assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
    """, tmp_path)


@pytest.mark.parametrize("argv", [["sample", "RUN", "--n", "4"], ["evaluate", "no-such-run"]],
                         ids=["success", "input-error"])
def test_main_restores_the_warning_format_when_it_returns(tmp_path, digits_run, argv):
    argv = [str(digits_run) if a == "RUN" else a for a in argv]
    run_python(f"""
        import shutil
        from pyro_vae.cli import main
        argv = {argv!r}
        if argv[0] == "sample":  # on a copy: the session's run stays as it is
            argv[1] = shutil.copytree(argv[1], "run")
        code = main(argv)
        assert code == (0 if argv[0] == "sample" else 2), code
        assert warnings.formatwarning is original
        assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
    """, tmp_path)
