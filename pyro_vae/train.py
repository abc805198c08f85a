"""The SVI training loop. `Trainer(...)` prepares a run (device, data, the model its kind builds, the
optimizer and step, the run directory locked: checkpoints.py); `run()` trains epoch by epoch (`run_epoch`,
each `step`, `end_epoch`) and ends with `finish`; a reader follows it top to bottom. What differs
between kinds of model is asked of the run's kind (models/kind.py), early stopping is early_stopping.py,
and each epoch's row goes to the epoch report (epoch_report.py: metrics.jsonl, TensorBoard, the
progress line, and any reporter added to it, e.g. MLflow: tracking.py).

Training uses Pyro's ELBO as a differentiable loss and a torch optimizer over the model's parameters
(not pyro.optim). The loss of a step is -ELBO summed over the batch divided by the batch size: nats
per example, like every number this package reports. The model is pyro-vae's own VAE, built from the
config, or a user's own model/guide pair (program.py states the contract), whose parameters are the
tensors its param sites use.

A run survives interruption: a checkpoint (parameters, optimizer, every random-number state, position
inside the epoch, metrics) is written atomically at the end of every epoch, every `checkpoint_every`
minutes, and when SIGINT/SIGTERM arrives (after the current step). Resuming from any of them gives,
on CPU, bit-identical parameters and metrics to an uninterrupted run.

With a validation set (--validation-size) each epoch's row also holds the validation ELBO; with
--early-stop PATIENCE the parameters of the epoch with the best validation ELBO are kept in best.pt
(written like checkpoint.pt), training stops once PATIENCE epochs in a row have not beaten it (the
count and the best epoch live in the checkpoint, so a resumed run continues them), and the final
evaluation and figures describe the model in best.pt.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
import time
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyro
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import distributed, plots
from .board import check_available as check_tensorboard
from .checkpoints import TrainingDirectory
from .config import Config
from .data import UnreadableImage, batch_indices, binarize
from .device import resolve_device
from .early_stopping import EarlyStopping
from .epoch_report import (
    EpochReport,
    EpochView,
    MetricsFile,
    ProgressLine,
    Reporter,
    RunView,
    TensorBoardReport,
)
from .errors import InputError, TrainingError
from .estimators import check_analytic_kl
from .exemplar import EAGER_PRIORS, leave_out, use_training_set
from .faults import NumericalFault, locate_nonfinite
from .kl_weight import kl_weight, scale_latents
from .models.kind import PAIR, ModelKind, model_kind
from .models.vae import init_prior
from .optim import make_optimizer
from .program import Program
from .rng import forked_rng, get_rng_state, set_rng_state
from .run_dir import (
    BEST,
    CHECKPOINT,
    build_from_config,
    check_data_shape,
    config_record,
    describe_pair,
    load_parameters,
    pair_parameters,
    restore_parameters,
)
from .step import CUDAGraphStep, SVIStep
from .train_data import prepare_data, prepare_stream, stop_on_unreadable, streamed

__all__ = ["Interrupted", "RunResult", "Trainer", "init_prior", "prepare_data", "train"]

POSTFIX_EVERY = 10  # steps between progress-bar loss updates
FAULT_CHECK_EVERY = 100  # steps between checks for a non-finite step (each waits for the device)


class Interrupted(TrainingError):
    """SIGINT or SIGTERM arrived; a checkpoint was written after the step in progress."""

    def __init__(self, signum: int, out: Path, step: int, resume: str):
        self.signum, self.out, self.step = signum, out, step
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint "
                         f"saved; resume with: {resume}")


@dataclass
class RunResult:
    """Where a run was written and what it measured."""

    out: Path
    metrics: list[dict]
    summary: dict
    kind: ModelKind = PAIR  # the model's kind: what its summary holds (ModelKind.result_line)


@contextmanager
def _stop_requests(requested: list[int]):
    """Turn SIGINT/SIGTERM into a request to stop after the current step, recorded in `requested` (a
    one-item list holding the signal number, or 0); a second one stops at once."""
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
    overwrite: bool = False, program: object | None = None, tensorboard: bool = False,
    reporters: Sequence[Reporter] = (),
) -> RunResult:
    """Train as `config` says and write the run directory (see DESIGN.md). The model is pyro-vae's own
    VAE built from the config or, with `program`, a user's own model/guide pair (an object with .model
    and .guide, or a Program), trained in place: an nn.Module pair is moved to the config's device,
    another must live there already. With resume=True, `out` is an existing run whose checkpoint is
    continued up to config.epochs (a pair's run: pass the same pair again, or one built the same way).
    With tensorboard=True, TensorBoard event files go to RUN/tensorboard/ (board.py). `reporters`
    (epoch_report.Reporter: tracking.MLflowTracker, grid_ray's Tune reporter) join the epoch report (the
    main process only): told when the run starts, of each epoch's row, and of summary.json."""
    return Trainer(config, out, resume, progress, overwrite, program, tensorboard, reporters).run()


class Trainer:
    """One training run. Everything it holds is made in __init__, which prepares the run in the order
    below (a failure leaves nothing half-written and releases the run directory); `run` trains and
    finishes. The loop's position (epoch, steps, batch in the epoch), the metrics and the random state
    the epoch started from change as it trains, and are what a checkpoint holds."""

    def __init__(self, config: Config, out: str | Path | None = None, resume: bool = False,
                 progress: bool = True, overwrite: bool = False, program: object | None = None,
                 tensorboard: bool = False, reporters: Sequence[Reporter] = ()):
        # what differs between kinds of model: pyro-vae's own kind that config.model names, or a pair's
        self.kind: ModelKind = model_kind(config.model) if program is None else PAIR
        self.own_model = program is None
        self.stop = [0]  # the signal that asked to stop after the current step, or 0
        self.reason: str | None = None  # why training ended (stop_reason), once it has
        config.validate()
        if not self.own_model:
            self.kind.check(config)  # a pair brings its own networks
        if tensorboard:
            check_tensorboard()  # before anything is written
        self.ranks, self.device = distributed.start(resolve_device(config.device))
        self.progress = progress and self.ranks.is_main
        self.cuda_graph = self._use_cuda_graph(config)
        self.dir = TrainingDirectory(out, resume, overwrite, self.ranks.is_main, self.own_model)
        try:
            self._prepare(config, program, tensorboard, reporters)
        except BaseException as err:
            self.dir.discard_unstarted(err)
            self.dir.close()
            raise

    def _prepare(self, config: Config, program: object | None, tensorboard: bool,
                 reporters: Sequence[Reporter]) -> None:
        """The run directory (locked), its checkpoint if resumed, the data, the model and its optimizer,
        where training starts (a checkpoint's position, or a fresh config.json), the epoch report and
        the training step; last, the reporters are told the run starts."""
        self.dir.open()
        state = self.dir.resumed_state(self.device, config.epochs)
        pyro.set_rng_seed(config.seed)
        self.stream, data = (prepare_stream(config) if config.workers
                             else (None, prepare_data(config, self.kind)))
        self.data = data.to(self.device)
        if state is not None:
            check_data_shape(self.out, self.data.shape)
        # a copy with what the kind reads off the data (e.g. the number of classes): recorded in
        # config.json, the model is rebuilt from it; the caller's Config is left as it was
        self.config = config = dataclasses.replace(config, **self.kind.derive(config, self.data))
        self.labels = self.data.train_y if self.kind.labelled else None
        self.pair, self.program, self.sites, self.params = self._build_model(program)
        self.elbo = self.kind.objective(config)
        self.kl_record = check_analytic_kl(config.estimator, self.program.model, self.program.guide,
                                           self.data.test_x, *self._test_conditions())
        self.optimizer = make_optimizer(config.optimizer, self.params.values(), lr=config.lr, fused=True,
                                        capturable=self.cuda_graph)  # state on the device, as a graph needs
        self.generator = torch.Generator(self.device).manual_seed(config.seed)
        # the position: the next epoch and batch, the steps taken; the epoch's loss so far; the metrics
        self.epoch, self.batch, self.steps, self.metrics = 1, 0, 0, []
        self.epoch_total = torch.zeros((), device=self.device)
        self.early = EarlyStopping(config.early_stop, rule=config.early_stop_rule, warmup=config.kl_anneal)
        # wall time of the run's earlier sessions (a resumed run's checkpoint): in all, and in the epoch
        # the checkpoint stopped in; this session's clock starts at the end of __init__
        self.seconds_before, self.epoch_seconds_before, self.epoch_started = 0.0, 0.0, 0.0
        self.resumed_rng = None  # this process's random state at the checkpoint, set once its epoch starts
        if state is not None:
            self._continue_from(state)
        else:
            self._start_run_dir()
        self.report = self._epoch_report(tensorboard, reporters)
        if self.ranks.active:  # each process draws its own z; model and data order are the same in all
            pyro.set_rng_seed(config.seed + self.ranks.rank)
        self.n_train = len(self.stream) if self.stream else self.data.train_x.shape[0]
        self.n_batches = (math.ceil(self.n_train / config.batch_size)
                          - self.ranks.drops_last(self.n_train, config.batch_size))
        self.total_steps = config.epochs * self.n_batches  # what the kind's schedule runs over
        module = self.pair if self.own_model else self.program.owner  # DDP averages its gradients
        self.svi_step = SVIStep(self.ranks.data_parallel(self._loss, module, self.device), self.optimizer,
                                list(self.params.values()), config.clip_grad, self.device)
        if self.cuda_graph:
            self.svi_step = CUDAGraphStep(self.svi_step)
        # the epoch in progress: its random state at the start, its images and its order of batches
        self.epoch_state, self.x_epoch, self.order = self.generator.get_state(), self.data.train_x, []
        self.started = self.last_save = time.perf_counter()
        self.report.start(RunView(self.out, config, self.device, state is not None, list(self.metrics)))

    @property
    def out(self) -> Path:
        """The run directory."""
        return self.dir.out

    def run(self) -> RunResult:
        """Every epoch left up to config.epochs, then finish; the run directory locked throughout."""
        with self.dir:
            try:
                with _stop_requests(self.stop), warnings.catch_warnings():
                    warnings.filterwarnings("ignore", "Encountered NaN", UserWarning)  # we stop on NaN
                    while (reason := self.stop_reason()) is None:
                        self.run_epoch()
                    self.reason = reason
            except BaseException as err:
                self.dir.discard_unstarted(err)
                raise
            return self.finish()

    def request_stop(self, signum: int = signal.SIGINT) -> None:
        """Stop after the step in progress, as SIGINT/SIGTERM `signum` does: a checkpoint is written and
        Interrupted raised (the CLI exits 128 + signum). Safe to call from another thread or a step hook."""
        self.stop[0] = signum

    # -- preparing the run ---------------------------------------------------------------------------

    def _use_cuda_graph(self, config: Config) -> bool:
        """Refuse what this run cannot do (more processes than examples in a batch, a CUDA graph off a
        single GPU or for a kind that runs eagerly); whether the step is captured as a CUDA graph (auto:
        where the kind knows it holds, one GPU, one process: measured equal to eager and 10x faster for
        the VAE, docs/scaling.md; a user's pair only when asked for)."""
        ranks, device = self.ranks, self.device
        if config.batch_size < ranks.world_size:
            raise InputError(f"--batch-size {config.batch_size} is the global batch, shared by "
                             f"{ranks.world_size} processes; make it at least the number of processes")
        if config.cuda_graph == "on" and (device.type != "cuda" or ranks.active):
            raise InputError("--cuda-graph on needs a CUDA GPU and a single process; "
                             f"this run has {device.type} and {ranks.world_size} process(es): leave it off")
        if config.cuda_graph == "on" and self.kind.eager:
            raise InputError(f"--cuda-graph on captures the VAE's step; --model {self.kind.name} runs "
                             "eagerly: leave --cuda-graph at auto or off")
        return config.cuda_graph == "on" or (
            config.cuda_graph == "auto" and self.kind.auto_cuda_graph and device.type == "cuda"
            and not ranks.active and config.prior not in EAGER_PRIORS)

    def _build_model(self, program: object | None) -> tuple[object, Program, object, dict[str, Tensor]]:
        """The model the kind builds from the config, or the user's pair moved to the device; the pair as
        a Program, its sites (found by tracing; None without a latent) and the tensors the optimizer
        steps, by name. An exemplar prior in the model gets the training images as its exemplars
        (exemplar.py; a resumed run's checkpoint then loads over them)."""
        x = self.data.test_x
        pair = build_from_config(self.config, self.data.shape).to(self.device) if self.own_model else program
        use_training_set(pair, self.data.train_x)
        as_program = Program.of(pair)
        owner = as_program.owner
        if not self.own_model and self.ranks.active and not isinstance(owner, nn.Module):
            raise InputError("several processes (torchrun) average the gradients of an nn.Module's "
                             "parameters; make your model/guide pair an nn.Module, or train in one process")
        if isinstance(owner, nn.Module):
            owner.to(self.device)
        # the sites and parameters are found by tracing once, in eval mode (no batch statistics change),
        # without drawing from the run's random stream (a run replays exactly)
        _train_mode(pair if self.own_model else owner, False)
        with forked_rng(self.device):
            sites = as_program.sites(x, *self._test_conditions(pair)) if self.kind.latent else None
            params = dict(pair.named_parameters()) if self.own_model else pair_parameters(as_program, x)
        return pair, as_program, sites, {name: p for name, p in params.items() if p.requires_grad}

    def _continue_from(self, state: dict) -> None:
        """Restore parameters, optimizer, position, the epoch's random state, metrics and early stopping."""
        self._load(state, self.out / CHECKPOINT)
        for group in state["optimizer"]["param_groups"]:  # --lr and --cuda-graph may change on resume;
            group.update(lr=self.config.lr, fused=True,  # older runs used plain Adam
                         capturable=self.cuda_graph)
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.steps, self.batch = int(state["epoch"]), int(state["step"]), int(state["batch"])
        self.generator.set_state(state["epoch_generator"].cpu())
        if self.ranks.is_main:  # the epoch's loss so far (summed over processes) is counted once
            self.epoch_total = state["epoch_total"].to(self.device)
        self.metrics = list(state["metrics"])
        self.early = EarlyStopping(self.config.early_stop, state.get("early_stop"),
                                   rule=self.config.early_stop_rule, warmup=self.config.kl_anneal)
        # checkpoints before pyro-vae recorded the seconds: the sum of their whole epochs' seconds
        self.seconds_before = float(state.get("seconds", sum(m.get("seconds") or 0.0 for m in self.metrics)))
        self.epoch_seconds_before = float(state.get("epoch_seconds", 0.0))
        self.resumed_rng = self.ranks.rng_state(state)
        self.dir.continue_run(self.metrics, self.steps)

    def _start_run_dir(self) -> None:
        """A fresh run: what the kind sets from the training data (the VampPrior's pseudo-inputs with
        --prior-init data), the run directory and config.json."""
        if self.own_model:
            self.kind.start(self.pair, self.config, self.data)
        self.ranks.barrier()  # every process has checked the run directory before rank 0 fills it
        pair = None if self.own_model else describe_pair(self.program, self.sites)
        self.dir.start(config_record(self.config, self.data.shape, pair))

    def _epoch_report(self, tensorboard: bool, reporters: Sequence[Reporter]) -> EpochReport:
        """Where each epoch's row goes (the main process only): metrics.jsonl, TensorBoard if asked for,
        the progress line if shown, then the caller's `reporters` (e.g. MLflow). Another reporter is
        added here (or with report.add)."""
        if not self.ranks.is_main:
            return EpochReport()
        return EpochReport([MetricsFile(self.out), *([TensorBoardReport(self.out)] if tensorboard else []),
                            *([ProgressLine()] if self.progress else []), *reporters])

    # -- one epoch, one step -------------------------------------------------------------------------

    def run_epoch(self) -> None:
        """The steps of the current epoch from self.batch on (0, or where a checkpoint stopped), each
        followed by the checks and the checkpoints that are due; then end_epoch."""
        config, ranks = self.config, self.ranks
        started = self.epoch_started = time.perf_counter() - self.epoch_seconds_before  # a resumed epoch's
        self.epoch_seconds_before = 0.0  # seconds before the checkpoint count in it
        self._train_mode(True)
        self.epoch_state = self.generator.get_state()  # everything random in this epoch starts here
        self.x_epoch = binarize(self.data.train_x, self.generator) if config.binarize == "dynamic" \
            else self.data.train_x
        order = list(batch_indices(self.n_train, config.batch_size, self.generator, self.device))
        self.order = order[:self.n_batches]  # with several processes, a last batch too small to share goes
        if self.resumed_rng is not None:  # resuming: random states as they were at the checkpoint
            set_rng_state(self.resumed_rng, self.device)
            self.resumed_rng = None
        bar = tqdm(zip(self.order[self.batch:], self._batches(), strict=True), total=self.n_batches,
                   initial=self.batch, disable=not self.progress, desc=f"epoch {self.epoch}/{config.epochs}",
                   leave=False)
        for idx, x in bar:
            loss = self.step(idx, x)
            if self.progress and self.batch % POSTFIX_EVERY == 1:
                bar.set_postfix(loss=f"{loss.item():.2f}")
            if self.steps % FAULT_CHECK_EVERY == 0:
                self._check_fault()
            minutes = (time.perf_counter() - self.last_save) / 60
            due = bool(config.checkpoint_every) and minutes > config.checkpoint_every
            signum, due = ranks.agree(self.steps, self.stop[0], due)  # several processes: the same step
            if signum:
                self.checkpoint()
                raise Interrupted(signum, self.out, self.steps, self.dir.resume_hint())
            if due:
                self.checkpoint()
                self.last_save = time.perf_counter()
        self.end_epoch(started)

    def step(self, idx: Tensor, x: Tensor) -> Tensor:
        """One SVI step on x, this process's share of the global batch `idx`; returns its loss (-ELBO
        per example, on the device)."""
        per = len(idx) / self.ranks.world_size
        schedule = self.kind.schedule(self.config, self.steps, self.total_steps)  # e.g. M2's temperature
        with leave_out(self.pair, self.ranks.shard(idx)):  # the exemplar prior skips each example's own
            loss = self.svi_step(x, self._kl_weight(self.steps), per, *self._inputs(idx, x), **schedule)
        self.epoch_total += loss * per
        self.steps, self.batch = self.steps + 1, self.batch + 1
        self.report.step(self.steps, loss)
        return loss

    def end_epoch(self, started: float) -> None:
        """The epoch's row of metrics (train loss, what the kind measures on the test set, ...), early
        stopping's count, the checkpoint at the next epoch's start, then the epoch report."""
        self._check_fault()
        self._train_mode(False)
        row = {"epoch": self.epoch, "step": self.steps,
               "train_loss": float(self.ranks.sum(self.epoch_total)) / self.n_train}
        row.update(self.kind.test_metrics(self.program, self.data))
        row.update(self.kind.schedule(self.config, self.steps - 1, self.total_steps))  # the last step's
        row["seconds"] = time.perf_counter() - started
        if self.config.beta != 1.0 or self.config.kl_anneal:
            row["kl_weight"] = self._kl_weight(self.steps - 1)  # that of the epoch's last step
        if self.data.val_x is not None and self.kind.latent:
            row["validation_elbo"] = self.validation_elbo()
            if self.config.early_stop is not None:
                if self.early.update(self.epoch, row["validation_elbo"]):
                    self.dir.save_best({"model": self._parameters(), "epoch": self.epoch, "step": self.steps,
                                        "validation_elbo": row["validation_elbo"]})
                row["best_epoch"] = self.early.best_epoch
        self.metrics.append(row)
        self.epoch, self.batch = self.epoch + 1, 0
        self.epoch_total = torch.zeros((), device=self.device)
        self.epoch_state = self.generator.get_state()  # where the next epoch starts
        self.checkpoint()
        self.last_save = time.perf_counter()
        self.report.epoch(row, EpochView(self.metrics, self.program, self.kind, self.data.test_x,
                                         self.config.seed))

    def validation_elbo(self) -> float:
        """The ELBO per example on the validation set (one draw of z per example; unweighted KL); with
        several processes, their mean, so that all of them stop at the same epoch."""
        value = self.kind.validation_elbo(self.program, self.data)
        return float(self.ranks.sum(value)) / self.ranks.world_size

    def stop_reason(self) -> str | None:
        """Why training ends before the next epoch: "epochs" (--epochs done), "early_stop" (--early-stop's
        patience ran out) or "time_budget" (--time-budget minutes of wall time, all sessions, spent); None
        while it goes on. Asked at epoch ends only, so the last epoch is always whole."""
        if self.epoch > self.config.epochs:
            return "epochs"
        if self.early.stopped():
            return "early_stop"
        budget = self.config.time_budget
        if budget is None:
            return None
        spent = int(self.elapsed() >= 60.0 * budget)
        # several processes stop at the same epoch end: as soon as one of their clocks is past the budget
        return "time_budget" if self.ranks.agree(0, spent)[0] else None

    def _parameters(self) -> dict[str, Tensor]:
        """The trained parameters as checkpoints hold them (a pair's by param-store name)."""
        return self.pair.state_dict() if self.own_model else {n: p.detach() for n, p in self.params.items()}

    def _load(self, state: dict, path: Path) -> None:
        """Load a checkpoint's (or best.pt's) parameters into the model (a pair's into its tensors)."""
        if self.own_model:
            load_parameters(self.pair, state["model"], path)
        else:
            restore_parameters(self.params, state["model"], path)

    def _loss(self, x: Tensor, weight: float, per: float, *labels: Tensor, **schedule: float) -> Tensor:
        """-ELBO with KL weight `weight` on every latent site, summed over the examples of x, divided by
        `per`: the examples in x, or with W processes, those in the step's global batch divided by W.
        `labels` (M2, the classifier) go to model and guide after x, and the kind's `schedule` of the
        step (M2's temperature) as keyword arguments."""
        if self.sites is None:  # nothing latent to weight
            return self.elbo.differentiable_loss(self.program.model, self.program.guide, x, *labels,
                                                 **schedule) / per
        latent = self.sites.latent
        model, guide = (scale_latents(fn, weight, latent) for fn in (self.program.model, self.program.guide))
        return self.elbo.differentiable_loss(model, guide, x, *labels, **schedule) / per

    def _labels(self, idx: Tensor) -> tuple[Tensor, ...]:
        """The labels of this process's share of batch `idx` (UNLABELLED where none), as the one extra
        argument of model and guide; () for a model without labels."""
        return () if self.labels is None else (self.labels[self.ranks.shard(idx)],)

    def _inputs(self, idx: Tensor, x: Tensor) -> tuple[Tensor, ...]:
        """What model and guide take after the batch x, this process's share of batch `idx`: the labels
        (_labels), then the kind's condition made from x and their labels (a conditional VAE's c)."""
        train_y = self.data.train_y
        y = None if train_y is None or self.stream is not None else train_y[self.ranks.shard(idx)]
        return (*self._labels(idx), *self.kind.conditions(self.pair, x, y))

    def _test_conditions(self, pair: object | None = None) -> tuple[Tensor, ...]:
        """The kind's condition of the test images (ModelKind.conditions), for tracing and checks."""
        return self.kind.conditions(self.pair if pair is None else pair, self.data.test_x, self.data.test_y)

    def _kl_weight(self, step: int) -> float:
        """The KL weight of step `step` (counted from 0 over the whole run)."""
        return kl_weight(self.config.beta, self.config.kl_anneal, step, self.n_batches)

    def _batches(self):
        """This process's share of each batch of the epoch's order from self.batch on: rows of the
        training images on the device, or read by the stream's workers."""
        if self.stream is None:
            return (self.x_epoch[self.ranks.shard(idx)] for idx in self.order[self.batch:])
        key = (self.config.seed, self.epoch, self.ranks.rank) if self.config.binarize == "dynamic" else None
        batches = streamed(self.stream, self.order, self.batch, self.ranks, self.device, key)
        return stop_on_unreadable(batches, self._unreadable)

    def _train_mode(self, training: bool) -> None:
        """Dropout and the like on (training) or off, where the pair is an nn.Module."""
        _train_mode(self.pair if self.own_model else self.program.owner, training)

    # -- checkpoint, faults --------------------------------------------------------------------------

    def checkpoint(self) -> None:
        """Save everything needed to continue at (epoch, batch) exactly as if never stopped: the
        parameters (a pair's by param-store name), the optimizer, the position, the random state the
        epoch started from and every process's current one, the epoch's loss so far, the metrics,
        early stopping's count."""
        self._check_fault()
        total, rng = self.ranks.sum(self.epoch_total), self.ranks.gather(get_rng_state(self.device))
        if not self.ranks.is_main:
            return
        self.dir.save({
            "model": self._parameters(), "optimizer": self.optimizer.state_dict(), "epoch": self.epoch,
            "batch": self.batch, "step": self.steps, "epoch_generator": self.epoch_state,
            "epoch_total": total, "metrics": self.metrics, "rng": rng[0], "seconds": self.elapsed(),
            "epoch_seconds": time.perf_counter() - self.epoch_started if self.batch else 0.0,
            **({"rng_ranks": rng} if self.ranks.active else {}),
            **self.early.record(),
        })

    def elapsed(self) -> float:
        """The run's wall time so far in seconds, summed over its sessions (a checkpoint carries the sum
        up to it): each session from the end of its preparation to its last checkpoint (the last
        session: to summary.json), so epochs, their test ELBO, checkpoints and the final evaluation
        count; preparation, figures, a session's time after its last checkpoint and the time between
        sessions do not."""
        return self.seconds_before + time.perf_counter() - self.started

    def _check_fault(self) -> None:
        """Raise NumericalFault naming the first step of this epoch that was not applied, if any."""
        skipped = self.svi_step.fault(self.ranks.max)
        if not skipped:
            return
        idx, bad_step = self.order[self.batch - skipped], self.steps - skipped
        x = self.x_epoch[self.ranks.shard(idx)] if self.stream is None else \
            next(streamed(self.stream, [idx], 0, self.ranks, self.device, None))  # read again, not binarized
        per = len(idx) / self.ranks.world_size
        # the model as that step saw it
        with leave_out(self.pair, self.ranks.shard(idx)):
            loss = self.svi_step.gradients(x, self._kl_weight(bad_step), per, *self._inputs(idx, x),
                                           **self.kind.schedule(self.config, bad_step, self.total_steps))
        where = locate_nonfinite(self.program, self.params, x, loss, *self._inputs(idx, x))
        raise NumericalFault(
            f"{where} at step {bad_step + 1} (epoch "
            f"{self.epoch}); this step was not applied and the last good checkpoint is in {self.out}. "
            f"Lower --lr (now {self.config.lr:g}) or clip gradients with --clip-grad (e.g. 10), then "
            f"continue with: {self.dir.resume_hint()} --lr ..."
        )

    def _unreadable(self, err: UnreadableImage) -> None:
        """A streamed image cannot be read: checkpoint after the last step (one process; with several,
        the others wait in the next all-reduce, so the last checkpoint stands) and say which file."""
        if not self.ranks.active:
            self.checkpoint()
        saved = "the last checkpoint is in" if self.ranks.active else "a checkpoint was saved in"
        raise TrainingError(f"{err} at step {self.steps + 1} (epoch {self.epoch}); {saved} {self.out}; "
                            "replace the file with a readable image (or delete it) and continue with: "
                            f"{self.dir.resume_hint()}") from None

    # -- finish --------------------------------------------------------------------------------------

    def _restore_best(self) -> dict:
        """With early stopping, load best.pt's parameters into the pair and say what they are (for
        summary.json: best_epoch, its validation ELBO, whether training stopped early); else {}."""
        state = self.dir.best(self.device) if self.config.early_stop is not None else None
        if state is None:
            return {}
        self._load(state, self.out / BEST)
        return {"best_epoch": int(state["epoch"]), "best_step": int(state["step"]),
                "best_validation_elbo": float(state["validation_elbo"]),
                "stopped_early": self.early.stopped()}

    def finish(self) -> RunResult:
        """Rank 0 evaluates the trained model (with early stopping: the best one, from best.pt, left in
        the pair) on the test set as its kind says (ELBO, log p(x), accuracy ...) and writes the figures
        and summary.json; the other processes return once the last checkpoint is written."""
        self.ranks.barrier()
        if not self.ranks.is_main:
            return RunResult(self.out, self.metrics, {}, self.kind)
        self._train_mode(False)
        best = self._restore_best()
        program = Program.of(self.pair)  # traced afresh, as evaluate_run does
        if self.kind.latent:
            program.sites(self.data.test_x, *self._test_conditions())
        final, _ = self.kind.evaluate(program, self.data, self.config.eval_k, self.progress)
        summary = {
            **final,
            **self.kind.training_record(self.data),
            "epochs": self.metrics[-1]["epoch"] if self.metrics else 0,
            "steps": self.steps,
            "train_loss": self.metrics[-1]["train_loss"] if self.metrics else None,
            "train_seconds": self.elapsed(),
            "stop_reason": self.reason,
            "time_budget_minutes": self.config.time_budget,
            "device": str(self.device),
            "processes": self.ranks.world_size,
            "cuda_graph": self.cuda_graph,
            "n_train": self.n_train,
            **(self.kl_record or {}),
            **best,
        }
        self.report.close()
        if self.kind.figures:
            plots.save_figures(self.pair, self.data, self.out, self.metrics, seed=self.config.seed,
                               kind=self.kind)
        self.dir.write_summary(summary)  # last: a run stopped before it resumes to write them all
        self.report.finish(summary)  # e.g. MLflow logs summary.json and the figures
        return RunResult(self.out, self.metrics, summary, self.kind)


def _train_mode(module: object, training: bool) -> None:
    """Dropout and the like on (training) or off, where `module` is an nn.Module."""
    if isinstance(module, nn.Module):
        module.train(training)
