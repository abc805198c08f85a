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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pyro
import torch
from torch import Tensor
from torch.utils.data import Subset
from tqdm.auto import tqdm

from . import distributed, plots
from .config import DEVICES, Config
from .data import (
    Dataset,
    ImageStream,
    UnreadableImage,
    batch_indices,
    binarize,
    image_folder_parts,
    load_dataset,
    read_images,
)
from .errors import InputError, TrainingError
from .estimators import check_analytic_kl, make_estimator
from .evaluate import elbo_terms, evaluate
from .faults import NumericalFault, locate_nonfinite
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
from .step import CUDAGraphStep, SVIStep

POSTFIX_EVERY = 10  # steps between progress-bar loss updates
FAULT_CHECK_EVERY = 100  # steps between checks for a non-finite step (each waits for the device)


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
    if name not in DEVICES:
        raise InputError(f"unknown device {name!r}: choose one of {', '.join(DEVICES)}")
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


def prepare_stream(config: Config) -> tuple[ImageStream, Dataset]:
    """With --workers N: the training images of an image folder as an ImageStream that N worker
    processes read batch by batch, and the Dataset with the test images loaded whole (binarized once,
    as prepare_data does) and no training images in memory (train_x is empty)."""
    root = Path(config.dataset)
    if not root.is_dir():
        raise InputError(f"--workers {config.workers} streams the images of a folder, and {config.dataset!r} "
                         "is not one; leave --workers at 0 (the data then lives on the device)")
    if config.binarize == "static" or config.prior_init == "data":
        what = "--binarize static" if config.binarize == "static" else "--prior-init data"
        raise InputError(f"{what} needs the training images in memory; with --workers use --binarize "
                         "dynamic or none and --prior-init noise, or leave --workers at 0")
    train, test = image_folder_parts(root, config.image_size or 28, config.channels)
    train = Subset(train, range(min(config.train_size or len(train), len(train))))
    test_x, test_y = read_images(Subset(test, range(min(config.test_size or len(test), len(test)))), root)
    if config.binarize != "none":
        test_x = binarize(test_x, torch.Generator().manual_seed(config.seed))
    make_likelihood(config.likelihood, sigma=config.sigma, sigma_mode=config.sigma_mode).check(test_x)
    return ImageStream(train, config.workers), Dataset(root.name, test_x[:0], test_x, None, test_y)


def _streamed(stream: ImageStream, order: list[Tensor], start: int, ranks: distributed.Ranks,
              device: torch.device, key: tuple[int, ...] | None) -> Iterator[Tensor]:
    """The batches order[start:] (this process's share of each) read by the stream's workers; with a
    key, binarized, batch b by a generator seeded from (key, b), so a resumed epoch draws the same."""
    lists = [ranks.shard(idx).tolist() for idx in order[start:]]
    for b, x in enumerate(stream.batches(lists, device), start):
        if key is None:
            yield x
        else:
            yield binarize(x, torch.Generator(device).manual_seed(hash((*key, b)) & (2**63 - 1)))


def _stop_on_unreadable(xs: Iterator[Tensor], stop: Callable[[UnreadableImage], None]) -> Iterator[Tensor]:
    """The batches of xs; if the stream meets an image it cannot read, stop(err) (which raises)."""
    try:
        yield from xs
    except UnreadableImage as err:
        stop(err)
        raise


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
    ranks, device = distributed.start(resolve_device(config.device))
    progress = progress and ranks.is_main
    if config.batch_size < ranks.world_size:
        raise InputError(f"--batch-size {config.batch_size} is the global batch, shared by "
                         f"{ranks.world_size} processes; make it at least the number of processes")
    if config.cuda_graph == "on" and (device.type != "cuda" or ranks.active):
        raise InputError("--cuda-graph on needs a CUDA GPU and a single process; "
                         f"this run has {device.type} and {ranks.world_size} process(es): leave it off")
    out_dir = Path(out) if resume else check_run_dir(out, overwrite)
    state = load_checkpoint(out_dir / CHECKPOINT, device) if resume else None

    pyro.set_rng_seed(config.seed)
    stream, data = prepare_stream(config) if config.workers else (None, prepare_data(config))
    data = data.to(device)
    vae = build_from_config(config, data.shape).to(device)
    elbo = make_estimator(config.estimator, config.particles)
    kl_record = check_analytic_kl(config.estimator, vae.model, vae.guide, data.test_x)
    capturable = config.cuda_graph == "on"  # Adam's state on the device, as a CUDA graph needs
    optimizer = torch.optim.Adam(vae.parameters(), lr=config.lr, fused=True, capturable=capturable)
    generator = torch.Generator(device).manual_seed(config.seed)
    epoch, step, batch, metrics = 1, 0, 0, []
    epoch_total = torch.zeros((), device=device)

    if state is not None:
        vae.load_state_dict(state["model"])
        for group in state["optimizer"]["param_groups"]:  # --lr and --cuda-graph may change on resume;
            group.update(lr=config.lr, fused=True, capturable=capturable)  # older runs used plain Adam
        optimizer.load_state_dict(state["optimizer"])
        epoch, step, batch = int(state["epoch"]), int(state["step"]), int(state["batch"])
        generator.set_state(state["epoch_generator"].cpu())
        if ranks.is_main:  # the epoch's loss so far (summed over processes) is counted once
            epoch_total = state["epoch_total"].to(device)
        metrics = list(state["metrics"])
        if ranks.is_main:
            remove_stale_temp_files(out_dir)
            write_jsonl(out_dir / METRICS, metrics)
    else:
        init_prior(vae, config, data)
        ranks.barrier()  # every process has checked the run directory before rank 0 fills it
        if ranks.is_main:
            if out_dir.exists():
                shutil.rmtree(out_dir)  # only reached with --overwrite on a pyro-vae run
            out_dir.mkdir(parents=True)
            write_json(out_dir / CONFIG, config_record(config, data.shape))
    if ranks.active:  # each process draws its own z; model and data order are the same in all
        pyro.set_rng_seed(config.seed + ranks.rank)

    params = [p for p in vae.parameters() if p.requires_grad]
    n_train = len(stream) if stream else data.train_x.shape[0]
    n_batches = math.ceil(n_train / config.batch_size) - ranks.drops_last(n_train, config.batch_size)
    started = last_save = time.perf_counter()

    def loss_fn(x: Tensor, weight: float, per: float) -> Tensor:
        """-ELBO with KL weight `weight`, summed over the examples of x, divided by `per`: the
        examples in x, or with W processes, those in the step's global batch divided by W."""
        return elbo.differentiable_loss(scale_latents(vae.model, weight),
                                        scale_latents(vae.guide, weight), x) / per

    svi_step = SVIStep(ranks.data_parallel(loss_fn, vae, device), optimizer, params, config.clip_grad, device)
    if config.cuda_graph == "on":
        svi_step = CUDAGraphStep(svi_step)

    def check_fault() -> None:
        """Raise NumericalFault naming the first step of this epoch that was not applied, if any."""
        skipped = svi_step.fault(ranks.max)
        if not skipped:
            return
        idx, bad_step = order[batch - skipped], step - skipped
        x = x_epoch[ranks.shard(idx)] if stream is None else \
            next(_streamed(stream, [idx], 0, ranks, device, None))  # read again, not binarized
        weight = kl_weight(config.beta, config.kl_anneal, bad_step, n_batches)
        loss = svi_step.gradients(x, weight, len(idx) / ranks.world_size)  # the model is as that step saw it
        raise NumericalFault(
            f"{locate_nonfinite(vae, x, loss)} at step {bad_step + 1} (epoch {epoch}); this "
            f"step was not applied and the last good checkpoint is in {out_dir}. Lower "
            f"--lr (now {config.lr:g}) or clip gradients with --clip-grad (e.g. 10), then "
            f"continue with: pyro-vae train --resume {out_dir} --lr ..."
        )

    def checkpoint(epoch_state: torch.Tensor) -> None:
        """Save everything needed to continue at (epoch, batch) exactly as if never stopped."""
        check_fault()
        total, rng = ranks.sum(epoch_total), ranks.gather(get_rng_state(device))
        if ranks.is_main:
            save_checkpoint(out_dir / CHECKPOINT, {
                "model": vae.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                "batch": batch, "step": step, "epoch_generator": epoch_state,
                "epoch_total": total, "metrics": metrics, "rng": rng[0],
                **({"rng_ranks": rng} if ranks.active else {}),
            })

    def unreadable(err: UnreadableImage) -> None:
        """A streamed image cannot be read: checkpoint after the last step (one process; with several,
        the others wait in the next all-reduce, so the last checkpoint stands) and say which file."""
        if not ranks.active:
            checkpoint(epoch_state)
        saved = "the last checkpoint is in" if ranks.active else "a checkpoint was saved in"
        raise TrainingError(f"{err} at step {step + 1} (epoch {epoch}); {saved} {out_dir}; replace the "
                            "file with a readable image (or delete it) and continue with: pyro-vae train "
                            f"--resume {out_dir}") from None

    with _stop_requests() as stop, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Encountered NaN", UserWarning)  # we stop on NaN ourselves
        while epoch <= config.epochs:
            epoch_start = time.perf_counter()
            vae.train()
            epoch_state = generator.get_state()  # everything random in this epoch starts here
            x_epoch = binarize(data.train_x, generator) if config.binarize == "dynamic" else data.train_x
            order = list(batch_indices(n_train, config.batch_size, generator, device))
            order = order[:n_batches]  # with several processes, a last batch too small to share goes
            if state is not None:  # resuming: random states as they were at the checkpoint
                if (rng := ranks.rng_state(state)) is not None:
                    set_rng_state(rng, device)
                state = None
            key = (config.seed, epoch, ranks.rank) if config.binarize == "dynamic" else None
            xs = (x_epoch[ranks.shard(idx)] for idx in order[batch:]) if stream is None else \
                _stop_on_unreadable(_streamed(stream, order, batch, ranks, device, key), unreadable)
            bar = tqdm(zip(order[batch:], xs, strict=True), total=n_batches, initial=batch,
                       disable=not progress, desc=f"epoch {epoch}/{config.epochs}", leave=False)
            for idx, x in bar:
                per = len(idx) / ranks.world_size
                weight = kl_weight(config.beta, config.kl_anneal, step, n_batches)
                loss = svi_step(x, weight, per)
                epoch_total += loss * per
                step, batch = step + 1, batch + 1
                if progress and batch % POSTFIX_EVERY == 1:
                    bar.set_postfix(loss=f"{loss.item():.2f}")
                if step % FAULT_CHECK_EVERY == 0:
                    check_fault()
                minutes = (time.perf_counter() - last_save) / 60
                due = bool(config.checkpoint_every) and minutes > config.checkpoint_every
                signum, due = ranks.agree(step, stop[0], due)  # with several processes: the same step
                if signum:
                    checkpoint(epoch_state)
                    raise Interrupted(signum, out_dir, step)
                if due:
                    checkpoint(epoch_state)
                    last_save = time.perf_counter()

            check_fault()
            vae.eval()
            test = elbo_terms(vae.model, vae.guide, data.test_x)
            row = {
                "epoch": epoch,
                "step": step,
                "train_loss": float(ranks.sum(epoch_total)) / n_train,
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
            if ranks.is_main:
                write_jsonl(out_dir / METRICS, metrics)
            if progress:
                tested = (f"test reconstruction log p(x|z) {row['test_recon']:.2f}" if vae.is_autoencoder
                          else f"test ELBO {row['test_elbo']:.2f}")
                tqdm.write(f"epoch {row['epoch']}: train loss {row['train_loss']:.2f}, {tested} nats "
                           f"({row['seconds']:.1f} s)")

    ranks.barrier()  # the last checkpoint is written
    if not ranks.is_main:  # rank 0 evaluates and writes the summary and figures
        return RunResult(out_dir, metrics, {})
    vae.eval()
    final = evaluate(vae, data.test_x, k=config.eval_k, progress=progress)
    summary = {
        **final,
        "epochs": metrics[-1]["epoch"] if metrics else 0,
        "steps": step,
        "train_loss": metrics[-1]["train_loss"] if metrics else None,
        "train_seconds": time.perf_counter() - started,
        "device": str(device),
        "processes": ranks.world_size,
        "n_train": n_train,
        **(kl_record or {}),
    }
    write_json(out_dir / SUMMARY, summary)
    plots.save_figures(vae, data, out_dir, metrics, seed=config.seed)
    return RunResult(out_dir, metrics, summary)
