"""The SVI training loop: one function a reader follows top to bottom — set up, loop over epochs
and minibatches, evaluate, checkpoint, summarize.

Training uses Pyro's ELBO as a differentiable loss and a torch optimizer over the VAE's
parameters (not pyro.optim). The loss of a step is -ELBO summed over the batch divided by the batch
size: nats per example, like every number this package reports.

A run survives interruption: a checkpoint (model, optimizer, every random-number state, position
inside the epoch, metrics) is written atomically at the end of every epoch, every
`checkpoint_every` minutes, and when SIGINT/SIGTERM arrives (after the current step). Resuming
from any of them gives, on CPU, bit-identical parameters and metrics to an uninterrupted run.
"""

from __future__ import annotations

import math
import shutil
import signal
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pyro
import torch
from tqdm.auto import tqdm

from . import plots
from .config import Config
from .data import Dataset, batch_indices, binarize, load_dataset
from .errors import InputError, TrainingError
from .estimators import check_analytic_kl, make_estimator
from .evaluate import elbo_terms, evaluate
from .faults import NumericalFault, is_validation_error, locate_nonfinite
from .kl_weight import kl_weight, scale_latents
from .likelihoods import make_likelihood
from .model import VAE
from .rng import get_rng_state, set_rng_state
from .run_dir import (
    CHECKPOINT,
    CONFIG,
    METRICS,
    SUMMARY,
    build_from_config,
    config_record,
    load_checkpoint,
    remove_stale_temp_files,
    save_checkpoint,
    write_json,
    write_jsonl,
)

POSTFIX_EVERY = 10  # steps between progress-bar loss updates


class Interrupted(TrainingError):
    """SIGINT or SIGTERM arrived; a checkpoint was written after the step in progress."""

    def __init__(self, signum: int, out: Path, step: int):
        self.signum, self.out, self.step = signum, out, step
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint "
                         f"saved; resume with: pyro-vae train --resume {out}")


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


def prepare_data(config: Config) -> Dataset:
    """The dataset as training sees it. 'static' binarizes train and test once (fixed seed);
    'dynamic' keeps train as probabilities (redrawn each epoch) and binarizes test once; 'none'
    uses the values as they are. The data must lie in the support of config.likelihood."""
    data = load_dataset(config.dataset, config.data_dir, config.train_size, config.test_size,
                        config.image_size, config.channels)
    if config.binarize != "none":
        gen = torch.Generator().manual_seed(config.seed)
        test_x = binarize(data.test_x, gen)
        train_x = binarize(data.train_x, gen) if config.binarize == "static" else data.train_x
        data = Dataset(data.name, train_x, test_x, data.train_y, data.test_y)
    likelihood = make_likelihood(config.likelihood, sigma=config.sigma, sigma_mode=config.sigma_mode)
    likelihood.check(data.train_x)
    likelihood.check(data.test_x)
    return data


def init_prior(vae: VAE, config: Config, data: Dataset) -> None:
    """With --prior-init data, start the VampPrior's pseudo-inputs at random training examples."""
    if config.prior_init == "data":
        vae.prior.init_from(data.train_x, torch.Generator().manual_seed(config.seed))


def check_run_dir(out: str | Path | None, overwrite: bool = False) -> Path:
    """`out`, or runs/<timestamp>. A non-empty directory is refused, except a pyro-vae run with
    `overwrite` (it is emptied only once the new run is ready to start)."""
    path = Path(out) if out else Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        if not (overwrite and (path / CONFIG).is_file()):
            what = "holds another run" if (path / CONFIG).is_file() else "is not an empty directory"
            hint = "pass --overwrite to replace it, " if (path / CONFIG).is_file() else ""
            raise InputError(f"{path} already exists and {what}; {hint}choose another --out, "
                             "or continue that run with --resume")
    return path


@contextmanager
def _stop_requests():
    """Turn SIGINT/SIGTERM into a request to stop after the current step (a second one stops at
    once). Yields a one-item list holding the signal number, or 0."""
    requested = [0]
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def handler(signum, frame):
        if requested[0]:
            raise KeyboardInterrupt
        requested[0] = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def train(
    config: Config, out: str | Path | None = None, resume: bool = False, progress: bool = True,
    overwrite: bool = False,
) -> RunResult:
    """Train a VAE as `config` says and write the run directory (see DESIGN.md). With resume=True,
    `out` is an existing run whose checkpoint is continued up to config.epochs."""
    config.validate()
    device = resolve_device(config.device)
    out_dir = Path(out) if resume else check_run_dir(out, overwrite)
    state = load_checkpoint(out_dir / CHECKPOINT, device) if resume else None

    pyro.set_rng_seed(config.seed)
    data = prepare_data(config).to(device)
    vae = build_from_config(config, data.shape).to(device)
    elbo = make_estimator(config.estimator, config.particles)
    kl_record = check_analytic_kl(config.estimator, vae.model, vae.guide, data.test_x)
    optimizer = torch.optim.Adam(vae.parameters(), lr=config.lr)
    generator = torch.Generator(device).manual_seed(config.seed)
    epoch, step, batch, metrics = 1, 0, 0, []
    epoch_total = torch.zeros((), device=device)

    if state is not None:
        vae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:
            group["lr"] = config.lr  # --lr may change on resume
        epoch, step, batch = int(state["epoch"]), int(state["step"]), int(state["batch"])
        generator.set_state(state["epoch_generator"].cpu())
        epoch_total = state["epoch_total"].to(device)
        metrics = list(state["metrics"])
        remove_stale_temp_files(out_dir)
        write_jsonl(out_dir / METRICS, metrics)
    else:
        init_prior(vae, config, data)
        if out_dir.exists():
            shutil.rmtree(out_dir)  # only reached with --overwrite on a pyro-vae run
        out_dir.mkdir(parents=True)
        write_json(out_dir / CONFIG, config_record(config, data.shape))

    params = [p for p in vae.parameters() if p.requires_grad]
    n_train = data.train_x.shape[0]
    n_batches = math.ceil(n_train / config.batch_size)
    started = last_save = time.perf_counter()

    def checkpoint(epoch_state: torch.Tensor) -> None:
        """Save everything needed to continue at (epoch, batch) exactly as if never stopped."""
        save_checkpoint(out_dir / CHECKPOINT, {
            "model": vae.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
            "batch": batch, "step": step, "epoch_generator": epoch_state,
            "epoch_total": epoch_total, "metrics": metrics, "rng": get_rng_state(device),
        })

    with _stop_requests() as stop, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Encountered NaN", UserWarning)  # we stop on NaN ourselves
        while epoch <= config.epochs:
            epoch_start = time.perf_counter()
            vae.train()
            epoch_state = generator.get_state()  # everything random in this epoch starts here
            x_epoch = binarize(data.train_x, generator) if config.binarize == "dynamic" else data.train_x
            order = list(batch_indices(n_train, config.batch_size, generator, device))
            if state is not None:  # resuming: random states as they were at the checkpoint
                set_rng_state(state["rng"], device)
                state = None
            bar = tqdm(order[batch:], total=n_batches, initial=batch, disable=not progress,
                       desc=f"epoch {epoch}/{config.epochs}", leave=False)
            for idx in bar:
                x = x_epoch[idx]
                weight = kl_weight(config.beta, config.kl_anneal, step, n_batches)
                try:
                    loss = elbo.differentiable_loss(scale_latents(vae.model, weight),
                                                    scale_latents(vae.guide, weight), x) / x.shape[0]
                except ValueError as err:  # Pyro's check of distribution parameters (NaN/inf)
                    if not is_validation_error(err):
                        raise
                    loss = torch.tensor(math.nan, device=device)
                optimizer.zero_grad(set_to_none=True)
                if loss.requires_grad:
                    loss.backward()
                grads = [p.grad for p in params if p.grad is not None]
                grad_norm = torch.nn.utils.get_total_norm(grads)
                if not bool(torch.isfinite(loss) & torch.isfinite(grad_norm)):
                    raise NumericalFault(
                        f"{locate_nonfinite(vae, x, loss)} at step {step + 1} (epoch {epoch}); this "
                        f"step was not applied and the last good checkpoint is in {out_dir}. Lower "
                        f"--lr (now {config.lr:g}) or clip gradients with --clip-grad (e.g. 10), then "
                        f"continue with: pyro-vae train --resume {out_dir} --lr ..."
                    )
                if config.clip_grad:
                    torch.nn.utils.clip_grads_with_norm_(params, config.clip_grad, grad_norm)
                optimizer.step()
                epoch_total += loss.detach() * x.shape[0]
                step, batch = step + 1, batch + 1
                if batch % POSTFIX_EVERY == 1:
                    bar.set_postfix(loss=f"{loss.item():.2f}")
                if stop[0]:
                    checkpoint(epoch_state)
                    raise Interrupted(stop[0], out_dir, step)
                if config.checkpoint_every and time.perf_counter() - last_save > 60 * config.checkpoint_every:
                    checkpoint(epoch_state)
                    last_save = time.perf_counter()

            vae.eval()
            test = elbo_terms(vae.model, vae.guide, data.test_x)
            row = {
                "epoch": epoch,
                "step": step,
                "train_loss": float(epoch_total) / n_train,
                "test_elbo": None if vae.is_autoencoder else float(test["elbo"].mean()),
                "test_recon": float(test["recon"].mean()),
                "seconds": time.perf_counter() - epoch_start,
            }
            if config.beta != 1.0 or config.kl_anneal:
                row["kl_weight"] = weight
            metrics.append(row)
            epoch, batch, epoch_total = epoch + 1, 0, torch.zeros((), device=device)
            checkpoint(generator.get_state())
            last_save = time.perf_counter()
            write_jsonl(out_dir / METRICS, metrics)
            if progress:
                tested = (f"test reconstruction log p(x|z) {row['test_recon']:.2f}" if vae.is_autoencoder
                          else f"test ELBO {row['test_elbo']:.2f}")
                tqdm.write(f"epoch {row['epoch']}: train loss {row['train_loss']:.2f}, {tested} nats "
                           f"({row['seconds']:.1f} s)")

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
        **(kl_record or {}),
    }
    write_json(out_dir / SUMMARY, summary)
    plots.save_figures(vae, data, out_dir, metrics, seed=config.seed)
    return RunResult(out_dir, metrics, summary)
