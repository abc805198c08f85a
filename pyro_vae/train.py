"""The SVI training loop: one function a reader follows top to bottom — set up, loop over epochs
and minibatches, evaluate, checkpoint, summarize.

Training uses Pyro's ELBO as a differentiable loss and a torch optimizer over the VAE's
parameters (not pyro.optim). The loss of a step is -ELBO summed over the batch divided by the batch
size: nats per example, like every number this package reports.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pyro
import torch
from tqdm.auto import tqdm

from . import plots
from .config import Config
from .data import Dataset, batch_indices, binarize, load_dataset
from .errors import InputError
from .estimators import make_estimator
from .evaluate import elbo_terms, evaluate
from .likelihoods import Likelihood, make_likelihood
from .run_dir import (
    CHECKPOINT,
    CONFIG,
    METRICS,
    SUMMARY,
    append_jsonl,
    build_from_config,
    config_record,
    load_checkpoint,
    read_jsonl,
    save_checkpoint,
    write_json,
    write_jsonl,
)

POSTFIX_EVERY = 10  # steps between progress-bar loss updates (each one syncs with the device)


class TrainingError(RuntimeError):
    """Training produced a non-finite loss; the run directory keeps the last good checkpoint."""


@dataclass
class RunResult:
    """Where a run was written and what it measured."""

    out: Path
    metrics: list[dict]
    summary: dict


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA if available else CPU; 'cuda' without a GPU is an input error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return torch.device(name)


def prepare_data(config: Config, likelihood: Likelihood) -> Dataset:
    """The dataset as training sees it. 'static' binarizes train and test once (fixed seed);
    'dynamic' keeps train as probabilities (redrawn each epoch) and binarizes test once; 'none'
    uses the values as they are. The data must lie in the likelihood's support."""
    data = load_dataset(config.dataset, config.data_dir, config.train_size, config.test_size,
                        config.image_size, config.channels)
    if config.binarize != "none":
        gen = torch.Generator().manual_seed(config.seed)
        test_x = binarize(data.test_x, gen)
        train_x = binarize(data.train_x, gen) if config.binarize == "static" else data.train_x
        data = Dataset(data.name, train_x, test_x, data.train_y, data.test_y)
    likelihood.check(data.train_x)
    likelihood.check(data.test_x)
    return data


def new_run_dir(out: str | Path | None) -> Path:
    """`out`, or runs/<timestamp>; refuses a directory that already holds files."""
    path = Path(out) if out else Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise InputError(f"{path} already exists and is not empty; choose another --out, "
                         "or continue that run with --resume")
    return path


def train(
    config: Config, out: str | Path | None = None, resume: bool = False, progress: bool = True
) -> RunResult:
    """Train a VAE as `config` says and write the run directory (see DESIGN.md). With resume=True,
    `out` is an existing run whose checkpoint is continued up to config.epochs."""
    config.validate()
    device = resolve_device(config.device)
    pyro.set_rng_seed(config.seed)
    out_dir = Path(out) if resume else new_run_dir(out)

    data = prepare_data(config, make_likelihood(config.likelihood, sigma=config.sigma)).to(device)
    vae = build_from_config(config, data.shape).to(device)
    elbo = make_estimator(config.estimator, config.particles)
    optimizer = torch.optim.Adam(vae.parameters(), lr=config.lr)
    generator = torch.Generator(device).manual_seed(config.seed)
    start_epoch, step = 1, 0
    metrics: list[dict] = []

    if resume:
        state = load_checkpoint(out_dir / CHECKPOINT, device)
        vae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"].cpu())
        torch.set_rng_state(state["torch_rng"].cpu())
        if device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"].cpu())
        start_epoch, step = int(state["epoch"]) + 1, int(state["step"])
        metrics = [row for row in read_jsonl(out_dir / METRICS) if row["epoch"] < start_epoch]
        write_jsonl(out_dir / METRICS, metrics)
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / CONFIG, config_record(config, data.shape))

    n_train = data.train_x.shape[0]
    n_batches = math.ceil(n_train / config.batch_size)
    started = time.perf_counter()
    for epoch in range(start_epoch, config.epochs + 1):
        epoch_start = time.perf_counter()
        vae.train()
        x_epoch = binarize(data.train_x, generator) if config.binarize == "dynamic" else data.train_x
        total = torch.zeros((), device=device)
        bar = tqdm(batch_indices(n_train, config.batch_size, generator, device), total=n_batches,
                   desc=f"epoch {epoch}/{config.epochs}", disable=not progress, leave=False)
        for i, idx in enumerate(bar):
            x = x_epoch[idx]
            loss = elbo.differentiable_loss(vae.model, vae.guide, x) / x.shape[0]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach() * x.shape[0]
            step += 1
            if i % POSTFIX_EVERY == 0:
                bar.set_postfix(loss=f"{loss.item():.2f}")
        train_loss = float(total) / n_train
        if not math.isfinite(train_loss):
            raise TrainingError(
                f"the training loss became {train_loss} in epoch {epoch} (by step {step}); the last "
                f"good checkpoint is in {out_dir}; lower --lr and try again"
            )
        vae.eval()
        row = {
            "epoch": epoch,
            "step": step,
            "train_loss": train_loss,
            "test_elbo": float(elbo_terms(vae.model, vae.guide, data.test_x)["elbo"].mean()),
            "seconds": time.perf_counter() - epoch_start,
        }
        metrics.append(row)
        append_jsonl(out_dir / METRICS, row)
        save_checkpoint(out_dir / CHECKPOINT, {
            "model": vae.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
            "step": step, "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
            **({"cuda_rng": torch.cuda.get_rng_state()} if device.type == "cuda" else {}),
        })
        if progress:
            tqdm.write(f"epoch {epoch}: train loss {train_loss:.2f}, test ELBO "
                       f"{row['test_elbo']:.2f} nats ({row['seconds']:.1f} s)")

    vae.eval()
    final = evaluate(vae, data.test_x, k=config.eval_k)
    summary = {
        **final,
        "epochs": metrics[-1]["epoch"] if metrics else 0,
        "steps": step,
        "train_loss": metrics[-1]["train_loss"] if metrics else None,
        "train_seconds": time.perf_counter() - started,
        "device": str(device),
        "n_train": n_train,
    }
    write_json(out_dir / SUMMARY, summary)
    plots.save_figures(vae, data, out_dir, metrics, seed=config.seed)
    return RunResult(out_dir, metrics, summary)
