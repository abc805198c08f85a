"""Importing pyro_vae changes no global state: matplotlib's backend and warnings.formatwarning stay
as the user set them, also after drawing a figure; the CLI's main restores formatwarning when it
returns (each of these checks runs in a fresh interpreter, where nothing else has touched either).
Calling it changes none either: compare and diagnose leave the caller's random generators as they
were, and only the command line sets torch's thread count."""

import os
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_vae import Config, train
from pyro_vae.cli import main
from pyro_vae.evaluation.compare import CompareOptions, compare, compare_estimators
from pyro_vae.evaluation.diagnostics import diagnose
from pyro_vae.training.run_dir import load_model, read_config
from pyro_vae.training.train import prepare_data

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
        wanted = {"pyro_vae.cli", "pyro_vae.figures.plots", "pyro_vae.evaluation.compare",
                  "pyro_vae.evaluation.diagnostics.report"}
        assert wanted <= set(names)
        for name in names:
            importlib.import_module(name)
        assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
        assert warnings.formatwarning is original
    """, tmp_path)


def test_drawing_a_figure_writes_a_png_and_keeps_the_backend(tmp_path):
    run_python("""
        from pathlib import Path
        from pyro_vae.figures.plots import plot_curves
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


# ---- no global state changed behind the caller's back (in this process) ----

def _draws() -> tuple:
    """One draw from each of the caller's generators: torch, NumPy, Python's random."""
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random()


def _compare(vae, x, run, tmp_path):
    compare(vae, x[:8], estimators=["mc", "iwae"], particles=[2], repeats=2, eval_k=10, seed=5)


def _compare_run(vae, x, run, tmp_path):
    options = CompareOptions(estimators=["mc"], particles=[1], repeats=2, batch_size=8, eval_k=10, seed=5,
                             progress=False)
    compare_estimators(run, out=tmp_path / "compare", options=options)


def _diagnose(vae, x, run, tmp_path):
    diagnose(vae, x, n_examples=4, mcmc_examples=0, eval_k=10, svi_steps=2, seed=5)


@pytest.mark.parametrize("call", [_compare, _compare_run, _diagnose],
                         ids=["compare", "compare-run", "diagnose"])
def test_compare_and_diagnose_leave_the_callers_random_state_as_it_was(call, digits_run, tmp_path):
    """They seed their own draws (reproducible from their seed), on forked generators: the caller's next
    draw after the call is the one it would have made without it."""
    _, vae = load_model(digits_run)
    x = prepare_data(read_config(digits_run)[0]).test_x[:16]
    torch.manual_seed(11), np.random.seed(11), random.seed(11)
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    call(vae, x, digits_run, tmp_path)
    after = _draws()
    torch.set_rng_state(states[0]), np.random.set_state(states[1]), random.setstate(states[2])
    assert after == _draws()


def test_train_and_diagnose_in_python_never_set_torch_threads(tmp_path, monkeypatch, digits_run):
    """`threads` is the command line's to apply: train(config) with threads=3, and diagnose with NUTS,
    leave the process's thread count alone (not even changed and restored)."""
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    before = torch.get_num_threads()
    config = Config(threads=3, epochs=1, hidden=[16], z_dim=2, train_size=100, test_size=20, eval_k=5)
    train(config, out=tmp_path / "run", progress=False)
    _, vae = load_model(digits_run)
    diagnose(vae, prepare_data(read_config(digits_run)[0]).test_x, n_examples=2, mcmc_examples=1, eval_k=10,
             svi_steps=2, num_samples=5, warmup=5, chains=1)
    assert calls == [] and torch.get_num_threads() == before


def test_the_command_line_runs_diagnose_with_the_runs_threads(tmp_path, monkeypatch, digits_run):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    run = shutil.copytree(digits_run, tmp_path / "run")
    assert main(["diagnose", str(run), "--n-examples", "4", "--mcmc-examples", "0", "--eval-k", "10",
                 "--svi-steps", "2", "--quiet"]) == 0
    assert calls == [read_config(run)[0].threads, torch.get_num_threads()]  # the run's, then restored
