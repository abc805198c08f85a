"""A run's evaluation on disk: RUN/eval.json (what the model's kind measures on the test set, which test
set: its size and fingerprint, which model: the checkpoint's stamp) and RUN/eval_examples.pt (the
per-example values behind it), written by `pyro-vae evaluate` and at the end of training, read by report."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor

from ..data import Dataset
from ..inference.program import Program
from ..models.kind import ModelKind
from ..rng import seeded
from ..staging import write_all_or_none
from .run_dir import EVAL, EVAL_EXAMPLES, model_stamp, save_checkpoint, write_json


def test_fingerprint(x: Tensor) -> str:
    """A short hash of the test examples' values, dtype and shape: two evaluations on the same test set
    (same examples, same order, same binarization) have the same fingerprint."""
    data = x.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{data.dtype} {tuple(data.shape)}".encode())
    digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()[:16]


def compact_values(values: dict[str, Tensor]) -> dict[str, Tensor]:
    """The per-example values as eval_examples.pt stores them: float32 where that holds each value
    exactly (the model computes in float32, so the evaluation's values are), else float64; half the
    bytes of float64, the same numbers (report.load_checkpoint_values reads them back as float64)."""
    stored = {}
    for name, value in values.items():
        value = value.detach().double().cpu()
        single = value.float()
        stored[name] = single if torch.equal(single.double(), value) else value
    return stored


def write_evaluation(run: str | Path, result: dict, values: dict[str, Tensor], x: Tensor,
                     model: dict | None = None) -> tuple[Path, Path]:
    """Write RUN/eval.json (`result`, the test set's fingerprint and size, and `model`: which checkpoint
    it describes, see run_dir.model_stamp) and the per-example values behind it, RUN/eval_examples.pt
    (a dict of tensors of shape (N,), loadable with torch.load(weights_only=True); see compact_values
    for their dtype): both or none."""
    record = {**result, "test_fingerprint": test_fingerprint(x), "examples_file": EVAL_EXAMPLES,
              **({"model_checkpoint": model} if model is not None else {})}

    def write(folder: Path) -> list[Path]:
        save_checkpoint(folder / EVAL_EXAMPLES, compact_values(values))
        write_json(folder / EVAL, record)
        return [folder / EVAL, folder / EVAL_EXAMPLES]

    eval_json, examples = write_all_or_none(run, write)
    return eval_json, examples


def evaluate_and_write(run: Path, kind: ModelKind, model: object, data: Dataset, eval_k: int,
                       progress: bool = False, seed: int = 0) -> dict:
    """What `kind` measures of `model` (a model/guide pair) on data's test set, its importance samples
    drawn from `seed` (rng.seeded: the caller's generators are left as they were), written with the
    per-example values to RUN/eval.json and RUN/eval_examples.pt, stamped with the model file of the run
    (write_evaluation); returns the result with its seed. What evaluate_run and the end of training call."""
    pair = Program.of(model)
    with seeded(seed, data.test_x.device):
        if kind.latent:
            pair.sites(data.test_x, *kind.test_conditions(model, data))
        result, values = kind.evaluate(pair, data, eval_k, progress)
    result = {**result, "seed": seed}
    write_evaluation(run, result, values, data.test_x, model_stamp(run))
    return result
