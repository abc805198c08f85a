"""Evaluation of a trained model, or of any model/guide pair that meets the Program contract, per
example, in nats (sum over pixels, mean over examples): what the model's kind measures (models/kind.py;
for a VAE: test ELBO and its two terms, importance-sampled log p(x), and active units), written to
RUN/eval.json (by training/eval_record.py, re-exported here). The scores themselves are in scores.py
(imported here too, where they used to live)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import Tensor

from ..device import resolve_device
from ..inference.program import Program
from ..inference.scores import (
    ACTIVE_UNIT_THRESHOLD,
    MAX_ELEMENTS,
    PREDICT_BATCH,
    active_units,
    elbo_terms,
    example_chunks,
    importance_chunks,
    iwae_log_px,
    labelled_correct,
    test_accuracy,
)
from ..models.kind import PAIR, kind_of, model_kind
from ..renames import renamed_keywords
from ..training.eval_record import evaluate_and_write, test_fingerprint, write_evaluation
from ..training.run_dir import (
    check_data_shape,
    load_model,
    load_pair,
    read_config,
)
from ..training.run_lock import run_lock
from ..training.train_data import prepare_data

__all__ = ["ACTIVE_UNIT_THRESHOLD", "MAX_ELEMENTS", "PREDICT_BATCH", "active_units", "elbo_terms", "evaluate",
           "evaluate_run", "example_chunks", "importance_chunks", "iwae_log_px", "labelled_correct",
           "per_example", "summarize", "test_accuracy", "test_fingerprint", "write_evaluation"]


@renamed_keywords(k="eval_k")
@torch.no_grad()
def per_example(program: object, x: Tensor, eval_k: int = 5000, elbo_samples: int = 10,
                progress: bool = False) -> dict[str, Tensor]:
    """The per-example values behind `evaluate`, each of shape (N,), in nats, as the model's kind
    measures them (kind_of; ModelKind.per_example): for a VAE or a pair, "elbo" = "recon" - "kl" and
    "log_px" (IWAE, eval_k draws per example); for an autoencoder "recon" = log p(x | decoder(encoder(x))) and
    "mse" = ||x - mean of p(x|z)||^2 summed over pixels.
    `program`: a model/guide pair (Program.of); an InputError if it breaks the contract (e.g. a
    global latent, which cannot be scored per example)."""
    kind, program = kind_of(program), Program.of(program)
    program.sites(x)
    return kind.per_example(program, x, eval_k, elbo_samples, progress)


@renamed_keywords(k="eval_k")
@torch.no_grad()
def evaluate(program: object, x: Tensor, eval_k: int = 5000, elbo_samples: int = 10,
             progress: bool = False) -> dict[str, float]:
    """All evaluation metrics on x, in nats per example, with standard errors over examples (for an
    autoencoder: its reconstruction error, and None for the ELBO and log p(x)); `progress` shows a
    bar over the importance-sampling chunks, the long part. `program`: our VAE, an object with .model
    and .guide, a (model, guide) tuple or a Program; per_example gives the values behind the means."""
    return summarize(program, x, per_example(program, x, eval_k, elbo_samples, progress), eval_k)


@torch.no_grad()
def summarize(program: object, x: Tensor, values: dict[str, Tensor], k: int) -> dict[str, float | None]:
    """The means (and standard errors sd/sqrt(N)) of per_example's `values` on x, the active units and
    the number of examples: what evaluate returns (ModelKind.summarize; an autoencoder has no ELBO and no
    log p(x): None)."""
    return kind_of(program).summarize(Program.of(program), x, values, k)


@renamed_keywords(k="eval_k")
def evaluate_run(run: str | Path, eval_k: int = 5000, test_size: int | None = None, device: str = "auto",
                 progress: bool = False, program: object | None = None,
                 seed: int = 0) -> tuple[dict, object, object]:
    """Evaluate the model of a run directory on its test set (the first `test_size` examples, if given)
    and write RUN/eval.json and RUN/eval_examples.pt (write_evaluation); returns (result, config, model).
    The importance samples are drawn from `seed` (recorded in eval.json), on forked generators: the same
    call gives the same numbers, and the caller's random state is as it was.
    A run of your own model/guide pair (trained with train(..., program=pair)) needs `program`: the
    same pair, built the same way, into which the run's parameters are loaded (run_dir.load_pair)."""
    run, torch_device = Path(run), resolve_device(device)
    with run_lock(run):  # one writer at a time
        if program is None:
            config, model = load_model(run, torch_device)
            kind = model_kind(config.model)
        else:
            load_pair(run, program, torch_device)
            config, model, kind = read_config(run, pair=True)[0], program, PAIR
        config = dataclasses.replace(config, test_size=test_size or config.test_size)
        data = prepare_data(config, kind).to(torch_device)
        check_data_shape(run, data.shape)
        result = evaluate_and_write(run, kind, model, data, eval_k, progress, seed)
    return result, config, model
