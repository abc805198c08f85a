"""Evaluation of a trained VAE, or of any model/guide pair that meets the Program contract, per
example, in nats (sum over pixels, mean over examples): test ELBO and its two terms,
importance-sampled log p(x), and active units."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .device import resolve_device
from .elbo import mean_field_terms
from .iwae import weights
from .program import Program
from .run_dir import (
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
from .run_lock import run_lock
from .staging import write_all_or_none
from .stats import mean_se
from .train_data import prepare_data

MAX_ELEMENTS = 2**24  # particles x examples x pixels per chunk: bounds memory (~64 MB a tensor)
ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. 2016: unit u is active if Cov_x(E_q[z_u]) > 0.01


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def example_chunks(x: Tensor, particles: int, max_elements: int = MAX_ELEMENTS) -> list[slice]:
    """Slices of x's examples, each holding at most max_elements particles x examples x pixels (and at
    least one example)."""
    return _chunks(x.shape[0], max(1, max_elements // max(1, particles * x[0].numel())))


def importance_chunks(x: Tensor, k: int, max_elements: int = MAX_ELEMENTS) -> list[tuple[slice, slice]]:
    """(examples, draws) slices that cover x's examples x k draws, examples outermost; a chunk holds
    at most max_elements draws x examples x pixels (and at least one draw of one example)."""
    k_chunk = max(1, min(k, max_elements // max(1, x[0].numel())))
    return [(rows, draws) for rows in example_chunks(x, k_chunk, max_elements)
            for draws in _chunks(k, k_chunk)]


@torch.no_grad()
def iwae_log_px(
    model: Callable, guide: Callable, x: Tensor, k: int, max_elements: int = MAX_ELEMENTS,
    progress: bool = False, conditions: tuple[Tensor, ...] = (),
) -> Tensor:
    """Per-example IWAE estimate log p(x) ~ logsumexp_k(log w_k) - log k, with w_k = p(x, z_k) /
    q(z_k|x); computed in chunks of particles and examples so memory stays bounded. Shape (N,).
    `conditions`: tensors with one row per example, passed after x to model and guide (a conditional
    pair's c: then the estimate is of log p(x | c))."""
    dtype = x.dtype if x.is_floating_point() else None  # float64 data keep float64 weights
    log_sum = torch.full((x.shape[0],), -math.inf, device=x.device, dtype=dtype)
    chunks = importance_chunks(x, k, max_elements)
    for rows, draws in tqdm(chunks, desc=f"log p(x), k={k}", disable=not progress, leave=False):
        lw = weights(model, guide, draws.stop - draws.start, x[rows], *(c[rows] for c in conditions)).log_w
        log_sum[rows] = torch.logaddexp(log_sum[rows], lw.logsumexp(0))
    return log_sum - math.log(k)


@torch.no_grad()
def elbo_terms(
    model: Callable, guide: Callable, x: Tensor, samples: int = 1, conditions: tuple[Tensor, ...] = ()
) -> dict[str, Tensor]:
    """Per-example ELBO = recon - kl: recon = E_q[log p(x|z)] (Monte Carlo over `samples`), and
    kl = KL(q(z|x) || p(z)) in closed form where torch has it, else Monte Carlo; unscaled (any
    poutine.scale, e.g. a KL weight, is ignored: these are the true terms). Shapes (N,). `conditions`:
    as in iwae_log_px (then the terms are of log p(x | c), with KL(q(z|x,c) || p(z|c)))."""
    recon, kl = [], []
    for rows in example_chunks(x, samples):
        r, k = mean_field_terms(model, guide, samples, x[rows], *(c[rows] for c in conditions))
        recon.append(r)
        kl.append(k)
    recon_t, kl_t = torch.cat(recon), torch.cat(kl)
    return {"elbo": recon_t - kl_t, "recon": recon_t, "kl": kl_t}


@torch.no_grad()
def active_units(program: object, x: Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD) -> int:
    """Number of latent units u with Var_x(E_q[z_u | x]) > threshold (Burda et al. 2016), over the
    coordinates of every latent site (Program.posterior_means). The variance is estimated as the
    covariance over x of two independent estimates of the posterior mean: the same as the variance
    where the mean is in closed form; where it is estimated from guide draws (a flow), the draws'
    noise, which would otherwise add sigma^2 / draws to every unit's variance, cancels."""
    program = Program.of(program)
    means = [torch.cat([program.posterior_means(x[rows]) for rows in _chunks(x.shape[0], 4096)])
             for _ in range(2)]
    if len(means[0]) < 2:
        return 0
    a, b = (m - m.mean(0) for m in means)
    return int(((a * b).sum(0) / (len(a) - 1) > threshold).sum())


@torch.no_grad()
def per_example(program: object, x: Tensor, k: int = 5000, elbo_samples: int = 10,
                progress: bool = False) -> dict[str, Tensor]:
    """The per-example values behind `evaluate`, each of shape (N,), in nats: "elbo" = "recon" - "kl"
    and "log_px" (IWAE, k draws); for an autoencoder "recon" = log p(x | decoder(encoder(x))) and
    "mse" = ||x - mean of p(x|z)||^2 summed over pixels.
    `program`: a model/guide pair (Program.of); an InputError if it breaks the contract (e.g. a
    global latent, which cannot be scored per example)."""
    program = Program.of(program)
    program.sites(x)
    if program.is_autoencoder:
        recon = elbo_terms(program.model, program.guide, x)["recon"]
        mse = torch.cat([(program.reconstruct(x[rows]) - x[rows]).square().flatten(1).sum(1)
                         for rows in _chunks(x.shape[0], 4096)])
        return {"recon": recon, "mse": mse}
    terms = elbo_terms(program.model, program.guide, x, samples=elbo_samples)
    return {**terms, "log_px": iwae_log_px(program.model, program.guide, x, k, progress=progress)}


@torch.no_grad()
def evaluate(program: object, x: Tensor, k: int = 5000, elbo_samples: int = 10,
             progress: bool = False) -> dict[str, float]:
    """All evaluation metrics on x, in nats per example, with standard errors over examples (for an
    autoencoder: its reconstruction error, and None for the ELBO and log p(x)); `progress` shows a
    bar over the importance-sampling chunks, the long part. `program`: our VAE, an object with .model
    and .guide, a (model, guide) tuple or a Program; per_example gives the values behind the means."""
    return summarize(program, x, per_example(program, x, k, elbo_samples, progress), k)


@torch.no_grad()
def summarize(program: object, x: Tensor, values: dict[str, Tensor], k: int) -> dict[str, float | None]:
    """The means (and standard errors sd/sqrt(N)) of per_example's `values` on x, the active units and
    the number of examples: what evaluate returns (an autoencoder has no ELBO and no log p(x): None)."""
    program = Program.of(program)
    if program.is_autoencoder:
        result: dict[str, float | None] = {"model": "ae", "test_elbo": None, "test_elbo_se": None,
                                           "log_px": None, "log_px_se": None}
        pairs: tuple[tuple[str, str], ...] = (("recon", "recon"), ("mse", "mse"))
    else:
        result = {}
        pairs = (("test_elbo", "elbo"), ("log_px", "log_px"), ("kl", "kl"), ("recon", "recon"))
    for name, key in pairs:
        result[name], result[f"{name}_se"] = mean_se(values[key])
    result.update(active_units=active_units(program, x), n_examples=int(x.shape[0]))
    if not program.is_autoencoder:
        result["k"] = k
    return result


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


def evaluate_run(run: str | Path, k: int = 5000, test_size: int | None = None, device: str = "auto",
                 progress: bool = False, program: object | None = None) -> tuple[dict, object, object]:
    """Evaluate the model of a run directory on its test set (the first `test_size` examples, if given)
    and write RUN/eval.json and RUN/eval_examples.pt (write_evaluation); returns (result, config, model).
    A run of your own model/guide pair (trained with train(..., program=pair)) needs `program`: the
    same pair, built the same way, into which the run's parameters are loaded (run_dir.load_pair)."""
    run, torch_device = Path(run), resolve_device(device)
    with run_lock(run):  # one writer at a time
        if program is None:
            config, vae = load_model(run, torch_device)
        else:
            load_pair(run, program, torch_device)
            config, vae = read_config(run, pair=True)[0], program
        config.test_size = test_size or config.test_size
        data = prepare_data(config).to(torch_device)
        check_data_shape(run, data.shape)
        x = data.test_x
        classifier = Program.of(vae).is_classifier
        values = {} if classifier else per_example(vae, x, k=k, progress=progress)
        result = {"n_examples": int(x.shape[0])} if classifier else summarize(vae, x, values, k)
        if callable(getattr(vae, "predict", None)) and data.test_y is not None:
            values["correct"] = labelled_correct(vae, data.test_x, data.test_y)
            result["test_accuracy"], result["test_accuracy_se"] = mean_se(values["correct"])
        write_evaluation(run, result, values, x, model_stamp(run))
    return result, config, vae


PREDICT_BATCH = 2000  # test examples classified at a time


@torch.no_grad()
def labelled_correct(model: object, x: Tensor, labels: Tensor) -> Tensor:
    """1.0 where `model.predict` (q(y|x)'s most likely class) gives the label, else 0.0, per example: its
    mean is the accuracy, its standard error sqrt(a (1 - a) / (n - 1))."""
    predicted = torch.cat([model.predict(batch) for batch in x.split(PREDICT_BATCH)])
    return (predicted == labels).double()


def test_accuracy(model: object, data) -> tuple[float, float]:
    """The test accuracy of `model.predict` on data.test_x against data.test_y, and its standard error
    over the test examples."""
    return mean_se(labelled_correct(model, data.test_x, data.test_y))
