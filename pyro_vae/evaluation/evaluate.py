"""Evaluation of a trained model, or of any model/guide pair that meets the Program contract, per
example, in nats (sum over pixels, mean over examples): what the model's kind measures (models/kind.py;
for a VAE: test ELBO and its two terms, importance-sampled log p(x), and active units), written to
RUN/eval.json. The scores themselves are in scores.py (imported here too, where they used to live)."""

from __future__ import annotations

import dataclasses
import hashlib
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
from ..rng import seeded
from ..staging import write_all_or_none
from ..training.run_dir import (
    EVAL,
    EVAL_EXAMPLES,
    check_data_shape,
    load_model,
    load_pair,
    model_stamp,
    read_config,
    save_checkpoint,
    write_json,
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


def test_fingerprint(x: Tensor) -> str:
    """A short hash of the test examples' values, dtype and shape: two evaluations on the same test set
    (same examples, same order, same binarization) have the same fingerprint."""
    data = x.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{data.dtype} {tuple(data.shape)}".encode())
    digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()[:16]


def write_evaluation(run: str | Path, result: dict, values: dict[str, Tensor], x: Tensor,
                     model: dict | None = None) -> tuple[Path, Path]:
    """Write RUN/eval.json (`result`, the test set's fingerprint and size, and `model`: which checkpoint
    it describes, see run_dir.model_stamp) and the per-example values behind it, RUN/eval_examples.pt
    (a dict of float64 tensors of shape (N,), loadable with torch.load(weights_only=True)): both or none."""
    record = {**result, "test_fingerprint": test_fingerprint(x), "examples_file": EVAL_EXAMPLES,
              **({"model_checkpoint": model} if model is not None else {})}

    def write(folder: Path) -> list[Path]:
        save_checkpoint(folder / EVAL_EXAMPLES,
                        {name: v.detach().double().cpu() for name, v in values.items()})
        write_json(folder / EVAL, record)
        return [folder / EVAL, folder / EVAL_EXAMPLES]

    eval_json, examples = write_all_or_none(run, write)
    return eval_json, examples


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
        pair = Program.of(model)
        with seeded(seed, torch_device):
            if kind.latent:
                pair.sites(data.test_x, *kind.test_conditions(model, data))
            result, values = kind.evaluate(pair, data, eval_k, progress)
        result = {**result, "seed": seed}
        write_evaluation(run, result, values, data.test_x, model_stamp(run))
    return result, config, model
