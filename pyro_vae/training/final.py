"""The end of a training run: the model it describes (with early stopping, the parameters in best.pt),
evaluated on the test set as its kind says (ELBO, log p(x), accuracy ...), and its figures."""

from __future__ import annotations

from pathlib import Path

import torch

from ..data import Dataset
from ..figures import plots
from ..models.kind import ModelKind
from .checkpoints import TrainingDirectory
from .eval_record import evaluate_and_write
from .run_dir import BEST, VALIDATION_KEYS
from .training_model import TrainingModel


def restore_best(directory: TrainingDirectory, model: TrainingModel, device: torch.device,
                 stopped_early: bool) -> dict:
    """Load best.pt's parameters into `model` and say what they are, for summary.json (best_epoch and
    step, its validation measures: best_validation_elbo, best_validation_accuracy where measured, whether
    training stopped early); {} where there is no best.pt."""
    state = directory.best(device)
    if state is None:
        return {}
    model.load(state, directory.out / BEST)
    measures = {f"best_{key}": float(state[key]) for key in VALIDATION_KEYS if key in state}
    return {"best_epoch": int(state["epoch"]), "best_step": int(state["step"]), **measures,
            "stopped_early": stopped_early}


def evaluate_trained(kind: ModelKind, model: TrainingModel, data: Dataset, k: int, progress: bool,
                     out: Path) -> dict:
    """What `kind` measures of the trained model on the test set (k importance samples where it
    estimates log p(x), drawn from seed 0 as `pyro-vae evaluate` draws them), written to OUT/eval.json
    and OUT/eval_examples.pt as evaluate writes them (no second evaluation needed for a paired report),
    then what it records of its training data (e.g. the labelled subset)."""
    model.train_mode(False)
    result = evaluate_and_write(out, kind, model.pair, data, k, progress)
    result.pop("seed")  # summary.json's seed is the training seed (config.json); eval.json records this one
    return {**result, **kind.training_record(data)}


def save_figures(kind: ModelKind, model: TrainingModel, data: Dataset, out: Path, metrics: list[dict],
                 seed: int) -> None:
    """The kind's figures of the model (plots.save_figures) into the run directory, if it has any."""
    if kind.figures:
        plots.save_figures(model.pair, data, out, metrics, seed=seed, kind=kind)
