"""Shared fixtures: a small trained run on the embedded digits, made once per test session."""

import importlib
import math
import shutil
from pathlib import Path

import pyro
import pytest
import torch

from pyro_vae.cli import main
from pyro_vae.evaluation.evaluate import per_example
from pyro_vae.training.run_dir import load_model
from pyro_vae.training.train_data import prepare_data

from .servers import mlflow_server

QUICK = ["--train-size", "400", "--test-size", "120", "--eval-k", "20", "--quiet"]
N_SE = 4.0  # statistical tolerance in standard errors: a true statement fails with probability ~6e-5


def run_values(run: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """The per-example values (elbo, log_px, kl, recon) of a run's model on its test set, with k =
    the run's eval_k, as its summary was computed (seeded)."""
    config, vae = load_model(run)
    pyro.set_rng_seed(seed)
    return per_example(vae, prepare_data(config).test_x, eval_k=config.eval_k)


def assert_log_px_at_least_elbo(values: dict[str, torch.Tensor]) -> None:
    """log p(x) >= ELBO for every example, and the IWAE estimate is at least the ELBO in expectation:
    the mean of the paired differences log_px_i - elbo_i is above -N_SE of its own standard error
    (that of the differences, not of the spread of either value across examples, which is far wider)."""
    gap = (values["log_px"] - values["elbo"]).double()
    se = float(gap.std()) / math.sqrt(len(gap))
    assert float(gap.mean()) > -N_SE * se, (float(gap.mean()), se)


def unregister_all() -> None:
    """Remove every prior, likelihood and estimator registered by a test (the built-in ones stay)."""
    from pyro_vae.inference.estimators import ESTIMATORS
    from pyro_vae.models.likelihoods import LIKELIHOODS
    from pyro_vae.models.priors import PRIORS

    for registry in (PRIORS, LIKELIHOODS, ESTIMATORS):
        for name in set(registry) - registry.builtins:
            registry.unregister(name)


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """A 3-epoch digits run directory written by the CLI."""
    out = tmp_path_factory.mktemp("runs") / "digits"
    assert main(["train", "--epochs", "3", "--out", str(out), *QUICK]) == 0
    return out


@pytest.fixture
def crash_copy(monkeypatch):
    """arm(dest, epoch, batch): when training writes the checkpoint at (epoch, batch), copy the run
    directory to `dest`, as a run killed right after it would be left; returns the list that receives
    that checkpoint's step. monkeypatch.undo() disarms it."""
    from pyro_vae.training import run_dir

    checkpoints = importlib.import_module("pyro_vae.training.checkpoints")  # where the trainer saves

    def arm(dest, epoch: int, batch: int) -> list[int]:
        saved, real_save = [], run_dir.save_checkpoint

        def save_and_keep(path, state):
            real_save(path, state)
            if state["epoch"] == epoch and state["batch"] == batch and not saved:
                shutil.copytree(path.parent, dest)
                saved.append(state["step"])

        monkeypatch.setattr(checkpoints, "save_checkpoint", save_and_keep)
        return saved

    return arm


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory):
    """A real `mlflow server` (SQLite backend store, 127.0.0.1, a free port) for the session's tests; its
    tracking URI. Stopped, every process of it, however the session ends."""
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as (uri, _):
        yield uri


@pytest.fixture(autouse=True)
def _fresh_pyro():
    pyro.clear_param_store()
    yield


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` are skipped where no CUDA GPU is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
